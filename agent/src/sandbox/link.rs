//! The host end of the function conversation with `hearth-init`, shared by every sandbox kind: the
//! `Hello` exchange, the bundle and its code, the wait for the runtime's init, then invokes
//! multiplexed by request id with the results and log lines read by one background task.
//!
//! The link is a byte stream: a Unix socket to the container's init, or the VMM's vsock backend
//! (a Unix socket too, after `CONNECT <port>`) to the microVM's init. See
//! `hearth_guest::protocol::function` for the messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_guest::protocol::function::{self as f, CODE_CHUNK, Message};
use hearth_guest::protocol::{self, Hello};
use hearth_guest::runtime::quiet_unix::{QuietReadHalf, QuietUnixStream, QuietWriteHalf};
use hearth_guest::runtime::{read_frame, write_frame};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use super::{FunctionSpec, InitReport, InvokeRequest, InvokeResponse, SandboxError, timed_out};

/// Log lines kept per invoke for the caller.
pub const MAX_LOG_LINES: usize = 10_000;
/// Log bytes kept per invoke for the caller.
pub const MAX_LOG_BYTES: usize = 1 << 20;

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<f::InvokeResult>>>>;
/// Per in-flight invoke: its log lines and their total size.
type Logs = Arc<Mutex<HashMap<String, (Vec<f::LogLine>, usize)>>>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A loaded function's host link: invokes go out, results and logs come back.
pub struct HostLink {
    writer: tokio::sync::Mutex<QuietWriteHalf>,
    waiters: Waiters,
    logs: Logs,
    alive: Arc<AtomicBool>,
    exit: Arc<Mutex<Option<String>>>,
    reader: tokio::task::JoinHandle<()>,
    arn: String,
    timeout: Duration,
    /// One permit per invoke the runtime takes at once (`max_concurrency`): more wait here, where
    /// their timeout has not started, rather than in the init.
    permits: tokio::sync::Semaphore,
}

impl HostLink {
    /// `Hello` both ways, then the bundle and its code; waits up to `init_timeout` for the
    /// runtime's init. A runtime that fails its init gives [`SandboxError::Init`].
    pub async fn open(
        function: &FunctionSpec,
        init_timeout: Duration,
        reader: OwnedReadHalf,
        writer: OwnedWriteHalf,
    ) -> Result<(HostLink, InitReport), SandboxError> {
        let (loaded, init_logs, reader, writer) =
            handshake(function, init_timeout, reader, writer).await?;
        // From here on the link is registered for read readiness only (see `QuietUnixStream`):
        // the init's reads of each invoke no longer wake this core for nothing.
        let (reader, writer) = reader
            .reunite(writer)
            .map_err(std::io::Error::other)
            .and_then(|stream| stream.into_std())
            .and_then(QuietUnixStream::new)
            .map_err(|e| SandboxError::Link(protocol::ProtocolError::Io(e)))?
            .into_split();
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
            HostLink {
                writer: tokio::sync::Mutex::new(writer),
                waiters,
                logs,
                alive,
                exit,
                reader,
                arn: function.bundle.function_arn.clone(),
                timeout: function.timeout(),
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

    /// Runs one invoke. Past the function's timeout the invoke gets `Sandbox.Timedout` and the
    /// link is marked dead (the caller destroys the sandbox). `peak_memory_mb` is asked for the
    /// sandbox's peak memory after the invoke; `None` takes the init's figure.
    pub async fn invoke(
        &self,
        request: InvokeRequest,
        peak_memory_mb: impl Fn() -> Option<u64>,
    ) -> Result<InvokeResponse, SandboxError> {
        if !self.is_alive() {
            return Err(SandboxError::Gone(self.why_dead()));
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
            host_time_ms: now_ms,
            invoked_function_arn: self.arn.clone(),
            trace_id: request.trace_id,
            client_context: request.client_context,
            cognito_identity: request.cognito_identity,
        });
        let sent = {
            let mut w = self.writer.lock().await;
            send(&mut *w, invoke).await
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
        let peak = peak_memory_mb();
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
            Ok(Err(_)) => Err(SandboxError::Gone(self.why_dead())),
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

    /// Whether invokes can still go through.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn why_dead(&self) -> String {
        lock(&self.exit)
            .clone()
            .unwrap_or_else(|| "the host link closed".into())
    }

    /// Stops taking invokes and stops reading; waiting invokes see the sandbox gone.
    pub fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.permits.close();
        self.reader.abort();
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        self.close();
    }
}

/// Hello both ways, then the bundle and its code; waits for the runtime's init.
async fn handshake(
    function: &FunctionSpec,
    init_timeout: Duration,
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
) -> Result<Handshake, SandboxError> {
    write_frame(
        &mut writer,
        &protocol::Message::Hello(Hello::ours("hearth-agent")),
    )
    .await
    .map_err(SandboxError::Link)?;
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
    let init = tokio::time::timeout(init_timeout, async {
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
                        init_timeout.as_secs_f64()
                    ),
                ),
                logs_tail: Vec::new(),
                init_duration: init_timeout,
            });
        }
    };
    Ok((loaded, logs, reader, writer))
}

type Handshake = (f::Loaded, Vec<f::LogLine>, OwnedReadHalf, OwnedWriteHalf);

/// The last [`f::LOG_TAIL`] bytes of `logs`, one line each.
pub fn tail_of(logs: &[f::LogLine]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in logs {
        out.extend_from_slice(&l.line);
        out.push(b'\n');
    }
    let cut = out.len().saturating_sub(f::LOG_TAIL);
    out.split_off(cut)
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    msg: Message,
) -> Result<(), SandboxError> {
    write_frame(w, &protocol::Message::Function(msg))
        .await
        .map_err(SandboxError::Link)
}

async fn read_loop(
    reader: QuietReadHalf,
    waiters: Waiters,
    logs: Logs,
    alive: Arc<AtomicBool>,
    exit: Arc<Mutex<Option<String>>>,
) {
    // Buffered: a frame (a result, or a burst of log lines) comes in one read rather than two per
    // frame. The handshake before read unbuffered, so nothing it read is lost here.
    let mut reader = tokio::io::BufReader::with_capacity(64 * 1024, reader);
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
