//! The virtio-mmio transport, version 2 (modern only): the register window a vCPU reads and
//! writes, the device status state machine, feature negotiation, queue set-up and validation, and
//! the hand-over of the queues to the device when the driver says DRIVER_OK.
//!
//! The VMM's MMIO bus calls [`MmioTransport::bus_read`] and [`MmioTransport::bus_write`] with
//! offsets relative to the window's base. Queue notifications normally never reach it: the VMM
//! registers each of [`MmioTransport::queue_evts`] as an ioeventfd at base + 0x50 with the queue
//! index as datamatch. The interrupt is [`MmioTransport::irq_evt`], registered as an irqfd.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{GuestMemory, IrqKind, IrqTrigger, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::guest_warn;

/// Size of one virtio-mmio window (registers and configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the queue notify register (the ioeventfd address is base + this).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset where the device configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The interrupt eventfd could not be created.
    #[error("cannot create the interrupt eventfd")]
    Irq(#[source] io::Error),
    /// The device declared a queue size `virtio_queue` refuses (not a power of two up to 32768).
    #[error("queue {index} has an invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        size: u16,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device does not offer VIRTIO_F_VERSION_1 (legacy devices are not supported).
    #[error("the device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// Cloning a queue eventfd failed.
    #[error("cannot clone a queue eventfd")]
    CloneEventFd(#[source] io::Error),
    /// The saved transport state is invalid.
    #[error("invalid saved virtio-mmio state")]
    Restore(#[source] super::persist::PersistError),
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    irq: Arc<IrqTrigger>,
    status: u32,
    features_select: u32,
    driver_features_select: u32,
    queue_select: u32,
    queues: Vec<Queue>,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("queue_select", &self.queue_select)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `current` with its low or high 32 bits replaced by `v`.
fn half(current: u64, v: u32, high: bool) -> GuestAddress {
    if high {
        GuestAddress((current & 0xffff_ffff) | (u64::from(v) << 32))
    } else {
        GuestAddress((current & !0xffff_ffff) | u64::from(v))
    }
}

fn new_queues(max_sizes: &[u16]) -> Result<Vec<Queue>, MmioError> {
    max_sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| {
            Queue::new(size).map_err(|source| MmioError::QueueSize {
                index,
                size,
                source,
            })
        })
        .collect()
}

impl MmioTransport {
    /// Put `device` behind a register window. `mem` is the guest memory its queues live in.
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Self, MmioError> {
        let queues = {
            let dev = lock(&device);
            if dev.avail_features() & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                return Err(MmioError::NotModern);
            }
            new_queues(dev.queue_max_sizes())?
        };
        Ok(Self {
            device,
            mem,
            irq: Arc::new(IrqTrigger::new().map_err(MmioError::Irq)?),
            status: 0,
            features_select: 0,
            driver_features_select: 0,
            queue_select: 0,
            queues,
            config_generation: 0,
        })
    }

    /// The transport's state (the device saves its own).
    pub fn save(&self) -> super::persist::MmioTransportState {
        super::persist::MmioTransportState {
            status: self.status,
            features_select: self.features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            queues: self
                .queues
                .iter()
                .map(super::persist::QueuePersist::from)
                .collect(),
        }
    }

    /// A transport in a saved state, in front of `device` (restored separately, and activated
    /// by its own restore when the state says DRIVER_OK, with [`MmioTransport::irq`]).
    pub fn restore(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &super::persist::MmioTransportState,
    ) -> Result<Self, MmioError> {
        super::persist::check_status(state.status).map_err(MmioError::Restore)?;
        let mut t = Self::new(mem, device)?;
        let max_sizes = lock(&t.device).queue_max_sizes().to_vec();
        t.queues = super::persist::build_queues(&state.queues, &max_sizes, None)
            .map_err(MmioError::Restore)?;
        t.status = state.status;
        t.features_select = state.features_select;
        t.driver_features_select = state.driver_features_select;
        t.queue_select = state.queue_select;
        t.config_generation = state.config_generation;
        t.irq.set_status(state.interrupt_status & 3);
        Ok(t)
    }

    /// The device behind this window.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The interrupt eventfd, to register as an irqfd on the device's GSI.
    pub fn irq_evt(&self) -> &EventFd {
        self.irq.irq_evt()
    }

    /// The interrupt (shared with the device once it is active).
    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    /// One eventfd per queue (clones of the device's): register queue `i`'s as an ioeventfd at
    /// base + [`NOTIFY_REG_OFFSET`] with datamatch `i` (32-bit).
    pub fn queue_evts(&self) -> Result<Vec<EventFd>, MmioError> {
        let dev = lock(&self.device);
        dev.queue_events()
            .iter()
            .map(|e| e.try_clone().map_err(MmioError::CloneEventFd))
            .collect()
    }

    /// The device status register as the guest sees it.
    pub fn status(&self) -> u32 {
        let needs_reset = lock(&self.device).needs_reset();
        if needs_reset {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// A vCPU reads `data.len()` bytes at `offset` in the window.
    pub fn bus_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            if offset < MMIO_WINDOW_SIZE {
                lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: unaligned register read"
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = lock(&self.device).avail_features();
                match self.features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.irq.status(),
            0x70 => self.status(),
            // No shared memory regions: their length and base read as -1.
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0xfc => self.config_generation,
            _ => {
                guest_warn!(offset, "virtio-mmio: read of an unknown register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A vCPU writes `data` at `offset` in the window.
    pub fn bus_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset >= MMIO_WINDOW_SIZE {
                return;
            }
            if self.status & DRIVER != 0 && self.status & FAILED == 0 {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                guest_warn!(offset, "virtio-mmio: config write before DRIVER");
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register write not 32 bits"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!(offset, "virtio-mmio: unaligned register write");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.features_select = v,
            0x20 => self.write_driver_features(v),
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                self.write_queue_reg(offset, v)
            }
            0x50 => self.notify(v),
            0x64 => self.irq.ack(v),
            0x70 => self.write_status(v),
            0xac => {} // SHMSel: there are no shared memory regions.
            _ => guest_warn!(
                offset,
                "virtio-mmio: write to an unknown or read-only register"
            ),
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status != (ACKNOWLEDGE | DRIVER) {
            guest_warn!(
                status = self.status,
                "virtio-mmio: driver features written out of order"
            );
            return;
        }
        let shift = match self.driver_features_select {
            0 => 0,
            1 => 32,
            _ => {
                if v != 0 {
                    guest_warn!("virtio-mmio: driver acknowledged unknown feature bits");
                }
                return;
            }
        };
        let mut dev = lock(&self.device);
        let avail = dev.avail_features();
        let word = u64::from(v) << shift;
        if word & !avail != 0 {
            guest_warn!("virtio-mmio: driver acknowledged features the device did not offer");
        }
        let mask = 0xffff_ffffu64 << shift;
        let acked = (dev.acked_features() & !mask) | (word & avail);
        dev.set_acked_features(acked);
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if self.status & FEATURES_OK == 0 || self.status & (DRIVER_OK | FAILED) != 0 {
            guest_warn!(
                offset,
                status = self.status,
                "virtio-mmio: queue set-up in the wrong state"
            );
            return;
        }
        let Some(q) = self.queues.get_mut(self.queue_select as usize) else {
            guest_warn!(
                queue = self.queue_select,
                "virtio-mmio: set-up of a queue that does not exist"
            );
            return;
        };
        // The `try_` setters: the plain ones log through `log` on every bad value, unlimited.
        let result = match offset {
            0x38 => q.try_set_size(v.try_into().unwrap_or(0)),
            0x44 => {
                q.set_ready(v == 1);
                Ok(())
            }
            0x80 | 0x84 => q.try_set_desc_table_address(half(q.desc_table(), v, offset == 0x84)),
            0x90 | 0x94 => q.try_set_avail_ring_address(half(q.avail_ring(), v, offset == 0x94)),
            0xa0 | 0xa4 => q.try_set_used_ring_address(half(q.used_ring(), v, offset == 0xa4)),
            _ => Ok(()),
        };
        if let Err(e) = result {
            guest_warn!(offset, value = v, error = %e, "virtio-mmio: invalid queue set-up value ignored");
        }
    }

    fn notify(&mut self, index: u32) {
        // Reached only when no ioeventfd is registered for this queue: forward it.
        let dev = lock(&self.device);
        match dev.queue_events().get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!(error = %e, "virtio-mmio: cannot signal a queue eventfd");
                }
            }
            None => guest_warn!(
                queue = index,
                "virtio-mmio: notify for a queue that does not exist"
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; a driver writing back what it read may echo it.
        let v = v & !DEVICE_NEEDS_RESET;
        let old = self.status & !DEVICE_NEEDS_RESET;
        if v & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        if v & old != old {
            guest_warn!(old, new = v, "virtio-mmio: status write clears bits");
            return;
        }
        match (old, v) {
            (0, ACKNOWLEDGE) => self.status = v,
            (ACKNOWLEDGE, x) if x == ACKNOWLEDGE | DRIVER => self.status = v,
            (x, y) if x == ACKNOWLEDGE | DRIVER && y == x | FEATURES_OK => {
                let acked = lock(&self.device).acked_features();
                if acked & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                    // Leave FEATURES_OK clear: the driver reads it back and gives up.
                    guest_warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
                    return;
                }
                self.status = v;
            }
            (x, y) if x == ACKNOWLEDGE | DRIVER | FEATURES_OK && y == x | DRIVER_OK => {
                self.status = v;
                self.activate();
            }
            (x, y) if x == y => {}
            _ => guest_warn!(old, new = v, "virtio-mmio: invalid status transition"),
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, q) in self.queues.iter().enumerate() {
            // Our own check first: `is_valid` logs through `log`, unlimited.
            if let Err(e) = super::queue::check_layout(q, &self.mem) {
                guest_warn!(queue = index, error = %e, "virtio-mmio: queue invalid at DRIVER_OK");
                self.fail_activation();
                return;
            }
            if !q.is_valid(&self.mem) {
                guest_warn!(queue = index, "virtio-mmio: queue invalid at DRIVER_OK");
                self.fail_activation();
                return;
            }
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    guest_warn!(queue = index, error = %e, "virtio-mmio: queue state rejected");
                    self.fail_activation();
                    return;
                }
            }
        }
        let result = lock(&self.device).activate(self.mem.clone(), queues, self.irq.clone());
        if let Err(e) = result {
            guest_warn!(error = %e, "virtio-mmio: device activation failed");
            self.fail_activation();
        }
    }

    fn fail_activation(&mut self) {
        self.status |= DEVICE_NEEDS_RESET;
        if let Err(e) = self.irq.trigger(IrqKind::Config) {
            tracing::error!(error = %e, "virtio-mmio: cannot raise the config interrupt");
        }
    }

    fn reset(&mut self) {
        let mut dev = lock(&self.device);
        dev.reset();
        for q in &mut self.queues {
            q.reset();
        }
        drop(dev);
        self.status = 0;
        self.features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.irq.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use crate::devices::virtio::test_utils::{TestQueue, test_memory};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A minimal device for transport tests: two queues, a 4-byte config space.
    struct Dummy {
        evts: Vec<EventFd>,
        acked: u64,
        config: [u8; 4],
        active: Option<Vec<Queue>>,
        resets: u32,
    }

    impl Dummy {
        fn new() -> Self {
            Self {
                evts: vec![
                    EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                    EventFd::new(EFD_NONBLOCK).expect("eventfd"),
                ],
                acked: 0,
                config: [1, 2, 3, 4],
                active: None,
                resets: 0,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            queues: Vec<Queue>,
            _irq: Arc<IrqTrigger>,
        ) -> Result<(), ActivateError> {
            self.active = Some(queues);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active.is_some()
        }
        fn needs_reset(&self) -> bool {
            false
        }
        fn reset(&mut self) {
            self.active = None;
            self.acked = 0;
            self.resets += 1;
        }
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.bus_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.bus_write(offset, &v.to_le_bytes());
    }

    fn setup() -> (GuestMemory, Arc<Mutex<Dummy>>, MmioTransport) {
        let mem = test_memory(0x10_0000);
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::new(mem.clone(), dev.clone()).expect("transport");
        (mem, dev, t)
    }

    fn negotiate(t: &mut MmioTransport) {
        write(t, 0x70, ACKNOWLEDGE);
        write(t, 0x70, ACKNOWLEDGE | DRIVER);
        write(t, 0x24, 1);
        write(t, 0x20, 1); // VERSION_1 is bit 0 of word 1
        write(t, 0x24, 0);
        write(t, 0x20, 1);
        write(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    fn set_queue(t: &mut MmioTransport, sel: u32, tq: &TestQueue) {
        let (d, a, u) = tq.addresses();
        write(t, 0x30, sel);
        write(t, 0x38, u32::from(tq.size()));
        write(t, 0x80, d.0 as u32);
        write(t, 0x84, (d.0 >> 32) as u32);
        write(t, 0x90, a.0 as u32);
        write(t, 0x94, (a.0 >> 32) as u32);
        write(t, 0xa0, u.0 as u32);
        write(t, 0xa4, (u.0 >> 32) as u32);
        write(t, 0x44, 1);
    }

    #[test]
    fn identity_registers() {
        let (_m, _d, mut t) = setup();
        assert_eq!(read(&mut t, 0x00), 0x7472_6976);
        assert_eq!(read(&mut t, 0x04), 2);
        assert_eq!(read(&mut t, 0x08), 42);
        write(&mut t, 0x14, 1);
        assert_eq!(read(&mut t, 0x10), 1);
        write(&mut t, 0x14, 0);
        assert_eq!(read(&mut t, 0x10), 1);
        write(&mut t, 0x30, 1);
        assert_eq!(read(&mut t, 0x34), 8);
        write(&mut t, 0x30, 7);
        assert_eq!(read(&mut t, 0x34), 0);
        let mut cfg = [0u8; 2];
        t.bus_read(0x102, &mut cfg);
        assert_eq!(cfg, [3, 4]);
        // Bad widths read as zero and do not panic.
        let mut odd = [0xffu8; 3];
        t.bus_read(0x00, &mut odd);
        assert_eq!(odd, [0; 3]);
        t.bus_write(0x70, &[1, 2]);
        assert_eq!(read(&mut t, 0x70), 0);
    }

    #[test]
    fn full_negotiation_activates_and_reset_clears() {
        let (mem, dev, mut t) = setup();
        negotiate(&mut t);
        assert_eq!(read(&mut t, 0x70), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            dev.lock().expect("lock").acked,
            (1 << VIRTIO_F_VERSION_1) | 1
        );
        let q0 = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        let q1 = TestQueue::new(&mem, GuestAddress(0x2000), 8);
        set_queue(&mut t, 0, &q0);
        set_queue(&mut t, 1, &q1);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(dev.lock().expect("lock").is_activated());
        assert_eq!(read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);
        // Queue registers are frozen after DRIVER_OK.
        write(&mut t, 0x30, 0);
        write(&mut t, 0x44, 0);
        assert_eq!(read(&mut t, 0x44), 1);
        // Notify without ioeventfd reaches the queue eventfd.
        write(&mut t, 0x50, 1);
        assert_eq!(
            dev.lock().expect("lock").evts[1].read().expect("signalled"),
            1
        );
        // Interrupt status and ack.
        t.irq().trigger(IrqKind::Vring).expect("irq");
        assert_eq!(read(&mut t, 0x60), 1);
        write(&mut t, 0x64, 1);
        assert_eq!(read(&mut t, 0x60), 0);
        write(&mut t, 0x70, 0);
        assert_eq!(read(&mut t, 0x70), 0);
        let d = dev.lock().expect("lock");
        assert!(!d.is_activated());
        assert_eq!(d.resets, 1);
    }

    #[test]
    fn invalid_queue_blocks_activation() {
        let (mem, dev, mut t) = setup();
        negotiate(&mut t);
        let q0 = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        set_queue(&mut t, 0, &q0);
        // Queue 1: rings outside guest memory.
        write(&mut t, 0x30, 1);
        write(&mut t, 0x80, 0);
        write(&mut t, 0x84, 0x10);
        write(&mut t, 0x44, 1);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(!dev.lock().expect("lock").is_activated());
        assert_ne!(read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);
        assert_ne!(read(&mut t, 0x60) & 2, 0);
    }

    #[test]
    fn out_of_order_status_and_missing_version_1() {
        let (_m, dev, mut t) = setup();
        write(&mut t, 0x70, DRIVER_OK);
        assert_eq!(read(&mut t, 0x70), 0);
        write(&mut t, 0x70, ACKNOWLEDGE);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        write(&mut t, 0x20, 1); // word 0 only: no VERSION_1
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read(&mut t, 0x70) & FEATURES_OK, 0);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FAILED);
        assert_ne!(read(&mut t, 0x70) & FAILED, 0);
        assert!(!dev.lock().expect("lock").is_activated());
    }

    #[test]
    fn transport_state_round_trips() {
        let (mem, dev, mut t) = setup();
        negotiate(&mut t);
        let q0 = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        set_queue(&mut t, 0, &q0);
        t.irq().trigger(IrqKind::Vring).expect("irq");
        let state = t.save();
        let back = MmioTransport::restore(mem.clone(), dev.clone(), &state).expect("restore");
        assert_eq!(back.save(), state);
        let mut bad = state.clone();
        bad.status = DRIVER_OK;
        assert!(matches!(
            MmioTransport::restore(mem.clone(), dev.clone(), &bad),
            Err(MmioError::Restore(_))
        ));
        let mut bad = state;
        bad.queues.pop();
        assert!(MmioTransport::restore(mem, dev, &bad).is_err());
    }

    #[test]
    fn arbitrary_accesses_never_panic() {
        let (_m, _d, mut t) = setup();
        for offset in (0..0x1100u64).step_by(1) {
            for len in [1usize, 2, 3, 4, 8] {
                let mut b = vec![0u8; len];
                t.bus_read(offset, &mut b);
                t.bus_write(offset, &b);
                t.bus_write(offset, &vec![0xff; len]);
            }
        }
    }
}
