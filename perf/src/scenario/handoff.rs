//! The machine's floor for the hops of an invoke: a one-byte round trip over a Unix socket pair
//! between two threads with blocking reads, first on two CPUs, then both on one. Every warm invoke
//! crosses between processes several times (caller, agent core, the sandbox's init, the function),
//! so these bound what any platform can reach on this machine, and `warm-invoke` reports them
//! beside its own figures, measured in the same run.
//!
//! On a virtual machine whose idle vCPUs halt, waking a thread on another, idle CPU costs a trip
//! through the hypervisor; on one CPU it is a plain switch between threads.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::Context as _;

use crate::report::Report;

/// Round trips timed at each placement (after as many untimed).
const ROUND_TRIPS: usize = 2000;

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("cannot pin a thread to CPU {cpu}"))
}

/// `ROUND_TRIPS` round trips (µs each) between a thread on `a` and one on `b`.
fn round_trips(a: usize, b: usize) -> anyhow::Result<Vec<f64>> {
    let (mut near, mut far) = UnixStream::pair().context("cannot make a socket pair")?;
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(b)?;
        let mut byte = [0u8; 1];
        for _ in 0..2 * ROUND_TRIPS {
            far.read_exact(&mut byte)?;
            far.write_all(&byte)?;
        }
        Ok(())
    });
    let timed = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        pin(a)?;
        let mut byte = [7u8; 1];
        let mut samples = Vec::with_capacity(ROUND_TRIPS);
        for i in 0..2 * ROUND_TRIPS {
            let t = Instant::now();
            near.write_all(&byte)?;
            near.read_exact(&mut byte)?;
            if i >= ROUND_TRIPS {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    });
    let samples = timed
        .join()
        .map_err(|_| anyhow::anyhow!("the timing thread panicked"))??;
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(samples)
}

/// Adds `floor_round_trip_cross_cpu` and `floor_round_trip_same_cpu` (µs) to `report`; on a
/// machine with one CPU only the latter.
pub fn measure(report: &mut Report) -> anyhow::Result<()> {
    let cpus = hearth_agent::cores::allowed_cpus().context("cannot read this thread's CPUs")?;
    let first = *cpus.first().context("no CPU to run on")?;
    if let Some(&second) = cpus.get(1) {
        report.add(
            "floor_round_trip_cross_cpu",
            &round_trips(first, second)?,
            "us",
        );
    }
    report.add(
        "floor_round_trip_same_cpu",
        &round_trips(first, first)?,
        "us",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_placements_are_measured() {
        let mut report = Report::new("t", crate::scenario::machine());
        measure(&mut report).unwrap();
        let same = &report.metrics["floor_round_trip_same_cpu"];
        assert!(same.p50 > 0.0, "{same:?}");
        assert_eq!(same.unit, "us");
        let cpus = hearth_agent::cores::allowed_cpus().unwrap().len();
        assert_eq!(
            report.metrics.contains_key("floor_round_trip_cross_cpu"),
            cpus > 1
        );
    }
}
