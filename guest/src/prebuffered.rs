//! [`Prebuffered`]: a stream whose first bytes were already read, put back in front of it. How a
//! connection served by a hand-written HTTP/1.1 loop (the frontend's Invoke path,
//! `hearth_api::invoke_connection`; the init's Runtime API, `runtime::connection`) is handed to
//! hyper together with the bytes that loop had read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream that yields `first` before its own bytes: how a connection whose first bytes were
/// read here is handed to hyper.
pub struct Prebuffered<S> {
    first: BytesMut,
    inner: S,
}

impl<S> Prebuffered<S> {
    /// `inner`, whose reads yield `first` before anything of its own.
    pub fn new(first: BytesMut, inner: S) -> Self {
        Prebuffered { first, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prebuffered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(out.remaining());
            out.put_slice(&self.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prebuffered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn handed_over_streams_replay_their_first_bytes() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = Prebuffered::new(BytesMut::from(&b"first "[..]), server);
        client.write_all(b"then").await.unwrap();
        drop(client);
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "first then");
    }
}
