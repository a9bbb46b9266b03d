//! The `hearth-perf` binary end to end: a scenario writes the documented JSON report.
//!
//! The `testhost` scenario boots the real QEMU test host, so this needs what `tests/testhost.rs`
//! needs: `cargo build --bins`, the static `hearth-init` and `hearth image`.

use std::process::Command;

/// Runs `hearth-perf ARGS --json FILE`, fails unless it succeeds, and returns its stdout and its
/// JSON report.
fn run_scenario(args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_hearth-perf"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run hearth-perf");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "--- stdout\n{stdout}--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "hearth-perf {} failed: {}",
        args.join(" "),
        out.status
    );
    let report =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON file")).expect("valid JSON");
    (stdout, report)
}

/// The report's metric `name` has `n` samples in `unit`, all above zero.
fn assert_measured(report: &serde_json::Value, name: &str, unit: &str, n: u64) {
    let metric = &report["metrics"][name];
    assert!(
        metric["min"].as_f64().is_some_and(|v| v > 0.0),
        "{name}.min = {}",
        metric["min"]
    );
    assert_eq!(metric["unit"], unit, "{name}");
    assert_eq!(metric["n"], n, "{name}");
}

#[test]
fn the_testhost_scenario_writes_the_json_report() {
    if let Err(err) = hearth_perf::testhost::find_hearth() {
        panic!("{err}: this test runs the real `hearth` binary; run `cargo build --bins` first");
    }
    let (stdout, report) = run_scenario(&["testhost", "--runs", "1"]);
    assert!(
        stdout.contains("end_to_end") && stdout.contains("p99"),
        "a table is printed"
    );
    assert_eq!(report["scenario"], "testhost");
    for field in ["cpu_model", "kernel", "kvm"] {
        assert!(report["machine"][field].is_string(), "machine.{field}");
    }
    assert!(report["machine"]["cores"].as_u64().is_some_and(|c| c >= 1));
    assert_eq!(report["machine"]["in_testhost"], false);
    let metric = &report["metrics"]["end_to_end"];
    for field in ["p50", "p90", "p99"] {
        assert!(
            metric[field].as_f64().is_some_and(|v| v > 0.0),
            "end_to_end.{field} = {}",
            metric[field]
        );
    }
    assert_eq!(metric["unit"], "ms");
    assert_eq!(metric["n"], 1);
}

#[test]
fn the_floor_scenario_measures_threads_and_process_chains() {
    let (_, report) = run_scenario(&["floor", "--callers", "1,8", "--windows", "2"]);
    assert_eq!(report["scenario"], "floor");
    let cpus = report["machine"]["cores"].as_u64().expect("machine.cores");
    let mut expected = vec![
        "floor_round_trip_same_cpu",
        "floor_chain3_same_cpu",
        "floor_chain4_same_cpu",
    ];
    if cpus > 1 {
        expected.extend([
            "floor_round_trip_cross_cpu",
            "floor_chain3_cross_cpu",
            "floor_chain4_cross_cpu",
        ]);
    }
    for name in expected {
        assert_measured(&report, name, "us", 2000);
    }
    // Invoke-shaped chains side by side, one figure per window at each level.
    for name in ["floor_invoke_rate_c1", "floor_invoke_rate_c8"] {
        assert_measured(&report, name, "inv/s", 2);
    }
    assert_eq!(report["parameters"]["rate_message_bytes"], 256);
}

/// `boot --floor` times the `kvm_floor` example (built static by `.ci/setup`) in the test host, or
/// on hardware KVM here: spawn to its `main` and to its guest's first exit, and each KVM step.
#[test]
fn the_boot_floor_scenario_times_the_least_a_vmm_can_do() {
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_hearth-perf"))
        .parent()
        .and_then(|debug| debug.parent())
        .expect("the target folder")
        .join(hearth_vmm::process::STATIC_VMM_SUBDIR)
        .join("examples/kvm_floor");
    assert!(
        built.is_file(),
        "{} is missing: run .ci/setup (it builds `kvm_floor` static next to `hearth-vmm`)",
        built.display()
    );
    let floor = std::path::absolute(&built).expect("an absolute path");
    let floor = floor.to_str().expect("a UTF-8 path");
    let (stdout, report) = run_scenario(&["boot", "--floor", floor, "--runs", "2"]);
    assert!(stdout.contains("floor 2: exec"), "each run is printed");
    assert_eq!(report["scenario"], "boot_floor");
    for name in [
        "spawn_to_exec",
        "spawn_to_first_exit",
        "kvm_open_to_vm",
        "vcpu_to_first_exit",
    ] {
        assert_measured(&report, name, "ms", 2);
    }
}
