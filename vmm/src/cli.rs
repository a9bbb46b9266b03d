//! `hearth vmm`: runs one microVM in this process. Configured by flags or a JSON config; driven
//! over the control socket (or started at once with `--start`); exits 0 when the guest reboots or
//! powers off, on Stop, on SIGTERM/SIGINT, and when its parent's pipe closes.

use crate::builder;
use crate::config::{DEFAULT_SERIAL_LOG_CAP, HugePages, VmConfig, VsockConfig};
use crate::control::Command;
use crate::control::server::ControlServer;
use crate::filtered_thread::FilteredThread;
use crate::restore::RestoreMode;
use crate::runtime::{Controller, EventLoop, StopReason, block_termination_signals};
use crate::seccomp::{self, ThreadKind};
use crate::vstate::vcpu::{Vcpu, install_kick_handler};
use anyhow::{Context, bail};
use hearth_snapshot::{MemoryFileInfo, SetKind, WorkingSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `hearth vmm`.
#[derive(Debug, Clone, clap::Args)]
pub struct VmmArgs {
    /// A JSON VM configuration file (fields of `hearth_vmm::VmConfig`); excludes the flags below.
    #[arg(long, conflicts_with_all = ["config_json", "kernel"])]
    pub config: Option<PathBuf>,
    /// The JSON VM configuration as a string.
    #[arg(long, conflicts_with = "kernel")]
    pub config_json: Option<String>,
    /// The guest kernel (bzImage).
    #[arg(long, required_unless_present_any = ["config", "config_json"])]
    pub kernel: Option<PathBuf>,
    /// The initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Appended to the kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory in MiB (128 to 10240).
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u32,
    /// vCPUs (1 to 8).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// The guest's vsock context id (needs --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    pub vsock_cid: Option<u64>,
    /// The vsock host Unix socket.
    #[arg(long, requires = "vsock_cid")]
    pub vsock_uds: Option<PathBuf>,
    /// Where the serial console goes.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Most bytes written to the serial log.
    #[arg(long, default_value_t = DEFAULT_SERIAL_LOG_CAP)]
    pub serial_log_cap: u64,
    /// The control socket.
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Run the guest at once instead of waiting for Start on the control socket.
    #[arg(long)]
    pub start: bool,
    /// Restore the VM from this snapshot state file instead of booting the kernel (needs
    /// --restore-mem; the configuration must match the snapshot, its kernel and initrd are unused).
    #[arg(long, requires = "restore_mem")]
    pub restore_state: Option<PathBuf>,
    /// The snapshot's memory file (mapped copy-on-write; never written).
    #[arg(long, requires = "restore_state")]
    pub restore_mem: Option<PathBuf>,
    /// How guest RAM is restored: `file` maps the memory file copy-on-write (clones share its
    /// pages); `copy` reads its data into huge-page anonymous memory first; `uffd` fills
    /// anonymous memory from it on first touch through userfaultfd.
    #[arg(long, value_enum, default_value_t = RestoreModeArg::File, requires = "restore_state")]
    pub restore_mode: RestoreModeArg,
    /// With `--restore-mode uffd`: copy the pages of this working-set file in before the vCPUs
    /// run; with `file`: make the private copies of the written pages it names before the vCPUs
    /// run. Either recorded with --record-ws by an earlier restore of the same snapshot in the
    /// same mode.
    #[arg(long)]
    pub prefetch_ws: Option<PathBuf>,
    /// With `--restore-mode uffd`: record the pages served and write them to `<memory file>.ws`
    /// when the VM stops; with `file`: record the pages the guest wrote, to
    /// `<memory file>.written.ws`.
    #[arg(long)]
    pub record_ws: bool,
    /// Start ahead of a restore: set up the KVM VM and its vCPUs for the configured memory and
    /// vCPU count, bind the control socket, and wait for a `Restore` command naming the snapshot
    /// (then `Start` runs it).
    #[arg(long, conflicts_with_all = ["restore_state", "start"])]
    pub await_restore: bool,
    /// Back guest RAM with 2 MiB pages from the host's hugetlbfs pool (`vm.nr_hugepages`),
    /// reserved at start, instead of transparent huge pages.
    #[arg(long)]
    pub hugetlb: bool,
    /// Exit when standard input reaches end of file (the parent's pipe closed).
    #[arg(long, hide = true)]
    pub exit_on_stdin_eof: bool,
    /// Install no seccomp filters (debugging only).
    #[arg(long, hide = true)]
    pub no_seccomp: bool,
}

/// `--restore-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreModeArg {
    /// Map the memory file copy-on-write.
    File,
    /// Read the memory file's data into huge-page-advised anonymous memory.
    Copy,
    /// Serve guest RAM from the memory file through userfaultfd.
    Uffd,
}

impl VmmArgs {
    /// The restore mode these flags describe.
    pub fn restore_mode(&self) -> anyhow::Result<RestoreMode> {
        match self.restore_mode {
            RestoreModeArg::File => Ok(RestoreMode::File {
                prefetch_ws: self.prefetch_ws.clone(),
                record_ws: self.record_ws,
            }),
            RestoreModeArg::Copy => {
                if self.prefetch_ws.is_some() || self.record_ws {
                    bail!("--prefetch-ws and --record-ws need --restore-mode file or uffd");
                }
                Ok(RestoreMode::Copy)
            }
            RestoreModeArg::Uffd => Ok(RestoreMode::Uffd {
                prefetch_ws: self.prefetch_ws.clone(),
                record_ws: self.record_ws,
            }),
        }
    }

    /// The VM configuration these flags describe.
    pub fn to_config(&self) -> anyhow::Result<VmConfig> {
        let config = if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            VmConfig::from_json(&text)?
        } else if let Some(text) = &self.config_json {
            VmConfig::from_json(text)?
        } else {
            let Some(kernel) = &self.kernel else {
                bail!("--kernel or --config is required")
            };
            let config = VmConfig {
                kernel: kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline_extra: self.cmdline.clone(),
                mem_mib: self.mem_mib,
                vcpus: self.vcpus,
                vsock: match (self.vsock_cid, &self.vsock_uds) {
                    (Some(guest_cid), Some(uds_path)) => Some(VsockConfig {
                        guest_cid,
                        uds_path: uds_path.clone(),
                    }),
                    _ => None,
                },
                serial_log: self.serial_log.clone(),
                serial_log_cap: self.serial_log_cap,
                control_socket: self.control_socket.clone(),
                ram_file: None,
                huge_pages: if self.hugetlb {
                    HugePages::Hugetlb
                } else {
                    HugePages::Transparent
                },
            };
            config.validate()?;
            config
        };
        Ok(config)
    }
}

/// Runs `hearth vmm`; returns the process exit status.
pub fn run(args: VmmArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    crate::build_id::keep_mark();
    // Snapshot files are written by this process with a fixed mode (`hearth_snapshot::access`);
    // a fixed umask means they never need an `fchmod`, which the seccomp filter does not allow.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let config = args.to_config()?;
    let signals = block_termination_signals()?;
    install_kick_handler()?;
    seccomp::install_reporter()?;
    let mode = args.restore_mode()?;
    // The VMM's threads start first, their seccomp filters installed, so that a VMM started ahead
    // has them in place before its Restore command: in the test host, starting them and
    // installing their filters took some 20 ms of the restore (`crate::filtered_thread`).
    let vmm_thread = FilteredThread::<Result<StopReason, String>>::spawn(
        "vmm",
        VMM_STACK,
        (!args.no_seccomp).then_some(ThreadKind::Vmm),
    )?;
    let vcpu_threads = (0..config.vcpus)
        .map(|id| Vcpu::thread_for(id, !args.no_seccomp))
        .collect::<Result<Vec<_>, _>>()?;
    if config.ram_file.is_some() && (args.restore_state.is_some() || args.await_restore) {
        bail!("ram_file is for booting a template VM, not for a restore");
    }
    if config.huge_pages == HugePages::Hugetlb
        && (args.restore_state.is_some() || args.await_restore)
    {
        bail!("huge_pages hugetlb is for booting a VM; a restore maps or copies its memory file");
    }
    let mut ram_file = None;
    // A VMM started ahead: prepared, then restored from the snapshot a Restore command names.
    let (mut ahead_vm, mut ahead_control, mode, restore_mem, restored_at) = if args.await_restore {
        match crate::awaiting::start_ahead(&config, &signals, &args, started)? {
            crate::awaiting::Awaited::Restored(r, control) => {
                let r = *r;
                (
                    Some((r.built, r.uffd)),
                    Some(control),
                    r.mode,
                    Some(r.files.mem),
                    Some((r.at, r.resume)),
                )
            }
            crate::awaiting::Awaited::Stopped(reason) => {
                tracing::info!(?reason, "VMM ended before a restore");
                return Ok(reason.exit_status());
            }
        }
    } else {
        (None, None, mode, args.restore_mem.clone(), None)
    };
    let (built, uffd) = match (&args.restore_state, &args.restore_mem) {
        _ if ahead_vm.is_some() => ahead_vm.take().context("the restored VM")?,
        (Some(state), Some(mem)) => crate::restore::restore_with(
            &config,
            &crate::restore::SnapshotFiles {
                state: state.clone(),
                mem: mem.clone(),
            },
            &mode,
            !args.no_seccomp,
            started,
        )
        .context("cannot restore the snapshot")?,
        _ => match &config.ram_file {
            Some(ram) => {
                let (mem, ram) = crate::arch::memory::RamFile::create(ram, config.mem_bytes())
                    .context("cannot back guest RAM with a file")?;
                ram_file = Some(ram);
                (builder::build_in(&config, mem, started)?, None)
            }
            None => (builder::build(&config, started)?, None),
        },
    };
    let control = match &config.control_socket {
        _ if ahead_control.is_some() => ahead_control.take(),
        Some(path) => Some(ControlServer::bind(path)?),
        None => None,
    };
    // Timings from here on count from the Restore command in a VMM started ahead.
    let started = restored_at.map_or(started, |(at, _)| at);
    tracing::debug!(ms = ms_since(started), "control socket bound");
    let mut handles = Vec::with_capacity(built.vcpus.len());
    anyhow::ensure!(
        built.vcpus.len() == vcpu_threads.len(),
        "{} vCPUs built for {} vCPU threads",
        built.vcpus.len(),
        vcpu_threads.len()
    );
    for (vcpu, thread) in built.vcpus.into_iter().zip(vcpu_threads) {
        handles.push(vcpu.spawn_on(thread));
    }
    tracing::debug!(ms = ms_since(started), "vCPUs handed to their threads");
    let parent = args.exit_on_stdin_eof.then_some(0);
    let controller = Controller::new(handles, built.events, built.wake, &signals, parent, control)?
        .with_snapshot(built.persist)
        .with_ram_file(ram_file);
    let mut event_loop = EventLoop::new(controller)?;
    for s in built.subscribers {
        event_loop.add_subscriber(s);
    }
    let start_now = args.start || restored_at.is_some_and(|(_, resume)| resume);
    let job = vmm_thread.start(move || {
        tracing::debug!(ms = ms_since(started), "VMM thread serving");
        if start_now {
            event_loop.command(Command::Start)?;
        }
        Ok(event_loop.run())
    });
    let reason = match job.join() {
        Ok(Some(Ok(reason))) => reason,
        Ok(Some(Err(e))) => bail!("the VMM failed: {e}"),
        Ok(None) => bail!("the VMM thread ended without running the VM"),
        Err(_) => bail!("the VMM thread panicked"),
    };
    // The pages the guest wrote, read from the mapping while it is still there.
    if let (
        Some(mem),
        RestoreMode::File {
            record_ws: true, ..
        },
    ) = (&restore_mem, &mode)
    {
        let info = built
            .restored_from
            .context("a restored VM without its memory file's record")?;
        record_written(&built.mem, mem, &info)?;
    }
    // Keep guest memory and the VM alive until every vCPU thread is gone (joined above).
    drop(built.vm);
    drop(built.mem);
    if let (
        Some(server),
        Some(mem),
        RestoreMode::Uffd {
            record_ws: true, ..
        },
    ) = (&uffd, &restore_mem, &mode)
    {
        let path = SetKind::Served.path_for(mem);
        let pages = server
            .save_working_set(&path)
            .with_context(|| format!("cannot write the working set {}", path.display()))?;
        tracing::info!(pages, path = %path.display(), "working set recorded");
    }
    tracing::info!(
        ?reason,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "VM ended"
    );
    match &reason {
        StopReason::Guest(crate::vstate::vcpu::VmExitReason::Error(e)) | StopReason::Error(e) => {
            bail!("the VM failed: {e}")
        }
        other => Ok(other.exit_status()),
    }
}

/// The VMM thread's stack. Under 2 MiB: a 2 MiB stack (the default) can be backed by a
/// transparent huge page, measured as 2 MiB more resident memory per VMM. 256 KiB overflowed while
/// writing a snapshot in a debug build.
const VMM_STACK: usize = 1024 * 1024;

/// Writes the pages of `ram` (guest RAM mapped from the memory file `mem`) that the guest wrote
/// as the set of written pages of that memory file, `<mem>.written.ws`.
fn record_written(
    ram: &crate::arch::memory::GuestMemory,
    mem: &Path,
    info: &MemoryFileInfo,
) -> anyhow::Result<()> {
    let pages = crate::arch::memory::written_pages(ram)?;
    let path = SetKind::Written.path_for(mem);
    let ws = WorkingSet::new(pages);
    ws.write(&path, info, SetKind::Written)
        .with_context(|| format!("cannot write the written pages {}", path.display()))?;
    tracing::info!(pages = ws.pages().len(), path = %path.display(), "written pages recorded");
    Ok(())
}

/// Milliseconds since `t` (for the start-up timing logs).
fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
