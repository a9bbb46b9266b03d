//! The invoke-proxy protocol served over a Unix socket by an echo server (no sandbox: each
//! `Invoke` is answered at once with a `Result` carrying its payload), on two runtimes side by
//! side: tokio's `current_thread` runtime (epoll, what the agent's cores run) and compio's
//! io_uring runtime. The server has one thread; the client another (a tokio `current_thread`
//! runtime, the same for both servers), with 1 and 16 connections, each with one invoke in flight
//! at a time. Both servers do the same work: read what is there, decode every whole frame
//! ([`protocol::decode`]), encode the answers, write them in one write.
//!
//! Prints per case: median and p99 latency of one invoke (client side) and invokes per second.
//! `cargo bench -p hearth-agent --bench proxy_runtimes`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_agent::proxy::protocol::{
    self, Frame, FunctionSpec, Hello, InvocationType, InvokeRequest, InvokeResult, Outcome,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WARMUP: Duration = Duration::from_millis(500);
const MEASURE: Duration = Duration::from_secs(3);

/// Answers every whole frame in `pending`, appending the answers to `out`; false on garbage.
fn answer(pending: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
    let mut at = 0;
    loop {
        match protocol::decode(&pending[at..]) {
            Ok(Some((frame, used))) => {
                at += used;
                let reply = match frame {
                    Frame::Hello(_) => Frame::Hello(Hello::ours("bench")),
                    Frame::Invoke(request) => Frame::Result(Box::new(InvokeResult::bare(
                        request.request_id,
                        Outcome::Success {
                            payload: request.payload,
                        },
                    ))),
                    _ => return false,
                };
                match protocol::encode(&reply) {
                    Ok(bytes) => out.extend_from_slice(&bytes),
                    Err(_) => return false,
                }
            }
            Ok(None) => break,
            Err(_) => return false,
        }
    }
    pending.drain(..at);
    true
}

/// The echo server on tokio's current_thread runtime.
fn tokio_server(path: PathBuf, ready: std::sync::mpsc::Sender<()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let _ = ready.send(());
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut pending = Vec::new();
                let mut out = Vec::new();
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    if !answer(&mut pending, &mut out) {
                        return;
                    }
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            });
        }
    });
}

/// The echo server on compio's io_uring runtime.
fn compio_server(path: PathBuf, ready: std::sync::mpsc::Sender<()>) {
    use compio::BufResult;
    use compio::io::{AsyncRead as _, AsyncWriteExt as _};
    let rt = compio::runtime::Runtime::new().expect("compio runtime");
    rt.block_on(async move {
        let listener = compio::net::UnixListener::bind(&path).await.expect("bind");
        let _ = ready.send(());
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            compio::runtime::spawn(async move {
                let mut buf = Vec::with_capacity(64 << 10);
                let mut pending = Vec::new();
                let mut out = Vec::new();
                loop {
                    buf.clear();
                    let BufResult(read, b) = stream.read(buf).await;
                    buf = b;
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    pending.extend_from_slice(&buf);
                    if !answer(&mut pending, &mut out) {
                        return;
                    }
                    let BufResult(wrote, o) = stream.write_all(out).await;
                    out = o;
                    if wrote.is_err() {
                        return;
                    }
                    out.clear();
                }
            })
            .detach();
        }
    });
}

fn request(n: u64) -> InvokeRequest {
    InvokeRequest {
        request_id: format!("bench-{n}"),
        function: FunctionSpec {
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:echo".into(),
            function_name: "echo".into(),
            version: "$LATEST".into(),
            code_sha256_hex: "ab".repeat(32),
            runtime: "provided.al2023".into(),
            handler: "bootstrap".into(),
            memory_mib: 128,
            timeout_s: 3,
            environment: vec![],
            reserved_concurrency: None,
            revision_id: "r1".into(),
        },
        payload: br#"{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#.to_vec(),
        invocation_type: InvocationType::RequestResponse,
        client_context: None,
        trace_id: None,
        deadline_ms: 0,
        log_tail: false,
    }
}

/// One connection: Hello, then invokes one at a time until `until`; latencies (us) of those
/// sent after `measure_from`.
async fn connection(path: &Path, measure_from: Instant, until: Instant) -> Vec<f64> {
    let mut s = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    let hello = protocol::encode(&Frame::Hello(Hello::ours("bench"))).expect("encode");
    s.write_all(&hello).await.expect("hello");
    match protocol::read_frame(&mut s).await {
        Ok(Some(Frame::Hello(_))) => {}
        other => panic!("no Hello: {other:?}"),
    }
    let frame = protocol::encode(&Frame::Invoke(Box::new(request(1)))).expect("encode");
    let mut latencies = Vec::new();
    loop {
        let start = Instant::now();
        if start >= until {
            return latencies;
        }
        s.write_all(&frame).await.expect("send");
        match protocol::read_frame(&mut s).await {
            Ok(Some(Frame::Result(r))) => assert_eq!(r.request_id, "bench-1"),
            other => panic!("no Result: {other:?}"),
        }
        if start >= measure_from {
            latencies.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
}

fn case(name: &str, path: &Path, connections: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut all = rt.block_on(async {
        let measure_from = Instant::now() + WARMUP;
        let until = measure_from + MEASURE;
        let tasks: Vec<_> = (0..connections)
            .map(|_| {
                let path = path.to_path_buf();
                tokio::spawn(async move { connection(&path, measure_from, until).await })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("client task"));
        }
        all
    });
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:>18}, {connections:>2} connection(s): p50 {:>6.1} us, p99 {:>6.1} us, {:>8.0} invokes/s",
        at(0.5),
        at(0.99),
        all.len() as f64 / MEASURE.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; filters are not supported.
    let dir = tempfile::tempdir().expect("a scratch folder");
    type Server = fn(PathBuf, std::sync::mpsc::Sender<()>);
    let servers: [(&str, Server); 2] = [
        ("tokio epoll", tokio_server),
        ("compio io_uring", compio_server),
    ];
    for (name, server) in servers {
        let path = dir.path().join(format!("{}.sock", name.replace(' ', "-")));
        let (ready, started) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || server(p, ready));
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the server started");
        for connections in [1, 16] {
            case(name, &path, connections);
        }
    }
}
