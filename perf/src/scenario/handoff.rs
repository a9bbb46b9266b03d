//! The machine's floor for the hops of an invoke.
//!
//! - A one-byte round trip over a Unix socket pair between two threads with blocking reads, first
//!   on two CPUs, then both on one ([`measure`]).
//! - The same byte through a chain of processes, each a relay that passes it on to the next and
//!   the answer back ([`measure_chains`]): three processes stand for the hops of a warm invoke's
//!   platform overhead (caller, agent core, the sandbox's init), four for the whole invoke (the
//!   function too). The relays run on one CPU, as the agent pins a core and its sandboxes; the
//!   caller runs there too, then on another CPU. The relays are this executable run again
//!   ([`RELAY_COMMAND`]), so each is its own process with its own address space, as the real
//!   hops are, but does nothing else: no event loop, no parsing, no allocation.
//!
//! `warm-invoke` reports them beside its own figures, measured in the same run: they bound what
//! any platform with those hops can reach on this machine.
//!
//! On a virtual machine whose idle vCPUs halt, waking a thread on another, idle CPU costs a trip
//! through the hypervisor; on one CPU it is a plain switch between threads.

use std::io::{Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Sends a byte on `stream` and reads the answer `2 * ROUND_TRIPS` times; returns the last
/// `ROUND_TRIPS` round trips, µs each (the first ones warm the path up).
fn time_round_trips(stream: &mut UnixStream) -> anyhow::Result<Vec<f64>> {
    let mut byte = [7u8; 1];
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..2 * ROUND_TRIPS {
        let t = Instant::now();
        stream.write_all(&byte)?;
        stream.read_exact(&mut byte)?;
        if i >= ROUND_TRIPS {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(samples)
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
        time_round_trips(&mut near)
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

/// `hearth-perf floor`: the thread floor ([`measure`]) and the chain floor ([`measure_chains`])
/// alone, the relays run by this executable.
pub fn run() -> anyhow::Result<Report> {
    let mut report = Report::new("floor", super::machine());
    report.parameter("round_trips", ROUND_TRIPS);
    measure(&mut report)?;
    measure_chains(&mut report)?;
    Ok(report)
}

/// The hidden `hearth-perf` subcommand that runs one relay of a chain ([`relay`]).
pub const RELAY_COMMAND: &str = "hop-relay";

/// How long a relay may take to start listening.
const RELAY_START: Duration = Duration::from_secs(10);

/// One relay of a chain, pinned to `cpu`: listens on `listen`, takes one connection, then for
/// each byte it reads passes it to `next` and the answer back (with no `next`, answers at once),
/// until its caller closes the connection.
pub fn relay(listen: &Path, next: Option<&Path>, cpu: usize) -> anyhow::Result<()> {
    // A relay ends with the thread that started it, should that end without closing the chain
    // (the chains are measured on the thread that starts their relays).
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("cannot ask to end with the parent")?;
    pin(cpu)?;
    let listener = UnixListener::bind(listen)
        .with_context(|| format!("cannot listen on {}", listen.display()))?;
    let (mut upstream, _) = listener.accept().context("accepting the caller")?;
    let mut downstream = next
        .map(|path| {
            UnixStream::connect(path)
                .with_context(|| format!("cannot connect to the next relay {}", path.display()))
        })
        .transpose()?;
    let mut byte = [0u8; 1];
    loop {
        match upstream.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading from the caller"),
        }
        if let Some(next) = downstream.as_mut() {
            next.write_all(&byte).context("writing to the next relay")?;
            next.read_exact(&mut byte)
                .context("reading from the next relay")?;
        }
        upstream.write_all(&byte).context("answering the caller")?;
    }
}

/// Relay processes that end when dropped.
struct Relays(Vec<Child>);

impl Drop for Relays {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ROUND_TRIPS` round trips (µs each) of one byte from a caller thread on `caller_cpu` through
/// `processes - 1` relay processes on `relay_cpu` (`exe` run with [`RELAY_COMMAND`]).
fn chain_round_trips(
    exe: &Path,
    processes: usize,
    caller_cpu: usize,
    relay_cpu: usize,
) -> anyhow::Result<Vec<f64>> {
    anyhow::ensure!(
        processes >= 2,
        "a chain has a caller and at least one relay"
    );
    let dir = tempfile::Builder::new()
        .prefix("hearth-perf-chain-")
        .tempdir()
        .context("cannot make a folder for the relays' sockets")?;
    let socket = |i: usize| -> PathBuf { dir.path().join(format!("relay-{i}")) };
    let mut relays = Relays(Vec::new());
    // The last relay first, so that each finds its next one listening.
    for i in (0..processes - 1).rev() {
        let mut command = Command::new(exe);
        command
            .arg(RELAY_COMMAND)
            .arg("--listen")
            .arg(socket(i))
            .arg("--cpu")
            .arg(relay_cpu.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if i + 2 < processes {
            command.arg("--next").arg(socket(i + 1));
        }
        relays.0.push(
            command
                .spawn()
                .with_context(|| format!("cannot start a relay ({})", exe.display()))?,
        );
        let since = Instant::now();
        while !socket(i).exists() {
            anyhow::ensure!(
                since.elapsed() < RELAY_START,
                "relay {i} did not listen on {} within {RELAY_START:?}",
                socket(i).display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let first = socket(0);
    let timed = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        pin(caller_cpu)?;
        let mut stream = UnixStream::connect(&first)
            .with_context(|| format!("cannot connect to {}", first.display()))?;
        time_round_trips(&mut stream)
    });
    let samples = timed
        .join()
        .map_err(|_| anyhow::anyhow!("the timing thread panicked"))??;
    drop(relays);
    Ok(samples)
}

/// Adds the chain floors (µs) to `report`: `floor_chain3_same_cpu` and `floor_chain4_same_cpu`
/// (a caller and two or three relays, all on one CPU) and, on a machine with a second CPU,
/// `floor_chain3_cross_cpu` and `floor_chain4_cross_cpu` (the caller on the other CPU). The
/// relays are this executable (`hearth-perf`) run with [`RELAY_COMMAND`].
pub fn measure_chains(report: &mut Report) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable to run the relays")?;
    let cpus = hearth_agent::cores::allowed_cpus().context("cannot read this thread's CPUs")?;
    let first = *cpus.first().context("no CPU to run on")?;
    for processes in [3, 4] {
        report.add(
            &format!("floor_chain{processes}_same_cpu"),
            &chain_round_trips(&exe, processes, first, first)?,
            "us",
        );
        if let Some(&second) = cpus.get(1) {
            report.add(
                &format!("floor_chain{processes}_cross_cpu"),
                &chain_round_trips(&exe, processes, second, first)?,
                "us",
            );
        }
    }
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
