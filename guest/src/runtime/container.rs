//! The init as PID 1 of a Linux container (the `container` sandbox, Lambda Managed Instances mode).
//!
//! `hearth-init` plays two parts, chosen by its first argument:
//! - `container-launch SPEC_JSON`, run by the host agent as root on the host: joins the sandbox's
//!   cgroups, connects to the agent's Unix socket (the host link), then builds the container:
//!   user, mount, pid, ipc, uts, cgroup and (unless networking is configured) network namespaces;
//!   container root mapped to an unprivileged host uid range; a tmpfs root with `/init` (this binary,
//!   bind-mounted read-only), `/var/task`, `/tmp`, `/proc` and a few `/dev` nodes; `pivot_root`; `lo`
//!   up; a seccomp filter; then it executes `/init container-init FD`.
//! - `container-init FD`, PID 1 inside: `Hello` on the host link, then the function conversation
//!   ([`super::serve_function`]) with Lambda's layout and the function running as uid/gid 993.
//!   The agent reads the sandbox cgroup's peak memory itself, so this init reports none.
//!
//! Why direct kernel calls (libc) rather than a container library: the work is a dozen system calls
//! in a fixed order, in a freshly executed single-threaded process (so `fork` is safe); youki's
//! `libcontainer` would bring an OCI bundle format, D-Bus/systemd cgroup managers and a large
//! dependency tree into the init, which must stay a small static binary. The seccomp filter is built
//! with rust-vmm's `seccompiler`, as the VMM's are.

use std::ffi::{CString, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RuntimeConfig, RuntimeError};
use crate::protocol::{self, Hello};

/// What the agent asks of the launcher (passed as JSON in argv).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// An empty host folder the container's tmpfs root is mounted on (in its own mount namespace).
    pub root_dir: PathBuf,
    /// The agent's listening Unix socket: the host link.
    pub link_socket: PathBuf,
    /// `cgroup.procs` files (v1: one per controller; v2: one) the launcher moves itself into.
    pub cgroup_procs: Vec<PathBuf>,
    /// First host uid/gid of the range mapped to the container's 0..uid_count.
    pub uid_base: u32,
    pub uid_count: u32,
    pub hostname: String,
    /// Size of the root tmpfs (code, /tmp) in MiB.
    pub disk_mb: u32,
    /// Keep the host's network namespace (else: a new one with only `lo`).
    pub network: bool,
}

pub(crate) fn report(result: Result<i32, RuntimeError>) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("hearth-init container: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                msg.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            let _ = writeln!(io::stderr(), "{msg}");
            125
        }
    }
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> RuntimeError {
    move |source| RuntimeError::Container { step, source }
}

fn bad_args(what: &'static str) -> RuntimeError {
    RuntimeError::Container {
        step: what,
        source: io::Error::new(io::ErrorKind::InvalidInput, what),
    }
}

/// Returns `Ok(rc)` when `rc >= 0`, else the OS error.
fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the launcher is single-threaded when it forks (no runtime, no threads started), so
    // the child may run ordinary Rust code.
    cvt(unsafe { libc::fork() })
}

fn wait_exit_code(pid: libc::pid_t) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out pointer for the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Ok(128 + libc::WTERMSIG(status))
    }
}

fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// The host-side launcher (see the module docs).
pub(crate) fn launch(args: &[OsString]) -> Result<i32, RuntimeError> {
    let json = args
        .get(2)
        .and_then(|a| a.to_str())
        .ok_or_else(|| bad_args("missing spec argument"))?;
    let spec: ContainerSpec = serde_json::from_str(json).map_err(|e| RuntimeError::Container {
        step: "parse spec",
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, me.to_string()).map_err(step("join cgroup"))?;
    }
    let link = UnixStream::connect(&spec.link_socket).map_err(step("connect host link"))?;
    let (mut to_parent_r, mut to_parent_w) = pipe().map_err(step("pipe"))?;
    let (mut to_child_r, mut to_child_w) = pipe().map_err(step("pipe"))?;

    let child = fork().map_err(step("fork"))?;
    if child == 0 {
        drop(to_parent_r);
        drop(to_child_w);
        let code = report(in_namespaces(
            &spec,
            link,
            &mut to_parent_w,
            &mut to_child_r,
        ));
        std::process::exit(code);
    }
    drop(to_parent_w);
    drop(to_child_r);
    drop(link);
    let mut byte = [0u8; 1];
    to_parent_r
        .read_exact(&mut byte)
        .map_err(step("wait for unshare"))?;
    let map = format!("0 {} {}\n", spec.uid_base, spec.uid_count);
    std::fs::write(format!("/proc/{child}/uid_map"), &map).map_err(step("write uid_map"))?;
    std::fs::write(format!("/proc/{child}/gid_map"), &map).map_err(step("write gid_map"))?;
    to_child_w.write_all(b"g").map_err(step("release child"))?;
    drop(to_child_w);
    wait_exit_code(child).map_err(step("wait"))
}

/// In the child of the launcher: unshare, wait for the id maps, become root inside, fork PID 1.
fn in_namespaces(
    spec: &ContainerSpec,
    link: UnixStream,
    to_parent: &mut std::fs::File,
    from_parent: &mut std::fs::File,
) -> Result<i32, RuntimeError> {
    let mut flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    if !spec.network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare only changes this (single-threaded) process's namespaces.
    cvt(unsafe { libc::unshare(flags) }).map_err(step("unshare"))?;
    to_parent.write_all(b"u").map_err(step("signal unshare"))?;
    let mut byte = [0u8; 1];
    from_parent
        .read_exact(&mut byte)
        .map_err(step("wait for id maps"))?;
    // SAFETY: plain credential calls; root (0) is mapped now.
    cvt(unsafe { libc::setresgid(0, 0, 0) }).map_err(step("setresgid"))?;
    // SAFETY: as above.
    cvt(unsafe { libc::setresuid(0, 0, 0) }).map_err(step("setresuid"))?;
    // SAFETY: an empty group list.
    cvt(unsafe { libc::setgroups(0, std::ptr::null()) }).map_err(step("setgroups"))?;
    let host = spec.hostname.as_bytes();
    // SAFETY: the pointer and length describe `host`.
    cvt(unsafe { libc::sethostname(host.as_ptr().cast(), host.len()) })
        .map_err(step("sethostname"))?;

    let pid1 = fork().map_err(step("fork pid 1"))?;
    if pid1 == 0 {
        let code = report(become_pid1(spec, link));
        std::process::exit(code);
    }
    drop(link);
    wait_exit_code(pid1).map_err(step("wait pid 1"))
}

fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = CString::new(src)?;
    let target = cstr(target)?;
    let fstype = CString::new(fstype)?;
    let data = data.map(CString::new).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is a NUL-terminated string (or null) that outlives the call.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })
    .map(drop)
}

fn bind(src: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    let src = src
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path"))?;
    mount(src, target, "", libc::MS_BIND, None)?;
    if read_only {
        mount(
            "",
            target,
            "",
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
            None,
        )?;
    }
    Ok(())
}

/// PID 1 of the new pid namespace, still with the host's root: build the root and execute `/init`.
fn become_pid1(spec: &ContainerSpec, link: UnixStream) -> Result<i32, RuntimeError> {
    let root = &spec.root_dir;
    mount(
        "",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("make / private"))?;
    let size = format!("size={}m,mode=0755", spec.disk_mb);
    mount(
        "tmpfs",
        root,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&size),
    )
    .map_err(step("mount root tmpfs"))?;
    for dir in [
        "proc",
        "dev",
        "tmp",
        "var/task",
        "var/runtime",
        "opt",
        "etc",
        ".old",
    ] {
        std::fs::create_dir_all(root.join(dir)).map_err(step("mkdir in root"))?;
    }
    std::fs::write(root.join("init"), b"").map_err(step("create /init"))?;
    // The file stays owned by a host uid that is unmapped inside, so container root cannot write
    // it; read-only on top where the host mount's locked flags allow it.
    let exe = std::env::current_exe().map_err(step("find this binary"))?;
    bind(&exe, &root.join("init"), false).map_err(step("bind /init"))?;
    let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    if let Err(e) = mount("", &root.join("init"), "", ro, None) {
        let _ = writeln!(
            io::stderr(),
            "hearth-init container: /init stays writable by host root only: {e}"
        );
    }
    for dev in ["null", "zero", "full", "random", "urandom"] {
        let target = root.join("dev").join(dev);
        std::fs::write(&target, b"").map_err(step("create /dev node"))?;
        bind(&Path::new("/dev").join(dev), &target, false).map_err(step("bind /dev node"))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, root.join("dev").join(name))
            .map_err(step("/dev symlink"))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/sbin/nologin\nsbx_user1051:x:993:990::/home/sbx_user1051:/sbin/nologin\n")
        .map_err(step("write /etc/passwd"))?;
    mount(
        "tmpfs",
        &root.join("tmp"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=512m,mode=1777"),
    )
    .map_err(step("mount /tmp"))?;
    mount(
        "proc",
        &root.join("proc"),
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(step("mount /proc"))?;
    let new_root = cstr(root).map_err(step("root path"))?;
    let old = cstr(&root.join(".old")).map_err(step("root path"))?;
    // SAFETY: both are NUL-terminated paths that outlive the call; pivot_root has no libc wrapper.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), old.as_ptr()) };
    cvt(rc as libc::c_int).map_err(step("pivot_root"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    let old = CString::new("/.old").map_err(|e| step("umount old root")(e.into()))?;
    // SAFETY: a NUL-terminated path.
    cvt(unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) })
        .map_err(step("umount old root"))?;
    std::fs::remove_dir("/.old").map_err(step("rmdir old root"))?;
    if !spec.network {
        crate::init::sys::loopback_up().map_err(|e| RuntimeError::Container {
            step: "bring lo up",
            source: io::Error::other(e.to_string()),
        })?;
    }
    // The host link survives the exec.
    let fd = link.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on a descriptor we own.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map_err(step("keep host link"))?;
    super::seccomp::install(super::seccomp::Profile::Init).map_err(|e| {
        RuntimeError::Container {
            step: "seccomp filter",
            source: io::Error::other(e.to_string()),
        }
    })?;
    let err = std::process::Command::new("/init")
        .arg0("/init")
        .arg("container-init")
        .arg(fd.to_string())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .exec();
    Err(RuntimeError::Container {
        step: "exec /init",
        source: err,
    })
}

/// PID 1 inside the container: the function conversation over the inherited host link.
pub(crate) fn container_init(args: &[OsString]) -> Result<i32, RuntimeError> {
    let fd: i32 = args
        .get(2)
        .and_then(|a| a.to_str())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| bad_args("missing host link fd"))?;
    // SAFETY: the launcher passed this descriptor, open and owned by nobody else, across exec.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sets FD_CLOEXEC on the descriptor we now own, so the runtime does not inherit it.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })
        .map_err(step("cloexec link"))?;
    let mut link = UnixStream::from(fd);
    // Hello, synchronously, before anything else.
    let hello: protocol::Message = protocol::expect_frame(&mut link).map_err(RuntimeError::Link)?;
    protocol::check_hello(hello).map_err(RuntimeError::Link)?;
    protocol::write_frame(
        &mut link,
        &protocol::Message::Hello(Hello::ours("hearth-init")),
    )
    .map_err(RuntimeError::Link)?;
    link.set_nonblocking(true)
        .map_err(step("nonblocking link"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::Tokio)?;
    rt.block_on(async move {
        let link = super::quiet_unix::QuietUnixStream::new(link).map_err(step("async link"))?;
        let (r, w) = link.into_split();
        super::serve_function(
            RuntimeConfig {
                set_clock: false,
                report_peak_memory: false,
                ..RuntimeConfig::lambda()
            },
            r,
            w,
        )
        .await
    })?;
    Ok(0)
}
