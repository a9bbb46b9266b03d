//! `hearth-init`, PID 1 inside a sandbox.
//!
//! Roles, chosen by `hearth.role=` on the kernel command line (or `HEARTH_ROLE` in the
//! environment): `vm` (the default: a Hearth microVM, see [`vm`]) and `testhost` (the QEMU test host
//! that runs one command, see [`testhost`]).
//!
//! PID 1 must never exit: a fatal error or a panic is printed on the console and the machine is
//! rebooted (`vm`) or powered off (`testhost`), which ends the VM.

pub mod link;
pub mod reaper;
pub mod sys;
pub mod testhost;
pub mod vm;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Errors inside the init.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the test host spec {path:?}")]
    SpecRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid test host spec {path:?}")]
    SpecParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the test host spec has an empty argv")]
    EmptyArgv,
    #[error("unknown role {0:?} (hearth.role= on the kernel command line)")]
    UnknownRole(String),
    #[error("host link: {0}")]
    Link(String),
    #[error(transparent)]
    Protocol(#[from] crate::protocol::ProtocolError),
    #[error("function conversation failed")]
    Function(#[source] crate::runtime::RuntimeError),
}

/// What the init does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A Hearth microVM: talk to the host over vsock.
    Vm,
    /// The QEMU test host: run the command in `/testhost/spec.json`, print its exit status, power off.
    Testhost,
}

impl Role {
    /// The role named on a kernel command line (`hearth.role=`); `vm` when absent.
    pub fn from_cmdline(cmdline: &str) -> Result<Role, InitError> {
        match cmdline
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("hearth.role="))
            .next_back()
        {
            None | Some("vm") => Ok(Role::Vm),
            Some("testhost") => Ok(Role::Testhost),
            Some(other) => Err(InitError::UnknownRole(other.to_owned())),
        }
    }

    /// The role's name.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Vm => "vm",
            Role::Testhost => "testhost",
        }
    }
}

/// Prints one line on the console (the init's stderr), ignoring failures.
#[macro_export]
macro_rules! console {
    ($($arg:tt)*) => {{
        $crate::init::console_line(&format!($($arg)*));
    }};
}

#[doc(hidden)]
pub fn console_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "hearth-init: {line}");
}

/// Whether the machine powers off (testhost) rather than reboots (vm) when the init gives up.
static POWER_OFF_ON_FATAL: AtomicBool = AtomicBool::new(false);

/// Prints a fatal error and ends the machine. Never returns.
pub fn fatal(msg: &str) -> ! {
    console!("FATAL: {msg}");
    halt()
}

/// Ends the machine the way the role wants; if the kernel refuses, sleeps forever (PID 1 must not exit).
pub fn halt() -> ! {
    let power_off = POWER_OFF_ON_FATAL.load(Ordering::SeqCst);
    let err = sys::reboot(power_off);
    console!("reboot(2) failed: {err}; sleeping forever");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// The error and its causes, on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// The init's entry point (`hearth-init`'s `main`).
pub fn main() -> ! {
    if sys::getpid() != 1 {
        let _ = writeln!(
            std::io::stderr(),
            "hearth-init must run as PID 1 inside a Hearth sandbox; refusing to run as PID {}",
            sys::getpid()
        );
        std::process::exit(2);
    }
    let start_ms = sys::boottime_ms();
    std::panic::set_hook(Box::new(|info| {
        console!("FATAL: panic: {info}");
        halt();
    }));
    if let Err(e) = sys::mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    ) {
        fatal(&chain(&e));
    }
    let role = match std::env::var("HEARTH_ROLE") {
        Ok(r) => Role::from_cmdline(&format!("hearth.role={r}")),
        Err(_) => Role::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default()),
    };
    let role = match role {
        Ok(r) => r,
        Err(e) => fatal(&chain(&e)),
    };
    POWER_OFF_ON_FATAL.store(role == Role::Testhost, Ordering::SeqCst);
    console!(
        "started at {start_ms} ms (kernel uptime), role {}",
        role.name()
    );
    match role {
        Role::Vm => vm::run(start_ms),
        Role::Testhost => testhost::run(),
    }
}

/// Where `/tmp` and `/run` come from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scratch {
    /// Fresh tmpfs mounts (the microVM).
    Tmpfs,
    /// The initramfs's own folders, so files packed under them stay visible (the test host, whose
    /// packed paths mirror the host's and may well lie under /tmp).
    Rootfs,
}

/// Mounts what every role needs (proc is already mounted): sysfs, devtmpfs, and /tmp and /run as
/// `scratch` says.
pub fn mount_common(scratch: Scratch) -> Result<(), InitError> {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    sys::mount(
        "sysfs",
        "/sys",
        "sysfs",
        nosuid_nodev | libc::MS_NOEXEC,
        None,
    )?;
    sys::mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    )?;
    if scratch == Scratch::Tmpfs {
        sys::mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777"))?;
        sys::mount("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755"))?;
    }
    Ok(())
}

/// Loads modules in the given order; stops at the first failure.
pub fn load_modules(paths: &[PathBuf]) -> Result<(), InitError> {
    for p in paths {
        sys::load_module(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_from_cmdline() {
        assert_eq!(Role::from_cmdline("console=ttyS0 quiet").unwrap(), Role::Vm);
        assert_eq!(Role::from_cmdline("hearth.role=vm").unwrap(), Role::Vm);
        assert_eq!(
            Role::from_cmdline("console=ttyS0 hearth.role=testhost panic=-1\n").unwrap(),
            Role::Testhost
        );
        assert!(matches!(
            Role::from_cmdline("hearth.role=nope"),
            Err(InitError::UnknownRole(_))
        ));
        assert_eq!(
            Role::from_cmdline("hearth.role=nope hearth.role=vm").unwrap(),
            Role::Vm
        );
    }

    #[test]
    fn error_chains_print_causes() {
        let e = InitError::Sys {
            what: "mount x".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let s = chain(&e);
        assert!(s.starts_with("mount x: "), "{s}");
    }
}
