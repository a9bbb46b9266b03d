//! `hearth-init function-exec UID GID PATH`: starts the function's runtime in its own pid and mount
//! namespaces, as its own uid/gid, under the function seccomp profile.
//!
//! The init spawns this helper (itself, re-executed: a fresh single-threaded process, where `fork`
//! is safe) with the runtime's environment, folder and pipes already in place. The helper unshares
//! the pid and mount namespaces and forks; the child, PID 1 of the new pid namespace, mounts its own
//! `/proc` (so the function sees only its own processes), drops to the function's uid/gid, asks to
//! be killed if the helper dies, installs the seccomp profile and executes the runtime. The helper
//! waits and ends the way the runtime ended (same exit code, or the same signal), so the init sees
//! the runtime's own status.
//!
//! The network namespace is kept: the runtime must reach the Runtime API on the loopback, and has
//! the sandbox's network when one is configured.

use std::ffi::{CString, OsString};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;

use super::RuntimeError;

/// The helper's first argument.
pub const ROLE: &str = "function-exec";

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> RuntimeError {
    move |source| RuntimeError::Container { step, source }
}

/// Runs the helper; returns its exit code.
pub(crate) fn function_exec(args: &[OsString]) -> Result<i32, RuntimeError> {
    let arg = |i: usize| args.get(i).and_then(|a| a.to_str());
    let bad = || RuntimeError::Container {
        step: "function-exec arguments",
        source: io::Error::new(io::ErrorKind::InvalidInput, "expected UID GID PATH"),
    };
    let uid: u32 = arg(2).and_then(|a| a.parse().ok()).ok_or_else(bad)?;
    let gid: u32 = arg(3).and_then(|a| a.parse().ok()).ok_or_else(bad)?;
    let path = args.get(4).ok_or_else(bad)?.clone();

    // SAFETY: unshare changes only this single-threaded process's namespaces.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS) })
        .map_err(step("unshare"))?;
    // SAFETY: this process is single-threaded (freshly executed, no threads started).
    let child = cvt(unsafe { libc::fork() }).map_err(step("fork"))?;
    if child == 0 {
        let err = match exec_runtime(uid, gid, &path) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        let _ = writeln!(io::stderr(), "hearth-init function-exec: {err}");
        std::process::exit(127);
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(step("wait")(e));
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // End the same way, so the init reports the runtime's signal.
        // SAFETY: resetting a signal's disposition and signalling ourselves.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
        }
        return Ok(128 + sig);
    }
    Ok(libc::WEXITSTATUS(status))
}

enum Never {}

fn exec_runtime(uid: u32, gid: u32, path: &OsString) -> Result<Never, RuntimeError> {
    let empty = CString::default();
    let root = CString::new("/").map_err(|e| step("path")(e.into()))?;
    let proc_ = CString::new("/proc").map_err(|e| step("path")(e.into()))?;
    let proc_fs = CString::new("proc").map_err(|e| step("path")(e.into()))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    cvt(unsafe {
        libc::mount(
            empty.as_ptr(),
            root.as_ptr(),
            empty.as_ptr(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
    .map_err(step("make / private"))?;
    // SAFETY: as above.
    cvt(unsafe {
        libc::mount(
            proc_fs.as_ptr(),
            proc_.as_ptr(),
            proc_fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })
    .map_err(step("mount /proc"))?;
    // SAFETY: plain credential calls with integer arguments (an empty group list).
    unsafe {
        cvt(libc::setgroups(0, std::ptr::null())).map_err(step("setgroups"))?;
        cvt(libc::setresgid(gid, gid, gid)).map_err(step("setresgid"))?;
        cvt(libc::setresuid(uid, uid, uid)).map_err(step("setresuid"))?;
        // After the uid change, which would clear it.
        cvt(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))
            .map_err(step("pdeathsig"))?;
    }
    super::seccomp::install(super::seccomp::Profile::Function).map_err(|e| {
        RuntimeError::Container {
            step: "seccomp",
            source: io::Error::other(e.to_string()),
        }
    })?;
    let err = std::process::Command::new(path).exec();
    Err(step("exec the runtime")(err))
}
