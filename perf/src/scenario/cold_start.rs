//! `hearth-perf cold-start`: invokes that have to start a new execution environment, through the
//! agent's invoke-proxy socket.
//!
//! The agent is a `hearth serve` child process with container sandboxes
//! (`warm_invoke::AgentProcess`), idle environments reaped after a second. Each timed
//! invoke names a function that has never run (`cold-<n>`, the echo function's code), one after
//! the other, so each claims a new environment: the concurrency check, the code from the cache
//! (filled once, by an untimed first invoke), the sandbox's start and the runtime's init, then the
//! invoke. Reported: the latency at the caller, the agent's stages (its result's timings), and the
//! runtime's own init as the `REPORT` record gives it. There are no pools of pre-started
//! environments yet, so every cold start here starts a container.

use std::path::PathBuf;

use anyhow::{Context as _, bail, ensure};
use hearth_agent::proxy::client::ProxyClient;

use super::warm_invoke::{AgentProcess, echo_code, echo_request, report_durations, timed_invoke};
use crate::report::Report;

/// `hearth-perf cold-start` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ColdStartArgs {
    /// Timed cold starts, one after the other.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// HEARTH_LOG of the agent process.
    #[arg(long, default_value = "warn")]
    pub agent_log: String,
    /// The `hearth` binary; by default the one next to `hearth-perf`.
    #[arg(long)]
    pub hearth: Option<PathBuf>,
}

/// One cold start's figures, in milliseconds.
#[derive(Default)]
struct Cold {
    latency: Vec<f64>,
    claim: Vec<f64>,
    code: Vec<f64>,
    init: Vec<f64>,
    runtime_init: Vec<f64>,
    invoke: Vec<f64>,
    agent: Vec<f64>,
}

/// Runs the scenario.
pub fn run(args: &ColdStartArgs) -> anyhow::Result<Report> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    let code = echo_code()?;
    let agent = AgentProcess::start(
        args.hearth.as_deref(),
        &["--idle-timeout", "1"],
        &args.agent_log,
    )?;
    let code_hex = agent.put_code(&code)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let measured = runtime.block_on(measure(args, &agent, &code_hex));
    let cold = measured.with_context(|| format!("the agent's log: {}", agent.log_tail()))?;
    drop(agent);

    let mut report = Report::new("cold_start", super::machine());
    report.parameter("runs", args.runs);
    report.parameter("agent_log", args.agent_log.clone());
    report.parameter(
        "function",
        "echo (lambda_runtime, static), 256 MB, container sandbox",
    );
    report.parameter(
        "pool",
        "none: no pools of pre-started environments yet; each cold start starts a container",
    );
    report.add("cold_invoke", &cold.latency, "ms");
    report.add("agent_total", &cold.agent, "ms");
    report.add("stage_claim", &cold.claim, "ms");
    report.add("stage_code", &cold.code, "ms");
    report.add("stage_init", &cold.init, "ms");
    report.add("runtime_init_duration", &cold.runtime_init, "ms");
    report.add("stage_invoke", &cold.invoke, "ms");
    Ok(report)
}

async fn measure(
    args: &ColdStartArgs,
    agent: &AgentProcess,
    code_hex: &str,
) -> anyhow::Result<Cold> {
    let client = ProxyClient::connect(&agent.socket())?;
    let ms = |us: u64| us as f64 / 1000.0;
    let mut cold = Cold::default();
    // Untimed: fills the code cache.
    for n in 0..=args.runs {
        let name = format!("cold-{n}");
        let payload = format!(r#"{{"n":{n},"op":"echo"}}"#).into_bytes();
        let request = echo_request(&name, code_hex, format!("cold-{n}"), payload, true);
        let (sample, result) = timed_invoke(&client, request)
            .await
            .with_context(|| format!("cold start {n}"))?;
        let t = &result.timings;
        if t.init_us == 0 {
            bail!("invoke {n} of a new function did not start an environment: {t:?}");
        }
        if n == 0 {
            continue;
        }
        cold.latency.push(sample.latency / 1000.0);
        cold.agent.push(ms(t.total_us));
        cold.claim.push(ms(t.claim_us));
        cold.code.push(ms(t.code_us));
        cold.init.push(ms(t.init_us));
        cold.invoke.push(ms(t.invoke_us));
        if let Some((_, Some(init))) = report_durations(&result.log_tail) {
            cold.runtime_init.push(init);
        }
    }
    Ok(cold)
}
