//! `hearth-perf`: Hearth's benchmark scenarios. Each prints a table and, with `--json FILE`,
//! writes `{"scenario", "machine", "metrics": {NAME: {"p50", "p90", "p99", "unit", "n", ...}}}`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hearth_perf::scenario::{self, Common};

#[derive(Parser)]
#[command(name = "hearth-perf", version, about = "Hearth's benchmark scenarios")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Time the QEMU test host itself: `hearth testhost -- /bin/true`, end to end and by phase.
    Testhost(scenario::testhost::TesthostScenarioArgs),
    /// Boot microVMs with `hearth vmm`: process start to guest init and to vsock ready, and the VMM's
    /// memory with an idle guest (inside the test host where there is no hardware KVM).
    Boot(scenario::boot::BootArgs),
    /// Snapshot restore of a booted microVM: restore to the guest answering on vsock (file-mapped,
    /// userfaultfd, userfaultfd with a prefetched working set), snapshot create time and file sizes,
    /// memory per idle clone, restores per second (inside the test host without hardware KVM).
    Restore(scenario::restore::RestoreArgs),
    /// The warm invoke round trip of an echo function through one sandbox (container or microVM;
    /// the microVM one inside the test host where there is no hardware KVM).
    SandboxInvoke(scenario::sandbox_invoke::SandboxInvokeArgs),
    /// The cold start of `hearth run`: process start to the response, one fresh sandbox each.
    RunCold(scenario::run_cold::RunColdArgs),
    /// The Lambda API frontend's own cost: warm invoke latency and throughput of an echo function
    /// through `hearth serve` (HTTP, SigV4) next to the same through the invoke-proxy socket.
    Api(scenario::api::ApiArgs),
    /// Warm invoke latency through the agent's invoke-proxy socket at 1, 8 and 64 concurrent
    /// callers, and the platform overhead (latency minus the function's own duration).
    WarmInvoke(scenario::warm_invoke::WarmInvokeArgs),
    /// Warm invokes per second at saturation through the invoke-proxy socket, CPU time per invoke,
    /// and the in-process cost of the concurrency check and the metrics recording.
    Throughput(scenario::throughput::ThroughputArgs),
    /// Invokes that start a new execution environment, through the invoke-proxy socket.
    ColdStart(scenario::cold_start::ColdStartArgs),
    /// This machine's floor for the hops of an invoke: a byte's round trip between two threads and
    /// through chains of three and four processes, on one CPU and across two (`warm-invoke`
    /// measures the same in its run), and the invokes per second of invoke-shaped chains of bare
    /// processes side by side (`throughput` measures the same at its levels).
    Floor(scenario::handoff::FloorArgs),
    /// One relay of a `floor` chain (started by `hearth-perf` itself).
    #[command(name = scenario::handoff::RELAY_COMMAND, hide = true)]
    HopRelay(scenario::handoff::RelayArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let report = match &cli.scenario {
        Scenario::Testhost(args) => scenario::testhost::run(args),
        Scenario::Boot(args) => scenario::boot::run(args),
        Scenario::Restore(args) => scenario::restore::run(args),
        Scenario::SandboxInvoke(args) => scenario::sandbox_invoke::run(args),
        Scenario::RunCold(args) => scenario::run_cold::run(args),
        Scenario::Api(args) => scenario::api::run(args),
        Scenario::WarmInvoke(args) => scenario::warm_invoke::run(args),
        Scenario::Throughput(args) => scenario::throughput::run(args),
        Scenario::ColdStart(args) => scenario::cold_start::run(args),
        Scenario::Floor(args) => scenario::handoff::run(args),
        Scenario::HopRelay(args) => {
            return match scenario::handoff::relay(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!(
                        "hearth-perf {}: error: {err:#}",
                        scenario::handoff::RELAY_COMMAND
                    );
                    ExitCode::FAILURE
                }
            };
        }
    };
    match report.and_then(|report| scenario::finish(&report, &cli.common)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hearth-perf: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
