//! `hearth-perf warm-invoke`: warm invoke latency through the agent's invoke-proxy socket at 1, 8
//! and 64 concurrent callers, and the platform's own share of it.
//!
//! Starts the agent as it runs in production: a `hearth serve` child process (the agent in that
//! process, container sandboxes, its invoke-proxy socket at `<data-dir>/agent.sock`), and puts the
//! echo function's code (`hearth_agent::testing`, the `lambda_runtime` crate) where the agent's
//! code cache fills from. Each caller has its own connection and sends one invoke after another;
//! before the timed invokes of a level every caller warms its own environment. Every invoke asks
//! for the log tail, whose `REPORT` record gives the function's own duration as the agent measured
//! it; the platform overhead of an invoke is its latency at the caller minus that duration (the
//! tail's formatting included, so the overhead is an upper bound). One more run at one caller
//! without the tail gives the plain latency. Before the levels, while the agent idles, the
//! machine's floor is measured ([`super::handoff`]): a round trip between two threads across CPUs
//! and on one CPU, and a byte through chains of three and four bare processes (the hops of the
//! overhead, and of the whole invoke) with the caller on the relays' CPU and on another, so the
//! overhead can be read against what any platform with those hops reaches here.
//!
//! The agent process helper here (`AgentProcess`) is shared by `throughput` and `cold-start`.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use hearth_agent::proxy::client::ProxyClient;
use hearth_agent::proxy::protocol as proxy;
use sha2::Digest as _;

use crate::report::Report;

/// The echo function's memory size. Lambda gives a function CPU in proportion to its memory (one
/// vCPU at 1769 MB), enforced here by a CFS quota per 100 ms period; a smaller function is
/// throttled for tens of milliseconds whenever it spends its quota, and the figures then measure
/// the quota rather than the platform.
pub(crate) const ECHO_MEMORY_MIB: u32 = 2048;

/// `hearth-perf warm-invoke` options.
#[derive(Debug, Clone, clap::Args)]
pub struct WarmInvokeArgs {
    /// Concurrent callers, one level after the other (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    pub callers: Vec<usize>,
    /// Timed invokes per level (shared among its callers).
    #[arg(long, default_value_t = 5000)]
    pub invokes: usize,
    /// Untimed invokes per caller before a level is timed.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// HEARTH_LOG of the agent process (`info` logs a REPORT record per invoke).
    #[arg(long, default_value = "warn")]
    pub agent_log: String,
    /// The `hearth` binary; by default the one next to `hearth-perf`.
    #[arg(long)]
    pub hearth: Option<PathBuf>,
}

/// A `hearth serve` child process with container sandboxes, stopped (SIGTERM, then SIGKILL) when
/// dropped.
pub(crate) struct AgentProcess {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
    _work: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts `hearth serve` on free ports with `extra` arguments and `HEARTH_LOG=log_level`.
    pub(crate) fn start(
        hearth: Option<&Path>,
        extra: &[&str],
        log_level: &str,
    ) -> anyhow::Result<AgentProcess> {
        let hearth = match hearth {
            Some(path) => path.to_path_buf(),
            None => crate::testhost::find_hearth()?,
        };
        let work = tempfile::Builder::new()
            .prefix("hearth-perf-agent-")
            .tempdir()
            .context("cannot make a work folder")?;
        let credentials = work.path().join("credentials");
        std::fs::write(&credentials, "AKIDHEARTHPERF hearth-perf-secret\n")
            .context("cannot write the credentials file")?;
        let data_dir = work.path().join("data");
        let log = work.path().join("agent.log");
        let log_file = std::fs::File::create(&log).context("cannot create the agent's log")?;
        let mut child = Command::new(&hearth)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--sandbox", "container", "--shutdown-grace", "5"])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--credentials")
            .arg(&credentials)
            .args(extra)
            .env("HEARTH_LOG", log_level)
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {} serve", hearth.display()))?;
        let stdout = child.stdout.take().context("no stdout from hearth serve")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let agent = AgentProcess {
            child,
            data_dir,
            log,
            _work: work,
        };
        match read {
            Ok(_) if line.starts_with("hearth-api listening on ") => Ok(agent),
            _ => bail!(
                "hearth serve did not start (it printed {line:?}); its log: {}",
                agent.log_tail()
            ),
        }
    }

    /// The invoke-proxy socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }

    /// The agent's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Puts a code zip where the agent's code cache fills from; returns its hex sha256.
    pub(crate) fn put_code(&self, zip: &[u8]) -> anyhow::Result<String> {
        let hex = hex::encode(sha2::Sha256::digest(zip));
        let dir = self.data_dir.join("code");
        std::fs::create_dir_all(&dir).context("cannot create the code folder")?;
        std::fs::write(dir.join(format!("{hex}.zip")), zip).context("cannot write the code")?;
        Ok(hex)
    }

    /// The last 2 KB of the agent's log.
    pub(crate) fn log_tail(&self) -> String {
        super::file_tail(&self.log, 2000)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        super::stop_child(&mut self.child, Duration::from_secs(20));
    }
}

/// The echo function's code zip (built by `hearth_agent::testing`).
pub(crate) fn echo_code() -> anyhow::Result<Vec<u8>> {
    let path = hearth_agent::testing::echo_zip().context("building the echo function")?;
    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// An invoke of the echo function `name` (256 MB, `provided.al2023`) as the frontend sends it.
pub(crate) fn echo_request(
    name: &str,
    code_hex: &str,
    request_id: String,
    payload: Vec<u8>,
    log_tail: bool,
) -> proxy::InvokeRequest {
    proxy::InvokeRequest {
        request_id,
        function: proxy::FunctionSpec {
            function_arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{name}"),
            function_name: name.to_owned(),
            version: "$LATEST".into(),
            code_sha256_hex: code_hex.to_owned(),
            runtime: "provided.al2023".into(),
            handler: "bootstrap".into(),
            memory_mib: ECHO_MEMORY_MIB,
            timeout_s: 30,
            environment: Vec::new(),
            reserved_concurrency: None,
            revision_id: format!("{name}-r1"),
        },
        payload,
        invocation_type: proxy::InvocationType::RequestResponse,
        client_context: None,
        trace_id: None,
        deadline_ms: 0,
        log_tail,
    }
}

/// The `Duration` and `Init Duration` (ms) of the `REPORT` record in a log tail.
pub(crate) fn report_durations(tail: &[u8]) -> Option<(f64, Option<f64>)> {
    let text = std::str::from_utf8(tail).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("REPORT RequestId: "))?;
    let field = |name: &str| -> Option<f64> {
        let rest = line.split(&format!("\t{name}: ")).nth(1)?;
        rest.split(' ').next()?.parse().ok()
    };
    Some((field("Duration")?, field("Init Duration")))
}

/// One timed invoke, in microseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    /// At the caller, from sending the request to its result.
    pub latency: f64,
    /// The function's own duration (the REPORT record), when the tail was asked for.
    pub function: Option<f64>,
    /// Everything in the agent (the result's timings).
    pub agent: f64,
}

/// Whether `a` and `b` are the same JSON (bytes first; the echo may reorder keys).
fn same_json(a: &[u8], b: &[u8]) -> bool {
    a == b
        || matches!(
            (
                serde_json::from_slice::<serde_json::Value>(a),
                serde_json::from_slice::<serde_json::Value>(b),
            ),
            (Ok(x), Ok(y)) if x == y
        )
}

/// One invoke; fails unless the echo came back.
pub(crate) async fn timed_invoke(
    client: &ProxyClient,
    request: proxy::InvokeRequest,
) -> anyhow::Result<(Sample, proxy::InvokeResult)> {
    let expected = request.payload.clone();
    let start = Instant::now();
    let result = client
        .invoke(request)
        .await
        .context("the invoke-proxy invoke failed")?;
    let latency = start.elapsed().as_secs_f64() * 1e6;
    match &result.outcome {
        proxy::Outcome::Success { payload } if same_json(payload, &expected) => {}
        other => bail!("the echo invoke failed: {other:?}"),
    }
    let function = report_durations(&result.log_tail).map(|(ms, _)| ms * 1000.0);
    Ok((
        Sample {
            latency,
            function,
            agent: result.timings.total_us as f64,
        },
        result,
    ))
}

/// `callers` loops of `per_caller` invokes each, each on its own connection, after every caller
/// made `warmup` untimed ones; returns every timed sample.
async fn level(
    socket: &Path,
    code_hex: &str,
    callers: usize,
    per_caller: usize,
    warmup: usize,
    log_tail: bool,
) -> anyhow::Result<Vec<Sample>> {
    let clients = (0..callers)
        .map(|_| ProxyClient::connect(socket))
        .collect::<Result<Vec<_>, _>>()?;
    let mut all = Vec::new();
    for (timed, count) in [(false, warmup), (true, per_caller)] {
        let mut tasks = tokio::task::JoinSet::new();
        for (caller, client) in clients.iter().enumerate() {
            let (client, code_hex) = (client.clone(), code_hex.to_owned());
            tasks.spawn(async move {
                let mut samples = Vec::with_capacity(count);
                for i in 0..count {
                    let payload = format!(r#"{{"caller":{caller},"i":{i},"op":"echo"}}"#);
                    let request = echo_request(
                        "perf-echo",
                        &code_hex,
                        format!("c{callers}-{caller}-{timed}-{i}"),
                        payload.into_bytes(),
                        log_tail,
                    );
                    let (sample, _) = timed_invoke(&client, request).await?;
                    samples.push(sample);
                }
                Ok::<_, anyhow::Error>(samples)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let samples = joined.context("a caller task failed")??;
            if timed {
                all.extend(samples);
            }
        }
    }
    Ok(all)
}

/// Runs the scenario.
pub fn run(args: &WarmInvokeArgs) -> anyhow::Result<Report> {
    ensure!(args.invokes > 0, "--invokes must be at least 1");
    ensure!(
        !args.callers.is_empty() && args.callers.iter().all(|&c| c > 0),
        "--callers must be positive"
    );
    let code = echo_code()?;
    let agent = AgentProcess::start(args.hearth.as_deref(), &[], &args.agent_log)?;
    let code_hex = agent.put_code(&code)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut report = Report::new("warm_invoke", super::machine());
    report.parameter("invokes_per_level", args.invokes);
    report.parameter("warmup_per_caller", args.warmup);
    report.parameter("agent_log", args.agent_log.clone());
    report.parameter(
        "function",
        "echo (lambda_runtime, static), 256 MB, container sandbox",
    );
    report.parameter("path", "invoke-proxy socket, one connection per caller");
    // The machine's floor, measured now: the agent idles (its cores wait in epoll).
    super::handoff::measure(&mut report).context("the round-trip floor")?;
    super::handoff::measure_chains(&mut report).context("the chain floor")?;
    let socket = agent.socket();
    let measured = runtime.block_on(async {
        let mut levels = Vec::new();
        for &callers in &args.callers {
            let per_caller = args.invokes.div_ceil(callers);
            let samples = level(&socket, &code_hex, callers, per_caller, args.warmup, true)
                .await
                .with_context(|| format!("{callers} callers"))?;
            levels.push((callers, samples));
        }
        let plain = level(&socket, &code_hex, 1, args.invokes, args.warmup, false)
            .await
            .context("1 caller without the log tail")?;
        Ok::<_, anyhow::Error>((levels, plain))
    });
    let (levels, plain) =
        measured.with_context(|| format!("the agent's log: {}", agent.log_tail()))?;
    for (callers, samples) in &levels {
        let latency: Vec<f64> = samples.iter().map(|s| s.latency).collect();
        let overhead: Vec<f64> = samples
            .iter()
            .filter_map(|s| Some(s.latency - s.function?))
            .collect();
        let function: Vec<f64> = samples.iter().filter_map(|s| s.function).collect();
        let agent_time: Vec<f64> = samples.iter().map(|s| s.agent).collect();
        report.add(&format!("latency_c{callers}"), &latency, "us");
        report.add(&format!("overhead_c{callers}"), &overhead, "us");
        report.add(&format!("function_duration_c{callers}"), &function, "us");
        report.add(&format!("agent_time_c{callers}"), &agent_time, "us");
    }
    let latency: Vec<f64> = plain.iter().map(|s| s.latency).collect();
    report.add("latency_c1_no_tail", &latency, "us");
    drop(agent);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_record_gives_its_durations() {
        let tail = b"START RequestId: r Version: $LATEST\nhello\nEND RequestId: r\nREPORT RequestId: r\tDuration: 0.04 ms\tBilled Duration: 1 ms\tMemory Size: 256 MB\tMax Memory Used: 12 MB\tInit Duration: 31.50 ms\t\n";
        assert_eq!(report_durations(tail), Some((0.04, Some(31.5))));
        let warm = b"REPORT RequestId: r\tDuration: 1.25 ms\tBilled Duration: 2 ms\tMemory Size: 256 MB\tMax Memory Used: 12 MB\t\n";
        assert_eq!(report_durations(warm), Some((1.25, None)));
        assert_eq!(report_durations(b"no report"), None);
    }
}
