//! The agent as one piece: the code cache, concurrency counting and the execution environments of
//! the chosen sandbox kind behind an invoke-proxy socket. `hearth serve` starts one in its own
//! process; [`Agent::shutdown`] drains it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::code_cache::{CodeCache, CodeCacheError, DirectorySource};
use crate::concurrency::{Concurrency, ConcurrencyConfig};
use crate::environment::{EnvironmentConfig, Environments};
use crate::proxy::server::{InvokeHandler, ProxyServer, ServerError};
use crate::sandbox::SandboxError;
use crate::sandbox::container::{ContainerConfig, ContainerSandbox};
use crate::sandbox::microvm::{MicrovmConfig, MicrovmSandbox};
use crate::sandbox::run::SandboxKind;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot find the hearth-init binary")]
    Init(#[source] hearth_guest::image::ImageError),
    #[error("cannot set up the {kind:?} sandbox")]
    Sandbox {
        kind: SandboxKind,
        #[source]
        source: SandboxError,
    },
    #[error("cannot open the code cache")]
    CodeCache(#[source] CodeCacheError),
    #[error("cannot start the invoke-proxy socket")]
    Proxy(#[source] ServerError),
    #[error("cannot create {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything the agent is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The invoke-proxy socket.
    pub socket: PathBuf,
    pub sandbox: SandboxKind,
    /// The static `hearth-init` (default: where `hearth_guest::image::locate_init` finds it).
    pub init_path: Option<PathBuf>,
    /// The `hearth` binary, which runs `hearth vmm` for microVMs.
    pub hearth_binary: PathBuf,
    /// Per-sandbox state (sockets, roots, the microVM initramfs).
    pub state_dir: PathBuf,
    /// Where code zips come from: `<dir>/<hex sha256>.zip`.
    pub code_source_dir: PathBuf,
    pub code_cache_dir: PathBuf,
    pub code_cache_max_bytes: u64,
    pub environments: EnvironmentConfig,
    pub concurrency: ConcurrencyConfig,
    /// How long in-flight invokes get to finish at shutdown.
    pub grace: Duration,
    /// The region functions see when their ARN does not say.
    pub region: String,
}

/// A running agent.
pub struct Agent {
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

impl Agent {
    /// Opens the code cache, prepares the sandbox kind and serves the socket.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let code = CodeCache::open(
            &config.code_cache_dir,
            config.code_cache_max_bytes,
            DirectorySource {
                dir: config.code_source_dir.clone(),
            },
        )
        .map_err(AgentError::CodeCache)?;
        let limits = Concurrency::new(config.concurrency.clone());
        let init = match &config.init_path {
            Some(p) => p.clone(),
            None => hearth_guest::image::locate_init().map_err(AgentError::Init)?,
        };
        let handler: Arc<dyn InvokeHandler> = match config.sandbox {
            SandboxKind::Container => {
                let mut c = ContainerConfig::new(init);
                c.state_dir = config.state_dir.clone();
                Environments::<ContainerSandbox>::new(
                    c,
                    code,
                    limits,
                    config.environments.clone(),
                    config.region.clone(),
                )
            }
            SandboxKind::Microvm => {
                let c = MicrovmConfig::new(
                    config.hearth_binary.clone(),
                    &init,
                    config.state_dir.clone(),
                )
                .map_err(|source| AgentError::Sandbox {
                    kind: SandboxKind::Microvm,
                    source,
                })?;
                Environments::<MicrovmSandbox>::new(
                    c,
                    code,
                    limits,
                    config.environments.clone(),
                    config.region.clone(),
                )
            }
        };
        let server = ProxyServer::bind(&config.socket).map_err(AgentError::Proxy)?;
        let (shutdown, rx) = watch::channel(false);
        let grace = config.grace;
        let server = tokio::spawn(server.run(handler, rx, grace));
        tracing::info!(socket = %config.socket.display(), sandbox = ?config.sandbox, "agent serving invokes");
        Ok(Agent {
            shutdown,
            server,
            socket: config.socket,
        })
    }

    /// The invoke-proxy socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Stops accepting, lets in-flight invokes finish within the grace period, ends the sandboxes.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.server.await {
            tracing::error!(error = %e, "the invoke-proxy server task failed");
        }
    }
}
