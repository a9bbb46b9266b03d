//! A VMM started ahead of its restore (`hearth vmm --await-restore`): the process, the KVM VM and
//! its vCPUs ([`crate::restore::prepare`]) and the control socket are set up before any snapshot
//! is named; then this waits, on the main thread and before any guest exists, for a
//! [`Command::Restore`] on the control socket and restores that snapshot with the same reading
//! and checks as a restore at start-up ([`crate::restore::open`]). A snapshot refused by those
//! checks is answered with the error and the VMM keeps waiting; a failure after them (the VM
//! half built) is answered and ends the process. `Status` answers `AwaitingRestore`; `Stop`,
//! SIGTERM/SIGINT and the parent's pipe closing end it as they end a running VM.

use crate::builder::BuiltVm;
use crate::config::VmConfig;
use crate::control::server::ControlServer;
use crate::control::{Command, PROTOCOL_VERSION, Request, Response, VmState};
use crate::restore::{self, Prepared, RestoreError, RestoreMode, SnapshotFiles};
use crate::runtime::StopReason;
use nix::sys::signal::SigSet;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

/// Waiting for the Restore command failed.
#[derive(Debug, thiserror::Error)]
pub enum AwaitError {
    /// The signalfd could not be created.
    #[error("cannot watch for termination signals")]
    Signals(#[source] nix::Error),
    /// poll(2) failed.
    #[error("cannot wait on the control socket")]
    Poll(#[source] std::io::Error),
    /// The snapshot passed its checks but the VM could not be built from it.
    #[error("cannot restore the snapshot {0}")]
    Restore(String, #[source] RestoreError),
}

/// A VM restored from the snapshot a Restore command named.
pub struct Restored {
    /// The VM, its vCPUs not yet spawned.
    pub built: BuiltVm,
    /// The userfaultfd handler, in that mode.
    pub uffd: Option<crate::uffd::UffdServer>,
    /// How guest RAM was restored.
    pub mode: RestoreMode,
    /// The snapshot restored.
    pub files: SnapshotFiles,
    /// When the Restore command arrived.
    pub at: Instant,
    /// The command asked for the VM to run at once (no `Start` to wait for).
    pub resume: bool,
}

/// How the wait ended.
pub enum Awaited {
    /// A snapshot was restored; the control socket, its accepted connections closed (the event
    /// loop takes it over).
    Restored(Box<Restored>, ControlServer),
    /// The VMM is to exit without a guest.
    Stopped(StopReason),
}

/// `error` and its sources, one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut msg = error.to_string();
    let mut src = error.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// What one request did to the wait.
enum Outcome {
    Continue,
    Stop(StopReason),
    Restored(Box<Restored>),
    Failed(AwaitError),
}

/// `hearth vmm --await-restore`'s start: prepares the VM for `config`, binds the control socket
/// and waits ([`await_restore`]).
pub fn start_ahead(
    config: &VmConfig,
    signals: &SigSet,
    args: &crate::cli::VmmArgs,
    started: Instant,
) -> anyhow::Result<Awaited> {
    use anyhow::Context as _;
    let prepared = restore::prepare(config).context("cannot prepare the VM for a restore")?;
    let Some(path) = &config.control_socket else {
        anyhow::bail!("--await-restore needs a control socket")
    };
    let control = ControlServer::bind(path)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "prepared; awaiting a restore"
    );
    let parent = args.exit_on_stdin_eof.then_some(0);
    Ok(await_restore(
        config,
        prepared,
        control,
        signals,
        parent,
        !args.no_seccomp,
    )?)
}

/// Serves the control socket of a prepared VM until a Restore succeeds or the VMM is to stop.
/// `parent`: the fd whose end of file means the parent is gone (standard input).
pub fn await_restore(
    config: &VmConfig,
    prepared: Prepared,
    mut control: ControlServer,
    signals: &SigSet,
    parent: Option<RawFd>,
    seccomp: bool,
) -> Result<Awaited, AwaitError> {
    let signalfd = SignalFd::with_flags(signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(AwaitError::Signals)?;
    let mut prepared = Some(prepared);
    let mut conns: Vec<RawFd> = Vec::new();
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: control.listener_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signalfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: parent.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        fds.extend(conns.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: poll(2) on a local array of `fds.len()` pollfd entries (a negative fd is
        // ignored by the kernel).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(AwaitError::Poll(e));
        }
        if fds[1].revents != 0
            && let Ok(Some(info)) = signalfd.read_signal()
        {
            return Ok(Awaited::Stopped(StopReason::Signal(info.ssi_signo as i32)));
        }
        if fds[2].revents != 0 {
            let mut buf = [0u8; 64];
            // SAFETY: reading into a local buffer from the parent's pipe, which this process owns.
            let r = unsafe { libc::read(fds[2].fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                return Ok(Awaited::Stopped(StopReason::ParentGone));
            }
        }
        let ready: Vec<(RawFd, i16)> = fds[3..]
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| (p.fd, p.revents))
            .collect();
        for (fd, revents) in ready {
            let mut outcome = Outcome::Continue;
            let alive = revents & libc::POLLIN != 0
                && control.serve(fd, |req: Request| {
                    let (result, o) = handle(config, &mut prepared, req.command, seccomp);
                    outcome = o;
                    Response {
                        version: PROTOCOL_VERSION,
                        result,
                    }
                });
            if !alive {
                control.close(fd);
                conns.retain(|&c| c != fd);
            }
            match outcome {
                Outcome::Continue => {}
                Outcome::Stop(reason) => return Ok(Awaited::Stopped(reason)),
                Outcome::Failed(e) => return Err(e),
                Outcome::Restored(restored) => {
                    // The event loop serves new connections only; these would never be answered.
                    for c in conns.drain(..) {
                        control.close(c);
                    }
                    return Ok(Awaited::Restored(restored, control));
                }
            }
        }
        if fds[0].revents != 0 {
            conns.extend(control.accept());
        }
    }
}

/// Answers one command of the wait.
fn handle(
    config: &VmConfig,
    prepared: &mut Option<Prepared>,
    command: Command,
    seccomp: bool,
) -> (Result<VmState, String>, Outcome) {
    match command {
        Command::Status => (Ok(VmState::AwaitingRestore), Outcome::Continue),
        Command::Stop => (Ok(VmState::Stopping), Outcome::Stop(StopReason::Requested)),
        Command::Restore {
            state_path,
            mem_path,
            mode,
            resume,
        } => {
            let at = Instant::now();
            tracing::debug!("restore requested");
            let files = SnapshotFiles {
                state: state_path,
                mem: mem_path,
            };
            let opened = match restore::open(config, &files, at) {
                Ok(o) => o,
                Err(e) => {
                    let msg = format!("cannot restore the snapshot: {}", chain(&e));
                    tracing::info!(error = %msg, "Restore refused");
                    return (Err(msg), Outcome::Continue);
                }
            };
            let checked = match prepared.as_ref() {
                Some(vm) => restore::check_prepared(vm, &opened, config),
                None => return (Err("the VM is already restored".into()), Outcome::Continue),
            };
            if let Err(e) = checked {
                let msg = format!("cannot restore the snapshot: {}", chain(&e));
                tracing::info!(error = %msg, "Restore refused");
                return (Err(msg), Outcome::Continue);
            }
            let Some(vm) = prepared.take() else {
                return (Err("the VM is already restored".into()), Outcome::Continue);
            };
            match restore::restore_prepared(vm, opened, config, &mode, seccomp, at) {
                Ok((built, uffd)) => {
                    let restored = Restored {
                        built,
                        uffd,
                        mode,
                        files,
                        at,
                        resume,
                    };
                    let state = if resume {
                        VmState::Running
                    } else {
                        VmState::Created
                    };
                    (Ok(state), Outcome::Restored(Box::new(restored)))
                }
                Err(e) => {
                    let msg = format!("cannot restore the snapshot: {}", chain(&e));
                    let path = files.state.display().to_string();
                    (Err(msg), Outcome::Failed(AwaitError::Restore(path, e)))
                }
            }
        }
        other => (
            Err(format!(
                "{other:?} is not valid while the VMM awaits a restore"
            )),
            Outcome::Continue,
        ),
    }
}
