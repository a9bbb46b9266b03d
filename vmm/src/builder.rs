//! Builds a VM from a [`VmConfig`]: memory, KVM VM, kernel and initramfs, the boot tables, the
//! devices on their buses, ACPI, and the vCPUs (created, not yet running).

use crate::acpi::{self, MmioDeviceInfo};
use crate::arch::layout::{
    ACPI_SLEEP_PORT, SERIAL_GSI, VIRTIO_GSI_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::arch::memory::{self, GuestMemory};
use crate::arch::{boot, regs};
use crate::config::VmConfig;
use crate::devices::bus::{Bus, BusAction, BusDevice, BusError};
use crate::devices::legacy::{AcpiSleep, CMOS_PORT, Cmos, I8042, I8042_CMD, I8042_DATA};
use crate::devices::serial::{BoundedLog, COM1_LEN, COM1_PORT, SerialDevice};
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::kvm;
use crate::vstate::vcpu::{EventSink, Vcpu, VcpuEvent};
use crate::vstate::vm::{Vm, VmError};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

/// The command line every guest gets before the caller's extra.
///
/// `cryptomgr.notests` skips the crypto API's self-tests of every algorithm the kernel registers
/// (the slowest initcall, `crypto_algapi_init`, with `initcall_debug` in the test host); measured
/// there, the guest's kernel-to-init time fell from 2898 to 2125 ms p50 (10 boots each).
///
/// `no-kvmapf` keeps the guest from turning on KVM's asynchronous page faults. A guest that has
/// them on gets an interrupt ("wake up all sleepers") from KVM as soon as a restore writes its
/// `MSR_KVM_ASYNC_PF_EN` back, and handling it is the first thing every restored clone does
/// (seen in KVM's trace: vector 0xf3 injected before the first guest instruction). Without it, a
/// restore into the test host took 376-382 nested page faults to the guest's echo instead of
/// 392-396 (the three fastest of 30 restores each). What asynchronous page faults are for, a
/// vCPU running other guest work while the host swaps a page in, does not apply to a microVM
/// whose memory is a mapped file in the page cache or anonymous memory that is not swapped.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd cryptomgr.notests no-kvmapf";
/// The virtio-mmio notify register offset.
pub const NOTIFY_OFFSET: u64 = 0x50;

/// Building the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The host has no hardware KVM.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// KVM set-up failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel or initramfs could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The boot page tables could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The serial console failed.
    #[error(transparent)]
    Serial(#[from] crate::devices::serial::SerialError),
    /// A bus range clashed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A virtio device could not be put behind its transport.
    #[error("cannot attach virtio device {0}")]
    Virtio(usize, #[source] crate::devices::virtio::MmioError),
    /// The vsock device could not be created.
    #[error("cannot create the vsock device: {0}")]
    Vsock(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A built VM: everything needed to spawn the vCPUs and run the event loop.
pub struct BuiltVm {
    /// The KVM VM (kept alive for as long as the vCPUs run).
    pub vm: Arc<Vm>,
    /// Guest memory.
    pub mem: GuestMemory,
    /// The vCPUs, not yet spawned.
    pub vcpus: Vec<Vcpu>,
    /// vCPU events.
    pub events: Receiver<VcpuEvent>,
    /// Written after each vCPU event.
    pub wake: Arc<EventFd>,
    /// Device event subscribers for the event loop.
    pub subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>,
    /// What a snapshot of the VM reads.
    pub persist: crate::persist::SnapshotParts,
    /// For a VM restored from a snapshot, the memory file its guest RAM came from.
    pub restored_from: Option<hearth_snapshot::MemoryFileInfo>,
}

/// The virtio-mmio transport on the MMIO bus.
impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bus_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> BusAction {
        self.bus_write(offset, data);
        BusAction::None
    }
}

/// The port-IO bus: the serial console (its interrupt `serial_irq` on its GSI) and the legacy
/// ports. Returns the bus and the console, shared.
pub(crate) fn port_bus(
    vm: &Vm,
    serial: SerialDevice,
    serial_irq: &EventFd,
) -> Result<(Bus, Arc<Mutex<SerialDevice>>), BuildError> {
    // Port IO: unmapped reads float high (0xff), which is what absent COM2-4 and PCI look like.
    let mut pio = Bus::new(0xff);
    vm.register_irqfd(serial_irq, SERIAL_GSI)?;
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(COM1_PORT, COM1_LEN, serial.clone())?;
    pio.insert(I8042_DATA, 1, Arc::new(Mutex::new(I8042::data())))?;
    pio.insert(I8042_CMD, 1, Arc::new(Mutex::new(I8042::command())))?;
    pio.insert(CMOS_PORT, 2, Arc::new(Mutex::new(Cmos)))?;
    pio.insert(
        u64::from(ACPI_SLEEP_PORT),
        1,
        Arc::new(Mutex::new(AcpiSleep)),
    )?;
    Ok((pio, serial))
}

/// Puts `transport` behind virtio-mmio window `index`: MMIO bus, ioeventfds, irqfd.
pub(crate) fn attach_transport(
    vm: &Vm,
    mmio: &mut Bus,
    index: usize,
    transport: MmioTransport,
) -> Result<(MmioDeviceInfo, Arc<Mutex<MmioTransport>>), BuildError> {
    let info = MmioDeviceInfo {
        base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_GSI_BASE + index as u32,
    };
    for (queue, evt) in transport
        .queue_evts()
        .map_err(|e| BuildError::Virtio(index, e))?
        .iter()
        .enumerate()
    {
        vm.register_ioevent(evt, info.base + NOTIFY_OFFSET, queue as u32)?;
    }
    vm.register_irqfd(transport.irq_evt(), info.gsi)?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(info.base, info.size, transport.clone())?;
    Ok((info, transport))
}

/// The full kernel command line for `config`.
pub fn cmdline(config: &VmConfig) -> String {
    if config.cmdline_extra.trim().is_empty() {
        BASE_CMDLINE.to_string()
    } else {
        format!("{BASE_CMDLINE} {}", config.cmdline_extra.trim())
    }
}

/// Puts `device` behind virtio-mmio window `index`: MMIO bus, ioeventfds, irqfd.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemory,
    mmio: &mut Bus,
    index: usize,
    device: Arc<Mutex<dyn VirtioDevice>>,
) -> Result<(MmioDeviceInfo, Arc<Mutex<MmioTransport>>), BuildError> {
    let transport =
        MmioTransport::new(mem.clone(), device).map_err(|e| BuildError::Virtio(index, e))?;
    attach_transport(vm, mmio, index, transport)
}

/// Builds the VM described by `config`. `started` is when the process started (for the
/// first-`KVM_RUN` timing log).
pub fn build(config: &VmConfig, started: Instant) -> Result<BuiltVm, BuildError> {
    config.validate()?;
    build_in(
        config,
        memory::create_with(config.mem_bytes(), config.huge_pages)?,
        started,
    )
}

/// [`build`] in guest memory `mem` made by the caller (a template VM's RAM file:
/// `memory::RamFile`).
pub fn build_in(
    config: &VmConfig,
    mem: GuestMemory,
    started: Instant,
) -> Result<BuiltVm, BuildError> {
    config.validate()?;
    // The guest is loaded before KVM is asked for anything, so a bad kernel or initramfs is
    // reported as such on any host; then a host without hardware KVM fails, naming the test host.
    // (Creating the VM on a second thread while loading was measured slower in the test host.)
    let entry = boot::load_guest(
        &mem,
        &config.kernel,
        config.initrd.as_deref(),
        &cmdline(config),
    )?;
    regs::write_boot_tables(&mem)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "guest loaded"
    );
    kvm::require_hardware()?;
    let vm = Vm::new(&mem)?;
    tracing::debug!(
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "KVM VM created"
    );

    let log = BoundedLog::create(config.serial_log.as_deref(), config.serial_log_cap)?;
    let (serial, serial_irq) = SerialDevice::new(log)?;
    let (pio, serial) = port_bus(&vm, serial, &serial_irq)?;

    let mut mmio = Bus::new(0);
    let mut devices = Vec::new();
    let mut subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> = Vec::new();
    let mut vsock_parts = None;
    if let Some(vsock_config) = &config.vsock {
        let device = crate::vsock::create_device(vsock_config, &mem).map_err(BuildError::Vsock)?;
        let (info, transport) = attach_virtio(&vm, &mem, &mut mmio, devices.len(), device.clone())?;
        devices.push(info);
        subscribers.push(device.clone());
        vsock_parts = Some((transport, device));
    }
    acpi::write_tables(&mem, config.vcpus, &devices)?;

    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?);
    let (sink, events) = EventSink::new(wake.clone());
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let fd = vm.create_vcpu(id, config.vcpus, entry.entry)?;
        let timing = (id == 0).then_some(started);
        let cpuid = vm.vcpu_cpuid(id, config.vcpus).as_slice().to_vec();
        vcpus.push(
            Vcpu::new(id, fd, pio.clone(), mmio.clone(), sink.clone(), timing)
                .with_persist(cpuid, vm.msr_indices().clone()),
        );
    }
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "VM built");
    let vm = Arc::new(vm);
    Ok(BuiltVm {
        persist: crate::persist::SnapshotParts {
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
        restored_from: None,
        subscribers,
    })
}
