//! `hearth-perf testhost --runs N`: how long the test host takes to run `/bin/true`, end to end and
//! by phase (packing the initramfs, QEMU start to the exit marker).

use crate::report::Report;
use crate::testhost::{TesthostConfig, run_timed};

/// `hearth-perf testhost` options.
#[derive(Debug, Clone, clap::Args)]
pub struct TesthostScenarioArgs {
    /// How many test hosts to boot.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The command to time.
    #[arg(long, default_value = "/bin/true")]
    pub command: String,
}

/// Boots the test host `runs` times and reports the timings.
pub fn run(args: &TesthostScenarioArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let mut total = Vec::new();
    let mut pack = Vec::new();
    let mut to_exit = Vec::new();
    let mut first_line = Vec::new();
    let mut size = Vec::new();
    let config = TesthostConfig::new(vec![args.command.clone()]);
    for run in 1..=args.runs {
        let outcome = run_timed(&config, &mut |line| {
            println!("  | {}", String::from_utf8_lossy(line))
        })?;
        anyhow::ensure!(
            outcome.code == 0,
            "`{}` exited with {} in the test host (run {run})",
            args.command,
            outcome.code
        );
        println!("run {run}: {} ms", outcome.total.as_millis());
        total.push(ms(outcome.total));
        pack.push(ms(outcome.pack));
        to_exit.push(ms(outcome.to_exit));
        if let Some(first) = outcome.first_line {
            first_line.push(ms(first));
        }
        size.push(outcome.initramfs_bytes as f64 / (1024.0 * 1024.0));
    }
    let mut report = Report::new("testhost", super::machine());
    report.parameter("runs", args.runs);
    report.parameter("command", args.command.clone());
    report.add("end_to_end", &total, "ms");
    report.add("pack_initramfs", &pack, "ms");
    report.add("qemu_start_to_exit_marker", &to_exit, "ms");
    report.add("qemu_start_to_first_line", &first_line, "ms");
    report.add("initramfs_size", &size, "MiB");
    Ok(report)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
