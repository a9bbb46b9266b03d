//! The virtio-vsock device: moves packets between the guest's queues and a [`VsockBackend`].
//!
//! - tx queue: each chain is one packet from the guest; it is parsed (`packet.rs`), handed to the
//!   backend, and returned to the guest.
//! - rx queue: the guest's empty buffers; each gets one packet the backend produces.
//! - event queue: buffers for events; used for the transport-reset event after a restore.
//!
//! After a transport reset goes out, the rx queue is held until the guest has handled it: a
//! connection the host opens meanwhile would be accepted by the guest and then reset with the
//! rest. The guest says it is done by giving the event buffer back (Linux's driver refills and
//! kicks the event queue after each event), so the host can connect right after a restore.
//!
//! A malformed queue (see [`QueueError`]) stops the device: it sets DEVICE_NEEDS_RESET (the
//! transport reports it), raises a config interrupt and ignores its queues until reset. A
//! malformed packet only drops that packet.
//!
//! Threads: `activate` and `reset` run on a vCPU thread (the guest's status write), under the
//! vCPU's seccomp filter. They only change state and signal queue eventfds; the backend's work
//! (sockets, epoll, timers) happens on the event-loop thread in `handle_event`.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryError;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::packet::{self, PacketError, VsockHeader};
use super::{EVENT_TRANSPORT_RESET, EVQ, QUEUE_SIZE, RXQ, TXQ, VsockBackend};
use crate::devices::virtio::queue::{self, QueueError};
use crate::devices::virtio::{
    ActivateError, GuestMemory, IrqKind, IrqTrigger, TYPE_VSOCK, VIRTIO_F_VERSION_1, VirtioDevice,
    read_config_bytes,
};
use crate::guest_warn;

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A queue eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
    /// The device is stopped on a malformed queue and needs a reset.
    #[error("the device needs a reset")]
    NeedsReset,
    /// A queue the guest set up is malformed.
    #[error("malformed virtqueue")]
    Queue(#[source] QueueError),
    /// The event could not be written to the guest's buffer.
    #[error("cannot write the event")]
    Event(#[source] GuestMemoryError),
    /// The interrupt could not be raised.
    #[error("cannot raise the interrupt")]
    Irq(#[source] io::Error),
}

pub(super) struct Active {
    pub(super) mem: GuestMemory,
    pub(super) queues: Vec<Queue>,
    pub(super) irq: Arc<IrqTrigger>,
}

/// The virtio-vsock device over backend `B`.
pub struct Vsock<B> {
    cid: u64,
    backend: B,
    queue_evts: Vec<EventFd>,
    pub(super) acked_features: u64,
    pub(super) active: Option<Active>,
    pub(super) failed: bool,
    transport_reset_pending: bool,
    /// A transport reset went out and the guest has not handled it yet: the event queue's avail
    /// index then. Rx is held meanwhile.
    reset_unhandled: Option<u16>,
    backend_reset_pending: bool,
    scratch: Vec<u8>,
}

/// Logs a packet's header at trace level (`way`: "tx" from the guest, "rx" to it).
fn trace_packet(way: &str, header: &VsockHeader) {
    tracing::trace!(
        way,
        op = header.op,
        src_port = header.src_port,
        dst_port = header.dst_port,
        len = header.len,
        fwd_cnt = header.fwd_cnt,
        "vsock: packet"
    );
}

impl<B> std::fmt::Debug for Vsock<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("active", &self.active.is_some())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// A device for `backend`'s guest cid.
    pub fn new(backend: B) -> Result<Self, VsockError> {
        let queue_evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            cid: backend.guest_cid(),
            backend,
            queue_evts,
            acked_features: 0,
            active: None,
            failed: false,
            transport_reset_pending: false,
            reset_unhandled: None,
            backend_reset_pending: false,
            scratch: Vec::with_capacity(packet::MAX_PAYLOAD as usize),
        })
    }

    /// The guest's context id.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Event-loop side of a device reset: drop the backend's connections if the guest reset the
    /// device since the last event.
    pub(crate) fn settle_reset(&mut self) {
        if std::mem::take(&mut self.backend_reset_pending) {
            self.backend.reset();
        }
    }

    /// Wake the event loop (from a vCPU thread): it processes `queues` as if notified.
    pub(super) fn kick(&self, queues: &[usize]) {
        for &q in queues {
            if let Err(e) = self.queue_evts[q].write(1) {
                tracing::error!(error = %e, "vsock: cannot signal a queue eventfd");
            }
        }
    }

    /// Process the tx queue: hand every packet the guest sent to the backend.
    pub fn process_tx(&mut self) -> Result<(), VsockError> {
        if self.failed {
            return Err(VsockError::NeedsReset);
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used = false;
        let result = loop {
            let chain = match queue::pop_chain(&mut active.queues[TXQ], &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            match packet::parse_tx(&active.mem, &chain, &mut self.scratch) {
                Ok(header) if header.src_cid != self.cid => {
                    guest_warn!(
                        src_cid = header.src_cid,
                        "vsock: packet with a foreign source cid dropped"
                    );
                }
                Ok(header) => {
                    trace_packet("tx", &header);
                    self.backend.send_pkt(&header, &self.scratch)
                }
                Err(PacketError::UnsupportedType { header }) => self.backend.reply_rst(&header),
                Err(e) => guest_warn!(error = %e, "vsock: malformed tx packet dropped"),
            }
            if let Err(e) = queue::add_used(&mut active.queues[TXQ], &active.mem, chain.head, 0) {
                break Err(e);
            }
            used = true;
        };
        self.finish(used, TXQ, result)
    }

    /// Process the rx queue: fill the guest's buffers with what the backend has.
    pub fn process_rx(&mut self) -> Result<(), VsockError> {
        if self.failed {
            return Err(VsockError::NeedsReset);
        }
        if !self.reset_handled() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used = false;
        let result = loop {
            if !self.backend.has_pending_rx() {
                break Ok(());
            }
            let chain = match queue::pop_chain(&mut active.queues[RXQ], &active.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let cap = packet::rx_capacity(&chain);
            if cap == 0 && (chain.writable_len as usize) < packet::HDR_SIZE {
                guest_warn!(
                    len = chain.writable_len,
                    "vsock: rx buffer too small for a header"
                );
                if let Err(e) = queue::add_used(&mut active.queues[RXQ], &active.mem, chain.head, 0)
                {
                    break Err(e);
                }
                used = true;
                continue;
            }
            self.scratch.resize(cap, 0);
            let Some(header) = self.backend.recv_pkt(&mut self.scratch[..cap]) else {
                queue::undo_pop(&mut active.queues[RXQ]);
                break Ok(());
            };
            trace_packet("rx", &header);
            let n = (header.len as usize).min(cap);
            let written = match packet::write_rx(&active.mem, &chain, &header, &self.scratch[..n]) {
                Ok(w) => w,
                Err(e) => {
                    guest_warn!(error = %e, "vsock: cannot write an rx packet; dropped");
                    0
                }
            };
            if let Err(e) =
                queue::add_used(&mut active.queues[RXQ], &active.mem, chain.head, written)
            {
                break Err(e);
            }
            used = true;
        };
        self.finish(used, RXQ, result)
    }

    /// Tell the guest its transport was reset (after a restore: host-side connections are not
    /// kept). Drops the backend's connections; the event goes out now if the guest gave an event
    /// buffer, else as soon as it gives one (or when the device activates).
    pub fn send_transport_reset(&mut self) -> Result<(), VsockError> {
        self.backend.reset();
        self.transport_reset_pending = true;
        self.deliver_transport_reset()
    }

    /// Queue a transport reset for the guest without touching the backend (a restored device's
    /// backend is new); it goes out when the event loop next handles the event queue.
    pub(super) fn queue_transport_reset(&mut self) {
        self.transport_reset_pending = true;
    }

    /// The guest gave event buffers: deliver a pending transport reset; or, when it gave back the
    /// one a reset went out in, release the rx queue held meanwhile.
    pub fn process_evq(&mut self) -> Result<(), VsockError> {
        if self.reset_unhandled.is_some() && self.reset_handled() {
            tracing::debug!("vsock: the guest handled the transport reset");
            self.process_rx()?;
        }
        self.deliver_transport_reset()
    }

    /// Whether the guest is past the last transport reset (its event queue's avail index moved
    /// on since the reset went out); clears the hold when it is.
    fn reset_handled(&mut self) -> bool {
        let Some(at) = self.reset_unhandled else {
            return true;
        };
        let Some(active) = self.active.as_ref() else {
            return true;
        };
        let now = virtio_queue::QueueT::avail_idx(
            &active.queues[EVQ],
            &active.mem,
            std::sync::atomic::Ordering::Acquire,
        );
        match now {
            Ok(idx) if idx.0 == at => false,
            // Moved on, or unreadable (then the queue is broken anyway): stop holding.
            _ => {
                self.reset_unhandled = None;
                true
            }
        }
    }

    fn deliver_transport_reset(&mut self) -> Result<(), VsockError> {
        if !self.transport_reset_pending {
            return Ok(());
        }
        if self.failed {
            return Err(VsockError::NeedsReset);
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let chain = match queue::pop_chain(&mut active.queues[EVQ], &active.mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return Ok(()),
            Err(e) => return self.finish(false, EVQ, Err(e)),
        };
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = if chain.writable_len as usize >= event.len() {
            match chain.write_at(&active.mem, 0, &event) {
                Ok(()) => event.len() as u32,
                Err(e) => return self.finish(false, EVQ, Err(e)),
            }
        } else {
            guest_warn!(len = chain.writable_len, "vsock: event buffer too small");
            0
        };
        let result = queue::add_used(&mut active.queues[EVQ], &active.mem, chain.head, written);
        if result.is_ok() && written > 0 {
            self.transport_reset_pending = false;
            let avail = virtio_queue::QueueT::avail_idx(
                &active.queues[EVQ],
                &active.mem,
                std::sync::atomic::Ordering::Acquire,
            );
            self.reset_unhandled = avail.ok().map(|idx| idx.0);
            tracing::debug!("vsock: transport reset given to the guest");
        }
        self.finish(true, EVQ, result)
    }

    /// After processing `q`: interrupt the guest if buffers were used; stop the device on a queue
    /// error.
    fn finish(
        &mut self,
        used: bool,
        q: usize,
        result: Result<(), QueueError>,
    ) -> Result<(), VsockError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if let Err(e) = result {
            guest_warn!(queue = q, error = %e, "vsock: malformed queue; the device stops until reset");
            self.failed = true;
            active
                .irq
                .trigger(IrqKind::Config)
                .map_err(VsockError::Irq)?;
            return Err(VsockError::Queue(e));
        }
        if used {
            let notify = active.queues[q].needs_notification_checked(&active.mem);
            if notify {
                active
                    .irq
                    .trigger(IrqKind::Vring)
                    .map_err(VsockError::Irq)?;
            }
        }
        Ok(())
    }
}

/// `needs_notification` that treats a memory error as "notify".
trait NotifyCheck {
    fn needs_notification_checked(&mut self, mem: &GuestMemory) -> bool;
}

impl NotifyCheck for Queue {
    fn needs_notification_checked(&mut self, mem: &GuestMemory) -> bool {
        virtio_queue::QueueT::needs_notification(self, mem).unwrap_or(true)
    }
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!(offset, "vsock: write to the read-only config space ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        self.failed = false;
        self.active = Some(Active { mem, queues, irq });
        // Packets the backend holds (connections the host opened before the driver was up, a
        // pending transport reset) go out from the event loop.
        self.kick(&[RXQ, EVQ]);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn needs_reset(&self) -> bool {
        self.failed
    }

    fn reset(&mut self) {
        self.active = None;
        self.failed = false;
        self.reset_unhandled = None;
        self.acked_features = 0;
        for evt in &self.queue_evts {
            // Drain stale notifications; an empty eventfd answers EAGAIN, which is fine.
            let _ = evt.read();
        }
        // The connections are dropped on the event-loop thread (sockets are not the vCPU's).
        self.backend_reset_pending = true;
        self.kick(&[RXQ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{DescSpec, TestQueue, test_memory};
    use crate::devices::virtio::vsock::packet::{HDR_SIZE, TYPE_STREAM, VsockHeader, op};
    use std::collections::VecDeque;
    use std::os::fd::{AsRawFd, RawFd};
    use vm_memory::{Bytes, GuestAddress};

    /// A backend that records what it gets and replays what it is given.
    struct Recorder {
        sent: Vec<(VsockHeader, Vec<u8>)>,
        rsts: Vec<VsockHeader>,
        to_guest: VecDeque<(VsockHeader, Vec<u8>)>,
        resets: u32,
        evt: EventFd,
    }

    impl Recorder {
        fn new() -> Self {
            Self {
                sent: Vec::new(),
                rsts: Vec::new(),
                to_guest: VecDeque::new(),
                resets: 0,
                evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            }
        }
    }

    impl VsockBackend for Recorder {
        fn guest_cid(&self) -> u64 {
            3
        }
        fn send_pkt(&mut self, header: &VsockHeader, payload: &[u8]) {
            self.sent.push((*header, payload.to_vec()));
        }
        fn reply_rst(&mut self, header: &VsockHeader) {
            self.rsts.push(*header);
        }
        fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<VsockHeader> {
            let (mut h, data) = self.to_guest.pop_front()?;
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            h.len = n as u32;
            Some(h)
        }
        fn has_pending_rx(&self) -> bool {
            !self.to_guest.is_empty()
        }
        fn polled_fd(&self) -> RawFd {
            self.evt.as_raw_fd()
        }
        fn notify(&mut self) {}
        fn reset(&mut self) {
            self.resets += 1;
            self.to_guest.clear();
        }
    }

    struct Rig {
        mem: GuestMemory,
        dev: Vsock<Recorder>,
        rx: TestQueue,
        tx: TestQueue,
        ev: TestQueue,
        irq: Arc<IrqTrigger>,
    }

    fn rig() -> Rig {
        let mem = test_memory(0x20_0000);
        let rx = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        let tx = TestQueue::new(&mem, GuestAddress(0x2000), 16);
        let ev = TestQueue::new(&mem, GuestAddress(0x3000), 16);
        let irq = Arc::new(IrqTrigger::new().expect("irq"));
        let mut dev = Vsock::new(Recorder::new()).expect("device");
        dev.activate(
            mem.clone(),
            vec![rx.queue(), tx.queue(), ev.queue()],
            irq.clone(),
        )
        .expect("activate");
        Rig {
            mem,
            dev,
            rx,
            tx,
            ev,
            irq,
        }
    }

    fn header(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5000,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn config_space_holds_the_cid() {
        let r = rig();
        let mut cfg = [0u8; 8];
        r.dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 3);
        assert_eq!(r.dev.device_type(), 19);
    }

    #[test]
    fn tx_packets_reach_the_backend() {
        let mut r = rig();
        let h = header(op::RW, 4);
        r.mem
            .write_slice(&h.to_bytes(), GuestAddress(0x10000))
            .expect("w");
        r.mem
            .write_slice(b"ping", GuestAddress(0x11000))
            .expect("w");
        r.tx.add_chain(
            &r.mem,
            &[
                DescSpec::readable(0x10000, 44),
                DescSpec::readable(0x11000, 4),
            ],
        );
        // Foreign source cid: dropped; bad type: answered with RST.
        let foreign = VsockHeader {
            src_cid: 9,
            ..header(op::REQUEST, 0)
        };
        r.mem
            .write_slice(&foreign.to_bytes(), GuestAddress(0x12000))
            .expect("w");
        r.tx.add_chain(&r.mem, &[DescSpec::readable(0x12000, 44)]);
        let dgram = VsockHeader {
            type_: 3,
            ..header(op::REQUEST, 0)
        };
        r.mem
            .write_slice(&dgram.to_bytes(), GuestAddress(0x13000))
            .expect("w");
        r.tx.add_chain(&r.mem, &[DescSpec::readable(0x13000, 44)]);
        r.dev.process_tx().expect("tx");
        assert_eq!(r.dev.backend().sent, vec![(h, b"ping".to_vec())]);
        assert_eq!(r.dev.backend().rsts.len(), 1);
        assert_eq!(r.tx.take_used(&r.mem).len(), 3);
        assert_eq!(r.irq.status() & 1, 1);
    }

    #[test]
    fn rx_packets_fill_guest_buffers() {
        let mut r = rig();
        let h = header(op::RW, 0);
        r.dev
            .backend_mut()
            .to_guest
            .push_back((h, b"pong".to_vec()));
        r.dev.process_rx().expect("rx: no buffers yet");
        r.rx.add_chain(
            &r.mem,
            &[
                DescSpec::writable(0x20000, 44),
                DescSpec::writable(0x21000, 4096),
            ],
        );
        r.dev.process_rx().expect("rx");
        let used = r.rx.take_used(&r.mem);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1, 48);
        let mut raw = [0u8; HDR_SIZE];
        r.mem
            .read_slice(&mut raw, GuestAddress(0x20000))
            .expect("r");
        assert_eq!(VsockHeader::from_bytes(&raw).len, 4);
        let mut data = [0u8; 4];
        r.mem
            .read_slice(&mut data, GuestAddress(0x21000))
            .expect("r");
        assert_eq!(&data, b"pong");
    }

    #[test]
    fn malformed_queue_stops_the_device() {
        let mut r = rig();
        // A descriptor loop on the tx queue.
        r.tx.set_desc(&r.mem, 0, 0x10000, 44, 1, 1);
        r.tx.set_desc(&r.mem, 1, 0x10000, 44, 1, 0);
        r.tx.publish(&r.mem, &[0]);
        assert!(matches!(
            r.dev.process_tx(),
            Err(VsockError::Queue(QueueError::ChainTooLong { .. }))
        ));
        assert!(r.dev.needs_reset());
        assert_eq!(r.irq.status() & 2, 2);
        assert!(matches!(r.dev.process_rx(), Err(VsockError::NeedsReset)));
        r.dev.reset();
        assert!(!r.dev.needs_reset());
        assert!(!r.dev.is_activated());
    }

    #[test]
    fn reset_leaves_backend_work_to_the_event_loop() {
        let mut r = rig();
        // Activation only signalled the event loop.
        assert_eq!(r.dev.queue_events()[RXQ].read().expect("kicked"), 1);
        assert_eq!(r.dev.queue_events()[EVQ].read().expect("kicked"), 1);
        r.dev.reset();
        assert_eq!(
            r.dev.backend().resets,
            0,
            "no socket work on the vCPU thread"
        );
        assert_eq!(r.dev.queue_events()[RXQ].read().expect("kicked"), 1);
        r.dev
            .handle_event(crate::devices::virtio::vsock::VsockEvent::RxQueue)
            .expect("handled");
        assert_eq!(r.dev.backend().resets, 1);
    }

    #[test]
    fn transport_reset_waits_for_an_event_buffer() {
        let mut r = rig();
        r.dev.send_transport_reset().expect("pending");
        assert_eq!(r.dev.backend().resets, 1);
        assert!(r.ev.take_used(&r.mem).is_empty());
        r.mem
            .write_obj(0xffff_ffffu32, GuestAddress(0x30000))
            .expect("w");
        r.ev.add_chain(&r.mem, &[DescSpec::writable(0x30000, 4)]);
        r.dev.process_evq().expect("evq");
        assert_eq!(r.ev.take_used(&r.mem), vec![(0, 4)]);
        assert_eq!(r.mem.read_obj::<u32>(GuestAddress(0x30000)).expect("r"), 0);
        // Delivered once only.
        r.ev.add_chain(&r.mem, &[DescSpec::writable(0x30000, 4)]);
        r.dev.process_evq().expect("evq");
        assert!(r.ev.take_used(&r.mem).is_empty());
    }

    #[test]
    fn rx_waits_until_the_guest_handled_the_transport_reset() {
        let mut r = rig();
        r.ev.add_chain(&r.mem, &[DescSpec::writable(0x30000, 4)]);
        r.ev.add_chain(&r.mem, &[DescSpec::writable(0x30010, 4)]);
        r.dev.send_transport_reset().expect("delivered");
        assert_eq!(r.ev.take_used(&r.mem).len(), 1);
        // A host connection opened right after the restore: held while the guest has not
        // handled the reset (its second event buffer is still there, but it gave none back).
        r.dev
            .backend_mut()
            .to_guest
            .push_back((header(op::REQUEST, 0), Vec::new()));
        r.rx.add_chain(&r.mem, &[DescSpec::writable(0x20000, 4096)]);
        r.dev.process_rx().expect("rx");
        r.dev.process_evq().expect("evq: a kick of our own");
        assert!(r.rx.take_used(&r.mem).is_empty(), "held");
        // The guest refills the event buffer it got the reset in: rx goes out.
        r.ev.add_chain(&r.mem, &[DescSpec::writable(0x30000, 4)]);
        r.dev.process_evq().expect("evq");
        assert_eq!(r.rx.take_used(&r.mem).len(), 1);
        assert!(r.ev.take_used(&r.mem).is_empty(), "no second reset");
    }
}
