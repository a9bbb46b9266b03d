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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_guest::protocol::function::{self as f, CODE_CHUNK, Message};
use hearth_guest::protocol::{self, Hello};
use hearth_guest::runtime::container::ContainerSpec;
use hearth_guest::runtime::{read_frame, write_frame};
use tokio::net::UnixListener;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

use super::cgroup::SandboxCgroup;
use super::{
    FunctionSpec, InitReport, InvokeRequest, InvokeResponse, Sandbox, SandboxError, timed_out,
};

/// Distinct uid ranges handed out before they are reused.
pub const UID_SLOTS: u32 = 1024;
static NEXT_UID_SLOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Log lines kept per invoke for the caller.
const MAX_LOG_LINES: usize = 10_000;
/// Log bytes kept per invoke for the caller.
const MAX_LOG_BYTES: usize = 1 << 20;

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

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<f::InvokeResult>>>>;
/// Per in-flight invoke: its log lines and their total size.
type Logs = Arc<Mutex<HashMap<String, (Vec<f::LogLine>, usize)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running container sandbox.
pub struct ContainerSandbox {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiters: Waiters,
    logs: Logs,
    alive: Arc<AtomicBool>,
    exit: Arc<Mutex<Option<String>>>,
    reader: tokio::task::JoinHandle<()>,
    launcher: Mutex<Option<tokio::process::Child>>,
    cgroup: SandboxCgroup,
    dir: PathBuf,
    arn: String,
    timeout: Duration,
    torn_down: AtomicBool,
    /// One permit per invoke the runtime takes at once (`max_concurrency`): more wait here, where
    /// their timeout has not started, rather than in the init.
    permits: tokio::sync::Semaphore,
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
        let mut launcher = tokio::process::Command::new(&config.init_path)
            .arg("container-launch")
            .arg(spec)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
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
        let loaded = match handshake(config, function, reader, writer).await {
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
        let (loaded, init_logs, reader, writer) = loaded;
        let _ = started;
        let Some(cgroup) = sandbox_dir_guard.disarm() else {
            return Err(SandboxError::Gone("the sandbox cgroup went missing".into()));
        };
        let waiters: Waiters = Arc::default();
        let logs: Logs = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let exit = Arc::new(Mutex::new(None));
        let reader = tokio::spawn(read_loop(
            reader,
            waiters.clone(),
            logs.clone(),
            alive.clone(),
            exit.clone(),
        ));
        Ok((
            ContainerSandbox {
                writer: tokio::sync::Mutex::new(writer),
                waiters,
                logs,
                alive,
                exit,
                reader,
                launcher: Mutex::new(Some(launcher)),
                cgroup,
                dir,
                arn: function.bundle.function_arn.clone(),
                timeout: function.timeout(),
                torn_down: AtomicBool::new(false),
                permits: tokio::sync::Semaphore::new(
                    function.bundle.max_concurrency.max(1) as usize
                ),
            },
            InitReport {
                duration: Duration::from_micros(loaded.init_duration_us),
                logs: init_logs,
            },
        ))
    }

    async fn invoke(&self, request: InvokeRequest) -> Result<InvokeResponse, SandboxError> {
        if !self.is_alive() {
            let why = lock(&self.exit)
                .clone()
                .unwrap_or_else(|| "not alive".into());
            return Err(SandboxError::Gone(why));
        }
        let request_id = if request.request_id.is_empty() {
            super::new_request_id()
        } else {
            request.request_id
        };
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| SandboxError::Gone("the sandbox is closing".into()))?;
        if !self.is_alive() {
            return Err(SandboxError::Gone(
                "the sandbox ended while the invoke waited".into(),
            ));
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let deadline_ms = now_ms + self.timeout.as_millis() as u64;
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(request_id.clone(), tx);
        lock(&self.logs).insert(request_id.clone(), (Vec::new(), 0));
        let started = Instant::now();
        let invoke = Message::Invoke(f::Invoke {
            request_id: request_id.clone(),
            payload: request.payload,
            deadline_ms,
            invoked_function_arn: self.arn.clone(),
            trace_id: request.trace_id,
            client_context: request.client_context,
            cognito_identity: request.cognito_identity,
        });
        let sent = {
            let mut w = self.writer.lock().await;
            send(&mut w, invoke).await
        };
        if let Err(e) = sent {
            lock(&self.waiters).remove(&request_id);
            lock(&self.logs).remove(&request_id);
            self.alive.store(false, Ordering::SeqCst);
            return Err(e);
        }
        let outcome = tokio::time::timeout(self.timeout, rx).await;
        let logs = lock(&self.logs)
            .remove(&request_id)
            .map(|(lines, _)| lines)
            .unwrap_or_default();
        let peak = self.cgroup.peak_memory_mb();
        match outcome {
            Ok(Ok(result)) => Ok(InvokeResponse {
                request_id,
                result: match result.outcome {
                    f::Outcome::Response(bytes) => Ok(bytes),
                    f::Outcome::Error(e) => Err(e),
                },
                logs,
                logs_tail: result.logs_tail,
                duration: Duration::from_micros(result.duration_us),
                init_duration: None,
                max_memory_used_mb: peak.unwrap_or(result.max_memory_used_mb),
            }),
            Ok(Err(_)) => {
                let why = lock(&self.exit)
                    .clone()
                    .unwrap_or_else(|| "the host link closed".into());
                Err(SandboxError::Gone(why))
            }
            Err(_) => {
                // Past the timeout: the environment is destroyed and replaced.
                lock(&self.waiters).remove(&request_id);
                self.alive.store(false, Ordering::SeqCst);
                let tail = tail_of(&logs);
                Ok(InvokeResponse {
                    request_id,
                    result: Err(timed_out(self.timeout)),
                    logs,
                    logs_tail: tail,
                    duration: started.elapsed(),
                    init_duration: None,
                    max_memory_used_mb: peak.unwrap_or(0),
                })
            }
        }
    }

    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
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
        self.alive.store(false, Ordering::SeqCst);
        self.permits.close();
        self.reader.abort();
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

/// Hello both ways, then the bundle and its code; waits for the runtime's init.
async fn handshake(
    config: &ContainerConfig,
    function: &FunctionSpec,
    mut reader: tokio::net::unix::OwnedReadHalf,
    mut writer: OwnedWriteHalf,
) -> Result<Handshake, SandboxError> {
    let link_err = SandboxError::Link;
    write_frame(
        &mut writer,
        &protocol::Message::Hello(Hello::ours("hearth-agent")),
    )
    .await
    .map_err(link_err)?;
    let hello = read_frame(&mut reader).await.map_err(SandboxError::Link)?;
    let hello =
        hello.ok_or_else(|| SandboxError::Gone("the init closed the link before Hello".into()))?;
    protocol::check_hello(hello).map_err(SandboxError::Link)?;
    let mut bundle = function.bundle.clone();
    bundle.code_len = function.code.len() as u64;
    send(&mut writer, Message::Load(bundle)).await?;
    for chunk in function.code.chunks(CODE_CHUNK) {
        send(&mut writer, Message::CodeChunk(chunk.to_vec())).await?;
    }
    let init = tokio::time::timeout(config.init_timeout, async {
        let mut tail = Vec::new();
        loop {
            match read_frame(&mut reader).await {
                Ok(Some(protocol::Message::Function(Message::Loaded(l)))) => return Ok((l, tail)),
                Ok(Some(protocol::Message::Function(Message::InitFailed(f)))) => {
                    return Err(SandboxError::Init {
                        error: f.error,
                        logs_tail: f.logs_tail,
                        init_duration: Duration::from_micros(f.init_duration_us),
                    });
                }
                Ok(Some(protocol::Message::Function(Message::Log(l)))) => {
                    tracing::debug!(line = %String::from_utf8_lossy(&l.line), "init log");
                    if tail.len() < MAX_LOG_LINES {
                        tail.push(l);
                    }
                }
                Ok(Some(other)) => {
                    tracing::warn!(kind = other.kind(), "unexpected message during init")
                }
                Ok(None) => {
                    return Err(SandboxError::Gone(
                        "the init closed the link during init".into(),
                    ));
                }
                Err(e) => return Err(SandboxError::Link(e)),
            }
        }
    })
    .await;
    let (loaded, logs) = match init {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(SandboxError::Init {
                error: f::FunctionError::new(
                    "Sandbox.Timedout",
                    format!(
                        "Init timed out after {:.2} seconds",
                        config.init_timeout.as_secs_f64()
                    ),
                ),
                logs_tail: Vec::new(),
                init_duration: config.init_timeout,
            });
        }
    };
    Ok((loaded, logs, reader, writer))
}

type Handshake = (
    f::Loaded,
    Vec<f::LogLine>,
    tokio::net::unix::OwnedReadHalf,
    OwnedWriteHalf,
);

fn tail_of(logs: &[f::LogLine]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in logs {
        out.extend_from_slice(&l.line);
        out.push(b'\n');
    }
    let cut = out.len().saturating_sub(f::LOG_TAIL);
    out.split_off(cut)
}

async fn send(w: &mut OwnedWriteHalf, msg: Message) -> Result<(), SandboxError> {
    write_frame(w, &protocol::Message::Function(msg))
        .await
        .map_err(SandboxError::Link)
}

async fn read_loop(
    mut reader: tokio::net::unix::OwnedReadHalf,
    waiters: Waiters,
    logs: Logs,
    alive: Arc<AtomicBool>,
    exit: Arc<Mutex<Option<String>>>,
) {
    loop {
        match read_frame(&mut reader).await {
            Ok(Some(protocol::Message::Function(Message::Result(r)))) => {
                if let Some(tx) = lock(&waiters).remove(&r.request_id) {
                    let _ = tx.send(r);
                }
            }
            Ok(Some(protocol::Message::Function(Message::Log(l)))) => {
                let mut logs = lock(&logs);
                let targets: Vec<String> = match &l.request_id {
                    Some(id) => vec![id.clone()],
                    None => logs.keys().cloned().collect(),
                };
                for id in targets {
                    if let Some((v, bytes)) = logs.get_mut(&id)
                        && v.len() < MAX_LOG_LINES
                        && *bytes + l.line.len() <= MAX_LOG_BYTES
                    {
                        *bytes += l.line.len();
                        v.push(l.clone());
                    }
                }
            }
            Ok(Some(protocol::Message::Function(Message::Exited(e)))) => {
                *lock(&exit) = Some(format!("the runtime exited: {}", e.status));
                alive.store(false, Ordering::SeqCst);
            }
            Ok(Some(other)) => {
                tracing::warn!(kind = other.kind(), "unexpected message from the init")
            }
            Ok(None) | Err(_) => {
                alive.store(false, Ordering::SeqCst);
                let mut exit = lock(&exit);
                if exit.is_none() {
                    *exit = Some("the host link closed".into());
                }
                // Waiters see their sender dropped.
                lock(&waiters).clear();
                return;
            }
        }
    }
}
