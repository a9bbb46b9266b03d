//! The container sandbox: `hearth-init` as PID 1 of a Linux container, the host link a Unix socket.
//!
//! The agent creates the sandbox's cgroup ([`super::cgroup`]) and a Unix socket, then runs
//! `hearth-init container-launch SPEC`; the launcher joins the cgroup, connects to the socket and
//! builds the container (namespaces, uid mapping, tmpfs root, `pivot_root`, seccomp) as described
//! in `hearth_guest::runtime::container`. The namespace work happens in that freshly executed,
//! single-threaded process rather than in the multi-threaded agent, where `fork` followed by
//! `unshare` and mounts would not be safe.
//!
//! Destroying a sandbox kills every process in its cgroup (the container's PID 1 first among them,
//! which ends its pid namespace) and removes the cgroup and the state folder.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hearth_guest::runtime::container::ContainerSpec;
use tokio::net::UnixListener;

use super::cgroup::SandboxCgroup;
use super::link::{HostLink, lock};
use super::{FunctionSpec, InitReport, InvokeRequest, InvokeResponse, Sandbox, SandboxError};

/// Distinct uid ranges handed out before they are reused.
pub const UID_SLOTS: u32 = 1024;
static NEXT_UID_SLOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// How container sandboxes are made.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// The static `hearth-init` binary.
    pub init_path: PathBuf,
    /// Where per-sandbox folders (socket, root mount point) are created.
    pub state_dir: PathBuf,
    /// First host uid/gid of the ranges mapped into containers: each sandbox gets its own range of
    /// 65536 ids (one of [`UID_SLOTS`] slots), so no two live sandboxes share a host uid.
    pub uid_base: u32,
    /// Keep the host's network (else only `lo`).
    pub network: bool,
    /// Size of the container's root tmpfs in MiB (code and runtime files; `/tmp` is separate).
    pub disk_mb: u32,
    /// Longest wait for the runtime's init.
    pub init_timeout: Duration,
}

impl ContainerConfig {
    /// Defaults around `init_path`: state in the temp folder, uids from 200000, no network.
    pub fn new(init_path: PathBuf) -> Self {
        ContainerConfig {
            init_path,
            state_dir: std::env::temp_dir(),
            uid_base: 200_000,
            network: false,
            disk_mb: 512,
            init_timeout: Duration::from_secs(10),
        }
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Setup { what, source }
}

/// A running container sandbox.
pub struct ContainerSandbox {
    link: HostLink,
    launcher: Mutex<Option<tokio::process::Child>>,
    cgroup: SandboxCgroup,
    dir: PathBuf,
    torn_down: AtomicBool,
}

impl Sandbox for ContainerSandbox {
    type Config = ContainerConfig;

    async fn start(
        config: &ContainerConfig,
        function: &FunctionSpec,
    ) -> Result<(Self, InitReport), SandboxError> {
        let name = format!("hearth-{}", &super::new_request_id()[..18]);
        let dir = config.state_dir.join(&name);
        std::fs::create_dir_all(dir.join("root")).map_err(setup("create the state folder"))?;
        let started = Instant::now();
        let cgroup = match SandboxCgroup::create(&name, function.bundle.memory_mb) {
            Ok(cg) => cg,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SandboxError::Setup {
                    what: e.to_string(),
                    source: std::io::Error::other(e),
                });
            }
        };
        let procs_files = cgroup.procs_files();
        let mut sandbox_dir_guard = Cleanup {
            dir: Some(dir.clone()),
            cgroup: Some(cgroup),
        };
        let socket = dir.join("link.sock");
        let listener = UnixListener::bind(&socket).map_err(setup("bind the link socket"))?;
        let spec = ContainerSpec {
            root_dir: dir.join("root"),
            link_socket: socket,
            cgroup_procs: procs_files,
            uid_base: config.uid_base
                + (NEXT_UID_SLOT.fetch_add(1, Ordering::Relaxed) % UID_SLOTS) * 65_536,
            uid_count: 65_536,
            hostname: "hearth".into(),
            disk_mb: config.disk_mb,
            network: config.network,
        };
        let spec = serde_json::to_string(&spec).map_err(|e| SandboxError::Setup {
            what: "encode the container spec".into(),
            source: std::io::Error::other(e),
        })?;
        // Started on the CPU placed for it, else with every CPU the agent may use (not just the
        // calling core's).
        let mut launcher = crate::cores::spawn_on(function.cpu, || {
            tokio::process::Command::new(&config.init_path)
                .arg("container-launch")
                .arg(spec)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
        })
        .map_err(setup(format!("start {}", config.init_path.display())))?;
        let stderr = launcher.stderr.take();
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            if let Some(mut s) = stderr {
                use tokio::io::AsyncReadExt;
                let _ = (&mut s).take(64 * 1024).read_to_end(&mut buf).await;
            }
            String::from_utf8_lossy(&buf).into_owned()
        });
        let accepted = tokio::select! {
            conn = tokio::time::timeout(config.init_timeout, listener.accept()) => conn,
            status = launcher.wait() => {
                let msg = stderr_task.await.unwrap_or_default();
                return Err(SandboxError::Gone(format!("the container launcher ended ({status:?}): {}", msg.trim())));
            }
        };
        let (stream, _) = match accepted {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(setup("accept the host link")(e)),
            Err(_) => {
                return Err(SandboxError::Gone(
                    "the container did not connect in time".into(),
                ));
            }
        };
        // Only our launcher may be the host link's other end.
        let peer = stream.peer_cred().ok().and_then(|c| c.pid());
        if peer.is_none() || peer.map(|p| p as u32) != launcher.id() {
            return Err(SandboxError::Gone(format!(
                "the host link was opened by pid {peer:?}, not the launcher"
            )));
        }
        let (reader, writer) = stream.into_split();
        let (link, report) =
            match HostLink::open(function, config.init_timeout, reader, writer).await {
                Ok(done) => done,
                Err(SandboxError::Link(e)) => {
                    let _ = launcher.start_kill();
                    let said = tokio::time::timeout(Duration::from_secs(2), stderr_task).await;
                    let said = said.ok().and_then(Result::ok).unwrap_or_default();
                    return Err(SandboxError::Gone(format!(
                        "host link failed ({e}); the container said: {}",
                        said.trim()
                    )));
                }
                Err(e) => return Err(e),
            };
        let _ = started;
        let Some(cgroup) = sandbox_dir_guard.disarm() else {
            return Err(SandboxError::Gone("the sandbox cgroup went missing".into()));
        };
        Ok((
            ContainerSandbox {
                link,
                launcher: Mutex::new(Some(launcher)),
                cgroup,
                dir,
                torn_down: AtomicBool::new(false),
            },
            report,
        ))
    }

    /// "Max Memory Used" is the sandbox cgroup's peak, read here after the invoke; the init in
    /// the container leaves it to the host and skips its own `/proc` read.
    async fn invoke(&self, request: InvokeRequest) -> Result<InvokeResponse, SandboxError> {
        self.link
            .invoke(request, || self.cgroup.peak_memory_mb())
            .await
    }

    fn is_alive(&self) -> bool {
        self.link.is_alive()
    }

    async fn destroy(self) {
        self.teardown();
        let child = lock(&self.launcher).take();
        if let Some(mut child) = child {
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
    }
}

impl ContainerSandbox {
    /// Pids in the sandbox's cgroup (host pids).
    pub fn pids(&self) -> Vec<i32> {
        self.cgroup.pids()
    }

    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.link.close();
        if let Some(child) = lock(&self.launcher).as_mut() {
            let _ = child.start_kill();
        }
        self.cgroup.kill_and_remove();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ContainerSandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Removes a half-made sandbox's folder and cgroup unless disarmed.
struct Cleanup {
    dir: Option<PathBuf>,
    cgroup: Option<SandboxCgroup>,
}

impl Cleanup {
    fn disarm(&mut self) -> Option<SandboxCgroup> {
        self.dir = None;
        self.cgroup.take()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup {
            cg.kill_and_remove();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
