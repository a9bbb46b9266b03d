//! What the VMM's event loop calls. The device's interest set is fixed for its lifetime: the
//! three queue eventfds and the backend's polled fd (the Unix backend multiplexes its listener and
//! connections behind one epoll fd of its own), all level-triggered for input.
//!
//! Everything here runs on the event-loop thread (sockets, epoll, timers); the vCPU threads only
//! signal eventfds.
//!
//! Two ways to hook it up: register [`Vsock::event_fds`] in your own epoll and call
//! [`Vsock::handle_event`] for each ready one; or add the device (`Arc<Mutex<Vsock<B>>>`) to an
//! `event_manager::EventManager`, through the `MutEventSubscriber` implementation below.

use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, VsockError};
use super::{EVQ, RXQ, TXQ, VsockBackend};

/// Which of the device's fds is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockEvent {
    /// The guest added receive buffers.
    RxQueue,
    /// The guest sent packets.
    TxQueue,
    /// The guest added event buffers.
    EvQueue,
    /// The backend has work (connections, data).
    Backend,
}

impl VsockEvent {
    const ALL: [VsockEvent; 4] = [
        VsockEvent::RxQueue,
        VsockEvent::TxQueue,
        VsockEvent::EvQueue,
        VsockEvent::Backend,
    ];

    fn from_data(data: u32) -> Option<Self> {
        Self::ALL.get(data as usize).copied()
    }

    fn data(self) -> u32 {
        self as u32
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// The fds to poll for input, with what each one means.
    pub fn event_fds(&self) -> [(RawFd, VsockEvent); 4] {
        let evts = crate::devices::virtio::VirtioDevice::queue_events(self);
        [
            (evts[RXQ].as_raw_fd(), VsockEvent::RxQueue),
            (evts[TXQ].as_raw_fd(), VsockEvent::TxQueue),
            (evts[EVQ].as_raw_fd(), VsockEvent::EvQueue),
            (self.backend().polled_fd(), VsockEvent::Backend),
        ]
    }

    /// Handle one ready fd. Before activation, queue notifications are drained and the backend
    /// still accepts host connections (their packets wait for the guest). An error means the
    /// device stopped on a malformed queue (it already told the guest); the loop goes on.
    pub fn handle_event(&mut self, event: VsockEvent) -> Result<(), VsockError> {
        self.settle_reset();
        let evts = crate::devices::virtio::VirtioDevice::queue_events(self);
        match event {
            VsockEvent::RxQueue => {
                // EAGAIN means a spurious wake-up: nothing to drain.
                let _ = evts[RXQ].read();
                self.process_rx()
            }
            VsockEvent::TxQueue => {
                let _ = evts[TXQ].read();
                self.process_tx()?;
                // The backend may have answers (RESPONSE, RST, credit) for the guest.
                self.process_rx()
            }
            VsockEvent::EvQueue => {
                let _ = evts[EVQ].read();
                self.process_evq()
            }
            VsockEvent::Backend => {
                self.backend_mut().notify();
                self.process_rx()
            }
        }
    }

    /// [`handle_event`](Self::handle_event) by fd; `false` when `fd` is not one of the device's.
    pub fn handle_fd(&mut self, fd: RawFd) -> Result<bool, VsockError> {
        let Some((_, event)) = self.event_fds().into_iter().find(|(f, _)| *f == fd) else {
            return Ok(false);
        };
        self.handle_event(event).map(|()| true)
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, event) in self.event_fds() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, event.data(), EventSet::IN)) {
                tracing::error!(error = ?e, ?event, "vsock: cannot register an fd with the event manager");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(event) = VsockEvent::from_data(events.data()) else {
            tracing::error!(data = events.data(), "vsock: event with unknown data");
            return;
        };
        match self.handle_event(event) {
            // Stopped on a malformed queue: said once already, when it happened.
            Ok(()) | Err(VsockError::NeedsReset) | Err(VsockError::Queue(_)) => {}
            Err(e) => tracing::error!(error = %e, ?event, "vsock: event handling failed"),
        }
    }
}
