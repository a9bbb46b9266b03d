//! `hearth-perf boot --floor PATH`: the floor of a VMM's own share of a boot on this host. It runs
//! the `kvm_floor` example (`vmm/examples/kvm_floor.rs`: `/dev/kvm`, one VM, one 128 MiB memory
//! slot, one vCPU, `KVM_RUN` to the guest's first instruction, `hlt`) and times, from just before
//! the spawn: the child's `main` (the exec share) and its guest's first exit, on the shared
//! monotonic clock (the child reports when its `main` ran); each KVM step on the child's clock; and
//! when the parent saw each (later, on a one-CPU host: it runs when the child lets it).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context as _;

use crate::report::Report;

/// One run, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Spawn to the child's `main`.
    exec: f64,
    /// Spawn to the child's `main`, seen by the parent.
    exec_seen: f64,
    /// Spawn to the guest's first exit, seen by the parent.
    first_exit_seen: f64,
    /// The child's own marks from `main`: /dev/kvm open, VM created, memory slot set, vCPU set
    /// up, first exit.
    marks: [f64; 5],
}

/// Runs `floor` `runs` times, one after the other.
pub fn run(runs: usize, floor: &Path) -> anyhow::Result<Report> {
    println!("floor program: {}", floor.display());
    let mut samples = Vec::with_capacity(runs);
    for run in 1..=runs {
        let s = run_once(floor).with_context(|| format!("floor run {run} of {runs}"))?;
        println!(
            "floor {run}: exec {:.2} ms, first exit {:.2} ms (seen {:.2} / {:.2} ms; child: open {:.2}, VM {:.2}, memory {:.2}, vCPU {:.2}, exit {:.2} ms)",
            s.exec,
            s.exec + s.marks[4],
            s.exec_seen,
            s.first_exit_seen,
            s.marks[0],
            s.marks[1],
            s.marks[2],
            s.marks[3],
            s.marks[4]
        );
        samples.push(s);
    }
    let mut report = Report::new("boot_floor", super::super::machine());
    report.parameter("runs", runs);
    report.parameter("floor_program", floor.display().to_string());
    let ms = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    report.add("spawn_to_exec", &ms(&|s| s.exec), "ms");
    report.add("spawn_to_first_exit", &ms(&|s| s.exec + s.marks[4]), "ms");
    report.add("spawn_to_exec_seen", &ms(&|s| s.exec_seen), "ms");
    report.add(
        "spawn_to_first_exit_seen",
        &ms(&|s| s.first_exit_seen),
        "ms",
    );
    report.add("main_to_kvm_open", &ms(&|s| s.marks[0]), "ms");
    report.add("kvm_open_to_vm", &ms(&|s| s.marks[1] - s.marks[0]), "ms");
    report.add("vm_to_memory_slot", &ms(&|s| s.marks[2] - s.marks[1]), "ms");
    report.add(
        "memory_slot_to_vcpu",
        &ms(&|s| s.marks[3] - s.marks[2]),
        "ms",
    );
    report.add(
        "vcpu_to_first_exit",
        &ms(&|s| s.marks[4] - s.marks[3]),
        "ms",
    );
    report.add("main_to_first_exit", &ms(&|s| s.marks[4]), "ms");
    Ok(report)
}

fn run_once(floor: &Path) -> anyhow::Result<Sample> {
    let spawn_ns = monotonic_ns();
    let started = Instant::now();
    let mut child = Command::new(floor)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", floor.display()))?;
    let mut stdout = child.stdout.take().context("the child has no stdout")?;
    let mut byte = [0u8; 1];
    let got = stdout
        .read(&mut byte)
        .context("cannot read the child's output")?;
    let exec = started.elapsed();
    let first = byte[0];
    // The line ends at the first exit; EOF would come only after the VM's teardown.
    let mut rest = Vec::new();
    while !rest.ends_with(b"\n") {
        if stdout
            .read(&mut byte)
            .context("cannot read the child's output")?
            == 0
        {
            break;
        }
        rest.push(byte[0]);
    }
    let first_exit = started.elapsed();
    let rest = String::from_utf8_lossy(&rest).into_owned();
    let output = child
        .wait_with_output()
        .context("cannot wait for the child")?;
    anyhow::ensure!(
        output.status.success() && got == 1 && first == b'e',
        "{} failed ({}): {}",
        floor.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let (main_ns, marks) = parse_marks(&rest)
        .with_context(|| format!("unexpected output from {}: {rest:?}", floor.display()))?;
    Ok(Sample {
        exec: main_ns.saturating_sub(spawn_ns) as f64 / 1e6,
        exec_seen: exec.as_secs_f64() * 1000.0,
        first_exit_seen: first_exit.as_secs_f64() * 1000.0,
        marks,
    })
}

/// `CLOCK_MONOTONIC` in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// `x MAIN A B C D E\n`: `MAIN` in nanoseconds, and the marks (microseconds) as milliseconds.
fn parse_marks(line: &str) -> Option<(u64, [f64; 5])> {
    let mut words = line.trim().strip_prefix("x ")?.split(' ');
    let main_ns = words.next()?.parse::<u64>().ok()?;
    let mut marks = [0.0; 5];
    for m in &mut marks {
        *m = words.next()?.parse::<u64>().ok()? as f64 / 1000.0;
    }
    words.next().is_none().then_some((main_ns, marks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_a_clock_reading_and_five_microsecond_counts() {
        assert_eq!(
            parse_marks("x 7 1000 2000 2500 3000 4000\n"),
            Some((7, [1.0, 2.0, 2.5, 3.0, 4.0]))
        );
        assert_eq!(parse_marks("x 7 1 2 3 4"), None);
        assert_eq!(parse_marks("x 7 1 2 3 4 5 6"), None);
        assert_eq!(parse_marks("y 7 1 2 3 4 5"), None);
    }
}
