//! One function's conversation with the host: load the bundle, start the runtime, relay invokes,
//! results and logs.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::api::{self, ApiEvent, ApiState, lock};
use super::env;
use super::{RuntimeConfig, RuntimeError};
use crate::bundle;
use crate::protocol::function::{
    Bundle, Exited, FunctionError, InitFailed, Invoke, InvokeResult, LOG_TAIL, Loaded, LogLine,
    MAX_LOG_LINE, Message, Outcome, Stream,
};
use crate::protocol::{self, MAX_FRAME};

/// The largest code zip accepted over the link.
const MAX_CODE: u64 = 256 << 20;
/// Log lines queued for the host before new ones are dropped.
const LOG_QUEUE: usize = 1024;
const RUNTIMES: &[&str] = &["provided", "provided.al2", "provided.al2023"];

/// Runs the function conversation over one host link until the host closes it or the runtime
/// exits. The caller has already exchanged `Hello`s.
pub async fn serve_function<R, W>(
    cfg: RuntimeConfig,
    reader: R,
    writer: W,
) -> Result<(), RuntimeError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Message>();
    let (log_tx, log_rx) = mpsc::channel::<Message>(LOG_QUEUE);
    let writer_task = tokio::spawn(write_loop(writer, out_rx, log_rx));
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Message>();
    let reader_task = tokio::spawn(read_loop(reader, in_tx));

    // A task of its own rather than the caller's `block_on` future: a current-thread runtime
    // polls its I/O driver (one `epoll_wait` system call) before each poll of the `block_on`
    // future that another task woke, and every invoke wakes the conversation twice.
    let session = tokio::spawn(async move {
        let result = converse(&cfg, &mut in_rx, &out_tx, log_tx).await;
        drop(out_tx);
        result
    });
    let result = session.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "the function conversation task failed");
        Err(RuntimeError::Protocol(
            "the function conversation task failed",
        ))
    });
    reader_task.abort();
    // Let the writer flush what is queued (results, Exited) before returning.
    let _ = writer_task.await;
    result
}

/// How far the guest's clock may be from the host's before the init sets it.
pub const CLOCK_TOLERANCE_MS: u64 = 10;

/// Sets the wall clock to the host's (see [`RuntimeConfig::set_clock`]); failures are logged.
fn sync_clock(cfg: &RuntimeConfig, host_time_ms: u64) {
    if !cfg.set_clock || host_time_ms == 0 {
        return;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if now_ms.abs_diff(host_time_ms) <= CLOCK_TOLERANCE_MS {
        return;
    }
    let ts = libc::timespec {
        tv_sec: (host_time_ms / 1000) as libc::time_t,
        tv_nsec: ((host_time_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec on the stack; clock_settime only reads it.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc == 0 {
        tracing::info!(
            behind_ms = host_time_ms as i64 - now_ms as i64,
            "set the guest clock to the host's"
        );
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set the guest clock");
    }
}

async fn converse(
    cfg: &RuntimeConfig,
    in_rx: &mut mpsc::UnboundedReceiver<Message>,
    out: &mpsc::UnboundedSender<Message>,
    log_tx: mpsc::Sender<Message>,
) -> Result<(), RuntimeError> {
    // 1. The bundle and its code.
    let Some(Message::Load(bundle)) = in_rx.recv().await else {
        return Err(RuntimeError::Protocol("expected Load first"));
    };
    let started = Instant::now();
    if bundle.code_len > MAX_CODE {
        return init_failed_loop(
            in_rx,
            out,
            FunctionError::new(
                "InvalidZipFileException",
                format!("the code zip is larger than {MAX_CODE} bytes"),
            ),
            started,
            Vec::new(),
        )
        .await;
    }
    let mut code = Vec::with_capacity(usize::try_from(bundle.code_len).unwrap_or(0));
    while (code.len() as u64) < bundle.code_len {
        match in_rx.recv().await {
            Some(Message::CodeChunk(chunk)) => code.extend_from_slice(&chunk),
            Some(_) => return Err(RuntimeError::Protocol("expected CodeChunk")),
            None => return Ok(()),
        }
    }
    if code.len() as u64 != bundle.code_len {
        return Err(RuntimeError::Protocol("code chunks exceed code_len"));
    }

    // 2. Unpack, build the environment, start the runtime.
    let (listener, events_rx, state, invokes_tx, mut child, sink) =
        match start(cfg, &bundle, code, log_tx).await {
            Ok(started) => started,
            Err(err) => return init_failed_loop(in_rx, out, err, started, Vec::new()).await,
        };
    let server = tokio::spawn(api::serve(listener, state.clone()));
    let mut events_rx = events_rx;
    let _server_guard = AbortOnDrop(server);

    // 3. Init: until the first /next, an init error, or the runtime's exit.
    loop {
        tokio::select! {
            event = events_rx.recv() => match event {
                Some(ApiEvent::FirstNext) => break,
                Some(ApiEvent::InitError(err)) => {
                    child.kill();
                    return init_failed_loop(in_rx, out, err, started, sink.init_tail()).await;
                }
                Some(ApiEvent::Done { .. }) | None => {}
            },
            status = child.wait() => {
                let err = FunctionError::new("Runtime.ExitError", format!("Runtime exited with error: {status}"));
                return init_failed_loop(in_rx, out, err, started, sink.init_tail()).await;
            }
            msg = in_rx.recv() => match msg {
                None => return Ok(()),
                Some(Message::Invoke(inv)) => {
                    sync_clock(cfg, inv.host_time_ms);
                    // Queue it: the runtime will take it after its init.
                    lock(&sink.pending).insert(inv.request_id.clone());
                    let _ = invokes_tx.send(inv);
                }
                Some(_) => tracing::warn!("unexpected function message during init"),
            },
        }
    }
    let _ = out.send(Message::Loaded(Loaded {
        init_duration_us: micros(started),
    }));

    // 4. Invokes.
    loop {
        tokio::select! {
            msg = in_rx.recv() => match msg {
                None => return Ok(()),
                Some(Message::Invoke(inv)) => {
                    sync_clock(cfg, inv.host_time_ms);
                    lock(&sink.pending).insert(inv.request_id.clone());
                    let _ = invokes_tx.send(inv);
                }
                Some(_) => tracing::warn!("unexpected function message"),
            },
            event = events_rx.recv() => {
                if let Some(ApiEvent::Done { request_id, outcome, inflight }) = event {
                    lock(&sink.pending).remove(&request_id);
                    let _ = out.send(Message::Result(InvokeResult {
                        request_id,
                        outcome,
                        logs_tail: inflight.tail.into_iter().collect(),
                        duration_us: micros(inflight.started),
                        max_memory_used_mb: child.max_memory_mb(),
                    }));
                }
            }
            status = child.wait() => {
                // Exited first, so the host knows the environment is gone before any waiter
                // wakes up; then every invoke not yet answered ends with the runtime.
                let _ = out.send(Message::Exited(Exited { status: status.clone() }));
                let pending: Vec<String> = lock(&sink.pending).drain().collect();
                for request_id in pending {
                    let tail = state.finish(&request_id).map(|i| i.tail.into_iter().collect()).unwrap_or_default();
                    let _ = out.send(Message::Result(InvokeResult {
                        outcome: Outcome::Error(FunctionError::new(
                            "Runtime.ExitError",
                            format!("RequestId: {request_id} Error: Runtime exited with error: {status}"),
                        )),
                        request_id,
                        logs_tail: tail,
                        duration_us: 0,
                        max_memory_used_mb: child.max_memory_mb(),
                    }));
                }
                return Ok(());
            }
        }
    }
}

type Started = (
    TcpListener,
    mpsc::UnboundedReceiver<ApiEvent>,
    Arc<ApiState>,
    mpsc::UnboundedSender<Invoke>,
    Child,
    Arc<LogSink>,
);

async fn start(
    cfg: &RuntimeConfig,
    bundle: &Bundle,
    code: Vec<u8>,
    log_tx: mpsc::Sender<Message>,
) -> Result<Started, FunctionError> {
    if !RUNTIMES.contains(&bundle.runtime.as_str()) {
        return Err(FunctionError::new(
            "InvalidRuntimeException",
            format!(
                "The runtime parameter of {} is not supported by this sandbox",
                bundle.runtime
            ),
        ));
    }
    let task_dir = cfg.task_dir.clone();
    let limits = cfg.limits;
    let unpacked = tokio::task::spawn_blocking(move || bundle::unpack(&code, &task_dir, &limits))
        .await
        .map_err(|e| FunctionError::new("Runtime.Unknown", format!("unpacking failed: {e}")))?;
    if let Err(e) = unpacked {
        return Err(FunctionError::new(e.error_type(), e.lambda_message()));
    }
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        FunctionError::new(
            "Runtime.Unknown",
            format!("cannot listen on {}: {e}", cfg.listen),
        )
    })?;
    let addr = listener.local_addr().map_err(|e| {
        FunctionError::new(
            "Runtime.Unknown",
            format!("cannot read the listener address: {e}"),
        )
    })?;
    let paths = env::Paths {
        task_root: cfg.task_dir.display().to_string(),
        runtime_dir: cfg.runtime_dir.display().to_string(),
        runtime_api: addr.to_string(),
    };
    let env = env::build(bundle, &paths)
        .map_err(|e| FunctionError::new("InvalidParameterValueException", e.to_string()))?;
    let candidates = [
        cfg.task_dir.join("bootstrap"),
        cfg.opt_dir.join("bootstrap"),
    ];
    let Some(bootstrap) = candidates.iter().find(|p| p.is_file()) else {
        return Err(FunctionError::new(
            "Runtime.InvalidEntrypoint",
            format!(
                "Couldn't find valid bootstrap(s): [{} {}]",
                candidates[0].display(),
                candidates[1].display()
            ),
        ));
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (invokes_tx, invokes_rx) = mpsc::unbounded_channel();
    let state = ApiState::new(invokes_rx, events_tx);
    let sink = Arc::new(LogSink {
        state: state.clone(),
        init_tail: Mutex::new(VecDeque::new()),
        pending: Mutex::new(HashSet::new()),
        tx: log_tx,
        dropped: AtomicU64::new(0),
    });
    let child = Child::spawn(cfg, bootstrap.clone(), &env, &sink).map_err(|e| {
        FunctionError::new(
            "Runtime.InvalidEntrypoint",
            format!("cannot start {}: {e}", bootstrap.display()),
        )
    })?;
    Ok((listener, events_rx, state, invokes_tx, child, sink))
}

/// After an init failure: report it, then answer every invoke with the same error until the host
/// closes the link.
async fn init_failed_loop(
    in_rx: &mut mpsc::UnboundedReceiver<Message>,
    out: &mpsc::UnboundedSender<Message>,
    error: FunctionError,
    started: Instant,
    logs_tail: Vec<u8>,
) -> Result<(), RuntimeError> {
    tracing::info!(error_type = %error.error_type, "function init failed");
    let _ = out.send(Message::InitFailed(InitFailed {
        error: error.clone(),
        init_duration_us: micros(started),
        logs_tail: logs_tail.clone(),
    }));
    while let Some(msg) = in_rx.recv().await {
        if let Message::Invoke(inv) = msg {
            let _ = out.send(Message::Result(InvokeResult {
                request_id: inv.request_id,
                outcome: Outcome::Error(error.clone()),
                logs_tail: logs_tail.clone(),
                duration_us: 0,
                max_memory_used_mb: 0,
            }));
        }
    }
    Ok(())
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The runtime process (its own process group, killed with the group when dropped).
struct Child {
    inner: tokio::process::Child,
    pid: Option<u32>,
    exited: Option<String>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    /// Started through the `function-exec` helper: the runtime is the helper's child.
    isolated: bool,
    /// Whether [`Child::max_memory_mb`] reads the runtime's peak memory.
    report_peak_memory: bool,
    /// The runtime's `/proc/<pid>/status`, opened on first use and re-read from offset 0 after
    /// (read once per invoke: an open per read costs two path walks).
    status_file: std::sync::OnceLock<std::fs::File>,
}

impl Child {
    fn spawn(
        cfg: &RuntimeConfig,
        bootstrap: PathBuf,
        env: &BTreeMap<String, String>,
        sink: &Arc<LogSink>,
    ) -> std::io::Result<Child> {
        let mut cmd = match cfg.run_as {
            Some((uid, gid)) if cfg.isolate => {
                let mut cmd = tokio::process::Command::new("/proc/self/exe");
                cmd.arg0("/init")
                    .arg(super::isolate::ROLE)
                    .arg(uid.to_string())
                    .arg(gid.to_string())
                    .arg(&bootstrap);
                cmd
            }
            _ => tokio::process::Command::new(&bootstrap),
        };
        cmd.env_clear()
            .envs(env)
            .current_dir(&cfg.task_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let (Some((uid, gid)), false) = (cfg.run_as, cfg.isolate) {
            cmd.uid(uid).gid(gid);
        }
        let mut inner = cmd.spawn()?;
        let mut pumps = Vec::new();
        if let Some(out) = inner.stdout.take() {
            pumps.push(tokio::spawn(pump(out, Stream::Stdout, sink.clone())));
        }
        if let Some(err) = inner.stderr.take() {
            pumps.push(tokio::spawn(pump(err, Stream::Stderr, sink.clone())));
        }
        let pid = inner.id();
        Ok(Child {
            inner,
            pid,
            exited: None,
            pumps,
            isolated: cfg.isolate && cfg.run_as.is_some(),
            report_peak_memory: cfg.report_peak_memory,
            status_file: std::sync::OnceLock::new(),
        })
    }

    /// Waits for the process to end and describes how it ended; resolves only once.
    async fn wait(&mut self) -> String {
        if self.exited.is_some() {
            // Already reported: never resolve again.
            std::future::pending::<()>().await;
        }
        let status = match self.inner.wait().await {
            Ok(s) => describe(s),
            Err(e) => format!("wait failed: {e}"),
        };
        // Let the last lines it printed arrive (bounded: a grandchild may hold the pipes open).
        let pumps = std::mem::take(&mut self.pumps);
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), async {
            for p in pumps {
                let _ = p.await;
            }
        })
        .await;
        self.exited = Some(status.clone());
        status
    }

    fn kill(&mut self) {
        if let Some(pid) = self
            .pid
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.inner.start_kill();
    }

    /// Peak resident memory of the runtime process (VmHWM), in MiB, rounded up; 0 where the host
    /// reads it itself ([`RuntimeConfig::report_peak_memory`] off).
    fn max_memory_mb(&self) -> u64 {
        use std::os::unix::fs::FileExt as _;
        if !self.report_peak_memory {
            return 0;
        }
        let file = match self.status_file.get() {
            Some(file) => file,
            None => {
                let Some(file) = self.open_status() else {
                    return 0;
                };
                self.status_file.get_or_init(|| file)
            }
        };
        let mut buf = [0u8; 4096];
        let Ok(n) = file.read_at(&mut buf, 0) else {
            return 0;
        };
        String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib.div_ceil(1024))
            .unwrap_or(0)
    }

    /// Opens the runtime process's status file (the helper's child when isolated).
    fn open_status(&self) -> Option<std::fs::File> {
        let mut pid = self.pid?;
        if self.isolated {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
            pid = children
                .ok()
                .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))?;
        }
        std::fs::File::open(format!("/proc/{pid}/status")).ok()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            6 => "aborted",
            9 => "killed",
            11 => "segmentation fault",
            15 => "terminated",
            _ => "",
        };
        if name.is_empty() {
            format!("signal: {sig}")
        } else {
            format!("signal: {name}")
        }
    } else {
        "unknown status".to_string()
    }
}

/// Where the runtime's output goes: tagged, kept as tails, and queued (bounded) for the host.
struct LogSink {
    state: Arc<ApiState>,
    init_tail: Mutex<VecDeque<u8>>,
    /// Invokes sent to the runtime and not yet answered.
    pending: Mutex<HashSet<String>>,
    tx: mpsc::Sender<Message>,
    dropped: AtomicU64,
}

impl LogSink {
    fn emit(&self, stream: Stream, line: Vec<u8>) {
        let request_id = {
            let mut inflight = lock(&self.state.inflight);
            if inflight.is_empty() {
                let mut tail = lock(&self.init_tail);
                tail.extend(line.iter().copied().chain(std::iter::once(b'\n')));
                let excess = tail.len().saturating_sub(LOG_TAIL);
                tail.drain(..excess);
            }
            for entry in inflight.values_mut() {
                entry.push_log(&line);
            }
            if inflight.len() == 1 {
                inflight.keys().next().cloned()
            } else {
                None
            }
        };
        let dropped_before = self.dropped.load(Ordering::Relaxed);
        let msg = Message::Log(LogLine {
            request_id,
            stream,
            line,
            dropped_before,
        });
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.dropped.fetch_sub(dropped_before, Ordering::Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn init_tail(&self) -> Vec<u8> {
        lock(&self.init_tail).iter().copied().collect()
    }
}

/// Reads one output stream line by line, cutting lines at [`MAX_LOG_LINE`] bytes.
async fn pump(stream: impl AsyncRead + Unpin, which: Stream, sink: Arc<LogSink>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::new();
    while let Ok(buf) = reader.fill_buf().await {
        if buf.is_empty() {
            break;
        }
        let (chunk, used, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = MAX_LOG_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if end {
            sink.emit(which, std::mem::take(&mut line));
        }
    }
    if !line.is_empty() {
        sink.emit(which, line);
    }
}

/// Decodes frames from the host into function messages.
async fn read_loop<R: AsyncRead + Unpin>(reader: R, tx: mpsc::UnboundedSender<Message>) {
    // Buffered: a frame comes in one read rather than two (length, then body); code chunks stream
    // through in large reads.
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    loop {
        match read_frame(&mut reader).await {
            Ok(Some(protocol::Message::Function(msg))) => {
                if tx.send(msg).is_err() {
                    return;
                }
            }
            Ok(Some(other)) => tracing::warn!(
                kind = other.kind(),
                "non-function message on the function link"
            ),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "host link read failed");
                return;
            }
        }
    }
}

/// Reads one frame asynchronously; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<protocol::Message>, protocol::ProtocolError> {
    let mut prefix = [0u8; 4];
    match reader.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(protocol::ProtocolError::Io(e)),
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(protocol::ProtocolError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            protocol::ProtocolError::Truncated
        } else {
            protocol::ProtocolError::Io(e)
        }
    })?;
    protocol::decode_payload(&payload).map(Some)
}

/// Writes one frame asynchronously and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    msg: &protocol::Message,
) -> Result<(), protocol::ProtocolError> {
    let frame = protocol::encode_frame(msg)?;
    writer
        .write_all(&frame)
        .await
        .map_err(protocol::ProtocolError::Io)?;
    writer.flush().await.map_err(protocol::ProtocolError::Io)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut out_rx: mpsc::UnboundedReceiver<Message>,
    mut log_rx: mpsc::Receiver<Message>,
) {
    loop {
        let msg = tokio::select! {
            biased;
            // Logs first, so that an invoke's lines reach the host before its result.
            Some(log) = log_rx.recv() => log,
            msg = out_rx.recv() => match msg {
                Some(m) => m,
                None => break,
            },
        };
        if let Err(e) = write_frame(&mut writer, &protocol::Message::Function(msg)).await {
            tracing::warn!(error = %e, "host link write failed");
            return;
        }
    }
    // Flush logs still queued.
    while let Ok(log) = log_rx.try_recv() {
        if write_frame(&mut writer, &protocol::Message::Function(log))
            .await
            .is_err()
        {
            return;
        }
    }
}
