//! The invoke-proxy: how the frontend (and, later, the async queue and the pollers) hands invokes
//! to the agent. A Unix socket carrying the versioned, length-prefixed postcard frames of
//! [`protocol`]; [`server::ProxyServer`] answers them through an [`server::InvokeHandler`] (the
//! agent's execution environments), [`client::ProxyClient`] multiplexes any number of in-flight
//! invokes over one connection. Both ends register the Unix socket for read readiness only
//! ([`hearth_guest::runtime::quiet_unix`]), so a peer's read of each frame does not wake them.

pub mod client;
pub mod protocol;
pub mod server;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

/// Writes the encoded frames it receives, coalescing what is queued into one write.
async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut batch = Vec::new();
    while let Some(first) = frames.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < 256 * 1024 {
            match frames.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        writer.write_all(&batch).await?;
    }
    writer.shutdown().await
}
