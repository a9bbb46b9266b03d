//! `hearth serve`: the Lambda API on one address, metadata under one data directory, and the
//! agent that runs the functions in the same process, reached over its invoke-proxy socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use hearth_agent::environment::EnvironmentConfig;
use hearth_agent::host::{Agent, AgentConfig};
use hearth_agent::sandbox::run::SandboxKind;

use crate::invoker::{LocalInvoker, ProxyInvoker};

/// How `hearth serve`'s frontend reaches its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InvokePath {
    /// In process, straight to the core that owns the function.
    Cores,
    /// Through the invoke-proxy socket.
    Socket,
}
use crate::{AppState, Auth, Partition, Store, server};

/// `hearth serve` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Directory of the metadata database and the code objects (created if missing).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "hearth-data")]
    pub data_dir: PathBuf,
    /// Access keys, one `ACCESS_KEY_ID SECRET` pair a line; requests must be SigV4-signed with one.
    #[arg(long, conflicts_with = "insecure_accept_any_key")]
    pub credentials: Option<PathBuf>,
    /// Accept any well-formed SigV4 signature, whatever its key. Local development only.
    #[arg(long)]
    pub insecure_accept_any_key: bool,
    /// The region in ARNs.
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// The 12-digit account id in ARNs.
    #[arg(long, default_value = "000000000000")]
    pub account_id: String,
    /// Directory that `Code.S3Bucket`/`S3Key` read from: a bucket is a folder under it, a key a
    /// path inside that (default: `<data-dir>/objects`).
    #[arg(long, conflicts_with = "s3_endpoint")]
    pub object_store_dir: Option<PathBuf>,
    /// Read `S3Bucket`/`S3Key` from this S3-compatible endpoint instead (credentials and region
    /// from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// The agent's invoke-proxy socket (default: `<data-dir>/agent.sock`).
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    /// Also serve the invoke-proxy protocol over TCP at this address (one SO_REUSEPORT listener
    /// per agent core; port 0 picks one).
    #[arg(long)]
    pub agent_listen: Option<SocketAddr>,
    /// The agent's worker threads, each pinned to a CPU (default: one per CPU this process may
    /// use).
    #[arg(long, default_value_t = 0)]
    pub agent_cores: usize,
    /// Where a container sandbox's processes run: `core` pins each to one CPU, the CPU of the
    /// agent core that owns its function first, then the least used (warm invokes then cross no
    /// CPUs at low load); `any`: every CPU the agent may use.
    #[arg(long, value_enum, default_value = "core")]
    pub sandbox_affinity: hearth_agent::placement::SandboxAffinity,
    /// Memory sizes (MiB) of the pools of restored microVMs that microVM sandboxes are claimed
    /// from (the smallest that fits; a function larger than all of them boots its own VM).
    #[arg(long, value_delimiter = ',', default_values_t = hearth_agent::pool::DEFAULT_SIZES)]
    pub pool_sizes: Vec<u32>,
    /// Idle restored microVMs each pool keeps ready (0: no pools, every microVM boots).
    #[arg(long, default_value_t = 1)]
    pub pool_idle: usize,
    /// Run microVM VMMs without the jail (`hearth jail` needs root: namespaces, cgroups, uids).
    #[arg(long)]
    pub no_jail: bool,
    /// Where VMM jails are made (`<jail-base>/<vm>/root`).
    #[arg(long, default_value = hearth_agent::jail::DEFAULT_JAIL_BASE)]
    pub jail_base: PathBuf,
    /// How the frontend hands invokes to the agent it embeds: `cores` straight to the agent's
    /// cores in this process (no framing, no socket hop), or `socket` through the invoke-proxy
    /// socket as a frontend in another process would.
    #[arg(long, value_enum, default_value_t = InvokePath::Cores)]
    pub invoke_path: InvokePath,
    /// Where functions run (default: microvm on hardware KVM, else container).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxKind>,
    /// The static hearth-init binary (default: next to this program or in the build folder).
    #[arg(long, env = "HEARTH_INIT")]
    pub init: Option<PathBuf>,
    /// Seconds an idle execution environment is kept warm.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
    /// Seconds an execution environment lives at most.
    #[arg(long, default_value_t = 7200, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_lifetime: u64,
    /// The code cache's size bound in MiB (under `<data-dir>/code-cache`).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub code_cache_mib: u64,
    /// Seconds in-flight invokes get to finish at shutdown.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Serve the agent's Prometheus metrics on `GET /metrics` at this address (port 0 picks a
    /// free port; the chosen address is logged). Default 127.0.0.1:9001, skipped with an error
    /// logged when that is taken; an address given here must be bound or the server does not
    /// start.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Where the metrics are served when `--metrics-listen` is not given.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9001";

impl ServeArgs {
    /// Checks every field and reports all problems at once.
    fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.credentials.is_none() && !self.insecure_accept_any_key {
            problems.push("no access keys: pass --credentials FILE, or --insecure-accept-any-key for local use".to_string());
        }
        if self.account_id.len() != 12 || !self.account_id.chars().all(|c| c.is_ascii_digit()) {
            problems.push(format!(
                "--account-id {:?} is not 12 digits",
                self.account_id
            ));
        }
        let region_ok = self.region.split('-').count() >= 3
            && self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            problems.push(format!(
                "--region {:?} is not a region name like us-east-1",
                self.region
            ));
        }
        // Lambda's memory range, which is also what one microVM may have.
        if let Some(bad) = self.pool_sizes.iter().find(|m| !(128..=10240).contains(*m)) {
            problems.push(format!(
                "--pool-sizes: {bad} MiB is outside 128..=10240 MiB"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", problems.join("; "))
        }
    }
}

/// Runs the server until SIGINT or SIGTERM. Prints `hearth-api listening on ADDR` on stdout once
/// it accepts connections.
pub fn run(args: ServeArgs) -> anyhow::Result<u8> {
    args.validate()?;
    let auth = match &args.credentials {
        Some(path) => Auth::from_file(path)?,
        None => {
            tracing::warn!(
                "--insecure-accept-any-key: ANY SigV4-signed request is accepted, whatever its access key; do not expose this server"
            );
            Auth::AcceptAnySigned
        }
    };
    let store = Store::open(&args.data_dir)
        .with_context(|| format!("opening {}", args.data_dir.display()))?;
    let partition = Partition {
        region: args.region.clone(),
        account: args.account_id.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hearth-api")
        .build()
        .context("starting the async runtime")?;
    let sandbox = args.sandbox.unwrap_or_else(default_sandbox);
    let hearth_binary = std::env::current_exe().context("finding the hearth binary")?;
    let agent_config = AgentConfig {
        socket: args
            .agent_socket
            .clone()
            .unwrap_or_else(|| args.data_dir.join("agent.sock")),
        tcp_listen: args.agent_listen,
        cores: hearth_agent::cores::CoresConfig {
            threads: args.agent_cores,
            pin: true,
        },
        sandbox,
        init_path: args.init.clone(),
        hearth_binary: hearth_binary.clone(),
        state_dir: std::env::temp_dir().join(format!("hearth-agent-{}", std::process::id())),
        code_source_dir: args.data_dir.join("code"),
        code_cache_dir: args.data_dir.join("code-cache"),
        code_cache_max_bytes: args.code_cache_mib << 20,
        environments: EnvironmentConfig {
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_lifetime: Duration::from_secs(args.max_lifetime),
            reap_interval: Duration::from_secs(1),
            sandbox_affinity: args.sandbox_affinity,
        },
        concurrency: Default::default(),
        grace: Duration::from_secs(args.shutdown_grace),
        region: args.region.clone(),
        pools: if args.pool_idle == 0 {
            Vec::new()
        } else {
            args.pool_sizes
                .iter()
                .map(|&mem_mib| hearth_agent::pool::PoolSize {
                    mem_mib,
                    target: args.pool_idle,
                })
                .collect()
        },
        template_dir: args.data_dir.join("templates"),
        jail: (!args.no_jail).then(|| {
            let mut jail = hearth_agent::jail::JailConfig::new(hearth_binary.clone());
            jail.jail_base = args.jail_base.clone();
            jail
        }),
    };
    runtime.block_on(async move {
        let agent = Agent::start(agent_config.clone())
            .await
            .context("starting the agent")?;
        tracing::info!(sandbox = ?sandbox, kvm = %hearth_vmm::kvm::detect_kind(), socket = %agent.socket().display(), "agent started");
        let metrics = serve_metrics(args.metrics_listen).await?;
        let invoker: Arc<dyn crate::Invoker> = match args.invoke_path {
            InvokePath::Cores => Arc::new(LocalInvoker::new(Arc::new(agent.dispatcher()))),
            InvokePath::Socket => Arc::new(
                ProxyInvoker::connect(agent.socket())
                    .context("connecting to the agent's invoke-proxy socket")?,
            ),
        };
        let state = AppState::new(store, auth, partition, invoker)
            .with_buckets(crate::buckets::Buckets::open_for_serve(
                &args.data_dir,
                args.object_store_dir.as_deref(),
                args.s3_endpoint.as_deref(),
            )?);
        state.finish_pending();
        state.collect_garbage();
        // The API is served by the agent's cores: each accepts on its own SO_REUSEPORT
        // listener, so an invoke of a function the accepting core owns stays on its thread.
        let steer_partition = state.partition().clone();
        let (service, connections) = server::on_cores(
            crate::ApiService::new(state),
            server::ServerLimits::default(),
        );
        // A new connection is served on the core that runs the function its first request
        // invokes, so the invokes that follow on it stay on that core's thread.
        let steer: hearth_agent::cores::Steer = Arc::new(move |first: &[u8]| {
            crate::names::invoked_function_arn(first, &steer_partition)
        });
        let http = agent
            .serve_tcp(args.listen, service, Some(steer))
            .with_context(|| format!("binding {}", args.listen))?;
        let local = http.address();
        tracing::info!(address = %local, data_dir = %args.data_dir.display(), cores = agent.cores(), "Lambda API listening");
        println!("hearth-api listening on {local}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        http.stop();
        connections.shutdown().await;
        agent.shutdown().await;
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        let _ = std::fs::remove_dir_all(&agent_config.state_dir);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}

/// Serves the agent's metrics at `address` (else at [`DEFAULT_METRICS_LISTEN`], if free).
async fn serve_metrics(
    address: Option<SocketAddr>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let listener = match address {
        Some(address) => tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics address {address}"))?,
        None => {
            let address: SocketAddr = DEFAULT_METRICS_LISTEN
                .parse()
                .context("the default metrics address")?;
            match tokio::net::TcpListener::bind(address).await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::error!(error = %e, %address, "cannot serve metrics on the default address; pass --metrics-listen ADDR (port 0 picks a free one)");
                    return Ok(None);
                }
            }
        }
    };
    let local = listener
        .local_addr()
        .context("reading the metrics address")?;
    tracing::info!(address = %local, "metrics on GET /metrics");
    let metrics = hearth_agent::metrics::Metrics::global().clone();
    Ok(Some(tokio::spawn(hearth_agent::metrics::serve(
        listener, metrics,
    ))))
}

/// MicroVMs where the host has hardware KVM, containers elsewhere.
fn default_sandbox() -> SandboxKind {
    match hearth_vmm::kvm::detect_kind() {
        hearth_vmm::kvm::KvmKind::Hardware(_) => SandboxKind::Microvm,
        _ => SandboxKind::Container,
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .unwrap()
            .serve
    }

    #[test]
    fn pool_sizes_default_to_lambdas_and_are_checked() {
        let defaults = parse(&["--insecure-accept-any-key"]);
        assert_eq!(defaults.pool_sizes, hearth_agent::pool::DEFAULT_SIZES);
        assert_eq!(defaults.pool_idle, 1);
        defaults.validate().unwrap();
        let bad = parse(&["--insecure-accept-any-key", "--pool-sizes", "64,256"]);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("64 MiB is outside"), "{err}");
    }
}
