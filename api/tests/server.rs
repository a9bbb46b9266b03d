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

/// A signed request's bytes on the wire, with its `content-length`.
fn wire_request(
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
    signer: Option<(&str, &str, std::time::SystemTime)>,
) -> Vec<u8> {
    let mut req = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut req = req.body(axum::body::Body::from(body.to_vec())).unwrap();
    if let Some((key, secret, time)) = signer {
        common::sign_request(&mut req, body, key, secret, time);
    }
    let mut out = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// One response from a keep-alive connection: status, lower-cased headers, body.
struct WireReply {
    status: u16,
    headers: std::collections::HashMap<String, String>,
    body: Vec<u8>,
}

async fn read_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> WireReply {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: std::collections::HashMap<String, String> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .map_or(0, |v| v.parse().unwrap());
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed the connection mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    WireReply {
        status,
        headers,
        body,
    }
}

/// Invokes over one keep-alive socket (served without hyper until the first other request)
/// answer as the router does; the connection then goes on under hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invokes_over_a_socket_answer_as_through_the_router() {
    use common::{KEY, SECRET};
    let (addr, stop, task, app) = start(ServerLimits::default()).await;
    let zip = common::zip_with(b"#!/bin/sh\necho hi\n");
    common::send(
        &app.router,
        axum::http::Method::POST,
        "/2015-03-31/functions",
        Some(common::create_body("wire", &zip)),
    )
    .await;
    common::wait_until(&app, "wire", |c| c["State"] == "Active").await;
    let router = hearth_api::app(app.state.clone());
    let now = std::time::SystemTime::now();
    let signed = Some((KEY, SECRET, now));
    let invoke = "/2015-03-31/functions/wire/invocations";
    // The last case is over the limit: hyper answers it, and the rest of the connection.
    let cases = common::invoke_cases("wire", now);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for (path, body, headers, signer) in cases {
        let bytes = wire_request("POST", &path, &body, &headers, signer);
        stream.write_all(&bytes).await.unwrap();
        let wire = read_reply(&mut stream, &mut buf).await;
        let routed = common::send_with(
            &router,
            axum::http::Method::POST,
            &path,
            body,
            &headers,
            signer,
        )
        .await;
        assert_eq!(wire.status, routed.status.as_u16(), "{path} {headers:?}");
        for name in ["x-amzn-errortype", "x-amz-executed-version", "content-type"] {
            assert_eq!(
                wire.headers.get(name).map(String::as_str),
                routed.headers.get(name).map(|v| v.to_str().unwrap()),
                "{name}: {path} {headers:?}"
            );
        }
        assert!(wire.headers.contains_key("x-amzn-requestid"), "{path}");
        assert!(wire.headers.contains_key("date"), "{path}");
        assert_eq!(
            String::from_utf8_lossy(&wire.body),
            String::from_utf8_lossy(&routed.bytes),
            "{path} {headers:?}"
        );
    }
    // The same connection, now hyper's: a control-plane request, then an invoke again.
    let list = wire_request("GET", "/2015-03-31/functions", b"", &[], signed);
    stream.write_all(&list).await.unwrap();
    let reply = read_reply(&mut stream, &mut buf).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let dry = wire_request(
        "POST",
        invoke,
        b"{}",
        &[("x-amz-invocation-type", "DryRun")],
        signed,
    );
    stream.write_all(&dry).await.unwrap();
    assert_eq!(read_reply(&mut stream, &mut buf).await.status, 204);
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// Requests sent back to back in one write are answered in order, the invokes here and the
/// rest by hyper; `Connection: close` closes after its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    use common::{KEY, SECRET};
    let (addr, stop, task, _app) = start(ServerLimits::default()).await;
    let signed = Some((KEY, SECRET, std::time::SystemTime::now()));
    let invoke = "/2015-03-31/functions/nothere/invocations";
    let mut all = wire_request("POST", invoke, b"{}", &[], signed);
    all.extend(wire_request("POST", invoke, b"{", &[], signed));
    all.extend(wire_request(
        "GET",
        "/2015-03-31/functions",
        b"",
        &[],
        signed,
    ));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&all).await.unwrap();
    let mut buf = Vec::new();
    let first = read_reply(&mut stream, &mut buf).await;
    assert_eq!(first.status, 404);
    let second = read_reply(&mut stream, &mut buf).await;
    assert_eq!(
        second.status,
        400,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(read_reply(&mut stream, &mut buf).await.status, 200);

    let mut stream = TcpStream::connect(addr).await.unwrap();
    let closing = wire_request("POST", invoke, b"{}", &[("connection", "close")], signed);
    stream.write_all(&closing).await.unwrap();
    let reply = read_all(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// At shutdown an idle keep-alive connection is closed at once; the server does not wait out
/// its grace period for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_invoke_connections() {
    use common::{KEY, SECRET};
    let (addr, stop, task, _app) = start(ServerLimits::default()).await;
    let signed = Some((KEY, SECRET, std::time::SystemTime::now()));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = wire_request(
        "POST",
        "/2015-03-31/functions/nothere/invocations",
        b"{}",
        &[],
        signed,
    );
    stream.write_all(&request).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_reply(&mut stream, &mut buf).await.status, 404);
    let started = Instant::now();
    stop.send(()).unwrap();
    task.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}
