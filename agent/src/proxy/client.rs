//! [`ProxyClient`]: one connection to the invoke-proxy socket, shared by any number of callers.
//!
//! `connect` opens the socket (`connect_tcp` the agent's optional TCP listener) and queues our
//! `Hello`; a background reader checks the server's `Hello` and routes each `Result` to its
//! caller by request id, a background writer coalesces queued frames into single writes. Invokes
//! may be sent before the server's `Hello` arrives: a server that refuses our version fails them
//! all with [`ClientError::Closed`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::protocol::{self, Frame, Hello, InvokeRequest, InvokeResult, ProtocolError};

/// Why an invoke through the proxy failed (as opposed to the function failing).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the invoke-proxy socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ProxyClient::connect must be called inside a tokio runtime")]
    NoRuntime,
    #[error("cannot encode the invoke")]
    Encode(#[source] ProtocolError),
    #[error("request id {0:?} is already in flight on this connection")]
    DuplicateRequestId(String),
    #[error("the invoke-proxy connection is closed: {0}")]
    Closed(String),
}

type Pending = Mutex<HashMap<String, oneshot::Sender<InvokeResult>>>;

struct Shared {
    pending: Pending,
    /// Why the connection ended, once it has.
    closed: Mutex<Option<String>>,
}

struct Inner {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
    reader: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A multiplexed connection to the agent's invoke-proxy socket. Clones share the connection.
#[derive(Clone)]
pub struct ProxyClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProxyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyClient").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ProxyClient {
    /// Connects to the socket at `path`. Must be called inside a tokio runtime (the connection's
    /// reader and writer are tasks on it); it does not wait for the server's `Hello`.
    pub fn connect(path: &Path) -> Result<ProxyClient, ClientError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let connect_err = |source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        };
        // A Unix socket connect completes at once (or fails at once), so this does not block.
        let std_stream = std::os::unix::net::UnixStream::connect(path).map_err(connect_err)?;
        std_stream.set_nonblocking(true).map_err(connect_err)?;
        let _guard = handle.enter();
        // Registered for read readiness only: the agent's reads of each invoke no longer wake
        // this side for nothing (see `QuietUnixStream`).
        let stream = hearth_guest::runtime::quiet_unix::QuietUnixStream::new(std_stream)
            .map_err(connect_err)?;
        let (reader, writer) = stream.into_split();
        Self::over(&handle, reader, writer)
    }

    /// Connects to the agent's TCP invoke-proxy listener at `address` (`--agent-listen`).
    pub async fn connect_tcp(address: std::net::SocketAddr) -> Result<ProxyClient, ClientError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        let connect_err = |source| ClientError::Connect {
            path: PathBuf::from(address.to_string()),
            source,
        };
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (reader, writer) = stream.into_split();
        Self::over(&handle, reader, writer)
    }

    /// Starts the connection's reader and writer tasks on `handle`, over a stream's halves.
    fn over<R, W>(
        handle: &tokio::runtime::Handle,
        mut reader: R,
        writer: W,
    ) -> Result<ProxyClient, ClientError>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (frames, frames_rx) = mpsc::unbounded_channel();
        let hello = protocol::encode(&Frame::Hello(Hello::ours("hearth-proxy-client")))
            .map_err(ClientError::Encode)?;
        // The first frame out: queued before any invoke can be.
        let _ = frames.send(hello);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            closed: Mutex::default(),
        });
        handle.spawn(async move {
            if let Err(e) = super::write_loop(writer, frames_rx).await {
                tracing::debug!(error = %e, "invoke-proxy client write failed");
            }
        });
        let reader_shared = shared.clone();
        let reader = handle.spawn(async move {
            let why = read_results(&mut reader, &reader_shared).await;
            tracing::debug!(%why, "invoke-proxy connection closed");
            *lock(&reader_shared.closed) = Some(why);
            // Callers waiting see their sender dropped.
            lock(&reader_shared.pending).clear();
        });
        Ok(ProxyClient {
            inner: Arc::new(Inner {
                frames,
                shared,
                reader: reader.abort_handle(),
            }),
        })
    }

    /// Sends one invoke and waits for its result. Any number may be in flight at once; their
    /// request ids must differ.
    pub async fn invoke(&self, request: InvokeRequest) -> Result<InvokeResult, ClientError> {
        let id = request.request_id.clone();
        let frame =
            protocol::encode(&Frame::Invoke(Box::new(request))).map_err(ClientError::Encode)?;
        let (tx, rx) = oneshot::channel();
        {
            if let Some(why) = lock(&self.inner.shared.closed).clone() {
                return Err(ClientError::Closed(why));
            }
            let mut pending = lock(&self.inner.shared.pending);
            if pending.contains_key(&id) {
                return Err(ClientError::DuplicateRequestId(id));
            }
            pending.insert(id.clone(), tx);
        }
        let guard = PendingGuard {
            shared: &self.inner.shared,
            id,
        };
        if self.inner.frames.send(frame).is_err() {
            return Err(ClientError::Closed("the writer ended".into()));
        }
        let result = rx.await.map_err(|_| ClientError::Closed(self.why_closed()));
        drop(guard);
        result
    }

    fn why_closed(&self) -> String {
        lock(&self.inner.shared.closed)
            .clone()
            .unwrap_or_else(|| "the connection closed".into())
    }
}

/// Forgets a pending invoke whose caller stopped waiting.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.id);
    }
}

/// The read buffer of a connection.
const READ_BUFFER: usize = 16 * 1024;

/// Reads the server's `Hello`, then results until the connection ends; returns why it ended.
async fn read_results<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, shared: &Shared) -> String {
    // Buffered: a frame (and often the next) comes in one read rather than two, plus the one that
    // finds the socket empty.
    let reader = &mut tokio::io::BufReader::with_capacity(READ_BUFFER, reader);
    match protocol::read_frame(reader).await {
        Ok(Some(Frame::Hello(h))) => {
            if let Err(e) = h.check() {
                return e.to_string();
            }
        }
        Ok(Some(Frame::Refused(why))) => return format!("the agent refused the connection: {why}"),
        Ok(Some(other)) => return format!("expected Hello, got {}", other.kind()),
        Ok(None) => return "the agent closed the connection before Hello".into(),
        Err(e) => return e.to_string(),
    }
    loop {
        match protocol::read_frame(reader).await {
            Ok(Some(Frame::Result(result))) => {
                let tx = lock(&shared.pending).remove(&result.request_id);
                match tx {
                    Some(tx) => {
                        let _ = tx.send(*result);
                    }
                    None => tracing::debug!(
                        request_id = %result.request_id,
                        "result for an invoke nobody waits for"
                    ),
                }
            }
            Ok(Some(other)) => return format!("unexpected {} frame from the agent", other.kind()),
            Ok(None) => return "the agent closed the connection".into(),
            Err(e) => return e.to_string(),
        }
    }
}
