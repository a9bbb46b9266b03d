//! The virtio-vsock device: three queues (rx, tx, event), the guest's context id in the config
//! space, generic over a [`VsockBackend`] that carries the streams on the host side.
//!
//! Files: `packet.rs` parses and writes packets on checked descriptor chains; `device.rs` is the
//! device (queue processing, transport reset); `event_handler.rs` is what the VMM's event loop
//! calls; `persist.rs` its saved state (queues, features; never host connections); `unix/` is
//! the Unix-socket backend (Firecracker's convention, see its module docs);
//! `test_utils.rs` is a guest driver in ordinary memory for tests and benches.
//!
//! Wiring it into a VM (one object, shared by the transport and the event loop):
//!
//! ```text
//! let backend = VsockUnixBackend::new(guest_cid, &uds_path)?;      // binds <uds_path>
//! let vsock = Arc::new(Mutex::new(Vsock::new(backend)?));
//! let transport = MmioTransport::new(mem.clone(), vsock.clone())?;  // Arc<Mutex<dyn VirtioDevice>>
//! for (i, evt) in transport.queue_evts()?.iter().enumerate() {      // ioeventfd, datamatch i (u32)
//!     vm.register_ioevent(evt, base + NOTIFY_REG_OFFSET, i as u32)?;
//! }
//! vm.register_irqfd(transport.irq_evt(), gsi)?;
//! event_manager.add_subscriber(vsock);                               // MutEventSubscriber
//! ```

use std::os::fd::RawFd;

pub mod device;
pub mod event_handler;
pub mod packet;
pub mod persist;
pub mod test_utils;
pub mod unix;

pub use device::{Vsock, VsockError};
pub use event_handler::VsockEvent;
pub use packet::{PacketError, VsockHeader};
pub use unix::{VsockUnixBackend, VsockUnixError};

/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The guest's context id unless configured otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Queue indices.
pub const RXQ: usize = 0;
/// Transmit queue (guest to host).
pub const TXQ: usize = 1;
/// Event queue (transport reset).
pub const EVQ: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Event id of the transport-reset event (virtio spec 5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The host side of vsock: takes the guest's packets, produces packets for the guest, and is
/// woken through one pollable fd. Runs on the VMM's event-loop thread.
pub trait VsockBackend: Send {
    /// The guest's context id (the device reports it in its config space).
    fn guest_cid(&self) -> u64;

    /// Handle a packet from the guest; its header is validated (op, type, length), its source
    /// cid is the guest's, and `payload` holds `header.len` bytes (RW only).
    fn send_pkt(&mut self, header: &VsockHeader, payload: &[u8]);

    /// Answer a packet the device refused (unsupported type) with a reset.
    fn reply_rst(&mut self, header: &VsockHeader);

    /// Produce the next packet for the guest: its payload is written into `buf` (at most
    /// `buf.len()` bytes) and the returned header's `len` says how many. `None` when nothing is
    /// pending.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<VsockHeader>;

    /// Whether `recv_pkt` may produce a packet.
    fn has_pending_rx(&self) -> bool;

    /// The fd the event loop polls (readable when [`notify`](Self::notify) has work).
    fn polled_fd(&self) -> RawFd;

    /// The polled fd is readable: accept, read, write what is ready.
    fn notify(&mut self);

    /// Drop every connection and pending packet (device reset, transport reset).
    fn reset(&mut self);
}
