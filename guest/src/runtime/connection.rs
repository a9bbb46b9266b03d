//! A keep-alive Runtime API connection whose hot requests are served without hyper:
//! `GET .../invocation/next`, `POST .../invocation/{id}/response` and `POST .../invocation/{id}/error`.
//! The request head is parsed in place (`httparse`), the body read by its `content-length`, the
//! request answered by [`super::api`]'s handlers, and the answer written in one `write`. At the
//! first request that is anything else (another path or method, a chunked body, `Expect`,
//! HTTP/1.0, a body over [`MAX_PAYLOAD`], a head that does not parse or passes [`MAX_HEAD`]) the
//! connection is handed to hyper with the bytes already read ([`Prebuffered`]), and hyper serves it
//! from that request on, with its own answers and limits.
//!
//! Why: a warm invoke crosses this API twice (the runtime's `next`, then its `response`). hyper's
//! connection machinery (its state machine, the body channel, the service future, header maps) was
//! a large part of the init's CPU per invoke; one parsed head and one written answer cost less.
//!
//! While a `next` waits for an invoke the connection is watched: a runtime that closes it gets no
//! invoke (the wait is dropped before it takes one), as a runtime that keeps it open does.

use std::time::SystemTime;

use bytes::{Buf as _, BytesMut};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::api::{self, ApiState, Body, Reply};
use crate::prebuffered::Prebuffered;
use crate::protocol::function::MAX_PAYLOAD;

/// The most header lines of a request served here; one with more goes to hyper.
const MAX_HEADERS: usize = 32;
/// The largest request head served here; a longer one goes to hyper (which has its own limit).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The first read buffer of a connection.
const FIRST_BUFFER: usize = 8 * 1024;

/// How a connection's loop ended.
pub(crate) enum Ended<S> {
    /// The connection is closed (or to be dropped): the runtime closed it or asked to.
    Closed,
    /// hyper serves the rest of the connection, starting with these bytes.
    HandOver(Prebuffered<S>),
}

/// A request this loop serves.
#[derive(Debug, PartialEq)]
enum Hot {
    Next,
    Response {
        id: String,
    },
    Error {
        id: String,
        /// `Lambda-Runtime-Function-Error-Type`, when it is text.
        error_type: Option<String>,
    },
}

/// A parsed hot request head.
#[derive(Debug, PartialEq)]
struct HotRequest {
    hot: Hot,
    content_length: usize,
    keep_alive: bool,
}

/// Serves `stream`'s hot requests until it closes or a request comes that hyper must serve.
pub(crate) async fn serve<S>(mut stream: S, state: &ApiState) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(FIRST_BUFFER);
    loop {
        let (head_len, request) = match read_head(&mut stream, &mut buf).await {
            Head::Hot(n, request) => (n, request),
            Head::HandOver => return Ended::HandOver(Prebuffered::new(buf, stream)),
            Head::Closed => return Ended::Closed,
        };
        let reply = match request.hot {
            Hot::Next => {
                buf.advance(head_len);
                match wait_next(&mut stream, &mut buf, state).await {
                    Some(reply) => reply,
                    None => return Ended::Closed,
                }
            }
            Hot::Response { id } => {
                let Some(body) =
                    read_body(&mut stream, &mut buf, head_len, request.content_length).await
                else {
                    return Ended::Closed;
                };
                api::response(state, &id, Body::Ok(body))
            }
            Hot::Error { id, error_type } => {
                let Some(body) =
                    read_body(&mut stream, &mut buf, head_len, request.content_length).await
                else {
                    return Ended::Closed;
                };
                api::invocation_error(state, &id, error_type, Body::Ok(body))
            }
        };
        let message = encode(&reply, request.keep_alive);
        if let Err(e) = stream.write_all(&message).await {
            tracing::debug!(error = %e, "runtime API write failed");
            return Ended::Closed;
        }
        if !request.keep_alive {
            let _ = stream.shutdown().await;
            return Ended::Closed;
        }
    }
}

enum Head {
    /// A whole hot request head of this many bytes is at the start of the buffer.
    Hot(usize, HotRequest),
    /// hyper serves this request (and the rest of the connection).
    HandOver,
    Closed,
}

/// Reads until the buffer starts with a whole request head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Head {
    loop {
        if !buf.is_empty() {
            match parse_head(buf) {
                Parsed::Complete(n, Some(request)) => return Head::Hot(n, request),
                Parsed::Complete(_, None) | Parsed::Invalid => return Head::HandOver,
                Parsed::Partial if buf.len() >= MAX_HEAD => return Head::HandOver,
                Parsed::Partial => {}
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(FIRST_BUFFER);
        }
        match stream.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            Ok(_) => return Head::Closed,
            Err(e) => {
                tracing::debug!(error = %e, "runtime API read failed");
                return Head::Closed;
            }
        }
    }
}

/// Waits for the next invoke while watching the connection: `None` when the runtime closes it
/// first (no invoke is taken then). Bytes it sends meanwhile (a pipelined request) stay in `buf`.
async fn wait_next<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    state: &ApiState,
) -> Option<Reply> {
    let next = api::next(state);
    tokio::pin!(next);
    let mut watching = true;
    loop {
        tokio::select! {
            biased;
            reply = &mut next => return Some(reply),
            read = stream.read_buf(buf), if watching => match read {
                Ok(n) if n > 0 => watching = buf.len() < MAX_HEAD,
                _ => return None,
            },
        }
    }
}

/// Reads until the buffer holds the head and `length` bytes of body; returns the body and drops
/// the request from the buffer. `None` when the connection ends first.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    head_len: usize,
    length: usize,
) -> Option<Vec<u8>> {
    let end = head_len.checked_add(length)?;
    if buf.len() < end {
        buf.reserve(end - buf.len());
    }
    while buf.len() < end {
        match stream.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
    }
    let body = buf.get(head_len..end)?.to_vec();
    buf.advance(end);
    Some(body)
}

enum Parsed {
    Partial,
    Invalid,
    Complete(usize, Option<HotRequest>),
}

/// Parses the head at the start of `buf`; a complete one comes with the hot request it is, if it
/// is one ([`hot_request`]).
fn parse_head(buf: &[u8]) -> Parsed {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut lines);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Parsed::Complete(n, hot_request(&request)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// The hot request that `request` is, if it is one: HTTP/1.1, a hot path and method, a
/// `content-length` (or none) within [`MAX_PAYLOAD`] (none at all for `next`), no
/// `transfer-encoding` and no `expect`. Every other request is hyper's.
fn hot_request(request: &httparse::Request<'_, '_>) -> Option<HotRequest> {
    if request.version != Some(1) {
        return None;
    }
    let target = request.path?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let rest = path.strip_prefix(api::PREFIX)?;
    let hot = match (request.method?, rest.strip_prefix("invocation/")?) {
        ("GET", "next") => Hot::Next,
        ("POST", tail) => match tail.split_once('/')? {
            (id, "response") if !id.contains('/') => Hot::Response { id: id.to_string() },
            (id, "error") if !id.contains('/') => Hot::Error {
                id: id.to_string(),
                error_type: None,
            },
            _ => return None,
        },
        _ => return None,
    };
    let mut content_length: Option<usize> = None;
    let mut keep_alive = true;
    let mut error_type = None;
    for line in request.headers.iter() {
        let name = line.name;
        if name.eq_ignore_ascii_case("content-length") {
            let digits = line.value.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let length: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
            if content_length.is_some_and(|seen| seen != length) {
                return None;
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
        {
            return None;
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !line
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("lambda-runtime-function-error-type") {
            // As hyper's `HeaderValue::to_str`: visible ASCII only.
            error_type = line
                .value
                .iter()
                .all(|&b| b == b'\t' || (32..127).contains(&b))
                .then(|| String::from_utf8_lossy(line.value).into_owned());
        }
    }
    let content_length = content_length.unwrap_or(0);
    let hot = match hot {
        Hot::Next if content_length > 0 => return None,
        Hot::Error { id, .. } => Hot::Error { id, error_type },
        hot => hot,
    };
    if content_length > MAX_PAYLOAD {
        return None;
    }
    Some(HotRequest {
        hot,
        content_length,
        keep_alive,
    })
}

/// `reply` as one HTTP/1.1 response.
fn encode(reply: &Reply, keep_alive: bool) -> Vec<u8> {
    let (status, body) = match reply {
        Reply::Json(status, body) => (*status, &body[..]),
        Reply::Invoke(invoke) => (StatusCode::OK, &invoke.payload[..]),
    };
    let mut out = Vec::with_capacity(512 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut header = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    match reply {
        Reply::Json(..) => header("content-type", b"application/json"),
        Reply::Invoke(invoke) => {
            for (name, value) in Reply::invoke_headers(invoke) {
                header(name, value.as_bytes());
            }
            header(
                "lambda-runtime-deadline-ms",
                invoke.deadline_ms.to_string().as_bytes(),
            );
        }
    }
    if !keep_alive {
        header("connection", b"close");
    }
    header("content-length", body.len().to_string().as_bytes());
    http_date(|date| header("date", date));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

thread_local! {
    /// This second's `date` value, formatted once a second per thread.
    static DATE: std::cell::RefCell<(u64, String)> =
        const { std::cell::RefCell::new((0, String::new())) };
}

/// Calls `with` with the current time as an HTTP date.
fn http_date(with: impl FnOnce(&[u8])) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        with(date.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decide(head: &[u8]) -> Option<HotRequest> {
        match parse_head(head) {
            Parsed::Complete(_, request) => request,
            _ => None,
        }
    }

    #[test]
    fn hot_heads_are_served_here() {
        let next = decide(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(
            next,
            Some(HotRequest {
                hot: Hot::Next,
                content_length: 0,
                keep_alive: true
            })
        );
        let response = decide(
            b"POST /2018-06-01/runtime/invocation/r-1/response HTTP/1.1\r\nContent-Length: 4\r\nConnection: keep-alive, Close\r\n\r\n",
        )
        .unwrap();
        assert_eq!(response.hot, Hot::Response { id: "r-1".into() });
        assert_eq!(response.content_length, 4);
        assert!(!response.keep_alive);
        let error = decide(
            b"POST /2018-06-01/runtime/invocation/r-2/error?x=1 HTTP/1.1\r\ncontent-length: 2\r\nLambda-Runtime-Function-Error-Type: Oops\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            error.hot,
            Hot::Error {
                id: "r-2".into(),
                error_type: Some("Oops".into())
            }
        );
    }

    #[test]
    fn every_other_head_is_hypers() {
        let over = format!(
            "POST /2018-06-01/runtime/invocation/r/response HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_PAYLOAD + 1
        );
        for head in [
            &b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\ncontent-length: 2\r\n\r\n"[..],
            b"POST /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n",
            b"GET /2018-06-01/runtime/invocation/r/response HTTP/1.1\r\n\r\n",
            b"GET /2018-06-01/runtime/invocation/next HTTP/1.0\r\n\r\n",
            b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\ncontent-length: 1\r\n\r\n",
            b"GET /2018-06-01/runtime/nothing HTTP/1.1\r\n\r\n",
            b"GET /other HTTP/1.1\r\n\r\n",
            b"POST /2018-06-01/runtime/invocation/a/b/response HTTP/1.1\r\n\r\n",
            b"POST /2018-06-01/runtime/invocation/r/response HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST /2018-06-01/runtime/invocation/r/response HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
            b"POST /2018-06-01/runtime/invocation/r/response HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            b"POST /2018-06-01/runtime/invocation/r/response HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            over.as_bytes(),
            b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n",
        ] {
            assert!(decide(head).is_none(), "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn answers_carry_status_headers_length_and_date() {
        let invoke = crate::protocol::function::Invoke {
            request_id: "r-1".into(),
            payload: b"{\"a\":1}".to_vec(),
            deadline_ms: 1_900_000_000_000,
            host_time_ms: 0,
            invoked_function_arn: "arn:f".into(),
            trace_id: Some("Root=1-a".into()),
            client_context: None,
            cognito_identity: Some("bad\r\nvalue".into()),
        };
        let text = String::from_utf8(encode(&Reply::Invoke(invoke), true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"));
        for line in [
            "lambda-runtime-aws-request-id: r-1\r\n",
            "lambda-runtime-invoked-function-arn: arn:f\r\n",
            "lambda-runtime-trace-id: Root=1-a\r\n",
            "lambda-runtime-deadline-ms: 1900000000000\r\n",
            "content-length: 7\r\n",
            "date: ",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(!text.contains("cognito"), "{text}");
        assert!(!text.contains("client-context"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"));
        let text = String::from_utf8(encode(&api::accepted(), false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 202 Accepted\r\n"), "{text}");
        assert!(text.contains("connection: close\r\ncontent-length: 15\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"status\":\"OK\"}"));
    }

    proptest! {
        /// Any bytes: a hot request or hyper's, never a panic.
        #[test]
        fn any_head_is_decided_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Some(request) = decide(&bytes) {
                prop_assert!(request.content_length <= MAX_PAYLOAD);
            }
        }

        #[test]
        fn runtime_like_heads_are_decided_without_panic(
            method in "(GET|POST|PUT)",
            tail in "[a-z0-9/-]{0,40}",
            extra in proptest::collection::vec(("[a-zA-Z-]{1,20}", "[ -~]{0,40}"), 0..6),
        ) {
            let mut head = format!("{method} /2018-06-01/runtime/invocation/{tail} HTTP/1.1\r\n");
            for (k, v) in &extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            if let Some(request) = decide(head.as_bytes()) {
                prop_assert!(request.content_length <= MAX_PAYLOAD);
            }
        }
    }
}
