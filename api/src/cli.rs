//! `hearth serve`: the Lambda API on one address, metadata under one data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use crate::{AppState, Auth, NoAgent, Partition, Store, app, server};

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
}

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
    runtime.block_on(async move {
        let state = AppState::new(store, auth, partition, Arc::new(NoAgent));
        state.finish_pending();
        state.collect_garbage();
        let listener =
            tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let local = listener.local_addr().context("reading the bound address")?;
        tracing::info!(address = %local, data_dir = %args.data_dir.display(), "Lambda API listening");
        println!("hearth-api listening on {local}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        server::serve(listener, app(state), shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
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
