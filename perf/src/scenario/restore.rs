//! `hearth-perf restore --runs N`: snapshot restore of a booted guest (1 vCPU, 128 MiB by
//! default), through the VMM's Rust API. A template guest is booted once, waits for its init's
//! Ready, runs `--settle-ms` more (as the agent's template does), is paused and snapshotted (`--snapshots` times, timed: snapshot create, and the files'
//! apparent and allocated sizes). By default (`--template-ram file-punch-huge`) its guest RAM is
//! the memory file itself, on a huge-page tmpfs, as the agent's templates have it: the first
//! snapshot takes the file in place (its all-zero 2 MiB pages punched out), and later ones (of the same paused VM) digest it again. Then, over `--runs` restores of that one snapshot in each mode
//! of `--modes`, interleaved (file-mapped; file-mapped with the pages an earlier restore's guest
//! wrote copied on write before the vCPUs run; the memory file's data copied into huge-page memory;
//! userfaultfd; userfaultfd with the working set of an earlier restore prefetched): from the VMM
//! process's spawn to the init's answer on its control port (connected right after the start:
//! the VMM holds the connection until the guest has handled the vsock transport reset; the
//! `Hello` and a `Refresh` with the clone's identity, entropy and clock go with the `CONNECT`
//! line, and the init's `Refreshed` is the echo) and,
//! timed on its own meanwhile, to the init's Ready re-announced after that reset; and the process's
//! memory just after. Then RSS and PSS per idle restored VM with 1, 8
//! and 32 clones of the snapshot alive together (`--clone-modes`, file by default), with how often
//! each idle clone wakes (KVM's halt exits and all exits per second over `--idle-ms`), and
//! restores per second (restore, refresh, kill) with 1, 2 and 4 in flight.
//!
//! Each restore is also timed into a VMM spawned ahead (`hearth vmm --await-restore`, idle for
//! 200 ms first): from the Restore command to its answer, to the Ready and to the echo
//! (`restore_MODE_ahead_*`), the figure comparable to Firecracker's LoadSnapshot into a running
//! process; and that VMM's RSS and PSS while it idles, before the Restore
//! (`restore_MODE_ahead_idle_{rss,pss}`: what a pool's VMM spawned ahead costs). KVM's counts
//! of that VM's exits and nested page faults up to its echo (`restore_MODE_ahead_kvm_exits`,
//! `restore_MODE_ahead_nested_page_faults`, from debugfs) measure the restore's work without the
//! noise of a shared machine: in the test host, the medians of the times of 30 restores moved
//! between 67 and 112 ms over nine runs of one build.
//!
//! The VMM's own timings of each restore phase are in its stderr with `HEARTH_LOG=debug`: the
//! first restore of each mode prints them.
//!
//! Where this machine has no hardware KVM, the scenario re-runs itself inside the test host.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hearth_guest::image::{self, KernelImage};
use hearth_guest::protocol::client::{ControlClient, realtime_ns};
use hearth_guest::protocol::{Message, READY_PORT, Refresh};
use hearth_snapshot::SetKind;
use hearth_vmm::config::{Punch, RamFileConfig, VmConfig, VsockConfig};
use hearth_vmm::process::{MemoryUsage, VmmProcess};
use hearth_vmm::{RestoreMode, SnapshotFiles};

use super::boot::wait_ready;
use crate::report::Report;

/// `hearth-perf restore` options.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// Restores of the snapshot in each mode of `--modes`, interleaved.
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// The restore modes timed, interleaved (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "file,file-prefetch,copy,uffd,uffd-prefetch"
    )]
    pub modes: Vec<Mode>,
    /// The restore modes whose idle clones' memory is measured (comma-separated). A copy-mode
    /// clone holds its own ~80 MiB (128 MiB guest): 32 of them do not fit the test host's RAM.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "file")]
    pub clone_modes: Vec<Mode>,
    /// Snapshots taken of the paused template (snapshot create time).
    #[arg(long, default_value_t = 5)]
    pub snapshots: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Clones alive together when measuring memory per idle VM (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clones: Vec<usize>,
    /// Restores in flight when measuring restores per second (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub in_flight: Vec<usize>,
    /// Restores at each in-flight level.
    #[arg(long, default_value_t = 24)]
    pub rate_restores: usize,
    /// How long clones idle before their memory is measured, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub idle_ms: u64,
    /// How long one guest may take to report ready, in seconds.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout: u64,
    /// The time limit for the whole run inside the test host, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub testhost_timeout: u64,
    /// Keep the snapshot files on a tmpfs mounted `huge=always` (2 MiB page-cache folios, so a
    /// file-mode restore's read faults can map whole 2 MiB pages). Needs root.
    #[arg(long)]
    pub huge_tmpfs: bool,
    /// How long the template runs after its init's Ready before it is paused and snapshotted, in
    /// milliseconds (a guest still busy with its boot when snapshotted is busy again after every
    /// restore). The default is what the agent's template builder waits (`TEMPLATE_SETTLE` in
    /// agent/src/pool/template.rs).
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// The template guest's extra kernel command line. The default is the agent's
    /// (`PoolsConfig::cmdline_extra`): the kernel zeroes the pages it frees, so that they stay
    /// holes in the memory file.
    #[arg(long, default_value = "init_on_free=1")]
    pub template_cmdline: String,
    /// Where the template's guest RAM lives: `file` is the snapshot's memory file itself, on the
    /// huge-page tmpfs (implies --huge-tmpfs), taken in place by each snapshot instead of copied;
    /// `file-punch-huge` (the default, as the agent's templates do) also turns its all-zero 2 MiB
    /// pages into holes at the first snapshot, `file-punch` all its all-zero pages (splitting
    /// huge pages); `anon` is anonymous memory, written out at each snapshot.
    #[arg(long, value_enum, default_value = "file-punch-huge")]
    pub template_ram: TemplateRam,
}

/// `--template-ram`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TemplateRam {
    /// Anonymous memory; each snapshot writes the memory file.
    Anon,
    /// The memory file, mapped shared.
    File,
    /// The memory file, its all-zero 2 MiB pages punched at the snapshot.
    FilePunchHuge,
    /// The memory file, its all-zero pages punched at the snapshot.
    FilePunch,
}

/// A tmpfs mounted `huge=always` for the snapshot files; unmounted on drop.
struct HugeTmpfs(PathBuf);

impl HugeTmpfs {
    fn mount(dir: PathBuf) -> anyhow::Result<Self> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let target = CString::new(dir.as_os_str().as_bytes()).context("a NUL in the path")?;
        let (fs, opts) = (c"tmpfs", c"huge=always,mode=0700");
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                fs.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot mount a huge=always tmpfs on {}", dir.display()));
        }
        Ok(HugeTmpfs(dir))
    }
}

impl Drop for HugeTmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        if let Ok(target) = std::ffi::CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The kernel's transparent huge page settings, for the report.
fn thp_settings() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{name}"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|e| format!("unreadable ({e})"))
    };
    format!(
        "enabled: {}; shmem_enabled: {}",
        read("enabled"),
        read("shmem_enabled")
    )
}

/// Mounts debugfs (where KVM's statistics are) if it is not mounted; best effort.
fn mount_debugfs() {
    if Path::new("/sys/kernel/debug/kvm").exists() {
        return;
    }
    let (fs, target) = (c"debugfs", c"/sys/kernel/debug");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            fs.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        println!(
            "no KVM statistics: cannot mount debugfs: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The folder of KVM's statistics of the VM that process `pid` made (debugfs `kvm/PID-FD/`).
fn kvm_stats_dir(pid: u32) -> Option<PathBuf> {
    let prefix = format!("{pid}-");
    std::fs::read_dir("/sys/kernel/debug/kvm")
        .ok()?
        .flatten()
        .find(|d| d.file_name().to_string_lossy().starts_with(&prefix))
        .map(|d| d.path())
}

/// The statistic `name` in a VM's debugfs folder `dir`.
fn stat_in(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One of KVM's statistics (debugfs `kvm/PID-FD/NAME`) of the VM that process `pid` made.
fn kvm_stat(pid: u32, name: &str) -> Option<u64> {
    stat_in(&kvm_stats_dir(pid)?, name)
}

/// KVM's counts of the exits and nested page faults (`pf_taken`) of the VM that process `pid`
/// made, from one look-up of its debugfs folder.
fn kvm_work(pid: u32) -> (Option<u64>, Option<u64>) {
    match kvm_stats_dir(pid) {
        Some(dir) => (stat_in(&dir, "exits"), stat_in(&dir, "pf_taken")),
        None => (None, None),
    }
}

/// KVM's statistics of the VM that process `pid` made (debugfs `kvm/PID-FD/`), for the report.
fn kvm_stats(pid: u32) -> String {
    const NAMES: [&str; 9] = [
        "pages_4k",
        "pages_2m",
        "pf_taken",
        "pf_fixed",
        "exits",
        "halt_exits",
        "halt_wakeup",
        "io_exits",
        "mmio_exits",
    ];
    let Some(dir) = kvm_stats_dir(pid) else {
        return format!("no kvm/{pid}-* folder in debugfs");
    };
    NAMES
        .iter()
        .map(|n| {
            let v = std::fs::read_to_string(dir.join(n)).unwrap_or_else(|_| "?".into());
            format!("{n} {}", v.trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The huge-page lines of a process's /proc/PID/smaps_rollup.
fn pmd_mapped(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("PmdMapped") || l.starts_with("Rss:"))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

/// How long `wait_ready` sleeps between checks of the VMM: short, since restores take tens of
/// milliseconds, yet not a busy wait on the test host's one CPU.
const READY_TICK: Duration = Duration::from_millis(20);

/// One VM's folder: its vsock socket, control socket and serial log, and the listener for its
/// init's Ready connection.
struct Slot {
    dir: PathBuf,
    ready: UnixListener,
}

impl Slot {
    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut path = dir.join("vsock.sock").into_os_string();
        path.push(format!("_{READY_PORT}"));
        let ready = UnixListener::bind(&path).context("cannot listen for the ready connection")?;
        ready
            .set_nonblocking(true)
            .context("cannot make the ready listener non-blocking")?;
        Ok(Slot { dir, ready })
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    fn config(&self, kernel: &Path, initrd: &Path, args: &RestoreArgs) -> VmConfig {
        let mut config = VmConfig::new(kernel);
        config.initrd = Some(initrd.to_path_buf());
        config.mem_mib = args.memory;
        config.vcpus = args.vcpus;
        config.cmdline_extra = args.template_cmdline.clone();
        config.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: self.uds(),
        });
        config.serial_log = Some(self.dir.join("serial.log"));
        config.control_socket = Some(self.dir.join("control.sock"));
        config
    }
}

/// A restored VM answering on vsock.
struct Restored {
    vmm: VmmProcess,
    _ready: UnixStream,
    spawned_ms: f64,
    ready_ms: f64,
    echo_ms: f64,
    /// Control connections the guest turned away before the one that answered.
    turned_away: u32,
    /// A VMM spawned ahead: its memory while it idled, before the Restore.
    idle_memory: Option<MemoryUsage>,
    /// Restored into a VMM spawned ahead: KVM's counts of the VM's exits and nested page
    /// faults, read right after the echo ([`kvm_work`]).
    kvm_at_echo: (Option<u64>, Option<u64>),
}

/// How long a restore's first control connection keeps being retried while the guest turns it
/// away (it should not: the VMM holds it until the guest has handled the transport reset).
const TURNED_AWAY_RETRY: Duration = Duration::from_secs(5);

/// How long a VMM spawned ahead idles before its Restore.
const AHEAD_IDLE: Duration = Duration::from_millis(200);

/// The restore modes compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The memory file mapped copy-on-write.
    File,
    /// The memory file mapped copy-on-write, the pages an earlier restore's guest wrote copied
    /// on write before the vCPUs run.
    FilePrefetch,
    /// The memory file's data read into huge-page anonymous memory.
    Copy,
    /// Served through userfaultfd.
    Uffd,
    /// Served through userfaultfd, an earlier restore's working set prefetched.
    UffdPrefetch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::File => "file",
            Mode::FilePrefetch => "file_prefetch",
            Mode::Copy => "copy",
            Mode::Uffd => "uffd",
            Mode::UffdPrefetch => "uffd_prefetch",
        }
    }

    /// How this mode restores the snapshot whose memory file is `mem`.
    fn restore_mode(self, mem: &Path) -> RestoreMode {
        match self {
            Mode::File => RestoreMode::file(),
            Mode::FilePrefetch => RestoreMode::File {
                prefetch_ws: Some(SetKind::Written.path_for(mem)),
                record_ws: false,
            },
            Mode::Copy => RestoreMode::Copy,
            Mode::Uffd => RestoreMode::Uffd {
                prefetch_ws: None,
                record_ws: false,
            },
            Mode::UffdPrefetch => RestoreMode::Uffd {
                prefetch_ws: Some(SetKind::Served.path_for(mem)),
                record_ws: false,
            },
        }
    }
}

/// What a run needs to restore.
struct Setup<'a> {
    args: &'a RestoreArgs,
    hearth: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    files: SnapshotFiles,
}

impl Setup<'_> {
    /// Restores the snapshot in `slot` with `mode`, starts it and pings the init's control port
    /// at once (its listener outlives the transport reset); meanwhile waits for the init's
    /// re-announced Ready, timed on its own.
    fn restore(&self, slot: &Slot, mode: RestoreMode) -> anyhow::Result<Restored> {
        self.restore_via(slot, false, |config| {
            Ok(VmmProcess::spawn_restored_with(
                &self.hearth,
                config,
                &self.files,
                mode,
            )?)
        })
    }

    /// [`Setup::restore`] into a VMM spawned ahead (`--await-restore`, left idle for
    /// [`AHEAD_IDLE`] first, as a pool's would be): the times count from the Restore command,
    /// as Firecracker's LoadSnapshot (with `resume_vm`) is timed into a running process;
    /// `spawned_ms` is the time to the Restore's answer. The Restore asks for the VM to run at
    /// once (`resume`), as the agent's pool does.
    fn restore_ahead(&self, slot: &Slot, mode: RestoreMode) -> anyhow::Result<Restored> {
        let config = slot.config(&self.kernel, &self.initrd, self.args);
        let vmm = VmmProcess::spawn_awaiting_restore(&self.hearth, &config)?;
        std::thread::sleep(AHEAD_IDLE);
        let idle_memory = vmm.memory_usage()?;
        let mut restored = self.restore_via(slot, true, |_| {
            vmm.restore_and_resume(&self.files, mode)
                .map_err(|e| anyhow::Error::new(e).context(vmm.stderr_tail()))?;
            Ok(vmm)
        })?;
        restored.idle_memory = Some(idle_memory);
        Ok(restored)
    }

    /// Times `get` (which yields a restored VMM for the slot's configuration) and the restored
    /// VM's Ready and echo from its call. `ahead`: the VMM was spawned ahead and its Restore ran
    /// the VM (else it is started here); KVM's counts are then read at the echo.
    fn restore_via(
        &self,
        slot: &Slot,
        ahead: bool,
        get: impl FnOnce(&VmConfig) -> anyhow::Result<VmmProcess>,
    ) -> anyhow::Result<Restored> {
        let config = slot.config(&self.kernel, &self.initrd, self.args);
        // A connection left queued by an earlier VM would pass for this one's Ready (the
        // listener is non-blocking).
        while slot.ready.accept().is_ok() {}
        let t = Instant::now();
        let vmm = get(&config)?;
        let spawned_ms = ms(t.elapsed());
        if !ahead {
            vmm.start()?;
        }
        let limit = Duration::from_secs(self.args.ready_timeout);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (echo, ready) = std::thread::scope(|scope| {
            let waiter = scope.spawn(|| accept_ready(&slot.ready, limit, &stop));
            let echo = echo(&slot.uds()).map(|turned_away| (ms(t.elapsed()), turned_away));
            // Read at once, before the guest goes on to its Ready.
            let kvm_at_echo = if ahead {
                kvm_work(vmm.vmm_pid())
            } else {
                (None, None)
            };
            if echo.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let ready = match waiter.join() {
                Ok(r) => r.map(|(conn, at)| (conn, ms(at.duration_since(t)))),
                Err(_) => Err(anyhow::anyhow!("the Ready waiter panicked")),
            };
            (echo.map(|e| (e, kvm_at_echo)), ready)
        });
        let context = |e: anyhow::Error| e.context(format!("VMM stderr:\n{}", vmm.stderr_tail()));
        let ((echo_ms, turned_away), kvm_at_echo) = echo.map_err(context)?;
        let (ready, ready_ms) = ready.map_err(context)?;
        Ok(Restored {
            vmm,
            _ready: ready,
            spawned_ms,
            ready_ms,
            echo_ms,
            turned_away,
            idle_memory: None,
            kvm_at_echo,
        })
    }
}

/// Connects to the init's control port through `uds` and makes the clone unique and current
/// (its `Hello` and a `Refresh` sent with the `CONNECT` line, as the agent's pool does), until
/// the init answers `Refreshed`; retries (every 5 ms, for up to [`TURNED_AWAY_RETRY`]) while the
/// guest turns the connection away; returns how many times it did.
fn echo(uds: &Path) -> anyhow::Result<u32> {
    let deadline = Instant::now() + TURNED_AWAY_RETRY;
    let mut turned_away = 0;
    let mut entropy = vec![0u8; 64];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?,
        &mut entropy,
    )
    .context("cannot read /dev/urandom")?;
    loop {
        let refresh = Message::Refresh(Refresh {
            identity: "restored".into(),
            entropy: entropy.clone(),
            realtime_ns: realtime_ns(),
        });
        let tried = ControlClient::open_uds(uds, &refresh, |s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))
        });
        match tried {
            Ok((_, answer)) => {
                anyhow::ensure!(
                    matches!(answer, Message::Refreshed { .. }),
                    "the guest answered {answer:?}"
                );
                return Ok(turned_away);
            }
            Err(e) if hearth_agent::pool::guest::turned_away(&e) && Instant::now() < deadline => {
                turned_away += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "refresh on the control port ({turned_away} connections turned away before)"
                )));
            }
        }
    }
}

/// Waits for the init's ready connection on `listener` (non-blocking) and reads its Ready;
/// returns it with when it was accepted. Gives up after `limit`, or when `stop` is set.
fn accept_ready(
    listener: &UnixListener,
    limit: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<(UnixStream, Instant)> {
    let (stream, at, _) = super::boot::accept_ready(listener, limit, READY_TICK, || {
        anyhow::ensure!(
            !stop.load(std::sync::atomic::Ordering::Relaxed),
            "no Ready: the echo failed"
        );
        Ok(())
    })?;
    Ok((stream, at))
}

/// Runs the scenario here on hardware KVM, else inside the test host.
pub fn run(args: &RestoreArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.snapshots > 0, "--snapshots must be at least 1");
    if !super::has_hardware_kvm() {
        anyhow::ensure!(
            std::env::var_os("HEARTH_IN_TESTHOST").is_none(),
            "inside the test host /dev/kvm must be hardware KVM, but it is {}",
            super::kvm_description()
        );
        return super::rerun_in_testhost(args.testhost_timeout);
    }
    let hearth = crate::testhost::find_hearth()?;
    let kernel = KernelImage::locate()
        .context("the guest kernel is not in the cache: run `hearth image`")?;
    let init = image::locate_init()?;
    let work = tempfile::Builder::new()
        .prefix("hearth-perf-restore-")
        .tempdir()
        .context("cannot make a work folder")?;
    let initrd = work.path().join("initramfs.cpio");
    std::fs::write(&initrd, image::guest_initramfs(&kernel, &init)?)
        .context("cannot write the guest initramfs")?;
    let mut report = Report::new("restore", super::machine());
    report.parameter("runs", args.runs);
    report.parameter("memory_mib", args.memory);
    report.parameter("vcpus", args.vcpus);
    report.parameter("kernel", kernel.package.clone() + " " + &kernel.version);

    println!("transparent huge pages: {}", thp_settings());
    mount_debugfs();
    let huge = if args.huge_tmpfs || args.template_ram != TemplateRam::Anon {
        Some(HugeTmpfs::mount(work.path().join("huge"))?)
    } else {
        None
    };
    report.parameter("huge_tmpfs", huge.is_some());
    report.parameter("template_ram", format!("{:?}", args.template_ram));
    report.parameter("settle_ms", args.settle_ms);
    let files_dir = huge.as_ref().map_or(work.path(), |h| h.0.as_path());
    let files = SnapshotFiles {
        state: files_dir.join("vm.state"),
        mem: files_dir.join("vm.mem"),
    };
    let setup = Setup {
        args,
        hearth,
        kernel: kernel.boot_image().to_path_buf(),
        initrd,
        files,
    };
    template(
        &setup,
        &Slot::new(work.path().join("template"))?,
        &mut report,
    )
    .context("the template")?;
    restore_to_echo(
        &setup,
        &Slot::new(work.path().join("restore"))?,
        &mut report,
    )?;
    for &mode in &args.clone_modes {
        for &n in &args.clones {
            clones(&setup, work.path(), mode, n, &mut report)
                .with_context(|| format!("{n} clones, {} mode", mode.name()))?;
        }
    }
    for &n in &args.in_flight {
        rate(&setup, work.path(), n, &mut report)
            .with_context(|| format!("{n} restores in flight"))?;
    }
    Ok(report)
}

/// Boots the template, snapshots it `--snapshots` times (the last one is the one restored).
fn template(setup: &Setup<'_>, slot: &Slot, report: &mut Report) -> anyhow::Result<()> {
    let args = setup.args;
    let mut config = slot.config(&setup.kernel, &setup.initrd, args);
    if args.template_ram != TemplateRam::Anon {
        // The RAM file is the memory file: every snapshot takes it where it is.
        config.ram_file = Some(RamFileConfig {
            path: setup.files.mem.clone(),
            punch: match args.template_ram {
                TemplateRam::FilePunch => Punch::Pages,
                TemplateRam::FilePunchHuge => Punch::HugePages,
                TemplateRam::Anon | TemplateRam::File => Punch::None,
            },
        });
    }
    let mut vmm = VmmProcess::spawn(&setup.hearth, &config)?;
    vmm.start()?;
    let (_ready, _) = wait_ready(
        &slot.ready,
        &mut vmm,
        Duration::from_secs(args.ready_timeout),
        READY_TICK,
    )
    .map_err(|e| e.context(format!("VMM stderr:\n{}", vmm.stderr_tail())))?;
    std::thread::sleep(Duration::from_millis(args.settle_ms));
    vmm.pause()?;
    let mut create = Vec::new();
    let (mut mem_size, mut mem_alloc, mut state_size, mut state_alloc) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..args.snapshots {
        let t = Instant::now();
        vmm.snapshot(&setup.files)?;
        create.push(ms(t.elapsed()));
        let mem = std::fs::metadata(&setup.files.mem).context("the memory file")?;
        let state = std::fs::metadata(&setup.files.state).context("the state file")?;
        (mem_size, mem_alloc) = (mib(mem.len()), mib(mem.blocks() * 512));
        (state_size, state_alloc) = (kib(state.len()), kib(state.blocks() * 512));
        println!(
            "snapshot {}: {:.1} ms; memory file {mem_size:.1} MiB ({mem_alloc:.1} MiB allocated), state file {state_size:.1} KiB",
            i + 1,
            create.last().copied().unwrap_or(0.0)
        );
    }
    // The VMM's own account of each snapshot (with HEARTH_LOG=hearth_vmm=info or more).
    for line in vmm.stderr_tail().lines() {
        if line.contains("snapshot written") || line.contains("memory file written") {
            println!("template VMM: {line}");
        }
    }
    drop(vmm);
    report.add("snapshot_create", &create, "ms");
    // The one that counts for a template (with `--template-ram file*`, later snapshots of the
    // same paused VM find the RAM file in place already, holes punched).
    report.add(
        "snapshot_create_first",
        &create[..create.len().min(1)],
        "ms",
    );
    report.add("memory_file_apparent", &[mem_size], "MiB");
    report.add("memory_file_allocated", &[mem_alloc], "MiB");
    report.add("state_file_apparent", &[state_size], "KiB");
    report.add("state_file_allocated", &[state_alloc], "KiB");
    Ok(())
}

/// `--runs` restores in each of `--modes`, interleaved; with `file-prefetch` or `uffd-prefetch`
/// among them, a first restore in the plain mode records the set that the prefetch mode uses
/// (and is not counted).
fn restore_to_echo(setup: &Setup<'_>, slot: &Slot, report: &mut Report) -> anyhow::Result<()> {
    let modes = &setup.args.modes;
    let recordings = [
        (
            Mode::FilePrefetch,
            RestoreMode::File {
                prefetch_ws: None,
                record_ws: true,
            },
            SetKind::Written,
            "written_set_pages",
        ),
        (
            Mode::UffdPrefetch,
            RestoreMode::Uffd {
                prefetch_ws: None,
                record_ws: true,
            },
            SetKind::Served,
            "working_set_pages",
        ),
    ];
    for (prefetching, record, kind, metric) in recordings {
        if !modes.contains(&prefetching) {
            continue;
        }
        let mut recorder = setup
            .restore(slot, record)
            .with_context(|| format!("recording the set for {}", prefetching.name()))?;
        recorder.vmm.stop().context("stop the recording VM")?;
        let bytes = std::fs::metadata(kind.path_for(&setup.files.mem))
            .with_context(|| format!("the set recorded for {}", prefetching.name()))?
            .len();
        // A 40-byte header and an 8-byte checksum around 8 bytes a page.
        let pages = bytes.saturating_sub(48) / 8;
        println!("{metric}: {pages} ({bytes} bytes)");
        report.add(metric, &[pages as f64], "pages");
    }
    let mut samples: Vec<[Vec<f64>; 13]> = modes.iter().map(|_| Default::default()).collect();
    for run in 0..setup.args.runs {
        for (m, mode) in modes.iter().enumerate() {
            let mut r = setup
                .restore(slot, mode.restore_mode(&setup.files.mem))
                .with_context(|| format!("{} restore {}", mode.name(), run + 1))?;
            let memory = r.vmm.memory_usage()?;
            if run == 0 {
                // The init logs on the console when its link was reset and when it is ready again.
                let serial =
                    std::fs::read_to_string(slot.dir.join("serial.log")).unwrap_or_default();
                let tail: Vec<&str> = serial.lines().rev().take(4).collect();
                println!(
                    "first {} restore: VMM stderr:\n{}guest console (last lines, newest first):\n{}\nVMM memory: {}\nKVM: {}",
                    mode.name(),
                    r.vmm.stderr_tail(),
                    tail.join("\n"),
                    pmd_mapped(r.vmm.vmm_pid()),
                    kvm_stats(r.vmm.vmm_pid())
                );
            }
            let s = &mut samples[m];
            s[0].push(r.spawned_ms);
            s[1].push(r.ready_ms);
            s[2].push(r.echo_ms);
            s[3].push(mib(memory.rss_kib * 1024));
            s[4].push(mib(memory.own_rss_kib() * 1024));
            s[5].push(f64::from(r.turned_away));
            r.vmm.kill()?;
            drop(r);
            // The same restore into a VMM spawned ahead, timed from the Restore command.
            let mut r = setup
                .restore_ahead(slot, mode.restore_mode(&setup.files.mem))
                .with_context(|| format!("{} restore {} ahead", mode.name(), run + 1))?;
            // The first restore of a test host also pays QEMU's first translation of every code
            // path it runs; the last one shows the steady state.
            if run == 0 || run + 1 == setup.args.runs {
                println!(
                    "{} {} restore into a VMM spawned ahead: VMM stderr:\n{}KVM: {}",
                    if run == 0 { "first" } else { "last" },
                    mode.name(),
                    r.vmm.stderr_tail(),
                    kvm_stats(r.vmm.vmm_pid())
                );
            }
            // KVM's own counts of the restored VM's work up to the echo: unlike the times, they
            // do not move with the test host's speed.
            let (exits, faults) = r.kvm_at_echo;
            let s = &mut samples[m];
            s[6].push(r.spawned_ms);
            s[7].push(r.ready_ms);
            s[8].push(r.echo_ms);
            if let Some(idle) = r.idle_memory {
                s[9].push(mib(idle.rss_kib * 1024));
                s[10].push(mib(idle.pss_kib * 1024));
            }
            s[11].extend(exits.map(|n| n as f64));
            s[12].extend(faults.map(|n| n as f64));
            r.vmm.kill()?;
        }
        // Every run of a short series, else every tenth.
        if setup.args.runs <= 20 || (run + 1) % 10 == 0 || run + 1 == setup.args.runs {
            let last: Vec<String> = modes
                .iter()
                .zip(&samples)
                .map(|(mode, s)| {
                    let echo = s[2].last().copied().unwrap_or(f64::NAN);
                    let ahead = s[8].last().copied().unwrap_or(f64::NAN);
                    format!(
                        "{} {echo:.1} ms (ahead, from the Restore command: {ahead:.1} ms)",
                        mode.name()
                    )
                })
                .collect();
            println!("restore {}: echo after {}", run + 1, last.join(", "));
        }
    }
    for (mode, s) in modes.iter().zip(&samples) {
        let name = mode.name();
        report.add(&format!("restore_{name}_to_process_ready"), &s[0], "ms");
        report.add(&format!("restore_{name}_to_ready"), &s[1], "ms");
        report.add(&format!("restore_{name}_to_echo"), &s[2], "ms");
        report.add(&format!("restore_{name}_rss_after_echo"), &s[3], "MiB");
        report.add(&format!("restore_{name}_own_rss_after_echo"), &s[4], "MiB");
        report.add(&format!("restore_{name}_turned_away"), &s[5], "connections");
        report.add(
            &format!("restore_{name}_ahead_restore_command"),
            &s[6],
            "ms",
        );
        report.add(&format!("restore_{name}_ahead_to_ready"), &s[7], "ms");
        report.add(&format!("restore_{name}_ahead_to_echo"), &s[8], "ms");
        report.add(&format!("restore_{name}_ahead_idle_rss"), &s[9], "MiB");
        report.add(&format!("restore_{name}_ahead_idle_pss"), &s[10], "MiB");
        report.add(&format!("restore_{name}_ahead_kvm_exits"), &s[11], "exits");
        report.add(
            &format!("restore_{name}_ahead_nested_page_faults"),
            &s[12],
            "faults",
        );
    }
    Ok(())
}

/// `n` clones restored in `mode` and idle together: RSS and PSS of each. The file mode's
/// metrics are `clones_N_...`, another mode's `clones_MODE_N_...`.
fn clones(
    setup: &Setup<'_>,
    work: &Path,
    mode: Mode,
    n: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = mode.name();
    let slots: Vec<Slot> = (0..n)
        .map(|i| Slot::new(work.join(format!("clone-{name}-{n}-{i}"))))
        .collect::<anyhow::Result<_>>()?;
    let mut vms = Vec::with_capacity(n);
    for slot in &slots {
        vms.push(setup.restore(slot, mode.restore_mode(&setup.files.mem))?);
    }
    // How often an idle guest wakes: KVM's halt exits (one per wake-up from idle) and all exits
    // over the idle time. A quiet pool VM makes close to none.
    let counters = |name: &str| -> Option<Vec<u64>> {
        vms.iter()
            .map(|r| kvm_stat(r.vmm.vmm_pid(), name))
            .collect()
    };
    let before = (counters("halt_exits"), counters("exits"));
    let idle = Instant::now();
    std::thread::sleep(Duration::from_millis(setup.args.idle_ms));
    let after = (counters("halt_exits"), counters("exits"));
    let idle_s = idle.elapsed().as_secs_f64();
    let usage: Vec<MemoryUsage> = vms
        .iter()
        .map(|r| r.vmm.memory_usage())
        .collect::<Result<_, _>>()?;
    let series =
        |f: fn(&MemoryUsage) -> u64| usage.iter().map(|u| mib(f(u) * 1024)).collect::<Vec<f64>>();
    let (rss, pss) = (series(|u| u.rss_kib), series(|u| u.pss_kib));
    let own = series(MemoryUsage::own_rss_kib);
    println!(
        "{n} clones idle ({name} mode): RSS {:.1} MiB, PSS {:.1} MiB, VMM's own RSS {:.2} MiB (means per VM)",
        mean(&rss),
        mean(&pss),
        mean(&own)
    );
    let prefix = if mode == Mode::File {
        format!("clones_{n}")
    } else {
        format!("clones_{name}_{n}")
    };
    let per_second = |b: &Option<Vec<u64>>, a: &Option<Vec<u64>>| -> Option<Vec<f64>> {
        let (b, a) = (b.as_ref()?, a.as_ref()?);
        Some(
            b.iter()
                .zip(a)
                .map(|(b, a)| a.saturating_sub(*b) as f64 / idle_s)
                .collect(),
        )
    };
    match (
        per_second(&before.0, &after.0),
        per_second(&before.1, &after.1),
    ) {
        (Some(halts), Some(exits)) => {
            println!(
                "{n} clones idle ({name} mode): {:.1} halt exits/s, {:.1} exits/s (means per VM)",
                mean(&halts),
                mean(&exits)
            );
            report.add(&format!("{prefix}_idle_halt_exits_per_s"), &halts, "1/s");
            report.add(&format!("{prefix}_idle_exits_per_s"), &exits, "1/s");
        }
        _ => println!("{n} clones idle ({name} mode): no KVM exit counters (debugfs)"),
    }
    report.add(&format!("{prefix}_rss_per_vm"), &rss, "MiB");
    report.add(&format!("{prefix}_pss_per_vm"), &pss, "MiB");
    report.add(&format!("{prefix}_own_rss_per_vm"), &own, "MiB");
    report.add(
        &format!("{prefix}_own_pss_per_vm"),
        &series(MemoryUsage::own_pss_kib),
        "MiB",
    );
    for mut r in vms {
        r.vmm.kill()?;
    }
    Ok(())
}

/// `--rate-restores` restores (file mode; restore, refresh, kill), `n` in flight: restores per second.
fn rate(setup: &Setup<'_>, work: &Path, n: usize, report: &mut Report) -> anyhow::Result<()> {
    anyhow::ensure!(n > 0, "--in-flight levels must be at least 1");
    let slots: Vec<Slot> = (0..n)
        .map(|i| Slot::new(work.join(format!("rate{n}-{i}"))))
        .collect::<anyhow::Result<_>>()?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let total = setup.args.rate_restores.max(n);
    let t = Instant::now();
    let latencies = std::thread::scope(|scope| -> anyhow::Result<Vec<f64>> {
        let workers: Vec<_> = slots
            .iter()
            .map(|slot| {
                let next = &next;
                scope.spawn(move || -> anyhow::Result<Vec<f64>> {
                    let mut mine = Vec::new();
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                        let mut r = setup.restore(slot, RestoreMode::file())?;
                        mine.push(r.echo_ms);
                        r.vmm.kill()?;
                    }
                    Ok(mine)
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            match w.join() {
                Ok(r) => all.extend(r?),
                Err(_) => anyhow::bail!("a restore worker panicked"),
            }
        }
        Ok(all)
    })?;
    let per_second = latencies.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "{n} in flight: {per_second:.2} restores/s over {} restores (restore to echo p50 {:.1} ms)",
        latencies.len(),
        crate::report::Metric::from_samples(&latencies, "ms").map_or(f64::NAN, |m| m.p50)
    );
    report.add(
        &format!("restores_per_second_{n}_in_flight"),
        &[per_second],
        "1/s",
    );
    report.add(&format!("restore_to_echo_{n}_in_flight"), &latencies, "ms");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn kib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
