//! `hearth-perf throughput`: warm invokes per second at saturation through the agent's
//! invoke-proxy socket, the CPU time each costs, and the per-invoke cost of two things on the
//! agent's hot path timed in process: the concurrency check and the metrics recording.
//!
//! The agent is a `hearth serve` child process with container sandboxes
//! (`warm_invoke::AgentProcess`); at each level of `--callers`, that many loops (one connection
//! each) keep the echo function busy, one environment each. Each level's figures carry its
//! number (`throughput_c8`); the plain names (`throughput`, `agent_cpu_per_invoke`, ...) are
//! those of the level with the highest median rate, the machine's saturation point, which the
//! report names (`peak_callers`). After an untimed window (the environments start), each one-second window
//! counts the invokes finished and the CPU time (user and system) that the agent process and every
//! process under it (the sandboxes' init and runtime) used, read from `/proc`: in all
//! (`agent_cpu_per_invoke`), the agent process alone (`agent_process_cpu_per_invoke`), the
//! sandboxes' function runtimes (processes named `bootstrap`: `runtime_cpu_per_invoke`) and the
//! rest under the agent, the sandboxes' `hearth-init` processes (`init_cpu_per_invoke`); the
//! caller's own CPU time is reported apart.
//!
//! After the agent has ended, the machine's floor at each level: `floor_invoke_rate_c8` is the
//! invokes per second of 8 invoke-shaped chains of bare processes side by side (caller, agent,
//! init and runtime relays, the last hop a Runtime API exchange over loopback TCP; see
//! [`super::handoff`]), the most any platform with those four processes can reach here.
//!
//! In process: [`Concurrency::acquire`] and the permit's release, and [`Metrics::invoke`] with a
//! warm invoke's record, each timed over batches of 100,000, on one thread and on two at once
//! (for the check: each thread its own function, as the cores shard them, and also both on one
//! function, `concurrency_check_t2_one_function`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hearth_agent::concurrency::{Concurrency, ConcurrencyConfig};
use hearth_agent::metrics::{InvokeRecord, Metrics, OutcomeKind};
use hearth_agent::proxy::client::ProxyClient;

use super::warm_invoke::{AgentProcess, echo_code, echo_request, timed_invoke};
use crate::report::Report;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, 100 on x86_64 Linux).
const USER_HZ: f64 = 100.0;

/// `hearth-perf throughput` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ThroughputArgs {
    /// Invokes in flight at once (one connection each), one level after the other
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [8, 64])]
    pub callers: Vec<usize>,
    /// Timed one-second windows.
    #[arg(long, default_value_t = 10)]
    pub windows: usize,
    /// Batches of 100,000 for the in-process figures.
    #[arg(long, default_value_t = 15)]
    pub batches: usize,
    /// HEARTH_LOG of the agent process (`info` logs a REPORT record per invoke).
    #[arg(long, default_value = "warn")]
    pub agent_log: String,
    /// The `hearth` binary; by default the one next to `hearth-perf`.
    #[arg(long)]
    pub hearth: Option<PathBuf>,
}

/// User plus system CPU seconds of `pid` (all its threads), if it runs.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// The parent of `pid`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `root` and every process under it.
fn tree(root: u32) -> Vec<u32> {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let parents: std::collections::HashMap<u32, u32> =
        pids.iter().filter_map(|&p| Some((p, parent(p)?))).collect();
    pids.into_iter()
        .filter(|&p| {
            let mut at = p;
            for _ in 0..64 {
                if at == root {
                    return true;
                }
                match parents.get(&at) {
                    Some(&up) if up != 0 => at = up,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// Whether `pid` is a function runtime (the echo function's `bootstrap`).
fn is_runtime(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "bootstrap")
}

/// CPU seconds of every process in `pids`, by pid.
fn cpu_of(pids: &[u32]) -> std::collections::HashMap<u32, f64> {
    pids.iter()
        .filter_map(|&p| Some((p, cpu_seconds(p)?)))
        .collect()
}

/// Runs the scenario.
pub fn run(args: &ThroughputArgs) -> anyhow::Result<Report> {
    ensure!(
        !args.callers.is_empty() && args.callers.iter().all(|&c| c > 0),
        "--callers must be positive"
    );
    ensure!(args.windows > 0, "--windows must be at least 1");
    ensure!(args.batches > 0, "--batches must be at least 1");
    let mut report = Report::new("throughput", super::machine());
    report.parameter("callers", args.callers.clone());
    report.parameter("windows", args.windows);
    report.parameter("agent_log", args.agent_log.clone());
    report.parameter(
        "function",
        "echo (lambda_runtime, static), 256 MB, container sandbox",
    );

    // The in-process figures first, on a quiet machine.
    for threads in [1, 2] {
        let limits = Concurrency::new(ConcurrencyConfig::default());
        // Each thread its own function, as the cores shard functions: only the account-wide count
        // is shared.
        let functions = ["bench-function-0", "bench-function-1"];
        let check = per_op_ns(args.batches, threads, |thread| {
            let permit = limits.acquire(functions[thread % 2], None);
            std::hint::black_box(&permit);
        });
        report.add(&format!("concurrency_check_t{threads}"), &check, "ns");
        if threads > 1 {
            // The worst case: both threads on one function's counters.
            let check = per_op_ns(args.batches, threads, |_| {
                let permit = limits.acquire(functions[0], None);
                std::hint::black_box(&permit);
            });
            report.add(
                &format!("concurrency_check_t{threads}_one_function"),
                &check,
                "ns",
            );
        }
        let metrics = Metrics::new();
        let record = InvokeRecord {
            claim: Some(Duration::from_micros(2)),
            invoke: Some(Duration::from_micros(60)),
            response: Some(Duration::from_micros(3)),
            function: Some(Duration::from_micros(30)),
            total: Duration::from_micros(70),
            ..Default::default()
        };
        let record_ns = per_op_ns(args.batches, threads, |_| {
            metrics.invoke(OutcomeKind::Success, std::hint::black_box(&record));
        });
        report.add(&format!("metrics_record_t{threads}"), &record_ns, "ns");
    }

    let code = echo_code()?;
    let agent = AgentProcess::start(args.hearth.as_deref(), &[], &args.agent_log)?;
    let code_hex = agent.put_code(&code)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut peak: Option<(f64, usize)> = None;
    for &callers in &args.callers {
        let measured = runtime.block_on(saturate(args, callers, &agent, &code_hex));
        let windows = measured
            .with_context(|| format!("{callers} callers; the agent's log: {}", agent.log_tail()))?;
        let level = Level::of(&windows);
        let median =
            crate::report::Metric::from_samples(&level.rate, "inv/s").map_or(0.0, |m| m.p50);
        level.add_to(&mut report, &format!("_c{callers}"));
        if peak.is_none_or(|(best, _)| median > best) {
            peak = Some((median, callers));
        }
    }
    drop(agent);
    // The machine's floor at the same levels, with the agent gone.
    super::handoff::measure_rates(&mut report, &args.callers, args.windows)
        .context("the rate floor")?;
    if let Some((_, callers)) = peak {
        report.parameter("peak_callers", callers);
        let names = Level::NAMES.iter().map(|(name, _)| *name);
        for name in names.chain(["floor_invoke_rate"]) {
            if let Some(m) = report.metrics.get(&format!("{name}_c{callers}")).cloned() {
                report.metrics.insert(name.to_string(), m);
            }
        }
    }
    Ok(report)
}

/// One level's figures, per window.
struct Level {
    rate: Vec<f64>,
    cpu: Vec<f64>,
    process_cpu: Vec<f64>,
    init_cpu: Vec<f64>,
    runtime_cpu: Vec<f64>,
    client_cpu: Vec<f64>,
    utilisation: Vec<f64>,
}

impl Level {
    /// The metric names, without the level's suffix, and their units, in [`Level::values`]' order.
    const NAMES: [(&'static str, &'static str); 7] = [
        ("throughput", "inv/s"),
        ("agent_cpu_per_invoke", "us"),
        ("agent_process_cpu_per_invoke", "us"),
        ("init_cpu_per_invoke", "us"),
        ("runtime_cpu_per_invoke", "us"),
        ("client_cpu_per_invoke", "us"),
        ("cpus_busy", "cpus"),
    ];

    /// The samples of each of [`Level::NAMES`].
    fn values(&self) -> [&[f64]; 7] {
        [
            &self.rate,
            &self.cpu,
            &self.process_cpu,
            &self.init_cpu,
            &self.runtime_cpu,
            &self.client_cpu,
            &self.utilisation,
        ]
    }

    fn of(windows: &[Window]) -> Level {
        // Microseconds of CPU per invoke in each window.
        let per_invoke = |cpu: fn(&Window) -> f64| -> Vec<f64> {
            windows
                .iter()
                .map(|w| cpu(w) * 1e6 / w.invokes.max(1.0))
                .collect()
        };
        let rate = windows.iter().map(|w| w.invokes / w.seconds).collect();
        let cpu = per_invoke(|w| w.agent_cpu);
        let process_cpu = per_invoke(|w| w.agent_process_cpu);
        let client_cpu = per_invoke(|w| w.client_cpu);
        let runtime_cpu = per_invoke(|w| w.runtime_cpu);
        let init_cpu = per_invoke(|w| w.agent_cpu - w.agent_process_cpu - w.runtime_cpu);
        let utilisation = windows
            .iter()
            .map(|w| (w.agent_cpu + w.client_cpu) / w.seconds)
            .collect();
        Level {
            rate,
            cpu,
            process_cpu,
            init_cpu,
            runtime_cpu,
            client_cpu,
            utilisation,
        }
    }

    /// Adds the figures to `report`, each name followed by `suffix`.
    fn add_to(&self, report: &mut Report, suffix: &str) {
        for ((name, unit), samples) in Self::NAMES.iter().zip(self.values()) {
            report.add(&format!("{name}{suffix}"), samples, unit);
        }
    }
}

/// Nanoseconds per call of `op` in each batch of 100,000 (on `threads` threads at once, each
/// passing its index).
fn per_op_ns(batches: usize, threads: usize, op: impl Fn(usize) + Sync) -> Vec<f64> {
    const N: u32 = 100_000;
    (0..batches)
        .map(|_| {
            let started = Instant::now();
            std::thread::scope(|s| {
                for thread in 0..threads {
                    let op = &op;
                    s.spawn(move || {
                        for _ in 0..N {
                            op(thread);
                        }
                    });
                }
            });
            started.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .collect()
}

/// One window's counts.
struct Window {
    seconds: f64,
    invokes: f64,
    /// The agent process and everything under it.
    agent_cpu: f64,
    /// The agent process alone (the rest is the sandboxes').
    agent_process_cpu: f64,
    /// The function runtimes (`bootstrap`) under it.
    runtime_cpu: f64,
    client_cpu: f64,
}

async fn saturate(
    args: &ThroughputArgs,
    callers: usize,
    agent: &AgentProcess,
    code_hex: &str,
) -> anyhow::Result<Vec<Window>> {
    let socket = agent.socket();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for caller in 0..callers {
        let client = ProxyClient::connect(&socket)?;
        let (done, stop, code_hex) = (done.clone(), stop.clone(), code_hex.to_owned());
        tasks.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = format!(r#"{{"caller":{caller},"i":{i},"op":"echo"}}"#);
                let request = echo_request(
                    "perf-echo",
                    &code_hex,
                    format!("t-{caller}-{i}"),
                    payload.into_bytes(),
                    false,
                );
                timed_invoke(&client, request).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    let mut failed = None;
    // An untimed window: the environments start.
    let warm_until = Instant::now() + Duration::from_secs(3);
    while failed.is_none() && Instant::now() < warm_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            failed = Some(e);
        }
    }
    let me = std::process::id();
    let mut windows = Vec::with_capacity(args.windows);
    for _ in 0..args.windows {
        if failed.is_some() {
            break;
        }
        let pids = tree(agent.pid());
        let runtimes: Vec<u32> = pids.iter().copied().filter(|&p| is_runtime(p)).collect();
        let before = cpu_of(&pids);
        let client_before = cpu_seconds(me).unwrap_or(0.0);
        let count_before = done.load(Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let seconds = start.elapsed().as_secs_f64();
        let count = done.load(Ordering::Relaxed) - count_before;
        let after = cpu_of(&pids);
        let used = |pid: &u32, s: &f64| s - before.get(pid).copied().unwrap_or(*s);
        let agent_cpu: f64 = after.iter().map(|(pid, s)| used(pid, s)).sum();
        let agent_process_cpu: f64 = after
            .iter()
            .filter(|(pid, _)| **pid == agent.pid())
            .map(|(pid, s)| used(pid, s))
            .sum();
        let runtime_cpu: f64 = after
            .iter()
            .filter(|(pid, _)| runtimes.contains(pid))
            .map(|(pid, s)| used(pid, s))
            .sum();
        let client_cpu = cpu_seconds(me).unwrap_or(0.0) - client_before;
        windows.push(Window {
            seconds,
            invokes: count as f64,
            agent_cpu,
            agent_process_cpu,
            runtime_cpu,
            client_cpu,
        });
        if let Some(Ok(Err(e))) = tasks.try_join_next() {
            failed = Some(e);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(anyhow::anyhow!("a caller task failed: {e}"))),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(windows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_is_in_its_own_tree() {
        let me = std::process::id();
        // Busy until the kernel has counted a tick of CPU time (5 s at most).
        let spin = Instant::now();
        while cpu_seconds(me).is_some_and(|s| s == 0.0) && spin.elapsed() < Duration::from_secs(5) {
            for i in 0..100_000u64 {
                std::hint::black_box(i);
            }
        }
        assert!(cpu_seconds(me).is_some_and(|s| s > 0.0));
        assert!(tree(me).contains(&me));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(tree(me).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
