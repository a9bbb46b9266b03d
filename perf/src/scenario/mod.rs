//! The `hearth-perf` scenarios ([`api`], [`boot`], [`restore`], [`sandbox_invoke`], [`run_cold`], [`testhost`],
//! [`warm_invoke`], [`throughput`], [`cold_start`]) and what they share: the `--json FILE` report,
//! the machine description, and re-running a scenario inside the test host when this machine has
//! no hardware KVM.

pub mod api;
pub mod boot;
pub mod cold_start;
pub mod handoff;
pub mod lean_client;
pub mod restore;
pub mod run_cold;
pub mod sandbox_invoke;
pub mod testhost;
pub mod throughput;
pub mod warm_invoke;

use std::path::PathBuf;

use anyhow::Context as _;

use crate::machine::Machine;
use crate::report::Report;
use crate::testhost::{TesthostConfig, run_command};

/// Printed around the JSON report when a scenario runs inside the test host, so the outer
/// `hearth-perf` can copy it out of the console.
pub const REPORT_BEGIN: &str = "HEARTH-PERF-REPORT-BEGIN";
/// See [`REPORT_BEGIN`].
pub const REPORT_END: &str = "HEARTH-PERF-REPORT-END";

/// Options every scenario takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Common {
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE", global = true)]
    pub json: Option<PathBuf>,
    /// Print the JSON report between marker lines on stdout (used inside the test host).
    #[arg(long, hide = true, global = true)]
    pub print_json: bool,
}

/// This machine, as reports describe it.
pub fn machine() -> Machine {
    Machine::detect(kvm_description())
}

/// The kind of /dev/kvm, without the advice that follows it in `hearth doctor`.
pub fn kvm_description() -> String {
    let kind = hearth_vmm::kvm::detect_kind().to_string();
    kind.split(';').next().unwrap_or(&kind).trim().to_owned()
}

/// Whether this machine has hardware KVM.
pub fn has_hardware_kvm() -> bool {
    hearth_vmm::kvm::detect_kind().is_hardware()
}

/// Prints the report's table, writes its JSON where asked, and prints it between markers when
/// asked.
pub fn finish(report: &Report, common: &Common) -> anyhow::Result<()> {
    if !common.print_json {
        print!("{}", report.table());
    }
    if let Some(path) = &common.json {
        report.write_json(path)?;
        println!("report written to {}", path.display());
    }
    if common.print_json {
        println!("{REPORT_BEGIN}\n{}\n{REPORT_END}", report.to_json()?);
    }
    Ok(())
}

/// The arguments for running this same `hearth-perf` command inside the test host: the original
/// ones without `--json FILE` (the outer process writes the file) and with `--print-json`.
pub fn inner_args(args: &[String]) -> Vec<String> {
    let mut inner = Vec::with_capacity(args.len() + 1);
    let mut skip_value = false;
    for arg in args {
        if skip_value {
            skip_value = false;
        } else if arg == "--json" {
            skip_value = true;
        } else if !arg.starts_with("--json=") && arg != "--print-json" {
            inner.push(arg.clone());
        }
    }
    inner.push("--print-json".to_owned());
    inner
}

/// The last `bytes` (about: cut at a character boundary) of the text file at `path`; empty when
/// it cannot be read.
pub(crate) fn file_tail(path: &std::path::Path, bytes: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(bytes);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

/// Stops a child process the scenario started: SIGTERM, up to `grace` for it to exit, then
/// SIGKILL.
pub(crate) fn stop_child(child: &mut std::process::Child, grace: std::time::Duration) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs this `hearth-perf` command again inside the test host (with this binary packed), streams
/// its output, and returns the report it printed.
pub fn rerun_in_testhost(timeout_secs: u64) -> anyhow::Result<Report> {
    rerun_in_testhost_with(timeout_secs, Vec::new())
}

/// [`rerun_in_testhost`], with the files `with` (absolute paths) packed too, at the same paths.
/// The VMM executable that spawned VMMs run (`hearth_vmm::process::vmm_program`) is packed too,
/// where it is not `hearth` itself, so the scenario inside runs the same one.
pub fn rerun_in_testhost_with(timeout_secs: u64, with: Vec<PathBuf>) -> anyhow::Result<Report> {
    rerun_in_testhost_appending(timeout_secs, with, "")
}

/// [`rerun_in_testhost_with`], with `append` added to the test host kernel's command line (for
/// example `hugepages=N`).
pub fn rerun_in_testhost_appending(
    timeout_secs: u64,
    mut with: Vec<PathBuf>,
    append: &str,
) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("cannot find the hearth-perf binary to pack")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut argv = vec![exe.display().to_string()];
    argv.extend(inner_args(&args));
    let mut config = TesthostConfig::new(argv);
    config.with.push(exe);
    if let Ok(hearth) = crate::testhost::find_hearth() {
        let vmm = hearth_vmm::process::vmm_program(&hearth);
        if vmm != hearth && !with.contains(&vmm) {
            with.push(vmm);
        }
    }
    config.with.extend(with);
    config.timeout = Some(std::time::Duration::from_secs(timeout_secs));
    config.append = append.to_string();
    println!(
        "hearth-perf: /dev/kvm here is {}; running inside the test host",
        kvm_description()
    );
    let mut json = String::new();
    let mut inside = false;
    let code = run_command(&config, &mut |line| {
        let text = String::from_utf8_lossy(line);
        match text.trim() {
            REPORT_BEGIN => inside = true,
            REPORT_END => inside = false,
            _ if inside => {
                json.push_str(&text);
                json.push('\n');
            }
            _ => println!("{text}"),
        }
    })?;
    anyhow::ensure!(
        code == 0,
        "hearth-perf inside the test host exited with {code}"
    );
    anyhow::ensure!(
        !json.is_empty(),
        "hearth-perf inside the test host printed no report"
    );
    serde_json::from_str(&json).context("the report printed inside the test host is not valid JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn inner_args_drop_the_json_file() {
        assert_eq!(
            inner_args(&strings(&["boot", "--runs", "20", "--json", "out.json"])),
            strings(&["boot", "--runs", "20", "--print-json"])
        );
        assert_eq!(
            inner_args(&strings(&["--json=x", "boot"])),
            strings(&["boot", "--print-json"])
        );
        assert_eq!(
            inner_args(&strings(&["boot", "--print-json"])),
            strings(&["boot", "--print-json"])
        );
    }
}
