//! The HTTP/1.1 server: one task per connection, graceful shutdown with a grace period. A
//! connection's Invoke requests are served by [`crate::invoke_connection`] until its first other
//! request, from which on hyper serves it; both apply the header read timeout and the header
//! size limit.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::invoke_connection::{self, Ended};

/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most header bytes read before the request is refused (431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long in-flight requests get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("accepting a connection failed")]
    Accept(#[source] std::io::Error),
}

/// The connection limits of the server.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_header_bytes: MAX_HEADER_BYTES,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    app: crate::ApiService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    serve_with_limits(listener, app, shutdown, ServerLimits::default()).await
}

/// `serve` with explicit connection limits.
pub async fn serve_with_limits(
    listener: TcpListener,
    app: crate::ApiService,
    shutdown: impl Future<Output = ()>,
    limits: ServerLimits,
) -> Result<(), ServerError> {
    let (service, connections) = on_cores(app, limits);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) if is_transient(&err) => {
                        tracing::warn!(error = %err, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(err) => return Err(ServerError::Accept(err)),
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(service(stream, peer));
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

fn is_transient(err: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || err.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

/// The HTTP server as the agent's cores run it (`hearth serve`): [`on_cores`] makes the
/// per-connection service each core runs for the connections its own listener accepts
/// (`hearth_agent::cores::TcpService`); this is what stops them.
pub struct CoreConnections {
    /// The connections hyper serves.
    graceful: Arc<Mutex<Option<GracefulShutdown>>>,
    /// Turned true at shutdown; every connection in [`invoke_connection`] holds a receiver, so
    /// all of them have ended once it has none.
    stop: watch::Sender<bool>,
}

/// The API ([`crate::ApiService`]) as a connection service for the agent's cores, with `limits`:
/// the same HTTP/1.1 settings as [`serve_with_limits`], each connection watched for a graceful
/// shutdown.
pub fn on_cores(
    app: crate::ApiService,
    limits: ServerLimits,
) -> (hearth_agent::cores::ConnectionService, CoreConnections) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let graceful = Arc::new(Mutex::new(Some(GracefulShutdown::new())));
    let (stop, _) = watch::channel(false);
    let watching = graceful.clone();
    let stopping = stop.clone();
    let service: hearth_agent::cores::ConnectionService = Arc::new(move |stream, peer| {
        let mut stop = stopping.subscribe();
        let (app, builder, watching) = (app.clone(), builder.clone(), watching.clone());
        Box::pin(async move {
            let stream = match invoke_connection::serve(stream, &app, &limits, &mut stop).await {
                Ended::Closed => return,
                Ended::HandOver(stream) => stream,
            };
            drop(stop);
            let watcher = watching
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .map(GracefulShutdown::watcher);
            // Shutting down: the connection is closed unanswered.
            let Some(watcher) = watcher else { return };
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            if let Err(err) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        })
    });
    (service, CoreConnections { graceful, stop })
}

impl CoreConnections {
    /// Asks every open connection to finish its request and close; waits for them at most
    /// [`SHUTDOWN_GRACE`]. Stop the listeners first.
    pub async fn shutdown(self) {
        let graceful = self
            .graceful
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let _ = self.stop.send(true);
        let all_closed = async {
            if let Some(graceful) = graceful {
                graceful.shutdown().await;
            }
            self.stop.closed().await;
        };
        tokio::select! {
            () = all_closed => tracing::info!("all connections closed"),
            () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; closing open connections"),
        }
    }
}
