//! Virtio devices: the device trait the transport drives, the interrupt they raise, the
//! virtio-mmio transport, checked virtqueue access, and the virtio-vsock device.
//!
//! Layout: `mmio.rs` is the transport (registers, status state machine, queue set-up); `queue.rs`
//! walks descriptor chains the guest hands over and checks every index, address and length;
//! `vsock/` is the vsock device, generic over its backend (`vsock/unix/` is the Unix-socket one);
//! `persist.rs` is the saved state of queues and of the transport (each device saves its own);
//! `ratelimit.rs` keeps guest-triggered logs bounded; `test_utils.rs` lays virtqueues out in
//! ordinary memory so devices are tested without a guest.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub mod mmio;
pub mod persist;
pub mod queue;
pub mod ratelimit;
pub mod test_utils;
pub mod vsock;

pub use mmio::{MmioError, MmioTransport};
pub use queue::{ChainBuffers, QueueError};

/// Guest memory as the devices see it.
pub type GuestMemory = GuestMemoryMmap;

/// Virtio device ids (virtio spec 5).
pub const TYPE_VSOCK: u32 = 19;

/// Device status bits (virtio spec 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver acknowledged the features it understands.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Feature bit: the device follows virtio 1.0 or later (modern only).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// The interrupt status bits of virtio-mmio (`InterruptStatus` register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqKind {
    /// A used ring was updated.
    Vring,
    /// The configuration changed (also raised when the device needs a reset).
    Config,
}

impl IrqKind {
    fn bit(self) -> u32 {
        match self {
            IrqKind::Vring => 1,
            IrqKind::Config => 2,
        }
    }
}

/// A device's interrupt line: the pending status bits the guest reads and acknowledges, and the
/// eventfd the VMM registers as an irqfd on the device's GSI.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A new interrupt with no pending bits.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Set the `kind` bit and signal the eventfd.
    pub fn trigger(&self, kind: IrqKind) -> io::Result<()> {
        self.status.fetch_or(kind.bit(), Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The pending bits (the `InterruptStatus` register).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clear the bits in `mask` (the guest writing `InterruptACK`).
    pub fn ack(&self, mask: u32) {
        self.status.fetch_and(!mask, Ordering::SeqCst);
    }

    /// Set the pending bits to `bits` (restoring a snapshot); signals nothing.
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Clear every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device is already active.
    #[error("the device is already active")]
    AlreadyActive,
    /// A device-specific failure.
    #[error("device activation failed: {0}")]
    Device(String),
}

/// A virtio device as the transport sees it. The transport owns the registers and the queue
/// configuration; the device owns its queues once activated and does the work on the VMM's
/// event-loop thread.
pub trait VirtioDevice: Send {
    /// The virtio device id (`TYPE_*`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The eventfd for each queue that the guest's notifications land on (ioeventfd).
    fn queue_events(&self) -> &[EventFd];

    /// All features the device offers, `VIRTIO_F_VERSION_1` included.
    fn avail_features(&self) -> u64;

    /// The features the driver acknowledged so far.
    fn acked_features(&self) -> u64;

    /// Record the driver's acknowledgement of features (already masked by `avail_features`).
    fn set_acked_features(&mut self, features: u64);

    /// Read `data.len()` bytes of the configuration space from `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the configuration space; read-only devices ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start the device with its validated queues and its interrupt.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError>;

    /// Whether the device is active.
    fn is_activated(&self) -> bool;

    /// Whether the device stopped on an error (a malformed queue) and needs a reset.
    fn needs_reset(&self) -> bool;

    /// Go back to the state before activation: drop the queues, the interrupt and any guest
    /// state. Acknowledged features are cleared too.
    fn reset(&mut self);
}

/// Read `data.len()` bytes of `config` at `offset`; what lies outside reads as 0.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_trigger_sets_acks_and_signals() {
        let irq = IrqTrigger::new().expect("eventfd");
        irq.trigger(IrqKind::Vring).expect("trigger");
        irq.trigger(IrqKind::Config).expect("trigger");
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irq_evt().read().expect("signalled"), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
