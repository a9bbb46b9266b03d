//! The agent as one piece: the code cache, concurrency counting and the execution environments of
//! the chosen sandbox kind behind an invoke-proxy socket, served thread-per-core
//! ([`crate::cores`]: each core has its own environments, the counters and the cache are shared).
//! `hearth serve` starts one in its own process; [`Agent::shutdown`] drains it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::code_cache::{CodeCache, CodeCacheError, DirectorySource};
use crate::concurrency::{Concurrency, ConcurrencyConfig};
use crate::cores::{Cores, CoresConfig, CoresError, HandlerFactory, Listeners};
use crate::environment::{EnvironmentConfig, Environments};
use crate::proxy::server::InvokeHandler;
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
    #[error("cannot start the pools of restored microVMs")]
    Pools(#[source] crate::pool::PoolError),
    #[error("cannot open the code cache")]
    CodeCache(#[source] CodeCacheError),
    #[error("cannot start the agent's cores and invoke-proxy listeners")]
    Cores(#[source] CoresError),
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
    /// An optional TCP invoke-proxy listener (port 0 picks one): one `SO_REUSEPORT` socket per
    /// core.
    pub tcp_listen: Option<SocketAddr>,
    /// Worker threads (cores) and their pinning.
    pub cores: CoresConfig,
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
    /// Pools of restored microVMs (memory size, idle VMs kept) that microVM sandboxes are claimed
    /// from; empty: every microVM boots. Unused by containers.
    pub pools: Vec<crate::pool::PoolSize>,
    /// Where the pools' templates (snapshots of a booted guest) are kept.
    pub template_dir: PathBuf,
    /// How microVM sandboxes' VMMs are jailed (`None`: not jailed): booted, pooled (restored) and
    /// the pools' template VMs alike (see `crate::pool::template`).
    pub jail: Option<crate::jail::JailConfig>,
}

/// A running agent.
pub struct Agent {
    cores: Cores,
    /// Keeps the code cache's metrics collector registered.
    _code_metrics: Arc<CodeCache>,
    socket: PathBuf,
    grace: Duration,
}

/// The factory of each core's environments, over one sandbox kind.
fn environments<S>(
    sandbox: S::Config,
    code: CodeCache,
    limits: Arc<Concurrency>,
    config: &AgentConfig,
) -> HandlerFactory
where
    S: crate::sandbox::Sandbox + 'static,
    S::Config: 'static,
{
    let environments = config.environments.clone();
    let region = config.region.clone();
    Arc::new(move |_core| {
        Environments::<S>::new(
            sandbox.clone(),
            code.clone(),
            limits.clone(),
            environments.clone(),
            region.clone(),
        ) as Arc<dyn InvokeHandler>
    })
}

impl Agent {
    /// Opens the code cache, prepares the sandbox kind and starts the cores serving the socket.
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
        // The cores share the cache: its gauges are read once, from here.
        let code_metrics = Arc::new(code.clone());
        let collector: std::sync::Weak<dyn crate::metrics::Collect> =
            Arc::downgrade(&code_metrics) as _;
        crate::metrics::Metrics::global().register(collector);
        let limits = Concurrency::new(config.concurrency.clone());
        let init = match &config.init_path {
            Some(p) => p.clone(),
            None => hearth_guest::image::locate_init().map_err(AgentError::Init)?,
        };
        let factory = match config.sandbox {
            SandboxKind::Container => {
                let mut c = ContainerConfig::new(init);
                c.state_dir = config.state_dir.clone();
                environments::<ContainerSandbox>(c, code, limits, &config)
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
                let mut c = c;
                c.jail = config.jail.clone();
                let c = if config.pools.is_empty() {
                    c
                } else {
                    c.with_pools(&config.pools, config.template_dir.clone())
                        .map_err(AgentError::Pools)?
                };
                environments::<MicrovmSandbox>(c, code, limits, &config)
            }
        };
        let listeners = Listeners {
            unix: Some(config.socket.clone()),
            tcp: config.tcp_listen,
        };
        let cores = Cores::start(&config.cores, listeners, factory)
            .await
            .map_err(AgentError::Cores)?;
        tracing::info!(socket = %config.socket.display(), tcp = ?cores.tcp_address(), cores = cores.len(), sandbox = ?config.sandbox, "agent serving invokes");
        Ok(Agent {
            cores,
            _code_metrics: code_metrics,
            socket: config.socket,
            grace: config.grace,
        })
    }

    /// The invoke-proxy socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The TCP invoke-proxy address, when the agent listens on one.
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        self.cores.tcp_address()
    }

    /// Serves `service` on `address` from every core ([`crate::cores::TcpService`]).
    pub fn serve_tcp(
        &self,
        address: SocketAddr,
        service: crate::cores::ConnectionService,
        steer: Option<crate::cores::Steer>,
    ) -> Result<crate::cores::TcpService, AgentError> {
        self.cores
            .serve_tcp(address, service, steer)
            .map_err(AgentError::Cores)
    }

    /// Runs invokes from this process without the socket (see [`crate::cores::Dispatcher`]).
    pub fn dispatcher(&self) -> crate::cores::Dispatcher {
        self.cores.dispatcher()
    }

    /// How many cores serve invokes.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// Stops accepting, lets in-flight invokes finish within the grace period, ends the sandboxes.
    pub async fn shutdown(self) {
        self.cores.shutdown(self.grace).await;
    }
}
