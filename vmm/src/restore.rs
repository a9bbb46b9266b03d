//! Builds a VM from a snapshot instead of a kernel: reads and checks the state file, checks the
//! memory file on the descriptor it then maps privately (copy on write, optionally with the
//! private copies of the pages an earlier restore's guest wrote made before the vCPUs run; or, in
//! the copy mode,
//! reads its data extents into huge-page anonymous memory; or, in the userfaultfd mode, serves
//! from it on demand, see `uffd`), and restores the KVM
//! VM, each vCPU and each device from its saved state. Nothing is built from the snapshot before
//! it is checked against the configuration (memory size, vCPU count, devices, vsock cid); a
//! snapshot that does not fit gives an error, never a guest on bad state.
//!
//! Why copy written pages ahead: in a nested VM (the test host) each first touch of a guest page
//! is an exit, and a page the guest reads before it writes costs two (a read fault that maps the
//! shared page read-only, then a write fault that copies it). A restored guest answering its first
//! vsock request wrote ~190 pages, ~140 of them read first; copying them ahead (some 8-15 ms of
//! `MADV_POPULATE_WRITE`) took `hearth-perf restore` from the Restore command to the echo from
//! 169-191 ms to 105 ms p50 in one interleaved run, 209 to 143 in another.
//!
//! A VMM started ahead of its restore (`hearth vmm --await-restore`, see `awaiting`) splits this
//! in two: [`prepare`] (the KVM VM and its vCPUs, for the configured shape) before the snapshot is
//! known, then [`open`] (the same reading and checking as every restore) and
//! [`restore_prepared`] when the Restore command names it.

use crate::arch::memory::{self, MemoryError};
use crate::builder::{self, BuildError, BuiltVm};
use crate::config::VmConfig;
use crate::devices::serial::{BoundedLog, SerialDevice};
use crate::devices::virtio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::vsock::persist::VsockPersistError;
use crate::kvm;
use crate::persist::{SnapshotParts, VmmState};
use crate::vstate::vcpu::{EventSink, Vcpu};
use crate::vstate::vm::{Vm, VmError};
use crate::vstate::vm_state::VmStateError;
use hearth_snapshot::{
    MemoryFile, MemoryFileError, SetKind, StateFileError, WorkingSet, WorkingSetError, state_file,
};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// Where a snapshot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
}

/// How guest RAM is brought back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestoreMode {
    /// The memory file mapped privately (copy on write): clones share untouched pages through
    /// the page cache.
    File {
        /// A set of written pages (`<mem>.written.ws`, recorded by an earlier file-mapped restore
        /// of the same snapshot) to copy on write before the vCPUs run: the guest's first write
        /// to each then takes no copying fault (nor, in a nested VM, a read fault before it).
        prefetch_ws: Option<PathBuf>,
        /// Record the pages the guest wrote (the mapping's private copies) and write them to
        /// `<mem>.written.ws` when the VM stops.
        record_ws: bool,
    },
    /// The memory file's data read into anonymous memory that starts on 2 MiB boundaries and is
    /// advised for transparent huge pages, before the vCPUs run: no sharing between clones (each
    /// holds its own copy of the snapshot's data), but KVM can map guest RAM with 2 MiB pages,
    /// where a file mapping gives it 4 KiB pages and the guest one nested page fault for each.
    Copy,
    /// Anonymous memory filled on first touch from the memory file by a userfaultfd handler.
    Uffd {
        /// A working-set file to copy in before the vCPUs run.
        prefetch_ws: Option<PathBuf>,
        /// Record the pages served and write them to `<mem>.ws` when the VM stops.
        record_ws: bool,
    },
}

impl RestoreMode {
    /// The memory file mapped privately, nothing prefetched or recorded.
    pub const fn file() -> Self {
        RestoreMode::File {
            prefetch_ws: None,
            record_ws: false,
        }
    }
}

impl Default for RestoreMode {
    fn default() -> Self {
        RestoreMode::file()
    }
}

/// Restoring failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The state file is unreadable, corrupted or of another version.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The memory file does not match the state file.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// The snapshot does not fit the configuration, or contradicts itself.
    #[error("the snapshot does not match the VM configuration: {0}")]
    Mismatch(String),
    /// The host has no hardware KVM.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM set-up or a vCPU restore failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The VM-wide KVM state could not be restored.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// A device could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The vsock device could not be restored.
    #[error(transparent)]
    Vsock(#[from] VsockPersistError),
    /// The userfaultfd mode could not be set up.
    #[error("userfaultfd restore")]
    Uffd(#[from] crate::uffd::UffdError),
    /// The vsock transport could not be restored.
    #[error("cannot restore the vsock transport")]
    Transport(#[source] crate::devices::virtio::MmioError),
    /// The set of written pages to prefetch is unreadable, damaged or another snapshot's.
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
    /// The memory file could not be read into guest RAM (the `Copy` mode).
    #[error("cannot read the memory file into guest RAM at offset {0:#x}")]
    CopyData(u64, #[source] std::io::Error),
}

/// Reads the data extents of `file` (guest RAM, the regions one after the other; holes are
/// zero, as fresh anonymous memory is) into `mem`. Returns the bytes read.
fn copy_data(file: &std::fs::File, mem: &memory::GuestMemory) -> Result<u64, RestoreError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    let mut copied = 0u64;
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| RestoreError::CopyData(offset, std::io::Error::other(e.to_string())))?;
        let extents = hearth_snapshot::memory_file::data_extents(file, offset, len)
            .map_err(|e| RestoreError::CopyData(offset, e))?;
        for (start, end) in extents {
            let mut pos = start;
            while pos < end {
                // SAFETY: `host` is the start of this region's mapping of `len` bytes, and
                // `pos < end <= len` (extents lie within the region); the memory is the process's
                // own anonymous guest RAM, which no vCPU or device uses yet.
                let r = unsafe {
                    libc::pread(
                        std::os::fd::AsRawFd::as_raw_fd(file),
                        host.add(pos as usize).cast(),
                        (end - pos) as usize,
                        (offset + pos) as libc::off_t,
                    )
                };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(RestoreError::CopyData(offset + pos, e));
                }
                if r == 0 {
                    return Err(RestoreError::CopyData(
                        offset + pos,
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                pos += r as u64;
                copied += r as u64;
            }
        }
        offset += len;
    }
    Ok(copied)
}

fn mismatch(what: String) -> RestoreError {
    RestoreError::Mismatch(what)
}

/// Checks the snapshot against itself and the configuration before anything is built from it.
fn check(state: &VmmState, config: &VmConfig) -> Result<(), RestoreError> {
    if state.mem_bytes != config.mem_bytes() || state.memory.size != state.mem_bytes {
        return Err(mismatch(format!(
            "the snapshot has {} bytes of guest RAM (memory file {}), the configuration {}",
            state.mem_bytes,
            state.memory.size,
            config.mem_bytes()
        )));
    }
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(mismatch(format!(
            "the snapshot has {} vCPUs, the configuration {}",
            state.vcpus.len(),
            config.vcpus
        )));
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        if usize::from(v.id) != i {
            return Err(mismatch(format!("vCPU {i} is saved as vCPU {}", v.id)));
        }
    }
    if state.vsock.is_some() != config.vsock.is_some() {
        return Err(mismatch(format!(
            "the snapshot {} a vsock device, the configuration {}",
            if state.vsock.is_some() {
                "has"
            } else {
                "has no"
            },
            if config.vsock.is_some() {
                "has one"
            } else {
                "none"
            }
        )));
    }
    Ok(())
}

/// What a VMM started ahead of a restore sets up before it knows the snapshot (see
/// `awaiting`): the KVM VM with its irqchip and PIT (no memory yet) and its vCPUs, created with
/// this host's CPUID, for the configured vCPU count; the serial log; the vsock host socket.
/// Only a snapshot of that shape can be restored into it.
pub struct Prepared {
    vm: Vm,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// The serial console's log, created.
    log: BoundedLog,
    /// The vsock device's host side, bound (its listener queues host connections until the
    /// restored device serves them).
    vsock_backend: Option<crate::devices::virtio::vsock::VsockUnixBackend>,
}

/// Sets up what does not depend on a snapshot's contents, for `config`'s vCPU count.
pub fn prepare(config: &VmConfig) -> Result<Prepared, RestoreError> {
    config.validate()?;
    kvm::require_hardware()?;
    let vm = Vm::new(&memory::GuestMemory::default())?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VCPU", e))?;
        fd.set_cpuid2(&vm.vcpu_cpuid(id, config.vcpus))
            .map_err(|e| VmError::Ioctl("KVM_SET_CPUID2", e))?;
        vcpus.push(fd);
    }
    let log = BoundedLog::create(config.serial_log.as_deref(), config.serial_log_cap)
        .map_err(BuildError::from)?;
    let vsock_backend = match &config.vsock {
        Some(v) => Some(crate::vsock::bind_backend(v).map_err(BuildError::Vsock)?),
        None => None,
    };
    Ok(Prepared {
        vm,
        vcpus,
        log,
        vsock_backend,
    })
}

/// A snapshot read and checked, not yet used: its state and its memory file, open (the
/// descriptor it was checked on, which is the one mapped or read).
pub struct Opened {
    state: VmmState,
    mem_file: std::fs::File,
}

/// Reads the state file, checks it against `config`, opens the memory file and checks it on
/// that descriptor. Nothing is built: a snapshot refused here leaves a [`Prepared`] VM usable.
pub fn open(
    config: &VmConfig,
    files: &SnapshotFiles,
    started: Instant,
) -> Result<Opened, RestoreError> {
    config.validate()?;
    let state: VmmState = state_file::read(&files.state)?;
    check(&state, config)?;
    let ms = |what: &str| tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "{what}");
    ms("state file read");
    let mem_file = MemoryFile::open(&files.mem, &state.memory)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        how = ?mem_file.checked(),
        "memory file checked"
    );
    Ok(Opened {
        state,
        mem_file: mem_file.into_file(),
    })
}

/// Builds the VM saved in `files` with the devices' host side as `config` says.
pub fn restore(
    config: &VmConfig,
    files: &SnapshotFiles,
    started: Instant,
) -> Result<BuiltVm, RestoreError> {
    restore_with(config, files, &RestoreMode::file(), true, started).map(|(vm, _)| vm)
}

/// [`restore`] in `mode`; in the userfaultfd mode also the running handler (which must live as
/// long as the VM). `seccomp`: install the handler thread's filter.
pub fn restore_with(
    config: &VmConfig,
    files: &SnapshotFiles,
    mode: &RestoreMode,
    seccomp: bool,
    started: Instant,
) -> Result<(BuiltVm, Option<crate::uffd::UffdServer>), RestoreError> {
    let opened = open(config, files, started)?;
    let (mem, uffd) = map_memory(&opened, mode, seccomp)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "guest memory mapped"
    );
    let prepared = prepare(config)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "KVM VM created"
    );
    let built = build(prepared, opened.state, mem, config, started)?;
    Ok((built, uffd))
}

/// Checks that the snapshot `opened` fits the VM `prepared` for `config`: its vCPU count, and
/// each vCPU's saved CPUID is the one this host gives it. Nothing is changed: a snapshot refused
/// here leaves `prepared` usable.
pub fn check_prepared(
    prepared: &Prepared,
    opened: &Opened,
    config: &VmConfig,
) -> Result<(), RestoreError> {
    if prepared.vcpus.len() != opened.state.vcpus.len() {
        return Err(mismatch(format!(
            "the snapshot has {} vCPUs, the VM was prepared with {}",
            opened.state.vcpus.len(),
            prepared.vcpus.len()
        )));
    }
    for saved in &opened.state.vcpus {
        saved
            .check_cpuid(prepared.vm.vcpu_cpuid(saved.id, config.vcpus).as_slice())
            .map_err(|e| VmError::Restore(saved.id, e))?;
    }
    Ok(())
}

/// Restores the snapshot `opened` (from [`open`], checked against the same `config`) into the
/// VM `prepared` for it: the VMM started ahead's half of [`restore_with`].
pub fn restore_prepared(
    prepared: Prepared,
    opened: Opened,
    config: &VmConfig,
    mode: &RestoreMode,
    seccomp: bool,
    started: Instant,
) -> Result<(BuiltVm, Option<crate::uffd::UffdServer>), RestoreError> {
    check_prepared(&prepared, &opened, config)?;
    let (mem, uffd) = map_memory(&opened, mode, seccomp)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "guest memory mapped"
    );
    let built = build(prepared, opened.state, mem, config, started)?;
    Ok((built, uffd))
}

/// Guest RAM from the checked memory file, as `mode` says.
fn map_memory(
    opened: &Opened,
    mode: &RestoreMode,
    seccomp: bool,
) -> Result<(memory::GuestMemory, Option<crate::uffd::UffdServer>), RestoreError> {
    let mem_file = &opened.mem_file;
    let mem_bytes = opened.state.mem_bytes;
    Ok(match mode {
        RestoreMode::File { prefetch_ws, .. } => {
            let mem = memory::map_file(mem_file, mem_bytes)?;
            if let Some(path) = prefetch_ws {
                let ws = WorkingSet::read(path, &opened.state.memory, SetKind::Written)?;
                memory::copy_on_write_ahead(&mem, ws.runs())?;
                tracing::debug!(pages = ws.pages().len(), "written pages copied ahead");
            }
            (mem, None)
        }
        RestoreMode::Copy => {
            let mem = memory::create(mem_bytes)?;
            let copied = copy_data(mem_file, &mem)?;
            tracing::debug!(bytes = copied, "memory file data copied into guest RAM");
            (mem, None)
        }
        RestoreMode::Uffd {
            prefetch_ws,
            record_ws,
        } => {
            let options = crate::uffd::UffdOptions {
                prefetch: prefetch_ws.clone(),
                record: *record_ws,
                seccomp,
            };
            let file = mem_file.try_clone().map_err(MemoryError::Dup)?;
            let (mem, server) = crate::uffd::map(file, &opened.state.memory, &options)?;
            (mem, Some(server))
        }
    })
}

/// Registers `mem` as the guest RAM of `vm` (a VM created without memory).
fn register_memory(vm: &Vm, mem: &memory::GuestMemory) -> Result<(), RestoreError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which the
        // VMM keeps alive (it is cloned into every user) for as long as the VM runs.
        unsafe { vm.fd().set_user_memory_region(region_desc) }
            .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// Builds the checked snapshot `state` into the VM `prepared`, with guest RAM `mem`.
fn build(
    prepared: Prepared,
    state: VmmState,
    mem: memory::GuestMemory,
    config: &VmConfig,
    started: Instant,
) -> Result<BuiltVm, RestoreError> {
    let ms = |what: &str| tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "{what}");
    let Prepared {
        vm,
        vcpus: fds,
        log,
        vsock_backend,
    } = prepared;
    register_memory(&vm, &mem)?;
    ms("guest memory registered");

    let (serial, serial_irq) =
        SerialDevice::restore(log, &state.serial).map_err(BuildError::from)?;
    let (pio, serial) = builder::port_bus(&vm, serial, &serial_irq)?;

    let mut mmio = crate::devices::bus::Bus::new(0);
    let mut subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> = Vec::new();
    let mut vsock_parts = None;
    if let (Some(backend), Some(saved)) = (vsock_backend, &state.vsock) {
        let device = Arc::new(Mutex::new(Vsock::restore(backend, &saved.device)?));
        let dyn_device: Arc<Mutex<dyn crate::devices::virtio::VirtioDevice>> = device.clone();
        let transport = MmioTransport::restore(mem.clone(), dyn_device, &saved.transport)
            .map_err(RestoreError::Transport)?;
        device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .resume(&saved.device, &mem, transport.irq())?;
        let (_info, transport) = builder::attach_transport(&vm, &mut mmio, 0, transport)?;
        subscribers.push(device.clone());
        vsock_parts = Some((transport, device));
    }

    ms("devices restored");
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?);
    let (sink, events) = EventSink::new(wake.clone());
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    // The clock first: each vCPU's TSC is set in step with it.
    let tsc_khz = state.vcpus.first().map_or(0, |v| v.tsc_khz);
    let tsc_shift = state.vm.restore_clock(&vm, tsc_khz)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        ?tsc_shift,
        "KVM clock restored"
    );
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (saved, fd) in state.vcpus.iter().zip(fds) {
        let cpuid = vm.vcpu_cpuid(saved.id, config.vcpus);
        saved
            .check_cpuid(cpuid.as_slice())
            .map_err(|e| VmError::Restore(saved.id, e))?;
        saved
            .restore(&fd, tsc_shift)
            .map_err(|e| VmError::Restore(saved.id, e))?;
        let cpuid = cpuid.as_slice().to_vec();
        let timing = (saved.id == 0).then_some(started);
        vcpus.push(
            Vcpu::new(
                saved.id,
                fd,
                pio.clone(),
                mmio.clone(),
                sink.clone(),
                timing,
            )
            .with_persist(cpuid, vm.msr_indices().clone()),
        );
    }
    ms("vCPUs restored");
    state.vm.restore_chips(&vm)?;
    ms("VM restored");
    let vm = Arc::new(vm);
    let restored_from = Some(state.memory);
    Ok(BuiltVm {
        persist: SnapshotParts {
            vm: vm.clone(),
            mem: mem.clone(),
            serial,
            vsock: vsock_parts,
        },
        vm,
        mem,
        vcpus,
        events,
        wake,
        subscribers,
        restored_from,
    })
}
