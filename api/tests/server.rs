//! The real HTTP server over a socket: header read timeout, header size limit, keep-alive, and
//! graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use hearth_api::server::{ServerLimits, serve_with_limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start(
    limits: ServerLimits,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    common::TestApp,
) {
    let app = common::new_app();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = app.router.clone();
    let task = tokio::spawn(async move {
        serve_with_limits(
            listener,
            router,
            async {
                let _ = rx.await;
            },
            limits,
        )
        .await
        .unwrap();
    });
    (addr, tx, task, app)
}

async fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let limits = ServerLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ServerLimits::default()
    };
    let (addr, stop, task, _app) = start(limits).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /2015-03-31/functions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let reply = read_all(&mut stream).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the connection stayed open"
    );
    assert!(!reply.starts_with("HTTP/1.1 2"), "{reply}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let limits = ServerLimits {
        max_header_bytes: 16 * 1024,
        ..ServerLimits::default()
    };
    let (addr, stop, task, _app) = start(limits).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let big = "a".repeat(64 * 1024);
    let request = format!("GET /2015-03-31/functions HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let reply = read_all(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    assert!(!reply.starts_with("HTTP/1.1 2"), "{reply}");
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_request_over_a_socket_is_lambda_shaped() {
    let (addr, stop, task, _app) = start(ServerLimits::default()).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /2015-03-31/functions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let reply = read_all(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    let lower = reply.to_ascii_lowercase();
    assert!(
        lower.contains("x-amzn-errortype: missingauthenticationtokenexception"),
        "{reply}"
    );
    assert!(lower.contains("x-amzn-requestid: "), "{reply}");
    stop.send(()).unwrap();
    task.await.unwrap();
}
