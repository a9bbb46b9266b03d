//! `hearth run`: run one function once, like `sam local invoke`.
//!
//! Prints the response (or the Lambda-shaped error) on stdout, the function's logs on stderr, then
//! a `REPORT` line on stderr. Exit status 0 on success, 1 when the function failed, 2 when the
//! sandbox could not be set up.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::container::{ContainerConfig, ContainerSandbox};
use super::microvm::{MicrovmConfig, MicrovmSandbox};
use super::{
    Bundle, Environment, FunctionSpec, InvokeRequest, InvokeResponse, Sandbox, SandboxError,
};

/// Which sandbox runs the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxKind {
    Container,
    Microvm,
}

/// `hearth run` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The function's code zip.
    #[arg(long)]
    pub code: PathBuf,
    /// `provided`, `provided.al2` or `provided.al2023`.
    #[arg(long, default_value = "provided.al2023")]
    pub runtime: String,
    #[arg(long, default_value = "bootstrap")]
    pub handler: String,
    /// Memory in MB (128 to 10240).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(128..=10240))]
    pub memory: u32,
    /// Timeout in seconds (1 to 900).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=900))]
    pub timeout: u64,
    /// A function environment variable, `K=V` (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Longest wait for the runtime's init, in seconds (Lambda gives 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=900))]
    pub init_timeout: u64,
    /// The event (JSON).
    #[arg(long, default_value = "{}")]
    pub event: String,
    #[arg(long, value_enum, default_value_t = SandboxKind::Container)]
    pub sandbox: SandboxKind,
    /// Print only the last 4 KB of the logs, as `LogType=Tail` does.
    #[arg(long)]
    pub log_tail: bool,
    /// `AWS_LAMBDA_MAX_CONCURRENCY` (container sandbox; a microVM takes one invoke at a time).
    #[arg(long, default_value_t = 1)]
    pub max_concurrency: u32,
    /// The function name.
    #[arg(long, default_value = "function")]
    pub name: String,
    /// The hearth-init binary (default: found next to this program or in the build folder).
    #[arg(long, env = "HEARTH_INIT")]
    pub init: Option<PathBuf>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected K=V, got {s:?}"))
}

/// Runs `hearth run`; returns the exit status.
pub fn run(args: RunArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<u8> {
    if serde_json::from_str::<serde_json::Value>(&args.event).is_err() {
        anyhow::bail!("--event is not valid JSON");
    }
    let code = std::fs::read(&args.code)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.code.display()))?;
    let init = match args.init.clone() {
        Some(p) => p,
        None => hearth_guest::image::locate_init()?,
    };
    let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
    let function = FunctionSpec {
        bundle: Bundle {
            function_arn: format!(
                "arn:aws:lambda:{region}:000000000000:function:{}",
                args.name
            ),
            function_name: args.name.clone(),
            function_version: "$LATEST".into(),
            runtime: args.runtime.clone(),
            handler: args.handler.clone(),
            memory_mb: args.memory,
            timeout_ms: args.timeout * 1000,
            region,
            log_group: format!("/aws/lambda/{}", args.name),
            log_stream: format!("$LATEST/{}", super::new_request_id()),
            env: args.env.clone(),
            credentials: None,
            max_concurrency: args.max_concurrency,
            code_len: 0,
        },
        code,
        cpu: None,
    };
    let request = InvokeRequest {
        payload: args.event.into_bytes(),
        ..Default::default()
    };
    let response = match args.sandbox {
        SandboxKind::Container => {
            let mut config = ContainerConfig::new(init);
            config.init_timeout = Duration::from_secs(args.init_timeout);
            invoke_once::<ContainerSandbox>(config, function, request).await
        }
        SandboxKind::Microvm => {
            let hearth = std::env::current_exe()
                .map_err(|e| anyhow::anyhow!("cannot find the hearth binary: {e}"))?;
            let config = match MicrovmConfig::new(hearth, &init, std::env::temp_dir()) {
                Ok(mut c) => {
                    c.init_timeout = Duration::from_secs(args.init_timeout);
                    c
                }
                Err(e) => {
                    eprintln!("hearth run: {e}");
                    return Ok(2);
                }
            };
            invoke_once::<MicrovmSandbox>(config, function, request).await
        }
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hearth run: {e}");
            return Ok(2);
        }
    };
    let mut stderr = std::io::stderr().lock();
    if args.log_tail {
        stderr.write_all(&response.logs_tail)?;
    } else {
        for line in &response.logs {
            stderr.write_all(&line.line)?;
            stderr.write_all(b"\n")?;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let billed = (ms(response.duration).ceil() as u64).max(1);
    let init = response
        .init_duration
        .map(|d| format!("\tInit Duration: {:.2} ms", ms(d)))
        .unwrap_or_default();
    writeln!(
        stderr,
        "REPORT RequestId: {}\tDuration: {:.2} ms\tBilled Duration: {billed} ms\tMemory Size: {} MB\tMax Memory Used: {} MB{init}",
        response.request_id,
        ms(response.duration),
        args.memory,
        response.max_memory_used_mb,
    )?;
    drop(stderr);
    let mut stdout = std::io::stdout().lock();
    match response.result {
        Ok(body) => {
            stdout.write_all(&body)?;
            stdout.write_all(b"\n")?;
            Ok(0)
        }
        Err(e) => {
            stdout.write_all(&e.body)?;
            stdout.write_all(b"\n")?;
            Ok(1)
        }
    }
}

/// One invoke in a fresh environment, which is destroyed afterwards.
async fn invoke_once<S: Sandbox>(
    config: S::Config,
    function: FunctionSpec,
    request: InvokeRequest,
) -> Result<InvokeResponse, SandboxError> {
    let mut envt: Environment<S> = Environment::new(config, function);
    let response = envt.invoke(request).await;
    envt.destroy().await;
    response
}
