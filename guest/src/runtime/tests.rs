//! The runtime session run natively: a real shell `bootstrap`, a real socket pair as the host link,
//! and the test itself acting as the runtime's HTTP client where exact statuses are checked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;
use crate::protocol::function::{self as f, Message};
use crate::protocol::{self, read_frame, write_frame};

fn zip_with(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    use zip::write::{SimpleFileOptions, ZipWriter};
    let mut w = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, mode) in files {
        w.start_file(*name, SimpleFileOptions::default().unix_permissions(*mode))
            .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Session {
    host: UnixStream,
    port: u16,
    _task: tempfile::TempDir,
    thread: Option<std::thread::JoinHandle<Result<(), RuntimeError>>>,
}

fn start(code: Vec<u8>, env: Vec<(&str, &str)>) -> Session {
    let task = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = RuntimeConfig {
        task_dir: task.path().to_path_buf(),
        opt_dir: task.path().join("no-opt"),
        runtime_dir: task.path().join("no-runtime"),
        listen: ([127, 0, 0, 1], port).into(),
        run_as: None,
        limits: crate::bundle::Limits::default(),
        isolate: false,
        set_clock: false,
        report_peak_memory: true,
    };
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            guest.set_nonblocking(true).unwrap();
            let guest = tokio::net::UnixStream::from_std(guest).unwrap();
            let (r, w) = guest.into_split();
            serve_function(cfg, r, w).await
        })
    });
    let mut s = Session {
        host,
        port,
        _task: task,
        thread: Some(thread),
    };
    let mut bundle = env::tests_bundle(env);
    bundle.code_len = code.len() as u64;
    s.send(Message::Load(bundle));
    for chunk in code.chunks(1000) {
        s.send(Message::CodeChunk(chunk.to_vec()));
    }
    s
}

impl Session {
    fn send(&mut self, m: Message) {
        write_frame(&mut self.host, &protocol::Message::Function(m)).unwrap();
    }

    /// The next non-log message (log messages are collected into `logs`).
    fn recv(&mut self, logs: &mut Vec<f::LogLine>) -> Message {
        loop {
            let msg: Option<protocol::Message> = read_frame(&mut self.host).unwrap();
            match msg.expect("the init closed the link") {
                protocol::Message::Function(Message::Log(l)) => logs.push(l),
                protocol::Message::Function(m) => return m,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn invoke(&mut self, id: &str, payload: &[u8]) {
        self.send(Message::Invoke(f::Invoke {
            request_id: id.into(),
            payload: payload.to_vec(),
            deadline_ms: 1_900_000_000_000,
            host_time_ms: 0,
            invoked_function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f".into(),
            trace_id: Some("Root=1-abc".into()),
            client_context: Some("e30=".into()),
            cognito_identity: Some("{\"cognitoIdentityId\":\"x\"}".into()),
        }));
    }

    fn finish(mut self) {
        drop(self.host);
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, lowercased head, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    // The init may not be listening yet when the test plays the runtime.
    let mut tries = 0;
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if tries < 200 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => panic!("cannot reach the Runtime API: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body); // a 413 may close the connection before the whole body is sent
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, head, resp[split + 4..].to_vec())
}

const API: &str = "/2018-06-01/runtime";

fn sleeper() -> Vec<u8> {
    zip_with(&[(
        "bootstrap",
        b"#!/bin/sh\necho booting\necho oops >&2\nexec sleep 1000\n",
        0o755,
    )])
}

#[test]
fn relays_invokes_with_lambdas_headers_and_statuses() {
    let mut s = start(sleeper(), vec![]);
    let mut logs = Vec::new();
    let port = s.port;
    // The test plays the runtime: /next blocks until an invoke arrives.
    let next =
        std::thread::spawn(move || http(port, "GET", &format!("{API}/invocation/next"), b""));
    assert!(matches!(s.recv(&mut logs), Message::Loaded(_)));
    s.invoke("req-1", b"{\"x\":1}");
    let (status, head, body) = next.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, b"{\"x\":1}");
    for h in [
        "lambda-runtime-aws-request-id: req-1",
        "lambda-runtime-deadline-ms: 1900000000000",
        "lambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:000000000000:function:f",
        "lambda-runtime-trace-id: root=1-abc",
        "lambda-runtime-client-context: e30=",
        "lambda-runtime-cognito-identity: {\"cognitoidentityid\":\"x\"}",
    ] {
        assert!(head.contains(h), "missing {h} in {head}");
    }
    let (status, _, body) = http(
        port,
        "POST",
        &format!("{API}/invocation/nope/response"),
        b"1",
    );
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        http(
            port,
            "POST",
            &format!("{API}/invocation/req-1/response"),
            b"\"ok\""
        )
        .0,
        202
    );
    let (status, _, body) = http(
        port,
        "POST",
        &format!("{API}/invocation/req-1/response"),
        b"\"again\"",
    );
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("errorType"));
    match s.recv(&mut logs) {
        Message::Result(r) => {
            assert_eq!(r.request_id, "req-1");
            assert_eq!(r.outcome, f::Outcome::Response(b"\"ok\"".to_vec()));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        logs.iter()
            .any(|l| l.line == b"booting" && l.stream == f::Stream::Stdout)
    );
    assert!(
        logs.iter()
            .any(|l| l.line == b"oops" && l.stream == f::Stream::Stderr)
    );

    // Over 6 MB: 413 to the runtime, Function.ResponseSizeTooLarge to the host.
    let next =
        std::thread::spawn(move || http(port, "GET", &format!("{API}/invocation/next"), b""));
    s.invoke("req-2", b"{}");
    assert_eq!(next.join().unwrap().0, 200);
    let big = vec![b'x'; f::MAX_PAYLOAD + 1];
    assert_eq!(
        http(
            port,
            "POST",
            &format!("{API}/invocation/req-2/response"),
            &big
        )
        .0,
        413
    );
    match s.recv(&mut logs) {
        Message::Result(f::InvokeResult {
            outcome: f::Outcome::Error(e),
            ..
        }) => {
            assert_eq!(e.error_type, "Function.ResponseSizeTooLarge")
        }
        other => panic!("{other:?}"),
    }

    // A handled error keeps the runtime's body.
    let next =
        std::thread::spawn(move || http(port, "GET", &format!("{API}/invocation/next"), b""));
    s.invoke("req-3", b"{}");
    assert_eq!(next.join().unwrap().0, 200);
    let err = br#"{"errorType":"MyError","errorMessage":"bad input","stackTrace":[]}"#;
    assert_eq!(
        http(port, "POST", &format!("{API}/invocation/req-3/error"), err).0,
        202
    );
    match s.recv(&mut logs) {
        Message::Result(f::InvokeResult {
            outcome: f::Outcome::Error(e),
            ..
        }) => {
            assert_eq!(
                (e.error_type.as_str(), e.error_message.as_str()),
                ("MyError", "bad input")
            );
            assert_eq!(e.body, err);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(http(port, "GET", &format!("{API}/nothing"), b"").0, 404);
    s.finish();
}

/// A keep-alive connection to the Runtime API, as a runtime's HTTP client keeps one.
struct KeepAlive(TcpStream);

impl KeepAlive {
    fn connect(port: u16) -> KeepAlive {
        let mut tries = 0;
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    return KeepAlive(s);
                }
                Err(_) if tries < 200 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => panic!("cannot reach the Runtime API: {e}"),
            }
        }
    }

    fn send(&mut self, method: &str, path: &str, headers: &str, body: &[u8]) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        );
        self.0.write_all(head.as_bytes()).unwrap();
        self.0.write_all(body).unwrap();
    }

    /// One response: (status, lowercased head, body), read by its content-length.
    fn receive(&mut self) -> (u16, String, Vec<u8>) {
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\r\n\r\n") {
            assert_eq!(self.0.read(&mut byte).unwrap(), 1, "the connection closed");
            bytes.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&bytes).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        let mut body = vec![0u8; length];
        self.0.read_exact(&mut body).unwrap();
        (head[9..12].parse().unwrap(), head, body)
    }
}

#[test]
fn one_keep_alive_connection_serves_invokes_then_hands_over_to_hyper() {
    let mut s = start(sleeper(), vec![]);
    let mut logs = Vec::new();
    let mut c = KeepAlive::connect(s.port);
    let next = format!("{API}/invocation/next");
    // The first `next` ends the init.
    c.send("GET", &next, "", b"");
    assert!(matches!(s.recv(&mut logs), Message::Loaded(_)));
    s.invoke("k-1", b"{\"k\":1}");
    let (status, head, body) = c.receive();
    assert_eq!((status, &body[..]), (200, &b"{\"k\":1}"[..]));
    for h in [
        "content-type: application/json",
        "lambda-runtime-aws-request-id: k-1",
        "lambda-runtime-deadline-ms: 1900000000000",
        "lambda-runtime-trace-id: root=1-abc",
        "lambda-runtime-client-context: e30=",
        "date: ",
    ] {
        assert!(head.contains(h), "missing {h} in {head}");
    }
    c.send(
        "POST",
        &format!("{API}/invocation/k-1/response"),
        "",
        b"\"one\"",
    );
    assert_eq!(c.receive().0, 202);
    match s.recv(&mut logs) {
        Message::Result(r) => assert_eq!(r.outcome, f::Outcome::Response(b"\"one\"".to_vec())),
        other => panic!("{other:?}"),
    }

    // An error that is not JSON takes its type from the header.
    c.send("GET", &next, "", b"");
    s.invoke("k-2", b"{}");
    assert_eq!(c.receive().0, 200);
    c.send(
        "POST",
        &format!("{API}/invocation/k-2/error"),
        "Lambda-Runtime-Function-Error-Type: Custom.Kind\r\n",
        b"plain words",
    );
    assert_eq!(c.receive().0, 202);
    match s.recv(&mut logs) {
        Message::Result(f::InvokeResult {
            outcome: f::Outcome::Error(e),
            ..
        }) => assert_eq!(
            (e.error_type.as_str(), e.error_message.as_str()),
            ("Custom.Kind", "plain words")
        ),
        other => panic!("{other:?}"),
    }
    c.send("POST", &format!("{API}/invocation/k-2/response"), "", b"1");
    assert_eq!(c.receive().0, 403);

    // A runtime that closes its connection while it waits takes no invoke with it.
    let mut gone = KeepAlive::connect(s.port);
    gone.send("GET", &next, "", b"");
    std::thread::sleep(Duration::from_millis(200));
    drop(gone);
    std::thread::sleep(Duration::from_millis(200));
    s.invoke("k-3", b"{\"k\":3}");

    // Another path goes to hyper, which serves the rest of the connection.
    c.send("GET", &format!("{API}/nothing"), "", b"");
    let (status, _, body) = c.receive();
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    c.send("GET", &next, "", b"");
    let (status, head, body) = c.receive();
    assert_eq!((status, &body[..]), (200, &b"{\"k\":3}"[..]));
    assert!(
        head.contains("lambda-runtime-aws-request-id: k-3"),
        "{head}"
    );
    c.send("POST", &format!("{API}/invocation/k-3/response"), "", b"3");
    assert_eq!(c.receive().0, 202);
    match s.recv(&mut logs) {
        Message::Result(r) => {
            assert_eq!(r.request_id, "k-3");
            assert_eq!(r.outcome, f::Outcome::Response(b"3".to_vec()));
        }
        other => panic!("{other:?}"),
    }
    s.finish();
}

#[test]
fn init_error_is_reported_and_answers_invokes() {
    let script = format!(
        "#!/bin/sh\ncurl -s -X POST -d '{{\"errorType\":\"Boom\",\"errorMessage\":\"no config\"}}' \
         http://$AWS_LAMBDA_RUNTIME_API{API}/init/error\nsleep 1000\n"
    );
    let mut s = start(zip_with(&[("bootstrap", script.as_bytes(), 0o755)]), vec![]);
    let mut logs = Vec::new();
    match s.recv(&mut logs) {
        Message::InitFailed(f) => assert_eq!(f.error.error_type, "Boom"),
        other => panic!("{other:?}"),
    }
    s.invoke("r", b"{}");
    match s.recv(&mut logs) {
        Message::Result(f::InvokeResult {
            outcome: f::Outcome::Error(e),
            ..
        }) => assert_eq!(e.error_type, "Boom"),
        other => panic!("{other:?}"),
    }
    s.finish();
}

#[test]
fn runtime_exit_during_init_is_an_exit_error() {
    let code = zip_with(&[("bootstrap", b"#!/bin/sh\necho going away\nexit 3\n", 0o755)]);
    let mut s = start(code, vec![]);
    let mut logs = Vec::new();
    match s.recv(&mut logs) {
        Message::InitFailed(f) => {
            assert_eq!(f.error.error_type, "Runtime.ExitError");
            assert!(
                f.error.error_message.contains("exit status 3"),
                "{}",
                f.error.error_message
            );
        }
        other => panic!("{other:?}"),
    }
    s.finish();
}

#[test]
fn runtime_exit_during_an_invoke_fails_it_and_reports_the_exit() {
    let script = format!(
        "#!/bin/sh\ncurl -s http://$AWS_LAMBDA_RUNTIME_API{API}/invocation/next >/dev/null\necho dying\nexit 7\n"
    );
    let mut s = start(zip_with(&[("bootstrap", script.as_bytes(), 0o755)]), vec![]);
    let mut logs = Vec::new();
    assert!(matches!(s.recv(&mut logs), Message::Loaded(_)));
    s.invoke("r-exit", b"{}");
    assert!(matches!(s.recv(&mut logs), Message::Exited(_)));
    match s.recv(&mut logs) {
        Message::Result(r) => {
            let f::Outcome::Error(e) = r.outcome else {
                panic!("expected an error")
            };
            assert_eq!(e.error_type, "Runtime.ExitError");
            assert!(
                e.error_message.contains("RequestId: r-exit"),
                "{}",
                e.error_message
            );
            assert_eq!(r.logs_tail, b"dying\n");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        logs.iter()
            .any(|l| l.line == b"dying" && l.request_id.as_deref() == Some("r-exit"))
    );
    s.finish();
}

#[test]
fn refuses_a_bad_zip_reserved_variables_and_a_missing_bootstrap() {
    type Case<'a> = (Vec<u8>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (b"not a zip".to_vec(), vec![], "InvalidZipFileException"),
        (
            sleeper(),
            vec![("AWS_REGION", "x")],
            "InvalidParameterValueException",
        ),
        (
            zip_with(&[("other", b"", 0o644)]),
            vec![],
            "Runtime.InvalidEntrypoint",
        ),
    ];
    for (code, env, expected) in cases {
        let mut s = start(code, env);
        let mut logs = Vec::new();
        match s.recv(&mut logs) {
            Message::InitFailed(f) => assert_eq!(f.error.error_type, expected),
            other => panic!("{other:?}"),
        }
        s.finish();
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// The async frame reader takes arbitrary bytes from the link without panicking, and refuses a
    /// length over the limit before reading (or allocating) the payload.
    #[test]
    fn the_async_frame_reader_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut cursor = bytes.as_slice();
            while let Ok(Some(_)) = super::read_frame(&mut cursor).await {}
        });
    }
}

#[test]
fn the_async_frame_reader_refuses_oversized_frames_first() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let len = (protocol::MAX_FRAME as u32 + 1).to_le_bytes();
    let err = rt
        .block_on(async { super::read_frame(&mut len.as_slice()).await })
        .unwrap_err();
    assert!(
        matches!(err, protocol::ProtocolError::TooLarge { .. }),
        "{err}"
    );
}
