//! The benchmark's timing clients: each writes a request's bytes and reads its reply on the
//! calling task, with no background connection task, channel or pool between the timer and the
//! socket. HTTP/1.1 over TCP for the Lambda API and length-prefixed frames for the invoke-proxy
//! socket get the same treatment, so a latency difference between the two is the servers', not
//! the clients' machinery (hyper's client hands every request to its connection task and back;
//! the agent's `ProxyClient` hands it to a writer task and its result back from a reader task).

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use hearth_agent::proxy::protocol::{self as proxy, Frame, Hello};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The largest HTTP response head this client reads.
const MAX_HEAD: usize = 64 * 1024;

/// One HTTP/1.1 keep-alive connection.
pub struct LeanHttp {
    stream: tokio::net::TcpStream,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

/// A status and a body.
pub struct HttpReply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl LeanHttp {
    pub async fn connect(address: &str) -> anyhow::Result<LeanHttp> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("cannot connect to {address}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        Ok(LeanHttp {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// The bytes of `request` on the wire (with its `content-length`).
    pub fn encode(request: &http::Request<Full<Bytes>>, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(512 + body.len());
        out.extend_from_slice(request.method().as_str().as_bytes());
        out.push(b' ');
        let target = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in request.headers() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Sends `request` (from [`LeanHttp::encode`]) and reads the whole response.
    pub async fn round_trip(&mut self, request: &[u8]) -> anyhow::Result<HttpReply> {
        self.stream
            .write_all(request)
            .await
            .context("writing the HTTP request")?;
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            ensure!(self.buf.len() < MAX_HEAD, "the response head is too large");
            self.fill().await?;
        };
        let (status, length) = parse_head(&self.buf[..head_end])?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Ok(HttpReply { status, body })
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .context("reading the HTTP response")?;
        ensure!(n > 0, "the server closed the connection");
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status and `content-length` of a response head (no chunked bodies: the Lambda API sends
/// none).
fn parse_head(head: &[u8]) -> anyhow::Result<(u16, usize)> {
    let text = std::str::from_utf8(head).context("the response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("a bad status line: {status_line:?}"))?;
    let mut length = 0;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().context("a bad content-length")?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("a chunked response, which this client does not read");
            }
        }
    }
    Ok((status, length))
}

/// One invoke-proxy connection (Unix or TCP), one invoke at a time.
pub struct LeanProxy<S> {
    stream: S,
    buf: Vec<u8>,
}

impl LeanProxy<tokio::net::TcpStream> {
    /// Sends each frame at once (TCP).
    pub fn set_nodelay(&self) -> anyhow::Result<()> {
        self.stream.set_nodelay(true).context("TCP_NODELAY")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> LeanProxy<S> {
    /// Says `Hello` and reads the server's.
    pub async fn start(stream: S) -> anyhow::Result<LeanProxy<S>> {
        let mut client = LeanProxy {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        };
        let hello = proxy::encode(&Frame::Hello(Hello::ours("hearth-perf-lean")))?;
        client
            .stream
            .write_all(&hello)
            .await
            .context("writing Hello")?;
        match client.read_frame().await? {
            Frame::Hello(_) => Ok(client),
            other => bail!("the agent answered Hello with {}", other.kind()),
        }
    }

    /// Sends one invoke and reads its result.
    pub async fn invoke(
        &mut self,
        request: proxy::InvokeRequest,
    ) -> anyhow::Result<proxy::InvokeResult> {
        let frame = proxy::encode(&Frame::Invoke(Box::new(request)))?;
        self.stream
            .write_all(&frame)
            .await
            .context("writing the invoke")?;
        match self.read_frame().await? {
            Frame::Result(result) => Ok(*result),
            other => bail!("the agent answered an invoke with {}", other.kind()),
        }
    }

    async fn read_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some((frame, used)) = proxy::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .context("reading from the agent")?;
            ensure!(n > 0, "the agent closed the connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_status_and_length() {
        let (status, length) =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: a\r\ncontent-length: 12\r\n\r\n")
                .unwrap();
        assert_eq!((status, length), (200, 12));
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(),
            (204, 0)
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn requests_are_encoded_with_their_length() {
        let request = http::Request::builder()
            .method("POST")
            .uri("/2015-03-31/functions/f/invocations?Qualifier=1")
            .header("host", "h")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let bytes = LeanHttp::encode(&request, b"{}");
        assert_eq!(
            bytes,
            b"POST /2015-03-31/functions/f/invocations?Qualifier=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\n{}"
        );
    }
}
