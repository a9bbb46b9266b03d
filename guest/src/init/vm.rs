//! The `vm` role: PID 1 of a Hearth microVM.
//!
//! Mounts /proc, /sys, /dev, /tmp, /run; loads the virtio and vsock modules listed in
//! `/lib/modules/load-order`; brings up `lo`; listens on vsock port [`CONTROL_PORT`]; starts the
//! threads that accept control connections; connects to the host on port [`READY_PORT`], lets
//! the console drain and sends `Hello` + `Ready`. Everything is set up before `Ready` and nothing
//! runs after it but blocking reads: the host may snapshot the VM as soon as it has `Ready`, and
//! whatever the guest was still doing then (spawning a thread, printing) is done again, slowly, by
//! every clone restored from that snapshot before it can answer. The listener outlives a vsock
//! transport reset, so after a restore the host can connect to it at once (the VMM holds the
//! connection until the guest has handled the reset).
//!
//! Control connections are served by acceptor threads that each block in `accept` on the shared
//! listener and serve what they accept; one more is started when the last idle one takes a
//! connection, and a surplus one ends after serving, so a connection never waits for a thread to
//! be created while one is idle (a restored clone answers its first request without a `clone`).
//!
//! The ready connection is held by the main thread for the VM's life. When it ends (after a
//! restore from a snapshot the VMM sends a vsock transport reset, which resets every connection
//! in the guest; or the host closed it), the init connects again and re-announces `Ready`. The
//! host does not wait for that: it connects to the control port as soon as the guest has handled
//! the reset, and an answer there is what says a restored guest is up. So the reconnect waits
//! until a control request has been answered (or [`REANNOUNCE_WAIT`] has passed), to leave the
//! guest's one vCPU and the vsock queues to that first answer.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

use super::link::FdStream;
use super::{InitError, Scratch, chain, fatal, halt, load_modules, mount_common, reaper, sys};
use crate::console;
use crate::image::{GUEST_MODULES, INITRAMFS_MODULES_DIR, MODULE_ORDER_FILE};
use crate::protocol::{
    CONTROL_PORT, ErrorCode, ErrorReply, GuestStatus, HOST_CID, Hello, MAX_RANDOM, Message,
    ProtocolError, READY_PORT, Ready, Refresh, check_hello, encode_frame, read_frame, write_frame,
};
use crate::runtime::RuntimeConfig;

/// How long the init keeps trying to reach the host's ready port before it gives up and reboots.
pub const READY_RETRY_WINDOW: Duration = Duration::from_secs(5);
/// Pause between connection attempts.
const READY_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// The longest the init waits, once its ready link ended, for a control request to be answered
/// before it reconnects the link.
pub const REANNOUNCE_WAIT: Duration = Duration::from_millis(500);

/// Control requests answered so far, with a way to wait for the next one.
struct Answered {
    count: Mutex<u64>,
    more: Condvar,
}

static ANSWERED: Answered = Answered {
    count: Mutex::new(0),
    more: Condvar::new(),
};

impl Answered {
    fn get(&self) -> u64 {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.more.notify_all();
    }

    /// Waits until more than `seen` requests were answered, or `limit` passed.
    fn wait_past(&self, seen: u64, limit: Duration) {
        let count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self
            .more
            .wait_timeout_while(count, limit, |n| *n <= seen)
            .map_err(PoisonError::into_inner);
    }
}

/// Runs the `vm` role. Never returns.
pub fn run(start_ms: u64) -> ! {
    if let Err(e) = mount_common(Scratch::Tmpfs) {
        fatal(&chain(&e));
    }
    let modules = match std::fs::read_to_string(MODULE_ORDER_FILE) {
        Ok(text) => parse_module_order(&text),
        Err(_) => GUEST_MODULES
            .iter()
            .map(|m| PathBuf::from(format!("{INITRAMFS_MODULES_DIR}/{m}.ko")))
            .collect(),
    };
    let t = sys::boottime_ms();
    if let Err(e) = load_modules(&modules) {
        fatal(&chain(&e));
    }
    console!(
        "loaded {} modules in {} ms",
        modules.len(),
        sys::boottime_ms().saturating_sub(t)
    );
    if let Err(e) = sys::loopback_up() {
        fatal(&chain(&e));
    }
    reaper::start();
    let lambda = RuntimeConfig::lambda();
    for dir in [&lambda.task_dir, &lambda.opt_dir, &lambda.runtime_dir] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            fatal(&format!("cannot create {}: {e}", dir.display()));
        }
    }
    // Listen and start the acceptors before saying ready, so the host can connect as soon as it
    // reads `Ready` and nothing is left to set up after it.
    let listener = match sys::vsock_listen(CONTROL_PORT) {
        Ok(l) => Arc::new(l),
        Err(e) => fatal(&format!("cannot listen on vsock port {CONTROL_PORT}: {e}")),
    };
    let idle = Arc::new(AtomicUsize::new(0));
    for _ in 0..IDLE_ACCEPTORS {
        spawn_acceptor(&listener, &idle);
    }
    // The ready connection stays open for the VM's life, held by this thread.
    let ready_conn = match connect_ready(start_ms) {
        Ok(c) => c,
        Err(e) => fatal(&chain(&e)),
    };
    hold_ready_link(ready_conn, start_ms)
}

/// Acceptor threads started before `Ready`: one for the host's first request after a restore
/// (a pool keeps that connection open until the clone is claimed and refreshed), one for the
/// function link (held for its life), one spare, so that no thread is created on an invoke's path.
const IDLE_ACCEPTORS: usize = 3;
/// Idle acceptors beyond this many end after serving.
const MAX_IDLE_ACCEPTORS: usize = 4;

/// Starts a thread that accepts control connections on `listener` and serves them, counted in
/// `idle` while it waits in `accept`.
fn spawn_acceptor(listener: &Arc<OwnedFd>, idle: &Arc<AtomicUsize>) {
    idle.fetch_add(1, Ordering::SeqCst);
    let (listener, counter) = (listener.clone(), idle.clone());
    let spawned = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_and_serve(&listener, &counter));
    if let Err(e) = spawned {
        idle.fetch_sub(1, Ordering::SeqCst);
        console!("cannot start a control thread: {e}");
    }
}

fn accept_and_serve(listener: &Arc<OwnedFd>, idle: &Arc<AtomicUsize>) {
    loop {
        let conn = match sys::accept(listener) {
            Ok(conn) => conn,
            Err(e) => {
                console!("accept on vsock port {CONTROL_PORT} failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Keep one thread waiting in `accept` while this one serves.
        if idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            spawn_acceptor(listener, idle);
        }
        if let Err(e) = serve(conn) {
            // A reset is how every connection ends on a transport reset (after a restore): not
            // worth a console line (a trap per byte) while the init reconnects.
            if !is_reset(&e) {
                console!("control connection ended: {}", chain(&e));
            }
        }
        if idle.fetch_add(1, Ordering::SeqCst) >= MAX_IDLE_ACCEPTORS {
            idle.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
}

/// Whether `e` is the connection reset a vsock transport reset gives every connection.
fn is_reset(e: &InitError) -> bool {
    matches!(e, InitError::Protocol(ProtocolError::Io(io)) if io.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Module paths, one a line; blank lines and `#` comments are skipped.
pub fn parse_module_order(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// Connects to the host's ready port (retrying while the vsock device comes up) and sends
/// `Hello` + `Ready`.
fn connect_ready(start_ms: u64) -> Result<File, InitError> {
    let began = Instant::now();
    let mut attempts = 0u32;
    let mut conn = loop {
        attempts += 1;
        match sys::vsock_connect(HOST_CID, READY_PORT) {
            Ok(c) => break c,
            Err(e) => {
                if attempts == 1 {
                    console!(
                        "vsock connect to host port {READY_PORT} failed ({e}); retrying for up to {} ms",
                        READY_RETRY_WINDOW.as_millis()
                    );
                }
                if began.elapsed() >= READY_RETRY_WINDOW {
                    return Err(InitError::Link(format!(
                        "could not connect to the host (CID {HOST_CID}) on vsock port {READY_PORT} within {} ms ({attempts} attempts, last error: {e})",
                        READY_RETRY_WINDOW.as_millis()
                    )));
                }
                std::thread::sleep(READY_RETRY_PAUSE);
            }
        }
    };
    if attempts > 1 {
        console!(
            "vsock connected after {attempts} attempts ({} ms)",
            began.elapsed().as_millis()
        );
    }
    // The host may snapshot the VM as soon as it has `Ready`: console output still on its way
    // out then would go out again, a trap per byte, on every restore. Nothing is printed after
    // `Ready` either (the host logs it, with its `ready_ms`).
    sys::drain_console();
    write_frame(&mut conn, &Message::Hello(Hello::ours("hearth-init")))?;
    let ready = Ready {
        init_start_ms: start_ms,
        ready_ms: sys::boottime_ms(),
        kernel_release: sys::kernel_release(),
    };
    write_frame(&mut conn, &Message::Ready(ready))?;
    Ok(conn)
}

/// Holds the ready connection; when it ends, connects again and re-announces `Ready` (retrying
/// for as long as it takes: a restored guest has no other way to tell the host it is up).
fn hold_ready_link(conn: File, start_ms: u64) -> ! {
    let mut conn = conn;
    loop {
        wait_for_end(&mut conn);
        // Let the host's first control request go first (see the module's doc).
        ANSWERED.wait_past(ANSWERED.get(), REANNOUNCE_WAIT);
        // Nothing on the console when all goes well: each byte written to the serial console is
        // a trap to the VMM, a costly one in a nested VM (a line here cost a restored guest tens
        // of milliseconds, competing with the host's first requests). The VMM logs the guest's
        // connection.
        conn = loop {
            match connect_ready(start_ms) {
                Ok(c) => break c,
                Err(e) => console!("cannot reach the host again: {}", chain(&e)),
            }
        };
    }
}

/// Returns when `conn` ends: end of file, or an error such as the reset a vsock transport reset
/// gives every connection. The host sends nothing on it; anything it does send is skipped.
pub fn wait_for_end(conn: &mut impl Read) {
    let mut buf = [0u8; 64];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The guest's status.
pub fn status() -> GuestStatus {
    let (mem_total_kib, mem_available_kib) = std::fs::read_to_string("/proc/meminfo")
        .map(|t| parse_meminfo(&t))
        .unwrap_or((0, 0));
    GuestStatus {
        uptime_ms: sys::boottime_ms(),
        kernel_release: sys::kernel_release(),
        mem_total_kib,
        mem_available_kib,
        cpus_online: sys::cpus_online(),
        role: "vm".into(),
    }
}

/// `MemTotal` and `MemAvailable` (KiB) from /proc/meminfo.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorReply {
        code,
        message: message.into(),
    })
}

/// Hands the connection, with the function message already read put back in front, to the async
/// function conversation on a single-threaded tokio runtime.
fn function_link(conn: File, first: &Message, cfg: &RuntimeConfig) -> Result<(), InitError> {
    let replay = encode_frame(first)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| InitError::Sys {
            what: "start the async runtime".into(),
            source,
        })?;
    let cfg = cfg.clone();
    rt.block_on(async move {
        let stream = FdStream::new(OwnedFd::from(conn)).map_err(|source| InitError::Sys {
            what: "register the host link with tokio".into(),
            source,
        })?;
        let (reader, writer) = tokio::io::split(stream);
        let reader = AsyncReadExt::chain(std::io::Cursor::new(replay), reader);
        crate::runtime::serve_function(cfg, reader, writer)
            .await
            .map_err(InitError::Function)
    })
}

/// What to do after answering a request.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    Reboot,
}

/// Answers one request.
pub fn handle(req: Message) -> (Message, After) {
    match req {
        Message::Ping { bytes } => (Message::Pong { bytes }, After::Continue),
        Message::Status => (Message::StatusReply(status()), After::Continue),
        Message::Reboot => (Message::Rebooting, After::Reboot),
        Message::Refresh(r) => (refresh(&r), After::Continue),
        Message::Random { len } if len <= MAX_RANDOM => {
            let mut bytes = vec![0u8; len as usize];
            match sys::random_bytes(&mut bytes) {
                Ok(()) => (Message::RandomBytes { bytes }, After::Continue),
                Err(e) => (
                    error(ErrorCode::Internal, format!("getrandom: {e}")),
                    After::Continue,
                ),
            }
        }
        Message::Random { len } => (
            error(
                ErrorCode::BadRequest,
                format!("{len} random bytes asked; at most {MAX_RANDOM}"),
            ),
            After::Continue,
        ),
        Message::Clock => (
            Message::ClockReply {
                realtime_ns: sys::realtime_ns(),
            },
            After::Continue,
        ),
        Message::ShiftClock { delta_ns } => {
            let target = (sys::realtime_ns() as i64).saturating_add(delta_ns).max(0) as u64;
            match sys::set_realtime_ns(target) {
                Ok(()) => (
                    Message::ClockReply {
                        realtime_ns: sys::realtime_ns(),
                    },
                    After::Continue,
                ),
                Err(e) => (
                    error(ErrorCode::Internal, format!("cannot set the clock: {e}")),
                    After::Continue,
                ),
            }
        }
        other => (
            error(
                ErrorCode::UnknownRequest,
                format!("the init does not handle {}", other.kind()),
            ),
            After::Continue,
        ),
    }
}

/// Applies a `Refresh`: entropy into the kernel's pool (and a reseed), the wall clock, the host
/// name. A clone restored from a snapshot gets this before any function code runs in it.
fn refresh(r: &Refresh) -> Message {
    if let Err(why) = r.check() {
        return error(ErrorCode::BadRequest, why);
    }
    if let Err(e) = sys::add_entropy(&r.entropy) {
        return error(ErrorCode::Internal, format!("cannot add entropy: {e}"));
    }
    if let Err(e) = sys::set_realtime_ns(r.realtime_ns) {
        return error(ErrorCode::Internal, format!("cannot set the clock: {e}"));
    }
    if let Err(e) = sys::set_hostname(&r.identity) {
        return error(
            ErrorCode::Internal,
            format!("cannot set the host name: {e}"),
        );
    }
    Message::Refreshed {
        realtime_ns: sys::realtime_ns(),
    }
}

/// Serves one control connection with Lambda's runtime layout (see [`serve_with`]).
pub fn serve(conn: File) -> Result<(), InitError> {
    serve_with(conn, &RuntimeConfig::lambda())
}

/// Serves one control connection: the `Hello` exchange, then requests until the host closes. The
/// first function message turns the connection into a function conversation
/// ([`crate::runtime::serve_function`] with `cfg`) for the rest of its life.
///
/// A host that sends its first request with its `Hello` (as after a restore) gets our `Hello` in
/// the same write as the answer.
pub fn serve_with(mut conn: File, cfg: &RuntimeConfig) -> Result<(), InitError> {
    let Some(first) = read_frame::<_, Message>(&mut conn)? else {
        return Ok(());
    };
    let mut held = match check_hello(first) {
        Ok(_) => send_or_hold_hello(&mut conn)?,
        Err(e) => {
            let code = if matches!(e, ProtocolError::Version { .. }) {
                ErrorCode::UnsupportedVersion
            } else {
                ErrorCode::BadRequest
            };
            write_frame(&mut conn, &error(code, e.to_string()))?;
            return Ok(());
        }
    };
    loop {
        let req = match read_frame::<_, Message>(&mut conn) {
            Ok(Some(req)) => req,
            Ok(None) => {
                // The host closed its end: our Hello may still reach it, or may not matter.
                let _ = write_held(&mut conn, &mut held);
                return Ok(());
            }
            // The whole frame was read, so the stream is still in step: answer and go on.
            Err(e @ (ProtocolError::Decode(_) | ProtocolError::TrailingBytes(_))) => {
                write_after(
                    &mut conn,
                    &mut held,
                    &error(ErrorCode::BadRequest, chain(&e)),
                )?;
                continue;
            }
            Err(e) => {
                // The read's error is the one worth reporting.
                let _ = write_held(&mut conn, &mut held);
                return Err(e.into());
            }
        };
        if matches!(req, Message::Function(_)) {
            write_held(&mut conn, &mut held)?;
            return function_link(conn, &req, cfg);
        }
        let (resp, after) = handle(req);
        write_after(&mut conn, &mut held, &resp)?;
        ANSWERED.bump();
        if after == After::Reboot {
            // Let the answer reach the host: close our half and wait (briefly) for the host to close.
            sys::shutdown_write(&conn);
            sys::set_read_timeout(&conn, 1000);
            let mut buf = [0u8; 256];
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            console!("reboot requested by the host at {} ms", sys::boottime_ms());
            halt();
        }
    }
}

/// Our `Hello`, written at once when nothing more from the host is waiting; else held back and
/// returned (as a frame) for [`write_after`] to send with the answer to the request that waits.
/// A host that pipelines its `Hello` and first request (as after a restore) then gets both in one
/// write, one vsock packet and one guest transmit (a trap to the VMM) fewer; a host that waits
/// for our `Hello` before it sends more gets it at once. An empty frame: nothing held.
fn send_or_hold_hello(conn: &mut (impl Write + AsFd)) -> Result<Vec<u8>, ProtocolError> {
    let hello = encode_frame(&Message::Hello(Hello::ours("hearth-init")))?;
    if sys::readable_now(conn) {
        return Ok(hello);
    }
    conn.write_all(&hello).map_err(ProtocolError::Io)?;
    Ok(Vec::new())
}

/// Writes the frames `held` back (emptying it) and `msg` after them, in one write.
fn write_after(w: &mut impl Write, held: &mut Vec<u8>, msg: &Message) -> Result<(), ProtocolError> {
    held.extend_from_slice(&encode_frame(msg)?);
    write_held(w, held)
}

/// Writes the frames `held` back, if any (emptying it).
fn write_held(w: &mut impl Write, held: &mut Vec<u8>) -> Result<(), ProtocolError> {
    if held.is_empty() {
        return Ok(());
    }
    let out = std::mem::take(held);
    w.write_all(&out).map_err(ProtocolError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::client::ControlClient;
    use crate::protocol::{PROTOCOL_VERSION, decode_frame, expect_frame};
    use std::io::Write;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    /// The real `serve` on one end of a socket pair (see [`served_with`]).
    fn served() -> UnixStream {
        served_with(RuntimeConfig::lambda())
    }

    #[test]
    fn control_connection_end_to_end() {
        let mut client = ControlClient::handshake(served()).unwrap();
        assert!(client.peer.agent.starts_with("hearth-init"));
        assert_eq!(client.ping(b"both ways".to_vec()).unwrap(), b"both ways");
        assert_eq!(client.status().unwrap().role, "vm");
        let err = client
            .request(&Message::Pong { bytes: vec![] })
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::Remote {
                    code: ErrorCode::UnknownRequest,
                    ..
                }
            ),
            "{err}"
        );

        // A frame that does not decode is answered, and the connection goes on.
        let mut stream = client.into_inner();
        stream.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        assert_bad_request(&mut stream);
        write_frame(&mut stream, &Message::Ping { bytes: vec![7] }).unwrap();
        assert_eq!(
            expect_frame::<_, Message>(&mut stream).unwrap(),
            Message::Pong { bytes: vec![7] }
        );
    }

    /// The next frame on `stream` is a `BadRequest` error.
    fn assert_bad_request(stream: &mut UnixStream) {
        let answer: Message = expect_frame(stream).unwrap();
        assert!(
            matches!(
                answer,
                Message::Error(ErrorReply {
                    code: ErrorCode::BadRequest,
                    ..
                })
            ),
            "{answer:?}"
        );
    }

    /// A runtime layout in `dir` with no runtime in it.
    fn function_cfg(dir: &std::path::Path) -> RuntimeConfig {
        RuntimeConfig {
            task_dir: dir.to_path_buf(),
            opt_dir: dir.join("no-opt"),
            runtime_dir: dir.join("no-runtime"),
            listen: ([127, 0, 0, 1], 0).into(),
            run_as: None,
            limits: crate::bundle::Limits::default(),
            isolate: false,
            set_clock: false,
            report_peak_memory: true,
        }
    }

    /// The host's end of a connection served by `serve_with(cfg)`, with a read timeout so that
    /// an answer that never comes (a deadlock) fails the test instead of hanging it.
    fn served_with(cfg: RuntimeConfig) -> UnixStream {
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let guest = File::from(OwnedFd::from(guest));
        std::thread::spawn(move || serve_with(guest, &cfg));
        host
    }

    /// Frames encoded back to back, as a host writes them in one write.
    fn frames(msgs: &[Message]) -> Vec<u8> {
        msgs.iter().flat_map(|m| encode_frame(m).unwrap()).collect()
    }

    fn host_hello() -> Message {
        Message::Hello(Hello::ours("test-host"))
    }

    #[test]
    fn a_request_sent_with_the_hello_gets_our_hello_then_its_answer() {
        let mut host = served();
        let ping = Message::Ping {
            bytes: b"pipelined".to_vec(),
        };
        host.write_all(&frames(&[host_hello(), ping])).unwrap();
        let hello = check_hello(expect_frame(&mut host).unwrap()).unwrap();
        assert!(hello.agent.starts_with("hearth-init"), "{hello:?}");
        assert_eq!(
            expect_frame::<_, Message>(&mut host).unwrap(),
            Message::Pong {
                bytes: b"pipelined".to_vec()
            }
        );
        // Later requests are answered as before.
        write_frame(&mut host, &Message::Status).unwrap();
        let answer: Message = expect_frame(&mut host).unwrap();
        assert!(matches!(answer, Message::StatusReply(_)), "{answer:?}");
    }

    #[test]
    fn a_host_that_waits_for_our_hello_gets_it_at_once() {
        let mut host = served();
        write_frame(&mut host, &host_hello()).unwrap();
        // Nothing more is sent until our Hello is in: a held Hello would time this read out.
        let hello = check_hello(expect_frame(&mut host).unwrap()).unwrap();
        assert!(hello.agent.starts_with("hearth-init"), "{hello:?}");
        write_frame(&mut host, &Message::Ping { bytes: vec![1] }).unwrap();
        assert_eq!(
            expect_frame::<_, Message>(&mut host).unwrap(),
            Message::Pong { bytes: vec![1] }
        );
    }

    #[test]
    fn a_host_that_closes_after_its_hello_still_gets_ours() {
        let mut host = served();
        write_frame(&mut host, &host_hello()).unwrap();
        // The end of stream is readable at once, so the Hello is held: it goes out at the close.
        host.shutdown(std::net::Shutdown::Write).unwrap();
        check_hello(expect_frame(&mut host).unwrap()).unwrap();
        assert!(read_frame::<_, Message>(&mut host).unwrap().is_none());
    }

    #[test]
    fn an_undecodable_request_sent_with_the_hello_is_answered_after_our_hello() {
        let mut host = served();
        let mut out = frames(&[host_hello()]);
        out.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        host.write_all(&out).unwrap();
        check_hello(expect_frame(&mut host).unwrap()).unwrap();
        assert_bad_request(&mut host);
    }

    #[test]
    fn a_function_message_sent_with_the_hello_comes_after_our_hello() {
        let task = tempfile::tempdir().unwrap();
        let mut host = served_with(function_cfg(task.path()));
        let mut bundle = crate::runtime::env::tests_bundle(vec![]);
        bundle.code_len = 4;
        host.write_all(&frames(&[
            host_hello(),
            Message::Function(crate::protocol::function::Message::Load(bundle)),
            Message::Function(crate::protocol::function::Message::CodeChunk(
                b"junk".to_vec(),
            )),
        ]))
        .unwrap();
        check_hello(expect_frame(&mut host).unwrap()).unwrap();
        let answer: Message = expect_frame(&mut host).unwrap();
        assert!(
            matches!(
                answer,
                Message::Function(crate::protocol::function::Message::InitFailed(_))
            ),
            "{answer:?}"
        );
    }

    /// Records each `write` call apart.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_hello_is_held_only_while_a_request_waits_and_then_shares_the_answers_write() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        // Nothing waiting: our Hello goes out at once.
        assert!(send_or_hold_hello(&mut guest).unwrap().is_empty());
        check_hello(expect_frame(&mut host).unwrap()).unwrap();
        // A request waiting: the Hello is held back, nothing written.
        write_frame(&mut host, &Message::Ping { bytes: vec![2] }).unwrap();
        let mut held = send_or_hold_hello(&mut guest).unwrap();
        let (hello, used) = decode_frame::<Message>(&held).unwrap().unwrap();
        assert_eq!(used, held.len());
        check_hello(hello).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            host.read(&mut byte).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        // The held Hello and the answer: one write, in that order; then nothing is held.
        let pong = Message::Pong { bytes: vec![2] };
        let mut writes = Writes::default();
        write_after(&mut writes, &mut held, &pong).unwrap();
        assert!(held.is_empty());
        assert_eq!(writes.0.len(), 1);
        let mut stream = writes.0[0].as_slice();
        check_hello(expect_frame(&mut stream).unwrap()).unwrap();
        assert_eq!(expect_frame::<_, Message>(&mut stream).unwrap(), pong);
        assert!(stream.is_empty());
        write_after(&mut writes, &mut held, &pong).unwrap();
        assert_eq!(writes.0[1], encode_frame(&pong).unwrap());
        write_held(&mut writes, &mut held).unwrap();
        assert_eq!(writes.0.len(), 2, "nothing held, nothing written");
    }

    #[test]
    fn a_function_message_hands_the_connection_to_the_runtime() {
        let task = tempfile::tempdir().unwrap();
        let cfg = function_cfg(task.path());
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let guest = File::from(OwnedFd::from(guest));
        let server = std::thread::spawn(move || serve_with(guest, &cfg));
        let mut client = ControlClient::handshake(host).unwrap();
        assert_eq!(client.ping(b"before".to_vec()).unwrap(), b"before");
        // A bundle whose code is not a zip: the runtime side answers InitFailed over the same link.
        let mut bundle = crate::runtime::env::tests_bundle(vec![]);
        bundle.code_len = 4;
        let mut stream = client.into_inner();
        write_frame(
            &mut stream,
            &Message::Function(crate::protocol::function::Message::Load(bundle)),
        )
        .unwrap();
        write_frame(
            &mut stream,
            &Message::Function(crate::protocol::function::Message::CodeChunk(
                b"junk".to_vec(),
            )),
        )
        .unwrap();
        let answer: Message = expect_frame(&mut stream).unwrap();
        assert!(
            matches!(
                answer,
                Message::Function(crate::protocol::function::Message::InitFailed(_))
            ),
            "{answer:?}"
        );
        drop(stream);
        let _ = server.join().unwrap();
    }

    #[test]
    fn other_versions_are_refused() {
        let mut host = served();
        write_frame(
            &mut host,
            &Message::Hello(Hello {
                version: PROTOCOL_VERSION + 1,
                agent: "future".into(),
            }),
        )
        .unwrap();
        let answer: Message = expect_frame(&mut host).unwrap();
        assert!(
            matches!(
                answer,
                Message::Error(ErrorReply {
                    code: ErrorCode::UnsupportedVersion,
                    ..
                })
            ),
            "{answer:?}"
        );
        assert!(
            read_frame::<_, Message>(&mut host).unwrap().is_none(),
            "the init closes the connection"
        );
    }

    #[test]
    fn the_ready_link_ends_on_close_and_skips_data() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let waiter = std::thread::spawn(move || {
            let mut guest = guest;
            wait_for_end(&mut guest);
        });
        host.write_all(b"ignored").unwrap();
        drop(host);
        waiter.join().unwrap();
    }

    #[test]
    fn the_reannounce_waits_for_an_answer_or_its_limit() {
        let answered = Arc::new(Answered {
            count: Mutex::new(0),
            more: Condvar::new(),
        });
        let t = Instant::now();
        answered.wait_past(answered.get(), Duration::from_millis(50));
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "no answer: the limit"
        );
        let seen = answered.get();
        let bumper = {
            let answered = answered.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                answered.bump();
            })
        };
        let t = Instant::now();
        answered.wait_past(seen, Duration::from_secs(20));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "an answer ends the wait"
        );
        assert_eq!(answered.get(), seen + 1);
        bumper.join().unwrap();
    }

    #[test]
    fn module_order_file() {
        let order = parse_module_order(
            "/lib/modules/virtio_ring.ko\n\n# comment\n  /lib/modules/virtio.ko \n",
        );
        assert_eq!(
            order,
            [
                PathBuf::from("/lib/modules/virtio_ring.ko"),
                PathBuf::from("/lib/modules/virtio.ko")
            ]
        );
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:         496012 kB\nMemFree:          470000 kB\nMemAvailable:     460100 kB\n";
        assert_eq!(parse_meminfo(text), (496_012, 460_100));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }

    #[test]
    fn requests_are_answered() {
        assert_eq!(
            handle(Message::Ping { bytes: vec![1, 2] }),
            (Message::Pong { bytes: vec![1, 2] }, After::Continue)
        );
        assert_eq!(handle(Message::Reboot), (Message::Rebooting, After::Reboot));
        let (m, a) = handle(Message::Status);
        assert!(matches!(m, Message::StatusReply(s) if s.role == "vm"));
        assert_eq!(a, After::Continue);
        let (m, _) = handle(Message::Random { len: 16 });
        assert!(matches!(m, Message::RandomBytes { bytes } if bytes.len() == 16));
        let (m, _) = handle(Message::Random {
            len: MAX_RANDOM + 1,
        });
        assert!(matches!(
            m,
            Message::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                ..
            })
        ));
        let (m, _) = handle(Message::Clock);
        assert!(matches!(m, Message::ClockReply { realtime_ns } if realtime_ns > 0));
        // A bad refresh is refused before anything is changed.
        let (m, _) = handle(Message::Refresh(Refresh {
            identity: "no spaces".into(),
            entropy: vec![0; 32],
            realtime_ns: 0,
        }));
        assert!(matches!(
            m,
            Message::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                ..
            })
        ));
        let (m, _) = handle(Message::Refresh(Refresh {
            identity: "clone-1".into(),
            entropy: vec![0; 8],
            realtime_ns: 0,
        }));
        assert!(matches!(
            m,
            Message::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                ..
            })
        ));
        let (m, _) = handle(Message::Pong { bytes: vec![] });
        assert!(matches!(
            m,
            Message::Error(ErrorReply {
                code: ErrorCode::UnknownRequest,
                ..
            })
        ));
    }
}
