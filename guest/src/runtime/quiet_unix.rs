//! [`QuietUnixStream`]: a Unix stream socket registered with tokio's reactor for read readiness
//! only, for the links that carry invokes (the host link of a sandbox's init, both ends; the
//! agent's invoke-proxy socket, both ends).
//!
//! Why: tokio registers its sockets for read and write readiness at once (edge-triggered). On a
//! Unix stream socket the kernel signals write space to the sender each time the receiver reads a
//! message (`unix_write_space`), so every message read woke the peer's reactor for nothing when it
//! was asleep: a context switch, a turn of its event loop and a sleep again, per message. A link
//! whose messages are small rarely finds its send buffer full, so here a write is tried at once;
//! only when it would block is a second descriptor of the socket registered for write readiness,
//! until a write goes through whole.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Registers `stream` with the current runtime's reactor for `interest`.
fn register(stream: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: the `UnixStream` owns its descriptor, which stays open and the same until the
    // `AsyncFd` is dropped or gives the stream back (`into_inner`); nothing here replaces it.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// A Unix stream socket registered for read readiness only (see the module docs). Must be made
/// inside a tokio runtime with I/O enabled, and used on it.
#[derive(Debug)]
pub struct QuietUnixStream {
    fd: Arc<AsyncFd<UnixStream>>,
}

impl QuietUnixStream {
    /// Registers `stream` (made non-blocking here) with the current runtime's reactor.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(QuietUnixStream {
            fd: Arc::new(register(stream, Interest::READABLE)?),
        })
    }

    /// Takes over a tokio stream (deregistering it from its reactor first).
    pub fn from_tokio(stream: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(stream.into_std()?)
    }

    /// The read and write halves.
    pub fn into_split(self) -> (QuietReadHalf, QuietWriteHalf) {
        (
            QuietReadHalf(self.fd.clone()),
            QuietWriteHalf {
                fd: self.fd,
                waiting: None,
                shutdown_on_drop: true,
            },
        )
    }
}

/// Reads of a [`QuietUnixStream`].
#[derive(Debug)]
pub struct QuietReadHalf(Arc<AsyncFd<UnixStream>>);

impl QuietReadHalf {
    /// The socket again, deregistered from the reactor (to move it to another runtime), with
    /// `write` its other half. Fails when the halves are not of one stream.
    pub fn into_std(self, mut write: QuietWriteHalf) -> io::Result<UnixStream> {
        write.shutdown_on_drop = false;
        let same = Arc::ptr_eq(&self.0, &write.fd);
        drop(write);
        if !same {
            return Err(io::Error::other("the halves are of two streams"));
        }
        match Arc::try_unwrap(self.0) {
            Ok(fd) => Ok(fd.into_inner()),
            Err(_) => Err(io::Error::other("the stream is still shared")),
        }
    }
}

/// Writes of a [`QuietUnixStream`]; dropping it shuts the socket's write side down.
#[derive(Debug)]
pub struct QuietWriteHalf {
    fd: Arc<AsyncFd<UnixStream>>,
    /// A second descriptor of the socket, registered for write readiness while a write would
    /// block.
    waiting: Option<AsyncFd<UnixStream>>,
    /// Shut the socket's write side down when dropped (as tokio's own write halves do); not when
    /// the socket is taken back ([`QuietReadHalf::into_std`]).
    shutdown_on_drop: bool,
}

impl Drop for QuietWriteHalf {
    fn drop(&mut self) {
        if self.shutdown_on_drop {
            let _ = self.fd.get_ref().shutdown(std::net::Shutdown::Write);
        }
    }
}

impl AsyncRead for QuietReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: the next read waits for readiness instead
                    // of finding it empty with a system call (as tokio's own sockets do).
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietWriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(waiting) = &self.waiting {
                let mut guard = ready!(waiting.poll_write_ready(cx))?;
                match guard.try_io(|fd| fd.get_ref().write(data)) {
                    Ok(Ok(n)) => {
                        if n == data.len() {
                            self.waiting = None;
                        }
                        return Poll::Ready(Ok(n));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            }
            match self.fd.get_ref().write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let second = self.fd.get_ref().try_clone()?;
                    self.waiting = Some(register(second, Interest::WRITABLE)?);
                }
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn carries_bytes_both_ways_and_writes_past_a_full_buffer() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut ar, mut aw) = QuietUnixStream::new(a).unwrap().into_split();
        let (mut br, mut bw) = QuietUnixStream::new(b).unwrap().into_split();
        aw.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // Far more than a socket buffer holds: the writer waits for room, the reader drains.
        let big: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            bw.write_all(&big).await.unwrap();
            bw.shutdown().await.unwrap();
            bw
        });
        let mut all = Vec::new();
        ar.read_to_end(&mut all).await.unwrap();
        assert!(all == expected, "the bytes differ");
        let bw = writer.await.unwrap();
        // Both halves give the socket back, and it still works.
        let b = br.into_std(bw).unwrap();
        drop(b);
        let mut rest = Vec::new();
        ar.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(aw);
    }

    #[tokio::test]
    async fn halves_of_two_streams_do_not_make_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let (ar, _aw) = QuietUnixStream::new(a).unwrap().into_split();
        let (_br, bw) = QuietUnixStream::new(b).unwrap().into_split();
        assert!(ar.into_std(bw).is_err());
    }
}
