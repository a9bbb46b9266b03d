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
//! - The rate at which chains shaped like a warm invoke can run side by side, at saturation
//!   ([`measure_rates`]): a caller thread, an agent relay, an init relay and a runtime relay. The
//!   init relay starts the runtime relay as its child and serves it over loopback TCP as an init
//!   serves the Lambda Runtime API: the runtime's `GET /next` waits for the event, then the runtime
//!   posts the response and the init answers `202` before it passes the result back, and the
//!   runtime asks for the next event. Every message is [`RATE_MESSAGE`] bytes; nothing is pinned.
//!
//! `warm-invoke` reports the round trips beside its own figures, and `throughput` the rates at its
//! own levels, measured in the same run: they bound what any platform with those hops can reach on
//! this machine.
//!
//! On a virtual machine whose idle vCPUs halt, waking a thread on another, idle CPU costs a trip
//! through the hypervisor; on one CPU it is a plain switch between threads.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// `hearth-perf floor` options.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Invoke-shaped chains running side by side, one level after the other (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8, 64])]
    pub callers: Vec<usize>,
    /// Timed one-second windows at each level of `--callers`.
    #[arg(long, default_value_t = 5)]
    pub windows: usize,
}

/// `hearth-perf floor`: the thread floor ([`measure`]), the chain floor ([`measure_chains`]) and
/// the rate floor ([`measure_rates`]) alone, the relays run by this executable.
pub fn run(args: &FloorArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !args.callers.is_empty() && args.callers.iter().all(|&c| c > 0),
        "--callers must be positive"
    );
    anyhow::ensure!(args.windows > 0, "--windows must be at least 1");
    let mut report = Report::new("floor", super::machine());
    report.parameter("round_trips", ROUND_TRIPS);
    report.parameter("callers", args.callers.clone());
    report.parameter("windows", args.windows);
    report.parameter("rate_message_bytes", RATE_MESSAGE);
    measure(&mut report)?;
    measure_chains(&mut report)?;
    measure_rates(&mut report, &args.callers, args.windows)?;
    Ok(report)
}

/// The hidden `hearth-perf` subcommand that runs one relay of a chain ([`relay`]).
pub const RELAY_COMMAND: &str = "hop-relay";

/// How long a relay may take to start listening.
const RELAY_START: Duration = Duration::from_secs(10);

/// Bytes in each message of an invoke-shaped chain: about a small invoke's frame or Runtime API
/// exchange.
pub const RATE_MESSAGE: usize = 256;

/// What a relay does with what it reads (`hearth-perf hop-relay --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayRole {
    /// Passes each message to the next relay and the answer back; with no next relay, answers
    /// at once.
    Pass,
    /// Starts a [`RelayRole::Runtime`] relay as its child and serves it over loopback TCP as an
    /// init serves the Runtime API, passing each message from its caller to it as an event.
    Init,
    /// Connects to its init relay over TCP and runs the Runtime API's loop against it.
    Runtime,
}

/// How one relay runs (`hearth-perf hop-relay`).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// What the relay does.
    #[arg(long, value_enum, default_value_t = RelayRole::Pass)]
    pub role: RelayRole,
    /// The Unix socket to listen on (`pass`, `init`).
    #[arg(long)]
    pub listen: Option<PathBuf>,
    /// The next relay's socket (`pass`).
    #[arg(long)]
    pub next: Option<PathBuf>,
    /// The init relay's TCP address (`runtime`).
    #[arg(long)]
    pub connect: Option<SocketAddr>,
    /// The CPU to run on; by default wherever the scheduler puts it.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Bytes in each message.
    #[arg(long, default_value_t = 1)]
    pub size: usize,
}

/// Reads exactly `buf.len()` bytes; `false` where the peer closed the stream before the first.
fn read_message(stream: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match stream.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// One relay of a chain ([`RelayArgs`]): runs until its caller closes the connection.
pub fn relay(args: &RelayArgs) -> anyhow::Result<()> {
    // A relay ends with the thread that started it, should that end without closing the chain
    // (the chains are measured on the thread that starts their relays).
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("cannot ask to end with the parent")?;
    if let Some(cpu) = args.cpu {
        pin(cpu)?;
    }
    anyhow::ensure!(args.size > 0, "--size must be positive");
    let mut message = vec![0u8; args.size];
    let listen = || -> anyhow::Result<UnixStream> {
        let path = args.listen.as_deref().context("this role needs --listen")?;
        // The socket appears at `path` only once it listens: its file exists from the bind, a
        // moment before the listen, and a caller that came in between would be refused.
        let binding = path.with_extension("binding");
        let listener = UnixListener::bind(&binding)
            .with_context(|| format!("cannot listen on {}", binding.display()))?;
        std::fs::rename(&binding, path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        Ok(listener.accept().context("accepting the caller")?.0)
    };
    match args.role {
        RelayRole::Pass => {
            let mut upstream = listen()?;
            let mut downstream = args
                .next
                .as_deref()
                .map(|path| {
                    UnixStream::connect(path).with_context(|| {
                        format!("cannot connect to the next relay {}", path.display())
                    })
                })
                .transpose()?;
            while read_message(&mut upstream, &mut message).context("reading from the caller")? {
                if let Some(next) = downstream.as_mut() {
                    next.write_all(&message)
                        .context("writing to the next relay")?;
                    next.read_exact(&mut message)
                        .context("reading from the next relay")?;
                }
                upstream
                    .write_all(&message)
                    .context("answering the caller")?;
            }
            Ok(())
        }
        RelayRole::Init => init_relay(args, listen, &mut message),
        RelayRole::Runtime => {
            let at = args.connect.context("the runtime role needs --connect")?;
            let mut api = TcpStream::connect(at)
                .with_context(|| format!("cannot connect to the init relay at {at}"))?;
            api.set_nodelay(true).context("TCP_NODELAY")?;
            // GET /next; the event; POST the response; its 202; GET /next again.
            api.write_all(&message)
                .context("asking for the first event")?;
            while read_message(&mut api, &mut message).context("reading an event")? {
                api.write_all(&message).context("posting the response")?;
                api.read_exact(&mut message).context("reading the 202")?;
                api.write_all(&message)
                    .context("asking for the next event")?;
            }
            Ok(())
        }
    }
}

/// The [`RelayRole::Init`] relay: starts its runtime relay, takes its first `GET /next`, and only
/// then listens for its caller (so a listening socket means a ready chain).
fn init_relay(
    args: &RelayArgs,
    listen: impl FnOnce() -> anyhow::Result<UnixStream>,
    message: &mut [u8],
) -> anyhow::Result<()> {
    let api = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot listen on loopback")?;
    let at = api.local_addr().context("the Runtime API's address")?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut runtime = Command::new(&exe);
    runtime
        .arg(RELAY_COMMAND)
        .arg("--role")
        .arg("runtime")
        .arg("--connect")
        .arg(at.to_string())
        .arg("--size")
        .arg(message.len().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(cpu) = args.cpu {
        runtime.arg("--cpu").arg(cpu.to_string());
    }
    let _runtime = Relays(vec![runtime.spawn().with_context(|| {
        format!("cannot start the runtime relay ({})", exe.display())
    })?]);
    let (mut runtime, _) = api.accept().context("accepting the runtime relay")?;
    runtime.set_nodelay(true).context("TCP_NODELAY")?;
    anyhow::ensure!(
        read_message(&mut runtime, message).context("reading the first GET /next")?,
        "the runtime relay closed before its first GET /next"
    );
    let mut upstream = listen()?;
    while read_message(&mut upstream, message).context("reading from the caller")? {
        runtime.write_all(message).context("sending the event")?;
        runtime
            .read_exact(message)
            .context("reading the response")?;
        runtime.write_all(message).context("answering 202")?;
        upstream
            .write_all(message)
            .context("answering the caller")?;
        anyhow::ensure!(
            read_message(&mut runtime, message).context("reading GET /next")?,
            "the runtime relay closed instead of asking for the next event"
        );
    }
    Ok(())
}

/// Relay processes that end when dropped.
struct Relays(Vec<Child>);

impl Relays {
    /// Starts `exe` [`RELAY_COMMAND`] `--listen listen ARGS` and waits until it listens.
    fn start(
        &mut self,
        exe: &Path,
        args: &[&std::ffi::OsStr],
        listen: &Path,
    ) -> anyhow::Result<()> {
        let child = Command::new(exe)
            .arg(RELAY_COMMAND)
            .arg("--listen")
            .arg(listen)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start a relay ({})", exe.display()))?;
        self.0.push(child);
        let since = Instant::now();
        while !listen.exists() {
            anyhow::ensure!(
                since.elapsed() < RELAY_START,
                "a relay did not listen on {} within {RELAY_START:?}",
                listen.display()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

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
        let cpu = relay_cpu.to_string();
        let next = socket(i + 1);
        let mut args = vec!["--cpu".as_ref(), cpu.as_ref()];
        if i + 2 < processes {
            args.extend(["--next".as_ref(), next.as_os_str()]);
        }
        relays.start(exe, &args, &socket(i))?;
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

/// How long a rate level runs untimed first (the chains' first invokes, the caches).
const RATE_WARM_UP: Duration = Duration::from_millis(500);

/// Invokes per second (one figure per one-second window, `windows` of them) of `callers`
/// invoke-shaped chains side by side ([`RelayRole`]: a caller thread here, then `pass`, `init` and
/// its `runtime`), each caller sending its next message as soon as the last came back.
fn chain_rates(exe: &Path, callers: usize, windows: usize) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::Builder::new()
        .prefix("hearth-perf-rate-")
        .tempdir()
        .context("cannot make a folder for the relays' sockets")?;
    let size = RATE_MESSAGE.to_string();
    let mut relays = Relays(Vec::new());
    let mut streams = Vec::with_capacity(callers);
    for chain in 0..callers {
        let agent = dir.path().join(format!("agent-{chain}"));
        let init = dir.path().join(format!("init-{chain}"));
        relays.start(
            exe,
            &[
                "--role".as_ref(),
                "init".as_ref(),
                "--size".as_ref(),
                size.as_ref(),
            ],
            &init,
        )?;
        relays.start(
            exe,
            &[
                "--next".as_ref(),
                init.as_os_str(),
                "--size".as_ref(),
                size.as_ref(),
            ],
            &agent,
        )?;
        streams.push(
            UnixStream::connect(&agent)
                .with_context(|| format!("cannot connect to {}", agent.display()))?,
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let (done, stop) = (done.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut message = [7u8; RATE_MESSAGE];
                while !stop.load(Ordering::Relaxed) {
                    stream.write_all(&message)?;
                    stream.read_exact(&mut message)?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(RATE_WARM_UP);
    let mut rates = Vec::with_capacity(windows);
    for _ in 0..windows {
        let (before, since) = (done.load(Ordering::Relaxed), Instant::now());
        std::thread::sleep(Duration::from_secs(1));
        let invokes = done.load(Ordering::Relaxed) - before;
        rates.push(invokes as f64 / since.elapsed().as_secs_f64());
    }
    stop.store(true, Ordering::Relaxed);
    for caller in loops {
        caller
            .join()
            .map_err(|_| anyhow::anyhow!("a caller thread panicked"))?
            .context("a chain broke")?;
    }
    drop(relays);
    Ok(rates)
}

/// Adds `floor_invoke_rate_c{N}` (invokes/s, one figure per window) for each `N` of `callers` to
/// `report`: `N` invoke-shaped chains of bare processes side by side (see [`RelayRole`]), the relays
/// this executable (`hearth-perf`) run with [`RELAY_COMMAND`].
pub fn measure_rates(report: &mut Report, callers: &[usize], windows: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable to run the relays")?;
    for &n in callers {
        report.add(
            &format!("floor_invoke_rate_c{n}"),
            &chain_rates(&exe, n, windows).with_context(|| format!("{n} invoke-shaped chains"))?,
            "inv/s",
        );
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
