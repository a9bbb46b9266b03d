//! `hearth-perf sandbox-invoke --sandbox container|microvm --runs N`: the warm invoke round trip
//! through one sandbox. Starts one sandbox with the echo function (`hearth_agent::testing`: the
//! `lambda_runtime` crate, built static), warms it up, then times N invokes one after the other,
//! from [`Sandbox::invoke`] called to its response back on the host, each response checked.
//!
//! The microVM one re-runs itself inside the test host where this machine has no hardware KVM
//! (the echo function's zip is built outside and packed in).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hearth_agent::sandbox::container::{ContainerConfig, ContainerSandbox};
use hearth_agent::sandbox::microvm::{MicrovmConfig, MicrovmSandbox};
use hearth_agent::sandbox::run::SandboxKind;
use hearth_agent::sandbox::{FunctionSpec, InvokeRequest, Sandbox};
use hearth_agent::testing;

use crate::report::Report;

/// `hearth-perf sandbox-invoke` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxInvokeArgs {
    /// The sandbox the function runs in.
    #[arg(long, value_enum, default_value_t = SandboxKind::Container)]
    pub sandbox: SandboxKind,
    /// How many timed invokes, one after the other.
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Untimed invokes first.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// The time limit for the whole run inside the test host, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub testhost_timeout: u64,
}

/// What one sandbox's run measured, in milliseconds.
struct Samples {
    start: f64,
    round_trip: Vec<f64>,
    reported: Vec<f64>,
}

/// Runs the scenario (the microVM one inside the test host where there is no hardware KVM).
pub fn run(args: &SandboxInvokeArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let zip = testing::echo_zip().context("cannot build the echo function")?;
    if args.sandbox == SandboxKind::Microvm && !super::has_hardware_kvm() {
        anyhow::ensure!(
            !testing::in_testhost(),
            "inside the test host /dev/kvm must be hardware KVM, but it is {}",
            super::kvm_description()
        );
        return super::rerun_in_testhost_with(args.testhost_timeout, vec![zip]);
    }
    let code = std::fs::read(&zip).with_context(|| format!("cannot read {}", zip.display()))?;
    // Generous limits: inside the test host everything is emulated.
    let function = testing::echo_function(code, 60_000, 1, &[]);
    let init = hearth_guest::image::locate_init()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    let samples = match args.sandbox {
        SandboxKind::Container => {
            let mut config = ContainerConfig::new(init);
            config.init_timeout = Duration::from_secs(60);
            rt.block_on(measure::<ContainerSandbox>(&config, &function, args))?
        }
        SandboxKind::Microvm => {
            let hearth = crate::testhost::find_hearth()?;
            let mut config = MicrovmConfig::new(hearth, &init, std::env::temp_dir())?;
            config.boot_timeout = Duration::from_secs(180);
            config.init_timeout = Duration::from_secs(120);
            rt.block_on(measure::<MicrovmSandbox>(&config, &function, args))?
        }
    };

    let mut report = Report::new("sandbox_invoke", super::machine());
    report.parameter("sandbox", kind_name(args.sandbox));
    report.parameter("runs", args.runs);
    report.parameter("warmup", args.warmup);
    report.parameter("function", "echo (lambda_runtime, static), 256 MB");
    report.add("sandbox_start", &[samples.start], "ms");
    report.add("invoke_round_trip", &samples.round_trip, "ms");
    report.add("invoke_reported_duration", &samples.reported, "ms");
    Ok(report)
}

/// The `--sandbox` value's name.
pub fn kind_name(kind: SandboxKind) -> &'static str {
    match kind {
        SandboxKind::Container => "container",
        SandboxKind::Microvm => "microvm",
    }
}

async fn measure<S: Sandbox>(
    config: &S::Config,
    function: &FunctionSpec,
    args: &SandboxInvokeArgs,
) -> anyhow::Result<Samples> {
    let started = Instant::now();
    let (sandbox, _init) = S::start(config, function)
        .await
        .context("the sandbox did not start")?;
    let start = ms(started.elapsed());
    println!("sandbox started in {start:.1} ms");
    let result = invoke_many(&sandbox, args).await;
    sandbox.destroy().await;
    let (round_trip, reported) = result?;
    Ok(Samples {
        start,
        round_trip,
        reported,
    })
}

/// The warm-up invokes, then the timed ones: (round trips, durations the sandbox reported).
async fn invoke_many<S: Sandbox>(
    sandbox: &S,
    args: &SandboxInvokeArgs,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut round_trip = Vec::with_capacity(args.runs);
    let mut reported = Vec::with_capacity(args.runs);
    for i in 0..args.warmup + args.runs {
        let payload = format!(r#"{{"op":"echo","i":{i}}}"#).into_bytes();
        let request = InvokeRequest {
            payload: payload.clone(),
            ..Default::default()
        };
        let sent = Instant::now();
        let response = sandbox
            .invoke(request)
            .await
            .with_context(|| format!("invoke {i}"))?;
        let elapsed = sent.elapsed();
        match &response.result {
            Ok(body) if same_json(body, &payload) => {}
            Ok(body) => anyhow::bail!(
                "invoke {i}: the echo came back as {}",
                String::from_utf8_lossy(body)
            ),
            Err(e) => anyhow::bail!("invoke {i} failed: {}: {}", e.error_type, e.error_message),
        }
        if i >= args.warmup {
            round_trip.push(ms(elapsed));
            reported.push(ms(response.duration));
        }
    }
    Ok((round_trip, reported))
}

fn same_json(a: &[u8], b: &[u8]) -> bool {
    match (
        serde_json::from_slice::<serde_json::Value>(a),
        serde_json::from_slice::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_compare_as_json() {
        assert!(same_json(
            br#"{"op":"echo","i":1}"#,
            br#"{ "i": 1, "op": "echo" }"#
        ));
        assert!(!same_json(
            br#"{"op":"echo","i":1}"#,
            br#"{"op":"echo","i":2}"#
        ));
        assert!(!same_json(b"not json", b"not json"));
    }
}
