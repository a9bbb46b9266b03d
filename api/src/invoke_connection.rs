//! A keep-alive HTTP/1.1 connection whose Invoke requests are served without hyper: the request
//! head is parsed in place (`httparse`), the body read by its `content-length`, the invoke run
//! by [`crate::service`]'s direct path, and the response written in one `write`. At the first
//! request that is anything else (another operation, a chunked body, `Expect`, HTTP/1.0, a body
//! over the invoke limit, a head that does not parse or outgrows the limit) the connection is
//! handed to hyper with the bytes already read ([`Prebuffered`]), and hyper serves it from that
//! request on, with its own answers and limits.
//!
//! Why: Invoke is the operation the frontend's cost is measured by (`hearth-perf api`). On this
//! host the frontend runs with cold caches between invokes (the function's processes share the
//! CPU), and hyper's connection machinery (its state machine, the body channel, the service
//! future) cost more there than parsing one head and writing one response.

use std::io;
use std::ops::Range;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::http::{self, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse as _, Response};
use bytes::BytesMut;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::server::ServerLimits;
pub use hearth_guest::prebuffered::Prebuffered;

/// The most header lines of a request served here; one with more goes to hyper.
const MAX_HEADERS: usize = 48;
/// The first read buffer of a connection.
const FIRST_BUFFER: usize = 8 * 1024;
/// The longest wait for the next piece of a body (as [`crate::body`] allows).
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a connection's loop ended.
pub enum Ended<S> {
    /// The connection is closed (or to be dropped): the client closed it, asked to, timed out,
    /// or the server is stopping.
    Closed,
    /// hyper serves the rest of the connection, starting with these bytes.
    HandOver(Prebuffered<S>),
}

/// An Invoke request this loop serves, as found in its head: where each part lies in the head's
/// bytes, so the request is built from them without copying once the body is in.
struct NativeInvoke {
    name: String,
    uri: Uri,
    /// Each header line's name, and where its value lies in the head.
    headers: Vec<(HeaderName, Range<usize>)>,
    content_length: usize,
    keep_alive: bool,
}

impl NativeInvoke {
    /// The request's parts, the header values sharing `head`'s bytes.
    fn into_parts(self, head: &Bytes) -> Option<(String, http::request::Parts)> {
        let mut headers = HeaderMap::with_capacity(self.headers.len());
        for (name, value) in self.headers {
            let value = HeaderValue::from_maybe_shared(head.slice(value)).ok()?;
            headers.append(name, value);
        }
        let mut parts = http::Request::new(()).into_parts().0;
        parts.method = Method::POST;
        parts.uri = self.uri;
        parts.headers = headers;
        Some((self.name, parts))
    }
}

/// Serves `stream`'s Invoke requests until it closes, `stop` turns true between requests, or a
/// request comes that hyper must serve.
pub async fn serve<S>(
    mut stream: S,
    app: &crate::ApiService,
    limits: &ServerLimits,
    stop: &mut watch::Receiver<bool>,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(FIRST_BUFFER);
    loop {
        if *stop.borrow() {
            return Ended::Closed;
        }
        let (head_len, invoke) = match read_head(&mut stream, &mut buf, limits, stop).await {
            HeadRead::Complete(n, Some(invoke)) => (n, invoke),
            HeadRead::Complete(_, None) | HeadRead::HandOver => {
                return Ended::HandOver(Prebuffered::new(buf, stream));
            }
            HeadRead::Closed => return Ended::Closed,
        };
        let keep_alive = invoke.keep_alive;
        let body_end = head_len.saturating_add(invoke.content_length);
        let response = match read_body(&mut stream, &mut buf, body_end).await {
            Ok(()) => {
                let mut request = buf.split_to(body_end);
                let payload = request.split_off(head_len).freeze();
                match invoke.into_parts(&request.freeze()) {
                    Some((name, parts)) => {
                        crate::service::invoke_read(app.state(), name, parts, payload).await
                    }
                    // The head's bytes were checked when it was parsed; this does not happen.
                    None => ApiError::InvalidRequestContent("The request head is malformed".into())
                        .into_response(),
                }
            }
            Err(BodyRead::Closed) => return Ended::Closed,
            Err(BodyRead::TimedOut) => {
                let response =
                    ApiError::InvalidRequestContent("Timed out reading the request body".into())
                        .into_response();
                let _ = write_response(&mut stream, response, false).await;
                return Ended::Closed;
            }
        };
        match write_response(&mut stream, response, keep_alive).await {
            Ok(true) => {}
            Ok(false) => {
                let _ = stream.shutdown().await;
                return Ended::Closed;
            }
            Err(e) => {
                tracing::debug!(error = %e, "writing an invoke response failed");
                return Ended::Closed;
            }
        }
    }
}

enum HeadRead {
    /// A whole head of this many bytes is at the start of the buffer; the invoke it asks for,
    /// if this loop serves it.
    Complete(usize, Option<NativeInvoke>),
    /// hyper answers this one (a head that does not parse, or is too large).
    HandOver,
    Closed,
}

/// Reads until the buffer starts with a whole request head, within the header read timeout
/// (counted from the start of the wait, as an idle keep-alive connection is a slow head too).
async fn read_head<S>(
    stream: &mut S,
    buf: &mut BytesMut,
    limits: &ServerLimits,
    stop: &mut watch::Receiver<bool>,
) -> HeadRead
where
    S: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        if !buf.is_empty() {
            match parse_head(buf) {
                Parsed::Complete(n, invoke) => return HeadRead::Complete(n, invoke),
                Parsed::Partial => {}
                Parsed::Invalid => return HeadRead::HandOver,
            }
            if buf.len() >= limits.max_header_bytes {
                return HeadRead::HandOver;
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(FIRST_BUFFER);
        }
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => read,
            // Only an idle connection stops here; a request under way is read to its end.
            changed = stop.changed(), if buf.is_empty() => {
                let _ = changed;
                return HeadRead::Closed;
            }
        };
        match read {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return HeadRead::Closed,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading a request head failed");
                return HeadRead::Closed;
            }
            Err(_) => {
                tracing::debug!("the request head was not sent in time; closing the connection");
                return HeadRead::Closed;
            }
        }
    }
}

enum Parsed {
    Partial,
    Invalid,
    Complete(usize, Option<NativeInvoke>),
}

/// Parses the head at the start of `buf`; a complete one comes with the invoke it asks for if
/// this loop serves it ([`native_invoke`]).
fn parse_head(buf: &[u8]) -> Parsed {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut lines);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Parsed::Complete(n, native_invoke(buf, &request)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// Where `part` (a slice of `whole`) lies in it.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// The invoke that the parsed `request` (from `head`) asks for, if this loop serves it: a `POST`
/// of an Invoke path over HTTP/1.1 with a `content-length` (or none) within the invoke limit, no
/// `transfer-encoding` and no `expect`. Every other request is hyper's.
fn native_invoke(head: &[u8], request: &httparse::Request<'_, '_>) -> Option<NativeInvoke> {
    if request.method != Some("POST") || request.version != Some(1) {
        return None;
    }
    let target = request.path?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let name = crate::names::invoke_path_name(path)?;
    let uri = Uri::try_from(target).ok()?;
    let mut headers = Vec::with_capacity(request.headers.len());
    let mut content_length: Option<usize> = None;
    let mut keep_alive = true;
    let mut asynchronous = false;
    for line in request.headers.iter() {
        let name = HeaderName::from_bytes(line.name.as_bytes()).ok()?;
        // What `HeaderValue` accepts.
        if !line
            .value
            .iter()
            .all(|&b| b == b'\t' || (b >= 32 && b != 127))
        {
            return None;
        }
        if name == http::header::CONTENT_LENGTH {
            let digits = line.value.trim_ascii();
            if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let length = std::str::from_utf8(digits).ok()?.parse().ok()?;
            if content_length.is_some_and(|seen| seen != length) {
                return None;
            }
            content_length = Some(length);
        } else if name == http::header::TRANSFER_ENCODING || name == http::header::EXPECT {
            return None;
        } else if name == http::header::CONNECTION {
            keep_alive = !line
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.as_str() == "x-amz-invocation-type" {
            asynchronous = line.value == b"Event";
        }
        headers.push((name, range_in(head, line.value)));
    }
    let content_length = content_length.unwrap_or(0);
    let limit = if asynchronous {
        crate::body::INVOKE_ASYNC_LIMIT
    } else {
        crate::body::INVOKE_SYNC_LIMIT
    };
    if content_length > limit {
        return None;
    }
    Some(NativeInvoke {
        name,
        uri,
        headers,
        content_length,
        keep_alive,
    })
}

enum BodyRead {
    Closed,
    TimedOut,
}

/// Reads until the buffer holds `end` bytes.
async fn read_body<S>(stream: &mut S, buf: &mut BytesMut, end: usize) -> Result<(), BodyRead>
where
    S: AsyncRead + Unpin,
{
    if buf.len() < end {
        buf.reserve(end - buf.len());
    }
    while buf.len() < end {
        match tokio::time::timeout(BODY_IDLE_TIMEOUT, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Err(BodyRead::Closed),
            Err(_) => return Err(BodyRead::TimedOut),
        }
    }
    Ok(())
}

/// Writes `response` as one HTTP/1.1 message; `Ok(false)` when the connection is to close after
/// it.
async fn write_response<S>(stream: &mut S, response: Response, keep_alive: bool) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    let keep_alive = keep_alive
        && !parts
            .headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let message = match axum::body::HttpBody::size_hint(&body).exact() {
        // A body of known length (every Invoke answer): its frames go straight after the head.
        Some(length) => {
            let length = usize::try_from(length).map_err(io::Error::other)?;
            let mut out = encode_head(&parts, length, keep_alive);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(io::Error::other)?.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            if bodiless(parts.status) {
                out.truncate(out.len() - out.len().min(length));
            }
            out
        }
        None => {
            let data = body.collect().await.map_err(io::Error::other)?.to_bytes();
            let mut out = encode_head(&parts, data.len(), keep_alive);
            if !bodiless(parts.status) {
                out.extend_from_slice(&data);
            }
            out
        }
    };
    stream.write_all(&message).await?;
    Ok(keep_alive)
}

/// Statuses that carry no body.
fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The head of a response whose body is `length` bytes: status line, headers (with `date`,
/// `content-length` and, when the connection closes after it, `connection: close`).
fn encode_head(parts: &http::response::Parts, length: usize, keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(320 + length);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(http::header::DATE) {
        out.extend_from_slice(b"date: ");
        http_date(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !bodiless(parts.status) {
        out.extend_from_slice(b"content-length: ");
        let mut digits = [0u8; 20];
        out.extend_from_slice(format_length(&mut digits, length));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `n` in decimal, written at the end of `digits`.
fn format_length(digits: &mut [u8; 20], mut n: usize) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

thread_local! {
    /// This second's `date` value, written once a second per thread.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// Appends the current time as an HTTP date.
fn http_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(date.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The invoke a whole head asks for, if served here.
    fn decide(head: &[u8]) -> Option<NativeInvoke> {
        match parse_head(head) {
            Parsed::Complete(_, invoke) => invoke,
            _ => None,
        }
    }

    const INVOKE: &[u8] = b"POST /2015-03-31/functions/f/invocations?Qualifier=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\n";

    #[test]
    fn invoke_heads_are_served_here() {
        let invoke = decide(INVOKE).unwrap();
        assert_eq!(invoke.content_length, 2);
        assert!(invoke.keep_alive);
        let (name, parts) = invoke.into_parts(&Bytes::copy_from_slice(INVOKE)).unwrap();
        assert_eq!(name, "f");
        assert_eq!(parts.uri.query(), Some("Qualifier=1"));
        assert_eq!(parts.headers["host"], "h");
        assert_eq!(parts.headers["content-length"], "2");
        let closing = decide(
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
        )
        .unwrap();
        assert!(!closing.keep_alive);
        assert_eq!(closing.content_length, 0);
    }

    #[test]
    fn every_other_head_is_hypers() {
        for head in [
            &b"GET /2015-03-31/functions/f/invocations HTTP/1.1\r\n\r\n"[..],
            b"POST /2015-03-31/functions HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.0\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\ncontent-length: x\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\ncontent-length: 6291457\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\nx-amz-invocation-type: Event\r\ncontent-length: 1048577\r\n\r\n",
            b"POST /2015-03-31/functions/a/b/invocations HTTP/1.1\r\n\r\n",
            b"POST /2015-03-31/functions/f/invocations HTTP/1.1\r\n",
        ] {
            assert!(
                decide(head).is_none(),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn responses_carry_length_date_and_close() {
        let response = Response::builder()
            .status(200)
            .header("x-amzn-RequestId", "r")
            .body(axum::body::Body::empty())
            .unwrap();
        let (parts, _) = response.into_parts();
        let mut bytes = encode_head(&parts, 2, false);
        bytes.extend_from_slice(b"{}");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nx-amzn-requestid: r\r\ndate: "));
        assert!(text.ends_with("\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"));
        let (parts, _) = Response::builder()
            .status(204)
            .body(())
            .unwrap()
            .into_parts();
        let text = String::from_utf8(encode_head(&parts, 0, true)).unwrap();
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn lengths_are_decimal() {
        for n in [0usize, 7, 10, 12345, usize::MAX] {
            let mut digits = [0u8; 20];
            assert_eq!(format_length(&mut digits, n), n.to_string().as_bytes());
        }
    }

    proptest! {
        /// Any bytes: a request served here or hyper's, never a panic; what is served here has
        /// an Invoke path and a body within the limit.
        #[test]
        fn any_head_is_decided_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Some(invoke) = decide(&bytes) {
                prop_assert!(invoke.content_length <= crate::body::INVOKE_SYNC_LIMIT);
                prop_assert!(crate::names::invoke_path_name(invoke.uri.path()).is_some());
                prop_assert!(invoke.into_parts(&Bytes::copy_from_slice(&bytes)).is_some());
            }
        }

        #[test]
        fn invoke_like_heads_are_decided_without_panic(
            name in "[a-zA-Z0-9%:_-]{0,70}",
            query in "[a-zA-Z0-9%=&]{0,20}",
            extra in proptest::collection::vec(("[a-zA-Z-]{1,20}", "[ -~]{0,40}"), 0..6),
            length in 0usize..8_000_000,
        ) {
            let mut head = format!("POST /2015-03-31/functions/{name}/invocations?{query} HTTP/1.1\r\ncontent-length: {length}\r\n");
            for (k, v) in &extra {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            if let Some(invoke) = decide(head.as_bytes()) {
                prop_assert!(invoke.content_length <= crate::body::INVOKE_SYNC_LIMIT);
                prop_assert!(invoke.into_parts(&Bytes::copy_from_slice(head.as_bytes())).is_some());
            }
        }
    }
}
