//! The floor under `hearth-perf api`'s figures on this host: the round trip of a small message
//! over loopback TCP and over a Unix socket, and of a minimal HTTP/1.1 exchange served by hyper,
//! each between two threads with their own single-threaded tokio runtime (as the agent's cores
//! and the benchmark's client are). Prints the median and p99 of each, interleaved.
//!
//! `cargo run --release -p hearth-perf --example loopback_rtt -- [ROUND_TRIPS]`

use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const MESSAGE: usize = 200;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = [0u8; MESSAGE];
    while s.read_exact(&mut buf).await.is_ok() {
        if s.write_all(&buf).await.is_err() {
            return;
        }
    }
}

async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) -> f64 {
    let mut buf = [7u8; MESSAGE];
    let start = Instant::now();
    s.write_all(&buf).await.expect("write");
    s.read_exact(&mut buf).await.expect("read");
    start.elapsed().as_secs_f64() * 1e6
}

const REQUEST: &[u8] = b"POST /x HTTP/1.1\r\nhost: h\r\ncontent-length: 64\r\n\r\n{\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}";

async fn http_ping(s: &mut tokio::net::TcpStream) -> f64 {
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    s.write_all(REQUEST).await.expect("write");
    let mut got = 0;
    loop {
        got += s.read(&mut buf[got..]).await.expect("read");
        if let Some(head) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n")
            && got >= head + 4 + 2
        {
            break;
        }
    }
    start.elapsed().as_secs_f64() * 1e6
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<28} p50 {:>7.1} us   p90 {:>7.1} us   p99 {:>7.1} us",
        at(0.5),
        at(0.9),
        at(0.99)
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("a temp dir");
    let unix_path = dir.path().join("rtt.sock");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind http");
    let (tcp_addr, http_addr) = (tcp.local_addr().unwrap(), http.local_addr().unwrap());
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).expect("bind unix");
    for l in [&tcp, &http] {
        l.set_nonblocking(true).unwrap();
    }
    unix.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
            let http = tokio::net::TcpListener::from_std(http).unwrap();
            let unix = tokio::net::UnixListener::from_std(unix).unwrap();
            let (t, _) = tcp.accept().await.unwrap();
            t.set_nodelay(true).unwrap();
            tokio::spawn(echo(t));
            let (u, _) = unix.accept().await.unwrap();
            tokio::spawn(echo(u));
            let (h, _) = http.accept().await.unwrap();
            h.set_nodelay(true).unwrap();
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt as _;
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                        body.slice(..2),
                    )))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(h), service)
                .await;
        });
    });
    runtime().block_on(async move {
        let mut t = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
        t.set_nodelay(true).unwrap();
        let mut u = tokio::net::UnixStream::connect(&unix_path).await.unwrap();
        let mut h = tokio::net::TcpStream::connect(http_addr).await.unwrap();
        h.set_nodelay(true).unwrap();
        let (mut tv, mut uv, mut hv) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n + 1000 {
            let (a, b, c) = (
                ping(&mut t).await,
                ping(&mut u).await,
                http_ping(&mut h).await,
            );
            if i >= 1000 {
                tv.push(a);
                uv.push(b);
                hv.push(c);
            }
        }
        summary("tcp round trip", tv);
        summary("unix round trip", uv);
        summary("hyper http/1.1 round trip", hv);
    });
}
