//! `hearth-perf boot --runs N`: boots microVMs with the VMM executable (`hearth-vmm`, or `hearth
//! vmm`; `--vmm-program` picks one) through the VMM's Rust API and measures, from the VMM
//! process's start: the VM built and its control socket up, the vCPUs running, the guest's init
//! started, and the init's vsock `Ready`; and the VMM process's RSS and PSS with an idle guest,
//! with and without guest RAM.
//!
//! `--cmdline` adds to the guests' kernel command line and `--serial-log` prints each guest's
//! console with the time each line arrived (with `initcall_debug`, where the kernel's time goes);
//! `--floor PATH` times the `kvm_floor` example instead (`floor`: the least a VMM can take to its
//! guest's first instruction on this host).
//!
//! Where this machine has no hardware KVM, the scenario re-runs itself inside the test host.

mod floor;

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hearth_guest::image::{self, KernelImage};
use hearth_guest::protocol::{READY_PORT, Ready, client};
use hearth_vmm::config::{HugePages, VmConfig, VsockConfig};
use hearth_vmm::process::VmmProcess;

use crate::memory;
use crate::report::Report;

/// `hearth-perf boot` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BootArgs {
    /// How many microVMs to boot, one after the other.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// How long one guest may take to report ready, in seconds.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout: u64,
    /// How long the guest idles before its memory is measured, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub idle_ms: u64,
    /// The VMM executable to run (`hearth` or `hearth-vmm`, run with `vmm`); default: the one
    /// `hearth_vmm::process::vmm_program` picks (the static `hearth-vmm` where it is built).
    #[arg(long)]
    pub vmm_program: Option<PathBuf>,
    /// Back guest RAM with 2 MiB pages of the hugetlbfs pool (the host needs `vm.nr_hugepages`
    /// of at least the guest's memory; the test host is booted with that pool). Those pages,
    /// which Linux leaves out of RSS, are counted as guest RAM.
    #[arg(long)]
    pub hugetlb: bool,
    /// Print each VMM's log (its stderr) after its boot: with `HEARTH_LOG=hearth_vmm=debug`, the
    /// timing of each start-up step.
    #[arg(long)]
    pub vmm_log: bool,
    /// The time limit for the whole run inside the test host, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub testhost_timeout: u64,
    /// Extra kernel command line for every guest (after the VMM's base command line), e.g.
    /// `initcall_debug printk.time=1`.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Print each guest's serial console log after its boot, each line with the time it reached
    /// the log file (ms from the VMM's start; the file is polled every millisecond, which takes a
    /// little CPU from the guest).
    #[arg(long)]
    pub serial_log: bool,
    /// Instead of booting guests, time the floor of a VMM's own share: run the `kvm_floor` example
    /// (an absolute path to its static build) `--runs` times and measure spawn to its `main` and
    /// spawn to its guest's first exit (`hlt`, the first instruction).
    #[arg(long)]
    pub floor: Option<PathBuf>,
}

/// One boot's measurements, in milliseconds from the VMM process's start, and memory in KiB.
#[derive(Debug, Clone, Copy)]
struct Sample {
    control_ready: f64,
    running: f64,
    guest_init: f64,
    vsock_ready: f64,
    /// The guest's own clock (CLOCK_BOOTTIME) when its init started. In the test host it reads
    /// seconds less than the host's clock over the same span (2-4 s less in traced boots), most
    /// likely because the kernel keeps time with jiffies until it switches to kvm-clock (an
    /// fs_initcall) and loses the ticks it misses while its vCPU is held up; the guest's printk
    /// times are no better. `vm_running_to_guest_init`, timed by the host, is the kernel's share.
    kernel_to_init: f64,
    memory: memory::ProcessMemory,
}

/// Runs the scenario here on hardware KVM, else inside the test host.
pub fn run(args: &BootArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    if !super::has_hardware_kvm() {
        anyhow::ensure!(
            std::env::var_os("HEARTH_IN_TESTHOST").is_none(),
            "inside the test host /dev/kvm must be hardware KVM, but it is {}",
            super::kvm_description()
        );
        // The VMM executable is packed at its path, where the scenario inside finds it again.
        let hearth = crate::testhost::find_hearth()?;
        let vmm = match &args.vmm_program {
            Some(p) => std::path::absolute(p).context("the --vmm-program path")?,
            None => hearth_vmm::process::vmm_program(&hearth),
        };
        let mut with = if vmm == hearth { Vec::new() } else { vec![vmm] };
        if let Some(floor) = &args.floor {
            anyhow::ensure!(
                floor.is_absolute(),
                "--floor needs an absolute path (it is packed into the test host at that path)"
            );
            with.push(floor.clone());
        }
        // One guest at a time: a pool of its RAM in 2 MiB pages, and a few more.
        let append = if args.hugetlb {
            format!("hugepages={}", args.memory / 2 + 4)
        } else {
            String::new()
        };
        return super::rerun_in_testhost_appending(args.testhost_timeout, with, &append);
    }
    if let Some(floor) = &args.floor {
        return floor::run(args.runs, floor);
    }
    let hearth = crate::testhost::find_hearth()?;
    let vmm_program = match &args.vmm_program {
        Some(p) => std::path::absolute(p).context("the --vmm-program path")?,
        None => hearth_vmm::process::vmm_program(&hearth),
    };
    println!("VMM program: {}", vmm_program.display());
    let kernel = KernelImage::locate()
        .context("the guest kernel is not in the cache: run `hearth image`")?;
    let init = image::locate_init()?;
    let work = tempfile::Builder::new()
        .prefix("hearth-perf-boot-")
        .tempdir()
        .context("cannot make a work folder")?;
    let initrd = work.path().join("initramfs.cpio");
    std::fs::write(&initrd, image::guest_initramfs(&kernel, &init)?)
        .context("cannot write the guest initramfs")?;
    let ranges_kib: Vec<u64> = hearth_vmm::arch::memory::ram_ranges(u64::from(args.memory) << 20)
        .iter()
        .map(|(_, len)| *len as u64 / 1024)
        .collect();

    let mut samples = Vec::with_capacity(args.runs);
    for run in 1..=args.runs {
        let sample = boot_once(
            args,
            &vmm_program,
            kernel.boot_image(),
            &initrd,
            &work.path().join(format!("vm{run}")),
            &ranges_kib,
        )
        .with_context(|| format!("boot {run} of {}", args.runs))?;
        println!(
            "boot {run}: running {:.1} ms, init {:.1} ms, vsock ready {:.1} ms, VMM RSS {} KiB (without guest RAM {} KiB)",
            sample.running,
            sample.guest_init,
            sample.vsock_ready,
            sample.memory.rss_kib,
            sample.memory.own_rss_kib()
        );
        samples.push(sample);
    }

    let mut report = Report::new("boot", super::machine());
    report.parameter("runs", args.runs);
    report.parameter("memory_mib", args.memory);
    report.parameter("vcpus", args.vcpus);
    report.parameter("vmm_program", vmm_program.display().to_string());
    report.parameter("kernel", kernel.package.clone() + " " + &kernel.version);
    let ms = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    let mib = |f: fn(&memory::ProcessMemory) -> u64| {
        samples
            .iter()
            .map(|s| f(&s.memory) as f64 / 1024.0)
            .collect::<Vec<_>>()
    };
    report.add("start_to_control_ready", &ms(|s| s.control_ready), "ms");
    report.add("start_to_vm_running", &ms(|s| s.running), "ms");
    report.add("start_to_guest_init", &ms(|s| s.guest_init), "ms");
    report.add("start_to_vsock_ready", &ms(|s| s.vsock_ready), "ms");
    report.add("guest_kernel_to_init", &ms(|s| s.kernel_to_init), "ms");
    report.add(
        "vm_running_to_guest_init",
        &ms(|s| s.guest_init - s.running),
        "ms",
    );
    report.add("vmm_rss", &mib(|m| m.rss_kib), "MiB");
    report.add("vmm_pss", &mib(|m| m.pss_kib), "MiB");
    report.add("guest_ram_rss", &mib(|m| m.guest_rss_kib), "MiB");
    report.add(
        "vmm_rss_without_guest_ram",
        &mib(memory::ProcessMemory::own_rss_kib),
        "MiB",
    );
    report.add(
        "vmm_pss_without_guest_ram",
        &mib(memory::ProcessMemory::own_pss_kib),
        "MiB",
    );
    if samples
        .iter()
        .any(|s| s.memory.guest_mappings != ranges_kib.len())
    {
        println!(
            "note: the guest RAM mappings were not all recognized in /proc/PID/smaps; *_without_guest_ram may include guest RAM"
        );
    }
    Ok(report)
}

fn boot_once(
    args: &BootArgs,
    vmm_program: &Path,
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    ranges_kib: &[u64],
) -> anyhow::Result<Sample> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let uds = dir.join("vsock.sock");
    let ready_listener = UnixListener::bind(socket_for_port(&uds, READY_PORT))
        .context("cannot listen for the guest's ready connection")?;
    ready_listener
        .set_nonblocking(true)
        .context("cannot make the ready listener non-blocking")?;
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd.to_path_buf());
    config.mem_mib = args.memory;
    config.vcpus = args.vcpus;
    config.cmdline_extra = args.cmdline.clone();
    if args.hugetlb {
        config.huge_pages = HugePages::Hugetlb;
    }
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds,
    });
    config.serial_log = Some(dir.join("serial.log"));
    config.control_socket = Some(dir.join("control.sock"));

    let started = Instant::now();
    let timeline = args
        .serial_log
        .then(|| SerialTimeline::start(dir.join("serial.log"), started));
    let mut vmm = VmmProcess::spawn_program(vmm_program, &config)?;
    let control_ready = started.elapsed();
    vmm.start()?;
    let running = started.elapsed();
    let (stream, ready) = match wait_ready(
        &ready_listener,
        &mut vmm,
        Duration::from_secs(args.ready_timeout),
        Duration::from_millis(100),
    ) {
        Ok(found) => found,
        Err(err) => {
            let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
            let tail: Vec<&str> = serial
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(err.context(format!(
                "guest serial log (last lines):\n{}\nVMM stderr:\n{}",
                tail.join("\n"),
                vmm.stderr_tail()
            )));
        }
    };
    let vsock_ready = started.elapsed();
    if args.vmm_log {
        println!("VMM log:\n{}", vmm.stderr_tail().trim_end());
    }
    if let Some(timeline) = timeline {
        println!("guest serial log (ms from the VMM's start when the line was seen):");
        for (at, line) in timeline.finish() {
            println!("{at:9.1} {line}");
        }
    }
    let init_to_ready = Duration::from_millis(ready.ready_ms.saturating_sub(ready.init_start_ms));
    let guest_init = vsock_ready.saturating_sub(init_to_ready);

    std::thread::sleep(Duration::from_millis(args.idle_ms));
    let memory = memory::read(vmm.pid(), ranges_kib)?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Err(err) = vmm.stop() {
        println!("warning: the VMM did not stop cleanly ({err}); killing it");
        vmm.kill()?;
    }
    Ok(Sample {
        control_ready: ms(control_ready),
        running: ms(running),
        guest_init: ms(guest_init),
        vsock_ready: ms(vsock_ready),
        kernel_to_init: ready.init_start_ms as f64,
        memory,
    })
}

/// The guest's serial log, polled every millisecond: each line with when it was first seen. The
/// polling stops when this is finished or dropped.
struct SerialTimeline {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, String)>>>,
}

impl SerialTimeline {
    fn start(path: PathBuf, started: Instant) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut seen = 0;
            loop {
                let done = flag.load(Ordering::Relaxed);
                let text = std::fs::read(&path).unwrap_or_default();
                let at = ms(started.elapsed());
                let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                let upto = if done { text.len() } else { complete };
                if upto > seen {
                    for line in String::from_utf8_lossy(&text[seen..upto]).lines() {
                        lines.push((at, line.to_owned()));
                    }
                    seen = upto;
                }
                if done {
                    return lines;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        SerialTimeline {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(f64, String)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for SerialTimeline {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where the VMM's vsock backend delivers guest connections to host port `port`: `<uds>_<port>`.
fn socket_for_port(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Accepts the init's ready connection and reads its `Ready`, failing when the VMM exits first or
/// the time is up. It sleeps in `poll` up to `tick` between checks of the VMM: a busy wait here
/// steals the test host's only CPU from the guest being measured.
pub(super) fn wait_ready(
    listener: &UnixListener,
    vmm: &mut VmmProcess,
    limit: Duration,
    tick: Duration,
) -> anyhow::Result<(UnixStream, Ready)> {
    let (stream, _, ready) = accept_ready(listener, limit, tick, || {
        if let Some(status) = vmm.wait(Duration::ZERO)? {
            anyhow::bail!("the VMM exited ({status}) before the guest was ready");
        }
        Ok(())
    })?;
    Ok((stream, ready))
}

/// Accepts the init's ready connection on `listener` (non-blocking) and reads its `Hello` and
/// `Ready`; returns the connection, when it was accepted, and the `Ready`. Between polls of up to
/// `tick` it asks `go_on` whether waiting still makes sense (its error ends the wait); it fails
/// after `limit`.
pub(super) fn accept_ready(
    listener: &UnixListener,
    limit: Duration,
    tick: Duration,
    mut go_on: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(UnixStream, Instant, Ready)> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = Instant::now() + limit;
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: i64::from(tick.min(Duration::from_millis(999)).subsec_nanos()),
    };
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let at = Instant::now();
                stream
                    .set_nonblocking(false)
                    .context("cannot make the ready connection blocking")?;
                stream
                    .set_read_timeout(Some(limit))
                    .context("cannot set a read timeout")?;
                let (_hello, ready) =
                    client::read_ready(&mut stream).context("the init's ready message")?;
                return Ok((stream, at, ready));
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {}
            Err(err) => return Err(err).context("cannot accept the guest's ready connection"),
        }
        go_on()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guest did not report ready within {} s",
            limit.as_secs()
        );
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&tick)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err).context("cannot wait for the guest's ready connection"),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sockets_follow_the_firecracker_convention() {
        assert_eq!(
            socket_for_port(Path::new("/run/vm/v.sock"), 1024),
            PathBuf::from("/run/vm/v.sock_1024")
        );
    }
}
