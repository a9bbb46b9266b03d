//! The in-sandbox side of a function: the Lambda Runtime API and the runtime process.
//!
//! Given a [`Bundle`](crate::protocol::function::Bundle) from the host, the init unpacks the code
//! zip into the task folder ([`crate::bundle`]), starts the runtime (`bootstrap` for the `provided`
//! runtimes) with Lambda's environment, serves the Runtime API on `127.0.0.1:9001`, relays invokes
//! and results, and streams the runtime's output line by line, tagged with the request id.
//!
//! The same code runs in a microVM and in a container sandbox; only the host link differs. It also
//! runs natively on a development host (a temporary task folder, any port): see [`RuntimeConfig`].
//!
//! The function's processes run with less privilege than the init: with [`RuntimeConfig::isolate`]
//! (the default inside a sandbox) the runtime is started through the `function-exec` helper
//! ([`isolate`]) in its own pid and mount namespaces, as uid/gid 993, under the function seccomp
//! profile ([`seccomp`]); it cannot see, signal or trace the init. Natively (tests) it runs as a
//! plain child in its own process group.
//!
//! The Runtime API's hot requests are served without hyper (`connection`); the container's host
//! link is a [`quiet_unix::QuietUnixStream`] (the agent's end is one too).
//!
//! The container sandbox's two roles of `hearth-init` live in [`container`];
//! [`main_if_runtime_role`] dispatches them from `main`.

mod api;
mod connection;
pub mod container;
pub mod env;
pub mod isolate;
pub mod quiet_unix;
pub mod seccomp;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use session::{read_frame, serve_function, write_frame};

/// Where the runtime lives and how it is started.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `LAMBDA_TASK_ROOT`, where the code zip is unpacked (`/var/task`). Must exist, and be empty.
    pub task_dir: PathBuf,
    /// Where layers would be (`/opt`); `/opt/bootstrap` is the second bootstrap tried.
    pub opt_dir: PathBuf,
    /// `LAMBDA_RUNTIME_DIR` (`/var/runtime`).
    pub runtime_dir: PathBuf,
    /// The Runtime API address (`127.0.0.1:9001`; port 0 picks a free one).
    pub listen: SocketAddr,
    /// uid and gid of the function's processes; `None` keeps the init's.
    pub run_as: Option<(u32, u32)>,
    /// Limits on the code zip.
    pub limits: crate::bundle::Limits,
    /// Start the runtime through the `function-exec` helper (own pid and mount namespaces,
    /// seccomp): needs this binary to be `hearth-init` and root; off natively in tests.
    pub isolate: bool,
    /// Set the clock from each invoke's `host_time_ms` when it is off by more than
    /// `session::CLOCK_TOLERANCE_MS`: in a microVM (whose clock may lag, and after a snapshot
    /// restore is stale); never in a container, which shares the host's clock.
    pub set_clock: bool,
    /// Read the runtime's peak memory (`/proc/<pid>/status`, VmHWM) after each invoke for its
    /// `REPORT`: in a microVM. Off in a container, whose host reads the sandbox cgroup's peak
    /// instead (that read was ~10% of the init's CPU on a warm echo invoke).
    pub report_peak_memory: bool,
}

impl RuntimeConfig {
    /// Lambda's layout: `/var/task`, `/opt`, `/var/runtime`, `127.0.0.1:9001`, uid/gid 993.
    pub fn lambda() -> Self {
        RuntimeConfig {
            task_dir: PathBuf::from("/var/task"),
            opt_dir: PathBuf::from("/opt"),
            runtime_dir: PathBuf::from("/var/runtime"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            run_as: Some((FUNCTION_UID, FUNCTION_UID)),
            limits: crate::bundle::Limits::default(),
            isolate: true,
            set_clock: true,
            report_peak_memory: true,
        }
    }
}

/// Runs the runtime-side roles of `hearth-init`, chosen by the first argument:
/// `container-launch SPEC` (on the host), `container-init FD` (PID 1 of a container) and
/// `function-exec UID GID PATH` (starts a runtime). Returns `None` for any other command line (the
/// caller goes on with its usual init), else the exit code to exit with.
pub fn main_if_runtime_role() -> Option<i32> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let result = match args.get(1).and_then(|a| a.to_str()) {
        Some("container-launch") => container::launch(&args),
        Some("container-init") => container::container_init(&args),
        Some(isolate::ROLE) => isolate::function_exec(&args),
        _ => return None,
    };
    Some(container::report(result))
}

/// uid and gid of the function's processes inside a sandbox (Lambda's `sbx_user1051`).
pub const FUNCTION_UID: u32 = 993;

/// Errors that end a function conversation.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("protocol error on the host link: {0}")]
    Protocol(&'static str),
    #[error("host link failed")]
    Link(#[source] crate::protocol::ProtocolError),
    #[error("cannot start the async runtime")]
    Tokio(#[source] std::io::Error),
    #[error("container setup failed at {step}")]
    Container {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
