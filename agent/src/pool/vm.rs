//! One pooled VM: restored from a template in a `hearth vmm` process of its own, kept paused
//! until it is claimed.
//!
//! Its VMM is spawned ahead of the restore ([`AheadVm`]: `hearth vmm --await-restore`, its folder
//! or jail made, the template's files mounted, the ready socket bound), so that the process, the
//! KVM VM, its vCPUs and devices are off the restore's critical path; the restore is then a
//! `Restore` command to it ([`AheadVm::restore`]). [`PooledVm::restore`] does both in a row.
//!
//! A restore is done only once the init has answered: right after a restore the guest still has
//! to handle the vsock transport reset, and until then a host connection can be accepted and then
//! reset. The VMM holds a host connection until the guest has handled the reset, so
//! [`PooledVm::restore`] connects to the init's control port right after the start, with its
//! `Hello` and a `Status` request in the same write, and pauses the VM once the init has
//! answered; it does not wait for the init's re-announced `Ready` (the init reconnects its ready
//! link after that first answer; the link's listener is kept for the VM's life). The control
//! connection stays open while the VM is paused. A claim ([`PooledVm::activate`]) checks the
//! process, resumes it and, on that connection, makes the clone unique and current (a fresh
//! identity, entropy and the host's clock: `Refresh`).
//!
//! Its VMM runs jailed (`hearth jail`, as a booted microVM's does: its own uid, namespaces, cgroup
//! and a root holding only the kernel, initramfs and the template's two snapshot files, mounted
//! read-only, and `/dev/kvm` and `/dev/userfaultfd`) when its [`VmHome`] is a jail, else as a
//! plain child process with its files in a folder of its own.
//!
//! Dropping one kills its VMM process and removes its folder; for a jailed one the jailer removes
//! the jail folder and the cgroup, and where the jailer itself was killed, the drop removes what
//! it left ([`JailConfig::clean_up`]).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hearth_guest::protocol::client::ControlClient;
use hearth_guest::protocol::{Message, Ready};
use hearth_vmm::{MemoryUsage, RestoreMode, SnapshotFiles, VmState, VmmProcess};

use super::guest::{bind_ready, open, ping, ready_socket, serial_tail};
use super::template::Template;
use crate::jail::{JailConfig, LaunchError, VmJail, snapshot_inside};

/// A pooled VM could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum PooledVmError {
    #[error("cannot {what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore the template")]
    Restore(#[source] hearth_vmm::ProcessError),
    #[error("cannot restore the template in a jail")]
    Jail(#[source] LaunchError),
    #[error(
        "the restored VM did not come up: {why}; VMM stderr: {stderr}; guest console: {serial}"
    )]
    NotUp {
        why: String,
        stderr: String,
        serial: String,
    },
    #[error("the pooled VM's process has exited ({0})")]
    Exited(std::process::ExitStatus),
    #[error("the pooled VM is {0:?}, not paused")]
    NotPaused(VmState),
    #[error("the pooled VM's VMM did not answer")]
    Control(#[source] hearth_vmm::ProcessError),
    #[error("the pooled VM's init did not take its refresh")]
    Refresh(#[source] hearth_guest::protocol::ProtocolError),
}

/// The init's ready link of a pooled VM: to keep for the VM's life (the init holds its end, and
/// reconnects while it finds no listener).
#[derive(Debug)]
pub enum ReadyLink {
    /// The init's connection, accepted.
    Open(UnixStream),
    /// The listener its connection comes to (it may be queued there, or still to come).
    Waiting(UnixListener),
}

/// What a claimed VM hands to its sandbox.
pub struct ClaimedParts {
    /// The VMM process (killed when dropped).
    pub vmm: VmmProcess,
    /// The init's ready link (keep it for the VM's life).
    pub ready_link: ReadyLink,
    /// The guest after the restore: `ready_ms` is its uptime when its init first answered, and
    /// `init_start_ms` 0 (the init started in the template).
    pub ready: Ready,
    /// The VM's folder (sockets, serial log; a jailed VM's jail root); the new owner removes it.
    pub dir: PathBuf,
    /// The VMM's vsock Unix socket.
    pub uds: PathBuf,
    /// The jail it runs in: once the VMM has ended, [`JailConfig::clean_up`] removes what a
    /// killed jailer left.
    pub jail: Option<(JailConfig, VmJail)>,
}

/// Where a pooled VM's VMM runs and its files (sockets, serial log) live.
#[derive(Debug, Clone)]
pub enum VmHome {
    /// A plain child process; its files in this folder (made, and removed with the VM).
    Folder(PathBuf),
    /// Jailed as VM `id` (which names the jail folder and the cgroup); its files in the jail
    /// root, which the jailer removes with the cgroup when the VMM ends.
    Jail {
        /// How VMMs are jailed.
        jails: JailConfig,
        /// The VM id.
        id: String,
    },
}

/// How a claimed VM's activation went.
#[derive(Debug, Clone, Copy)]
pub struct Activated {
    /// The guest clock's offset from the host's left after the refresh, ns.
    pub clock_offset_ns: i64,
    /// The VMM's status check and resume.
    pub resume: Duration,
    /// Getting the control connection: none when the one the init answered on after the
    /// restore is still open (else connect, `Hello`, ping).
    pub answer: Duration,
    /// The refresh, with its clock corrections.
    pub refresh: Duration,
}

/// A restored VM in a pool.
pub struct PooledVm {
    vmm: Option<VmmProcess>,
    ready_listener: Option<UnixListener>,
    /// The control connection the init first answered on, kept for the claim's refresh.
    control: Option<ControlClient<UnixStream>>,
    ready: Ready,
    dir: PathBuf,
    jail: Option<(JailConfig, VmJail)>,
    uds: PathBuf,
    mem_mib: u32,
    template_digest: String,
    restored_in: Duration,
}

/// A pooled VM's VMM spawned ahead of its restore (`hearth vmm --await-restore`, in its folder or
/// jail, with the template's files already mounted there and the init's ready socket bound): the
/// process, the KVM VM, its vCPUs and devices are made off the restore's critical path.
/// [`AheadVm::restore`] sends it the `Restore`. Dropping it kills the VMM and removes its folder or
/// jail, as dropping a [`PooledVm`] does.
pub struct AheadVm {
    vm: PooledVm,
    /// The template's files as the VMM sees them.
    files: SnapshotFiles,
}

impl AheadVm {
    /// Spawns a VMM for `template`'s shape at `home` (its folder or jail root created, and
    /// removed again on failure) that awaits a restore. Blocking.
    pub fn spawn(
        hearth_binary: &Path,
        template: &Template,
        home: VmHome,
    ) -> Result<AheadVm, PooledVmError> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| PooledVmError::Io { what, path, source }
        };
        let mut vm = PooledVm {
            vmm: None,
            ready_listener: None,
            control: None,
            ready: Ready {
                init_start_ms: 0,
                ready_ms: 0,
                kernel_release: String::new(),
            },
            uds: PathBuf::new(),
            dir: PathBuf::new(),
            jail: None,
            mem_mib: template.spec.mem_mib,
            template_digest: template.digest.clone(),
            restored_in: Duration::ZERO,
        };
        // The folder as this host sees it, and as the VMM does.
        let inside = match &home {
            VmHome::Folder(dir) => {
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
                // From here on the folder goes with `vm` (removed with it).
                vm.dir = dir.clone();
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io("restrict", dir))?;
                dir.clone()
            }
            VmHome::Jail { jails, id } => {
                let shape = template.spec.vm_config(Path::new("/"));
                let jail = jails.jail_for(id, &shape).map_err(PooledVmError::Jail)?;
                // From here on the jail goes with `vm` (cleaned up with it).
                vm.dir = jail.root.clone();
                vm.jail = Some((jails.clone(), jail.clone()));
                jails.prepare(&jail).map_err(PooledVmError::Jail)?;
                PathBuf::from("/")
            }
        };
        vm.uds = vm.dir.join("vsock.sock");
        let listener = bind_ready(&vm.uds).map_err(io("listen for the init in", &vm.dir))?;
        vm.ready_listener = Some(listener);
        let config = template.spec.vm_config(&inside);
        let (spawned, files) = match &vm.jail {
            Some((jails, jail)) => {
                // The VMM, under the jail's uid, connects to the agent's ready socket.
                let spawned = jail
                    .give(&ready_socket(&vm.uds))
                    .and_then(|()| jails.spawn_awaiting_restore(jail, &config, &template.files))
                    .map_err(PooledVmError::Jail);
                (spawned, snapshot_inside())
            }
            None => {
                let spawned = crate::cores::unpinned(|| {
                    VmmProcess::spawn_awaiting_restore(hearth_binary, &config)
                })
                .map_err(PooledVmError::Restore);
                (spawned, template.files.clone())
            }
        };
        vm.vmm = Some(spawned?);
        Ok(AheadVm { vm, files })
    }

    /// The digest of the template it awaits.
    pub fn template_digest(&self) -> &str {
        &self.vm.template_digest
    }

    /// The VMM process's id (for a jailed VMM, the jailer's child).
    pub fn pid(&self) -> Option<u32> {
        self.vm.pid()
    }

    /// Whether the process has exited (a cheap check, no VMM round trip).
    pub fn has_exited(&mut self) -> bool {
        self.vm.has_exited()
    }

    /// Restores the template into the VMM and runs it (one `Restore` with `resume`), waits for
    /// the init's answer on its control port and pauses it. A `Restore` the VMM refuses ends it
    /// ([`PooledVmError::Restore`]). Blocking; setting `cancel` ends the wait early.
    pub fn restore(
        self,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<PooledVm, PooledVmError> {
        let started = Instant::now();
        let AheadVm { mut vm, files } = self;
        // Restored and run in one command (`resume`): no `Start` round trip before the guest runs.
        let restored = match vm.vmm.as_ref() {
            Some(vmm) => vmm.restore_and_resume(&files, RestoreMode::file()),
            None => return Err(vm.not_up("the VMM is gone".into())),
        };
        match restored {
            Ok(VmState::Running) => {}
            Ok(other) => return Err(vm.not_up(format!("the restore left it {other:?}"))),
            // Never used: dropping `vm` kills the VMM and removes its folder or jail.
            Err(e) => return Err(PooledVmError::Restore(e)),
        }
        if cancel.load(Ordering::SeqCst) {
            return Err(vm.not_up("cancelled (the pools are shutting down)".into()));
        }
        // The init answers on its control port: the transport reset is behind it.
        let left = timeout.saturating_sub(started.elapsed());
        let status = match open(&vm.uds, &Message::Status, left) {
            Ok((client, Message::StatusReply(status))) => {
                vm.control = Some(client);
                status
            }
            Ok((_, other)) => {
                return Err(vm.not_up(format!("the init answered a Status with {}", other.kind())));
            }
            Err(e) => return Err(vm.not_up(format!("no answer after the restore: {e}"))),
        };
        let answered = started.elapsed();
        vm.ready = Ready {
            init_start_ms: 0,
            ready_ms: status.uptime_ms,
            kernel_release: status.kernel_release,
        };
        let paused = match vm.vmm.as_ref().map(VmmProcess::pause) {
            Some(r) => r,
            None => return Err(vm.not_up("the VMM is gone".into())),
        };
        match paused {
            Ok(VmState::Paused) => {}
            Ok(other) => return Err(vm.not_up(format!("pause left it {other:?}"))),
            Err(e) => return Err(vm.not_up(format!("pause: {e}"))),
        }
        vm.restored_in = started.elapsed();
        tracing::debug!(
            mem_mib = vm.mem_mib,
            restore_to_answer = ?answered,
            pid = vm.pid(),
            "a VMM spawned ahead restored; its init answered"
        );
        Ok(vm)
    }
}

impl PooledVm {
    /// Restores `template` in a new `hearth vmm` process at `home` (its folder or jail root
    /// created, and removed again on failure): spawns it ahead ([`AheadVm::spawn`]) and restores
    /// it at once ([`AheadVm::restore`]): the init has answered and the VM is paused. Blocking;
    /// setting `cancel` ends the wait early.
    pub fn restore(
        hearth_binary: &Path,
        template: &Template,
        home: VmHome,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<PooledVm, PooledVmError> {
        let started = Instant::now();
        let ahead = AheadVm::spawn(hearth_binary, template, home)?;
        if cancel.load(Ordering::SeqCst) {
            return Err(PooledVmError::NotUp {
                why: "cancelled (the pools are shutting down)".into(),
                stderr: String::new(),
                serial: String::new(),
            });
        }
        let mut vm = ahead.restore(timeout.saturating_sub(started.elapsed()), cancel)?;
        vm.restored_in = started.elapsed();
        Ok(vm)
    }

    fn not_up(&mut self, why: String) -> PooledVmError {
        let stderr = match self.vmm.as_mut() {
            Some(v) => {
                let _ = v.kill();
                v.stderr_tail().trim().to_string()
            }
            None => String::new(),
        };
        PooledVmError::NotUp {
            why,
            stderr,
            serial: serial_tail(&self.dir),
        }
    }

    /// The VMM process's id (for a jailed VM, the jailer's child, the VMM itself).
    pub fn pid(&self) -> Option<u32> {
        self.vmm.as_ref().map(VmmProcess::vmm_pid)
    }

    /// The jailer's process id, for a jailed VM.
    pub fn jailer_pid(&self) -> Option<u32> {
        self.jail.as_ref()?;
        self.vmm.as_ref().map(VmmProcess::pid)
    }

    /// The VM's jail, when it runs in one.
    pub fn jail(&self) -> Option<&VmJail> {
        self.jail.as_ref().map(|(_, jail)| jail)
    }

    /// Guest memory, MiB.
    pub fn mem_mib(&self) -> u32 {
        self.mem_mib
    }

    /// The digest of the template it was restored from.
    pub fn template_digest(&self) -> &str {
        &self.template_digest
    }

    /// From the `Restore` (or, through [`PooledVm::restore`], from spawning the VMM) to the
    /// paused, answering VM.
    pub fn restored_in(&self) -> Duration {
        self.restored_in
    }

    /// The VMM process's memory (guest RAM set apart).
    pub fn memory_usage(&self) -> Option<MemoryUsage> {
        self.vmm.as_ref().and_then(|v| v.memory_usage().ok())
    }

    /// Whether the process has exited (a cheap check, no VMM round trip).
    pub fn has_exited(&mut self) -> bool {
        match self.vmm.as_mut() {
            Some(v) => !matches!(v.wait(Duration::ZERO), Ok(None)),
            None => true,
        }
    }

    /// Checks that the VM is alive and paused, resumes it and refreshes the clone with
    /// `identity`, fresh entropy and the host's clock. Blocking.
    pub fn activate(&mut self, identity: &str) -> Result<Activated, PooledVmError> {
        let Some(vmm) = self.vmm.as_mut() else {
            return Err(PooledVmError::Control(
                hearth_vmm::ProcessError::NoControlSocket,
            ));
        };
        if let Ok(Some(status)) = vmm.wait(Duration::ZERO) {
            return Err(PooledVmError::Exited(status));
        }
        let t = Instant::now();
        match vmm.status().map_err(PooledVmError::Control)? {
            VmState::Paused => {}
            other => return Err(PooledVmError::NotPaused(other)),
        }
        vmm.resume().map_err(PooledVmError::Control)?;
        let resume = t.elapsed();
        let t = Instant::now();
        // The connection the init answered on after the restore, else a new one.
        let mut client = match self.control.take() {
            Some(client) => client,
            None => ping(&self.uds).map_err(PooledVmError::Refresh)?,
        };
        let answer = t.elapsed();
        let t = Instant::now();
        let entropy = host_entropy().map_err(|source| PooledVmError::Io {
            what: "read entropy from",
            path: PathBuf::from("/dev/urandom"),
            source,
        })?;
        let clock_offset_ns = client
            .refresh(hearth_guest::protocol::Refresh {
                identity: identity.to_string(),
                entropy,
                realtime_ns: hearth_guest::protocol::client::realtime_ns(),
            })
            .map_err(PooledVmError::Refresh)?;
        Ok(Activated {
            clock_offset_ns,
            resume,
            answer,
            refresh: t.elapsed(),
        })
    }

    /// Hands the VM over (to a sandbox); its folder is then the new owner's to remove.
    pub fn into_parts(mut self) -> Option<ClaimedParts> {
        let vmm = self.vmm.take()?;
        let listener = self.ready_listener.take()?;
        let ready_link = match listener.accept() {
            Ok((conn, _)) => ReadyLink::Open(conn),
            Err(_) => ReadyLink::Waiting(listener),
        };
        // The activation's connection ends here; the sandbox opens its own.
        self.control = None;
        let dir = std::mem::take(&mut self.dir);
        Some(ClaimedParts {
            vmm,
            ready_link,
            ready: self.ready.clone(),
            dir,
            uds: self.uds.clone(),
            jail: self.jail.take(),
        })
    }
}

impl Drop for PooledVm {
    fn drop(&mut self) {
        if let Some(mut v) = self.vmm.take() {
            let _ = v.kill();
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if let Some((jails, jail)) = self.jail.take()
            && let Err(e) = jails.clean_up(&jail)
        {
            tracing::warn!(id = %jail.id, error = %e, "cannot clean up a pooled VM's jail");
        }
    }
}

/// 64 bytes from the host's generator.
fn host_entropy() -> Result<Vec<u8>, std::io::Error> {
    let mut bytes = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}
