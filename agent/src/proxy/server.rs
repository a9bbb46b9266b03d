//! [`ProxyServer`]: the agent's end of the invoke-proxy socket.
//!
//! Per connection the `Hello`s are exchanged (`answer_hello`), then one task reads frames
//! (`serve_invokes`) and spawns a task per invoke, whose result goes back
//! through the connection's writer as soon as it is ready, so results leave in the order invokes
//! finish. [`ProxyServer::run`] serves one Unix socket on the current runtime (tests, embedding);
//! the agent serves it thread-per-core through [`crate::cores`], with the same connection code
//! (`serve_connection`) over Unix or TCP streams. Shutdown stops accepting and stops reading
//! new invokes, lets those in flight finish within a grace period, then hands the rest of the
//! grace to the handler to end its sandboxes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc, watch};

use super::protocol::{self, Frame, Hello, InvokeRequest, InvokeResult};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot bind the invoke-proxy socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A boxed future, for handlers behind `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What answers invokes: the agent's execution environments.
pub trait InvokeHandler: Send + Sync + 'static {
    /// Runs one invoke; every failure is an [`protocol::Outcome`], never a panic.
    fn invoke(&self, request: InvokeRequest) -> BoxFuture<'_, InvokeResult>;

    /// Stops taking invokes, lets those in flight finish within `grace`, ends what it runs.
    fn drain(&self, grace: Duration) -> BoxFuture<'_, ()>;
}

/// Invokes in flight on the connections of one server (or one core).
#[derive(Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Returns once no invoke is in flight.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(f: &Arc<InFlight>) -> Self {
        f.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(f.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Binds the Unix socket at `path` (non-blocking), replacing a stale socket left by an earlier
/// run, never any other file.
pub(crate) fn bind_std(path: &Path) -> Result<std::os::unix::net::UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// A bound invoke-proxy socket.
pub struct ProxyServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ProxyServer {
    /// Binds `path`, replacing a stale socket left by an earlier run (never any other file).
    /// Must be called inside a tokio runtime, which then serves it.
    pub fn bind(path: &Path) -> Result<ProxyServer, ServerError> {
        let listener =
            UnixListener::from_std(bind_std(path)?).map_err(|source| ServerError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(ProxyServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` turns true, then drains: no new connections or invokes, in-flight
    /// invokes get up to `grace` to finish, then the handler drains with the same grace.
    pub async fn run(
        self,
        handler: Arc<dyn InvokeHandler>,
        mut shutdown: watch::Receiver<bool>,
        grace: Duration,
    ) {
        let in_flight = Arc::new(InFlight::default());
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (reader, writer) = stream.into_split();
                        tokio::spawn(serve_connection(
                            reader,
                            writer,
                            handler.clone(),
                            in_flight.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "invoke-proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        drop(self.listener);
        let _ = std::fs::remove_file(&self.path);
        let started = tokio::time::Instant::now();
        tracing::info!(
            in_flight = in_flight.count.load(Ordering::SeqCst),
            "invoke proxy draining"
        );
        let drained = tokio::time::timeout(grace, in_flight.wait_idle()).await;
        if drained.is_err() {
            tracing::warn!(
                left = in_flight.count.load(Ordering::SeqCst),
                "invokes still in flight after the grace period"
            );
        }
        handler.drain(grace.saturating_sub(started.elapsed())).await;
    }
}

/// Serves one connection (a Unix or TCP stream's halves) on the current runtime until the
/// client closes it, sends garbage, or `shutdown` turns true; returns once every invoke it read
/// has sent its result.
pub(crate) async fn serve_connection<R, W>(
    reader: R,
    mut writer: W,
    handler: Arc<dyn InvokeHandler>,
    in_flight: Arc<InFlight>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Buffered: a frame comes in one read rather than two (length, then body), plus the one that
    // finds the socket empty.
    let mut reader = tokio::io::BufReader::with_capacity(16 * 1024, reader);
    if *shutdown.borrow_and_update() {
        return;
    }
    if !answer_hello(&mut reader, &mut writer).await {
        return;
    }
    serve_invokes(reader, writer, None, handler, in_flight, shutdown).await;
}

/// Reads the client's `Hello` and answers it: `true` when the conversation goes on (our
/// `Hello` is sent), `false` when the connection is to be closed (a `Refused` is sent to a client
/// of another version).
pub(crate) async fn answer_hello<R, W>(reader: &mut R, writer: &mut W) -> bool
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    let answer = match protocol::read_frame(reader).await {
        Ok(Some(Frame::Hello(h))) => match h.check() {
            Ok(()) => Frame::Hello(Hello::ours("hearth-agent")),
            Err(e) => Frame::Refused(e.to_string()),
        },
        Ok(Some(other)) => {
            tracing::warn!(
                kind = other.kind(),
                "invoke-proxy client did not start with Hello"
            );
            return false;
        }
        Ok(None) => return false,
        Err(e) => {
            tracing::warn!(error = %e, "invoke-proxy client sent a bad first frame");
            return false;
        }
    };
    let go_on = matches!(answer, Frame::Hello(_));
    let bytes = match protocol::encode(&answer) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an invoke-proxy frame");
            return false;
        }
    };
    if let Err(e) = writer.write_all(&bytes).await {
        tracing::debug!(error = %e, "invoke-proxy write failed");
        return false;
    }
    if !go_on {
        let _ = writer.shutdown().await;
    }
    go_on
}

/// The next invoke a client sends on a connection whose `Hello`s are exchanged; `None` (the
/// connection is to be closed) when it closes, sends anything else or garbage, or `shutdown`
/// turns true.
pub(crate) async fn next_invoke<R>(
    reader: &mut R,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Box<InvokeRequest>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let frame = tokio::select! {
        _ = shutdown.changed() => return None,
        frame = protocol::read_frame(reader) => frame,
    };
    match frame {
        Ok(Some(Frame::Invoke(request))) => Some(request),
        Ok(Some(other)) => {
            tracing::warn!(
                kind = other.kind(),
                "unexpected frame from an invoke-proxy client"
            );
            None
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "bad frame from an invoke-proxy client; closing");
            None
        }
    }
}

/// Serves the invokes of a connection whose `Hello`s are exchanged, starting with `first` when
/// it was read already (a connection handed over by another core), until the client closes it,
/// sends garbage, or `shutdown` turns true; returns once every invoke it read has sent its
/// result.
pub(crate) async fn serve_invokes<R, W>(
    mut reader: R,
    writer: W,
    first: Option<InvokeRequest>,
    handler: Arc<dyn InvokeHandler>,
    in_flight: Arc<InFlight>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (frames, frames_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(async move {
        if let Err(e) = super::write_loop(writer, frames_rx).await {
            tracing::debug!(error = %e, "invoke-proxy write failed");
        }
    });
    let run = |request: InvokeRequest| {
        let arrived = std::time::Instant::now();
        let guard = InFlightGuard::new(&in_flight);
        let handler = handler.clone();
        let frames = frames.clone();
        tokio::spawn(async move {
            let result = crate::metrics::with_arrival(arrived, handler.invoke(request)).await;
            match protocol::encode(&Frame::Result(Box::new(result))) {
                Ok(bytes) => {
                    let _ = frames.send(bytes);
                }
                Err(e) => tracing::error!(error = %e, "cannot encode an invoke result"),
            }
            drop(guard);
        });
    };
    if let Some(request) = first {
        run(request);
    }
    while let Some(request) = next_invoke(&mut reader, &mut shutdown).await {
        run(*request);
    }
    // The writer ends once every in-flight invoke of this connection has sent its result.
    drop(frames);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::client::{ClientError, ProxyClient};
    use crate::proxy::protocol::Outcome;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::UnixStream;

    /// Answers each invoke with its payload after sleeping the milliseconds the payload names:
    /// the protocol's own behaviour, without sandboxes (those are in tests/environments.rs).
    struct Sleepy;

    impl InvokeHandler for Sleepy {
        fn invoke(&self, request: InvokeRequest) -> BoxFuture<'_, InvokeResult> {
            Box::pin(async move {
                let ms: u64 = String::from_utf8_lossy(&request.payload)
                    .parse()
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                InvokeResult::bare(
                    request.request_id,
                    Outcome::Success {
                        payload: request.payload,
                    },
                )
            })
        }

        fn drain(&self, _grace: Duration) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn request(id: &str, ms: u64) -> InvokeRequest {
        crate::proxy::protocol::test_request(id, "f", ms.to_string().as_bytes())
    }

    fn start() -> (tempfile::TempDir, PathBuf, watch::Sender<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.sock");
        let server = ProxyServer::bind(&path).unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(server.run(Arc::new(Sleepy), stopped, Duration::from_secs(5)));
        (dir, path, stop)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_invokes_in_flight_answered_in_any_order() {
        let (_dir, path, _stop) = start();
        let client = ProxyClient::connect(&path).unwrap();
        let started = tokio::time::Instant::now();
        let calls: Vec<_> = (0..50u64)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { c.invoke(request(&format!("r{i}"), 300 - i * 5)).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let r = call.await.unwrap().unwrap();
            assert_eq!(r.request_id, format!("r{i}"));
            assert_eq!(
                r.outcome,
                Outcome::Success {
                    payload: (300 - i as u64 * 5).to_string().into_bytes()
                }
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not run at once"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_id_in_flight_twice_is_refused() {
        let (_dir, path, _stop) = start();
        let client = ProxyClient::connect(&path).unwrap();
        let (a, b) = tokio::join!(
            client.invoke(request("same", 200)),
            client.invoke(request("same", 0))
        );
        a.unwrap();
        assert!(matches!(b, Err(ClientError::DuplicateRequestId(_))));
        client.invoke(request("same", 0)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_version_and_garbage_are_refused() {
        let (_dir, path, _stop) = start();
        let mut s = UnixStream::connect(&path).await.unwrap();
        let hello = Frame::Hello(Hello {
            version: protocol::PROTOCOL_VERSION + 1,
            agent: "future".into(),
        });
        s.write_all(&protocol::encode(&hello).unwrap())
            .await
            .unwrap();
        match protocol::read_frame(&mut s).await.unwrap() {
            Some(Frame::Refused(why)) => assert!(why.contains("version"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(protocol::read_frame(&mut s).await.unwrap().is_none());
        // Garbage after a good Hello closes the connection; the server keeps serving others.
        let mut s = UnixStream::connect(&path).await.unwrap();
        let hello = Frame::Hello(Hello::ours("test"));
        s.write_all(&protocol::encode(&hello).unwrap())
            .await
            .unwrap();
        assert!(matches!(
            protocol::read_frame(&mut s).await.unwrap(),
            Some(Frame::Hello(_))
        ));
        s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(protocol::read_frame(&mut s).await.unwrap().is_none());
        let client = ProxyClient::connect(&path).unwrap();
        client.invoke(request("ok", 0)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_finishes_in_flight_invokes_and_closes_the_socket() {
        let (_dir, path, stop) = start();
        let client = ProxyClient::connect(&path).unwrap();
        let slow = {
            let c = client.clone();
            tokio::spawn(async move { c.invoke(request("slow", 500)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).unwrap();
        assert!(slow.await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!path.exists());
        assert!(matches!(
            client.invoke(request("late", 0)).await,
            Err(ClientError::Closed(_))
        ));
    }

    #[test]
    fn bind_refuses_to_replace_a_file_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            ProxyServer::bind(&path),
            Err(ServerError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
