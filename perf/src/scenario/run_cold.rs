//! `hearth-perf run-cold --runs N [--sandbox container|microvm]`: the cold start of `hearth run`,
//! the binary itself, as a user sees it: from spawning `hearth run --code echo.zip --event ...`
//! to its response on stdout, and to its exit (a fresh sandbox, the function's init, one invoke,
//! the sandbox's teardown). Also the init duration `hearth run` reports on its REPORT line.
//!
//! The echo function comes from `hearth_agent::testing` (the `lambda_runtime` crate, static). The
//! microVM one re-runs itself inside the test host where this machine has no hardware KVM.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hearth_agent::sandbox::run::SandboxKind;
use hearth_agent::testing;

use super::sandbox_invoke::kind_name;
use crate::report::Report;

/// `hearth-perf run-cold` options.
#[derive(Debug, Clone, clap::Args)]
pub struct RunColdArgs {
    /// How many `hearth run` processes, one after the other.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// The sandbox `hearth run` uses.
    #[arg(long, value_enum, default_value_t = SandboxKind::Container)]
    pub sandbox: SandboxKind,
    /// The longest one `hearth run` may take, in seconds.
    #[arg(long, default_value_t = 300)]
    pub run_timeout: u64,
    /// The time limit for the whole run inside the test host, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub testhost_timeout: u64,
}

/// One `hearth run`'s times, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    to_response: f64,
    to_exit: f64,
    init_duration: Option<f64>,
}

/// Runs the scenario (the microVM one inside the test host where there is no hardware KVM).
pub fn run(args: &RunColdArgs) -> anyhow::Result<Report> {
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
    let hearth = crate::testhost::find_hearth()?;
    let init = hearth_guest::image::locate_init()?;
    let mut samples = Vec::with_capacity(args.runs);
    for i in 1..=args.runs {
        let sample = run_once(args, &hearth, &init, &zip, i)
            .with_context(|| format!("hearth run {i} of {}", args.runs))?;
        println!(
            "run {i}: response {:.1} ms, exit {:.1} ms, init duration {}",
            sample.to_response,
            sample.to_exit,
            sample
                .init_duration
                .map_or("-".to_owned(), |d| format!("{d:.1} ms"))
        );
        samples.push(sample);
    }
    let mut report = Report::new("run_cold", super::machine());
    report.parameter("sandbox", kind_name(args.sandbox));
    report.parameter("runs", args.runs);
    report.parameter("function", "echo (lambda_runtime, static), 256 MB");
    let of = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    report.add("start_to_response", &of(|s| s.to_response), "ms");
    report.add("start_to_exit", &of(|s| s.to_exit), "ms");
    let init: Vec<f64> = samples.iter().filter_map(|s| s.init_duration).collect();
    report.add("reported_init_duration", &init, "ms");
    Ok(report)
}

fn run_once(
    args: &RunColdArgs,
    hearth: &Path,
    init: &Path,
    zip: &Path,
    i: usize,
) -> anyhow::Result<Sample> {
    let event = format!(r#"{{"op":"echo","run":{i}}}"#);
    let started = Instant::now();
    let mut child = Command::new(hearth)
        .args(["run", "--sandbox", kind_name(args.sandbox), "--code"])
        .arg(zip)
        .arg("--init")
        .arg(init)
        .args([
            "--memory",
            "256",
            "--timeout",
            "60",
            "--init-timeout",
            "120",
        ])
        .args(["--event", &event])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {} run", hearth.display()))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        anyhow::bail!("hearth run's output pipes are missing");
    };
    let stderr_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    // The first stdout line and when it came.
    let stdout_reader = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        (line, started.elapsed())
    });
    let limit = Duration::from_secs(args.run_timeout);
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait for hearth run")? {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr_reader.join().unwrap_or_default();
            anyhow::bail!("hearth run took over {limit:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let to_exit = started.elapsed();
    let (response, to_response) = stdout_reader
        .join()
        .map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?;
    let stderr = stderr_reader.join().unwrap_or_default();
    anyhow::ensure!(
        status.success(),
        "hearth run exited with {status}; stdout: {response}\nstderr:\n{stderr}"
    );
    let got: serde_json::Value = serde_json::from_str(response.trim())
        .with_context(|| format!("hearth run's response is not JSON: {response}"))?;
    let want: serde_json::Value = serde_json::from_str(&event)?;
    anyhow::ensure!(
        got == want,
        "hearth run answered {got}, not the echo of {want}"
    );
    Ok(Sample {
        to_response: ms(to_response),
        to_exit: ms(to_exit),
        init_duration: report_init_duration(&stderr),
    })
}

/// The `Init Duration: N ms` of `hearth run`'s REPORT line.
fn report_init_duration(stderr: &str) -> Option<f64> {
    let report = stderr.lines().rev().find(|l| l.starts_with("REPORT "))?;
    let rest = report.split("Init Duration: ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_duration_comes_from_the_report_line() {
        let stderr = "echo function init\nREPORT RequestId: r\tDuration: 1.20 ms\tBilled Duration: 2 ms\tMemory Size: 256 MB\tMax Memory Used: 3 MB\tInit Duration: 41.50 ms\n";
        assert_eq!(report_init_duration(stderr), Some(41.5));
        assert_eq!(
            report_init_duration("REPORT RequestId: r\tDuration: 1 ms\n"),
            None
        );
        assert_eq!(report_init_duration("no report"), None);
    }
}
