//! The agent's handle on a `hearth vmm` child process: spawn it with a [`VmConfig`], drive it
//! over its control socket, wait for it, and never leave it behind (killed and reaped on drop; it
//! also exits by itself when this process's pipe to it closes).

use crate::config::VmConfig;
use crate::control::protocol::{self, ProtocolError};
use crate::control::{Command, Request, Response, VmState};
use std::collections::VecDeque;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as ProcessCommand, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a new child gets to build its VM and open its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a Restore may take (the copy mode reads the memory file's data).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a snapshot may take (it writes guest RAM).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of the child's stderr is kept for error messages.
const STDERR_KEEP: usize = 16 * 1024;
/// How long a jailer gets to clean up and exit after its VMM was killed.
const JAILER_EXIT: Duration = Duration::from_secs(5);

/// The environment variable naming the VMM executable spawned VMMs run.
pub const VMM_BINARY_ENV: &str = "HEARTH_VMM_BINARY";
/// The small VMM-only executable (`vmm/src/bin/hearth-vmm.rs`).
pub const VMM_BINARY_NAME: &str = "hearth-vmm";
/// Where the set-up builds the static, non-PIE `hearth-vmm`, under the cargo target folder.
pub const STATIC_VMM_SUBDIR: &str = "x86_64-unknown-linux-gnu/release";

/// The program a VMM is spawned as, for the `hearth` binary `hearth_binary`; it is run with `vmm`
/// and the VMM flags (`hearth-vmm` accepts and ignores the leading `vmm`). In order:
/// `$HEARTH_VMM_BINARY`; for `hearth` in a cargo build folder (`<target>/debug` or
/// `<target>/release`), the static `hearth-vmm` the set-up builds
/// (`<target>/x86_64-unknown-linux-gnu/release/`); then `hearth-vmm` next to `hearth`; each only
/// if it was built from the same VMM sources as this process ([`crate::build_id`]: an executable
/// left from before a change is never run); else `hearth` itself.
pub fn vmm_program(hearth_binary: &Path) -> PathBuf {
    let (program, why) = resolve_vmm_program(
        hearth_binary,
        std::env::var_os(VMM_BINARY_ENV).filter(|v| !v.is_empty()),
        crate::build_id::file_is_this_build,
    );
    tracing::debug!(program = %program.display(), why, "VMM program");
    program
}

fn resolve_vmm_program(
    hearth_binary: &Path,
    from_env: Option<std::ffi::OsString>,
    same_build: impl Fn(&Path) -> bool,
) -> (PathBuf, &'static str) {
    if let Some(p) = from_env {
        return (PathBuf::from(p), "$HEARTH_VMM_BINARY");
    }
    let dir = hearth_binary.parent().unwrap_or(Path::new("."));
    let in_build = dir
        .file_name()
        .is_some_and(|n| n == "debug" || n == "release");
    if in_build && let Some(target) = dir.parent() {
        let built = target.join(STATIC_VMM_SUBDIR).join(VMM_BINARY_NAME);
        if same_build(&built) {
            return (built, "the static hearth-vmm of the build");
        }
    }
    let sibling = dir.join(VMM_BINARY_NAME);
    if same_build(&sibling) {
        return (sibling, "hearth-vmm next to hearth");
    }
    (
        hearth_binary.to_path_buf(),
        "hearth vmm (no hearth-vmm of the same build)",
    )
}

/// `path` of a configuration as seen from this host: under `root` for a jailed VMM.
fn host_path(root: Option<&Path>, path: &Path) -> PathBuf {
    match root {
        Some(root) => root.join(path.strip_prefix("/").unwrap_or(path)),
        None => path.to_path_buf(),
    }
}

/// Controlling a `hearth vmm` process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The configuration has no control socket (it is how the process is driven).
    #[error("the VM configuration needs a control_socket")]
    NoControlSocket,
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The binary could not be started.
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The process exited before it was ready.
    #[error("the VMM process exited ({status}) before it was ready: {stderr}")]
    ExitedEarly {
        /// Its exit status.
        status: ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
    /// The process did not open its control socket in time.
    #[error("the VMM process did not open its control socket within {0:?}: {1}")]
    NotReady(Duration, String),
    /// A control request failed on the wire.
    #[error("control request {0:?} failed")]
    Control(Command, #[source] ProtocolError),
    /// The VMM refused a command.
    #[error("the VMM refused {0:?}: {1}")]
    Refused(Command, String),
    /// Waiting for the process failed.
    #[error("cannot wait for the VMM process")]
    Wait(#[source] std::io::Error),
    /// The process did not exit after Stop.
    #[error("the VMM process did not exit within {0:?} of Stop")]
    StopTimeout(Duration),
}

/// Memory of a VMM process, from `/proc/<pid>/smaps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Resident set of the whole process, KiB.
    pub rss_kib: u64,
    /// Proportional set size of the whole process, KiB.
    pub pss_kib: u64,
    /// Resident guest RAM (the guest memory mappings), KiB.
    pub guest_rss_kib: u64,
    /// Proportional set size of the guest memory mappings, KiB.
    pub guest_pss_kib: u64,
}

impl MemoryUsage {
    /// The VMM's own resident memory: everything but guest RAM, KiB.
    pub fn own_rss_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }

    /// The VMM's own proportional set size, KiB.
    pub fn own_pss_kib(&self) -> u64 {
        self.pss_kib.saturating_sub(self.guest_pss_kib)
    }
}

/// Sums `Rss` and `Pss` of `smaps` text, setting apart writable mappings whose size is one of
/// `guest_sizes` bytes (the guest memory regions, anonymous or mapped from a snapshot).
pub fn parse_smaps(smaps: &str, guest_sizes: &[u64]) -> MemoryUsage {
    let mut usage = MemoryUsage {
        rss_kib: 0,
        pss_kib: 0,
        guest_rss_kib: 0,
        guest_pss_kib: 0,
    };
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            // A mapping header: "start-end perms offset dev inode [path]". Guest RAM is a
            // writable private mapping of a region's size: anonymous, or of a snapshot's memory
            // file after a restore.
            let writable = fields.next().is_some_and(|p| p.starts_with("rw"));
            in_guest = writable && guest_sizes.contains(&end.saturating_sub(start));
            continue;
        }
        let value = fields
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match first {
            "Rss:" => {
                usage.rss_kib += value;
                if in_guest {
                    usage.guest_rss_kib += value;
                }
            }
            "Pss:" => {
                usage.pss_kib += value;
                if in_guest {
                    usage.guest_pss_kib += value;
                }
            }
            _ => {}
        }
    }
    usage
}

/// A running `hearth vmm` child.
pub struct VmmProcess {
    child: Child,
    // Held open: the child exits when it closes (this process died or dropped the handle).
    _stdin: Option<ChildStdin>,
    control: PathBuf,
    config: VmConfig,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    status: Option<ExitStatus>,
    /// A jailed VMM's jail root on this host: `config`'s paths are inside it.
    host_root: Option<PathBuf>,
    /// The VMM's own pid: the child's, or a jailed VMM's (the jailer's child), as its control
    /// socket reports it.
    vmm_pid: u32,
}

impl VmmProcess {
    /// Starts `hearth_binary vmm` (or the VMM executable [`vmm_program`] finds for it) for
    /// `config` and waits until its VM is built and its control
    /// socket answers. The VM is not running yet: call [`VmmProcess::start`].
    pub fn spawn(hearth_binary: &Path, config: &VmConfig) -> Result<Self, ProcessError> {
        Self::spawn_with(hearth_binary, config, &[])
    }

    /// [`VmmProcess::spawn`] running `program vmm` as given (`hearth` or `hearth-vmm`), without
    /// [`vmm_program`]'s choice: for comparing VMM executables.
    pub fn spawn_program(program: &Path, config: &VmConfig) -> Result<Self, ProcessError> {
        Self::spawn_via(program, &[], None, config, &[])
    }

    /// Starts `hearth_binary vmm` restoring the snapshot in `files` with the host side (sockets,
    /// serial log) `config` describes; `config`'s memory, vCPUs and devices must match the
    /// snapshot. Waits until the VM is restored: call [`VmmProcess::start`] to run it.
    pub fn spawn_restored(
        hearth_binary: &Path,
        config: &VmConfig,
        files: &crate::SnapshotFiles,
    ) -> Result<Self, ProcessError> {
        Self::spawn_with(
            hearth_binary,
            config,
            &[
                "--restore-state".into(),
                files.state.clone().into_os_string(),
                "--restore-mem".into(),
                files.mem.clone().into_os_string(),
            ],
        )
    }

    /// [`VmmProcess::spawn_restored`] with guest RAM restored as `mode` says (`RestoreMode::file()`
    /// is `spawn_restored`; `File` can also copy a set of written pages ahead and record one to
    /// `<mem>.written.ws` when the VM stops; `Uffd` serves it through userfaultfd, optionally
    /// prefetching a working set and recording one to `<mem>.ws` when the VM stops).
    pub fn spawn_restored_with(
        hearth_binary: &Path,
        config: &VmConfig,
        files: &crate::SnapshotFiles,
        mode: crate::RestoreMode,
    ) -> Result<Self, ProcessError> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--restore-state".into(),
            files.state.clone().into_os_string(),
            "--restore-mem".into(),
            files.mem.clone().into_os_string(),
        ];
        let (name, prefetch_ws, record_ws) = match mode {
            crate::RestoreMode::File {
                prefetch_ws,
                record_ws,
            } => ("file", prefetch_ws, record_ws),
            crate::RestoreMode::Copy => ("copy", None, false),
            crate::RestoreMode::Uffd {
                prefetch_ws,
                record_ws,
            } => ("uffd", prefetch_ws, record_ws),
        };
        args.extend(["--restore-mode".into(), name.into()]);
        if let Some(ws) = prefetch_ws {
            args.extend(["--prefetch-ws".into(), ws.into_os_string()]);
        }
        if record_ws {
            args.push("--record-ws".into());
        }
        Self::spawn_with(hearth_binary, config, &args)
    }

    /// Starts `hearth_binary vmm --await-restore` for `config` ahead of a restore: waits until
    /// its KVM VM and vCPUs are set up for `config`'s memory size and vCPU count and its control
    /// socket answers. Then [`VmmProcess::restore`] names the snapshot and
    /// [`VmmProcess::start`] runs it.
    pub fn spawn_awaiting_restore(
        hearth_binary: &Path,
        config: &VmConfig,
    ) -> Result<Self, ProcessError> {
        Self::spawn_with(hearth_binary, config, &["--await-restore".into()])
    }

    /// Restores the snapshot in `files` into a VMM started ahead
    /// ([`VmmProcess::spawn_awaiting_restore`], or jailed with `--await-restore`; the paths are
    /// as the VMM sees them), guest RAM as `mode` says. The files are read and checked as at a
    /// restore on spawn; a refused snapshot ([`ProcessError::Refused`]) leaves the VMM awaiting
    /// another, unless it failed past those checks (then the process exits).
    pub fn restore(
        &self,
        files: &crate::SnapshotFiles,
        mode: crate::RestoreMode,
    ) -> Result<VmState, ProcessError> {
        self.restore_command(files, mode, false)
    }

    /// [`VmmProcess::restore`], the VM then running at once, without a [`VmmProcess::start`]
    /// (the command's `resume`): one round trip fewer before the guest runs. `Running` once
    /// the VM is restored; its vCPUs start right after the answer.
    pub fn restore_and_resume(
        &self,
        files: &crate::SnapshotFiles,
        mode: crate::RestoreMode,
    ) -> Result<VmState, ProcessError> {
        self.restore_command(files, mode, true)
    }

    fn restore_command(
        &self,
        files: &crate::SnapshotFiles,
        mode: crate::RestoreMode,
        resume: bool,
    ) -> Result<VmState, ProcessError> {
        self.request_within(
            Command::Restore {
                state_path: files.state.clone(),
                mem_path: files.mem.clone(),
                mode,
                resume,
            },
            RESTORE_TIMEOUT,
        )
    }

    /// Starts a jailed `hearth vmm`: runs `jailer` with `jail_args` (the jail's command line up to
    /// and including `--`, e.g. `hearth jail ... --`), then `vmm` and its flags for `config` and
    /// `extra`. `config`'s paths (and any in `extra`) are as the VMM sees them inside the jail;
    /// `jail_root` is where that root lies on this host, through which the control socket is
    /// reached and the sockets are cleaned up. [`VmmProcess::pid`] is the jailer's pid,
    /// [`VmmProcess::vmm_pid`] the VMM's.
    pub fn spawn_jailed(
        jailer: &Path,
        jail_args: &[std::ffi::OsString],
        jail_root: &Path,
        config: &VmConfig,
        extra: &[std::ffi::OsString],
    ) -> Result<Self, ProcessError> {
        Self::spawn_via(jailer, jail_args, Some(jail_root), config, extra)
    }

    fn spawn_with(
        hearth_binary: &Path,
        config: &VmConfig,
        extra: &[std::ffi::OsString],
    ) -> Result<Self, ProcessError> {
        Self::spawn_via(&vmm_program(hearth_binary), &[], None, config, extra)
    }

    fn spawn_via(
        program: &Path,
        prefix: &[std::ffi::OsString],
        host_root: Option<&Path>,
        config: &VmConfig,
        extra: &[std::ffi::OsString],
    ) -> Result<Self, ProcessError> {
        config.validate()?;
        let inside = config
            .control_socket
            .clone()
            .ok_or(ProcessError::NoControlSocket)?;
        let control = host_path(host_root, &inside);
        let _ = std::fs::remove_file(&control);
        let json = serde_json::to_string(config)
            .map_err(|e| ProcessError::Config(crate::config::ConfigError::Parse(e)))?;
        let mut child = ProcessCommand::new(program)
            .args(prefix)
            .arg("vmm")
            .arg("--config-json")
            .arg(json)
            .arg("--exit-on-stdin-eof")
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ProcessError::Spawn(program.to_path_buf(), e))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let keep = stderr.clone();
            // Drains the child's stderr so it never blocks on a full pipe; keeps the tail.
            let _ = std::thread::Builder::new()
                .name("vmm-stderr".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = pipe.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                        k.extend(&buf[..n]);
                        while k.len() > STDERR_KEEP {
                            k.pop_front();
                        }
                    }
                });
        }
        let stdin = child.stdin.take();
        let vmm_pid = child.id();
        let mut me = VmmProcess {
            child,
            _stdin: stdin,
            control,
            config: config.clone(),
            stderr,
            status: None,
            host_root: host_root.map(Path::to_path_buf),
            vmm_pid,
        };
        me.wait_ready()?;
        Ok(me)
    }

    fn wait_ready(&mut self) -> Result<(), ProcessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(ProcessError::Wait)? {
                self.status = Some(status);
                // Give the stderr thread a moment to collect the last words.
                std::thread::sleep(Duration::from_millis(20));
                return Err(ProcessError::ExitedEarly {
                    status,
                    stderr: self.stderr_tail(),
                });
            }
            if let Ok(stream) = UnixStream::connect(&self.control) {
                // The peer is the process that listens: the VMM, in whatever pid namespace.
                if let Ok(cred) = nix::sys::socket::getsockopt(
                    &stream,
                    nix::sys::socket::sockopt::PeerCredentials,
                ) && let Ok(pid) = u32::try_from(cred.pid())
                    && pid != 0
                {
                    self.vmm_pid = pid;
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::NotReady(READY_TIMEOUT, self.stderr_tail()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The child's process id (for a jailed VMM, its jailer's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VMM process's id (for a jailed VMM, the jailer's child; else [`VmmProcess::pid`]).
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// Where a path of the configuration lies on this host (inside the jail root if jailed).
    pub fn host_path(&self, path: &Path) -> PathBuf {
        host_path(self.host_root.as_deref(), path)
    }

    /// The process's memory, with guest RAM set apart.
    pub fn memory_usage(&self) -> Result<MemoryUsage, ProcessError> {
        let text = std::fs::read_to_string(format!("/proc/{}/smaps", self.vmm_pid()))
            .map_err(ProcessError::Wait)?;
        let sizes: Vec<u64> = crate::arch::memory::ram_ranges(self.config.mem_bytes())
            .iter()
            .map(|(_, len)| *len as u64)
            .collect();
        Ok(parse_smaps(&text, &sizes))
    }

    /// The configuration it runs.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The last part of the child's stderr (its logs and errors).
    pub fn stderr_tail(&self) -> String {
        let k = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = k.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn request(&self, command: Command) -> Result<VmState, ProcessError> {
        self.request_within(command, REQUEST_TIMEOUT)
    }

    fn request_within(&self, command: Command, timeout: Duration) -> Result<VmState, ProcessError> {
        let mut stream = UnixStream::connect(&self.control)
            .map_err(|e| ProcessError::Control(command.clone(), e.into()))?;
        let io = |e: std::io::Error| ProcessError::Control(command.clone(), e.into());
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        protocol::write_frame(&mut stream, &Request::new(command.clone()))
            .map_err(|e| ProcessError::Control(command.clone(), e))?;
        let resp: Response = protocol::read_frame(&mut stream)
            .map_err(|e| ProcessError::Control(command.clone(), e))?;
        resp.result.map_err(|m| ProcessError::Refused(command, m))
    }

    /// Writes a snapshot of the paused VM to `files` (the VM stays paused).
    pub fn snapshot(&self, files: &crate::SnapshotFiles) -> Result<VmState, ProcessError> {
        self.request_within(
            Command::Snapshot {
                state_path: files.state.clone(),
                mem_path: files.mem.clone(),
            },
            SNAPSHOT_TIMEOUT,
        )
    }

    /// Runs the vCPUs for the first time.
    pub fn start(&self) -> Result<VmState, ProcessError> {
        self.request(Command::Start)
    }

    /// Pauses the vCPUs.
    pub fn pause(&self) -> Result<VmState, ProcessError> {
        self.request(Command::Pause)
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) -> Result<VmState, ProcessError> {
        self.request(Command::Resume)
    }

    /// The VM's state.
    pub fn status(&self) -> Result<VmState, ProcessError> {
        self.request(Command::Status)
    }

    /// Stops the VM and waits for the process to exit.
    pub fn stop(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        // The process may be exiting already; the wait below is what counts.
        let _ = self.request(Command::Stop);
        let limit = Duration::from_secs(5);
        self.wait(limit)?.ok_or(ProcessError::StopTimeout(limit))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().map_err(ProcessError::Wait)? {
                self.status = Some(s);
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        // A jailed VMM is the jailer's child: end it (PID 1 of its namespace, so everything in
        // it) and let the jailer clean up and exit; kill the jailer only if it lingers. The
        // jailer has not exited (checked), so it has not reaped the VMM and the pid is still its.
        if self.host_root.is_some()
            && self.vmm_pid != self.child.id()
            && self.child.try_wait().ok().flatten().is_none()
            && let Ok(pid) = i32::try_from(self.vmm_pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            if let Some(s) = self.wait(JAILER_EXIT)? {
                return Ok(s);
            }
        }
        let _ = self.child.kill();
        let s = self.child.wait().map_err(ProcessError::Wait)?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_file(&self.control);
        if let Some(v) = &self.config.vsock {
            let _ = std::fs::remove_file(self.host_path(&v.uds_path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_program_is_a_small_image_of_the_same_build_else_hearth() {
        let target = tempfile::tempdir().unwrap();
        let profile = target.path().join("debug");
        let static_dir = target.path().join(STATIC_VMM_SUBDIR);
        std::fs::create_dir_all(&profile).unwrap();
        std::fs::create_dir_all(&static_dir).unwrap();
        let hearth = profile.join("hearth");
        let sibling = profile.join(VMM_BINARY_NAME);
        let built = static_dir.join(VMM_BINARY_NAME);
        let same = crate::build_id::MARK.as_bytes();
        // Another build's mark (of another length, so no file-time granularity can hide the
        // rewrite from the per-file cache).
        let other = b"hearth-vmm-build-id=0;";
        std::fs::write(&hearth, same).unwrap();
        let resolve = |env: Option<&str>| {
            resolve_vmm_program(
                &hearth,
                env.map(Into::into),
                crate::build_id::file_is_this_build,
            )
            .0
        };
        assert_eq!(resolve(None), hearth);
        assert_eq!(resolve(Some("/opt/vmm")), Path::new("/opt/vmm"));
        std::fs::write(&sibling, same).unwrap();
        assert_eq!(resolve(None), sibling);
        // The static image of the same build wins.
        std::fs::write(&built, same).unwrap();
        assert_eq!(resolve(None), built);
        // Built from other sources (a rebuild of hearth alone): never run, whatever its time.
        std::fs::write(&built, other).unwrap();
        assert_eq!(resolve(None), sibling);
        std::fs::write(&sibling, other).unwrap();
        assert_eq!(resolve(None), hearth);
        // Installed (not a build folder): hearth-vmm next to hearth, if of the same build.
        let bin = target.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("hearth"), same).unwrap();
        std::fs::write(bin.join(VMM_BINARY_NAME), same).unwrap();
        let installed =
            |p: &Path| resolve_vmm_program(p, None, crate::build_id::file_is_this_build).0;
        assert_eq!(installed(&bin.join("hearth")), bin.join(VMM_BINARY_NAME));
        std::fs::write(bin.join(VMM_BINARY_NAME), other).unwrap();
        assert_eq!(installed(&bin.join("hearth")), bin.join("hearth"));
    }

    #[test]
    fn jailed_paths_lie_under_the_jail_root() {
        let root = Path::new("/srv/jail/vm1/root");
        assert_eq!(
            host_path(Some(root), Path::new("/control.sock")),
            Path::new("/srv/jail/vm1/root/control.sock")
        );
        assert_eq!(
            host_path(Some(root), Path::new("run/v.sock")),
            Path::new("/srv/jail/vm1/root/run/v.sock")
        );
        assert_eq!(host_path(None, Path::new("/c.sock")), Path::new("/c.sock"));
    }

    #[test]
    fn smaps_sets_guest_memory_apart() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234 /usr/bin/hearth
Rss:                 600 kB
Pss:                 300 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Rss:               20000 kB
Pss:               20000 kB
7f1000000000-7f1000021000 rw-p 00000000 00:00 0
Rss:                 100 kB
Pss:                 100 kB
";
        let u = parse_smaps(smaps, &[128 << 20]);
        assert_eq!(
            (u.rss_kib, u.guest_rss_kib, u.own_rss_kib(), u.own_pss_kib()),
            (20700, 20000, 700, 400)
        );
        // Restored: guest RAM is a private mapping of the memory file.
        let restored = "\
7f0000000000-7f0008000000 rw-p 00000000 08:01 99 /snap/vm.mem
Rss:                5000 kB
Pss:                2500 kB
7f2000000000-7f2008000000 r--s 00000000 08:01 98 /other
Rss:                  10 kB
Pss:                  10 kB
";
        let u = parse_smaps(restored, &[128 << 20]);
        assert_eq!(
            (u.guest_rss_kib, u.guest_pss_kib, u.own_rss_kib()),
            (5000, 2500, 10)
        );
    }
}
