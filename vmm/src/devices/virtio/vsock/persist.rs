//! The saved state of the vsock device: its cid, the features the driver acknowledged, whether it
//! stopped on an error, and its live queues. Host-side connections are not saved: a restored
//! device starts with none and tells the guest so with a transport-reset event, on which the
//! guest drops its connections and the init connects again.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::device::Vsock;
use super::{EVQ, QUEUE_SIZE, RXQ, TXQ, VsockBackend, VsockError};
use crate::devices::virtio::persist::{PersistError, QueuePersist, build_queues};
use crate::devices::virtio::{GuestMemory, IrqTrigger, VirtioDevice};

/// Restoring the vsock device failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockPersistError {
    /// The snapshot's guest cid is not the configured one (the guest kernel keeps its cid).
    #[error("the snapshot's guest cid is {saved}; the VM is configured with {configured}")]
    Cid {
        /// In the snapshot.
        saved: u64,
        /// Configured.
        configured: u64,
    },
    /// The driver acknowledged features the device does not offer.
    #[error("the snapshot's acknowledged features {0:#x} are not all offered by the device")]
    Features(u64),
    /// The device could not be created.
    #[error(transparent)]
    Device(#[from] VsockError),
    /// The queues are invalid.
    #[error("invalid saved vsock queues")]
    Queues(#[source] PersistError),
    /// The device refused activation.
    #[error("cannot activate the restored vsock device: {0}")]
    Activate(String),
}

/// The saved state of the vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub cid: u64,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Stopped on a malformed queue.
    pub failed: bool,
    /// The live queues (rx, tx, event) when the device is active.
    pub queues: Option<Vec<QueuePersist>>,
}

impl<B: VsockBackend> Vsock<B> {
    /// The device's state.
    pub fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid(),
            acked_features: self.acked_features,
            failed: self.failed,
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(QueuePersist::from).collect()),
        }
    }

    /// A device in `state` over a fresh `backend`, not yet active: its transport is rebuilt next,
    /// then [`Vsock::resume`] activates it with the transport's interrupt.
    pub fn restore(backend: B, state: &VsockState) -> Result<Self, VsockPersistError> {
        if backend.guest_cid() != state.cid {
            return Err(VsockPersistError::Cid {
                saved: state.cid,
                configured: backend.guest_cid(),
            });
        }
        let mut dev = Vsock::new(backend)?;
        if state.acked_features & !dev.avail_features() != 0 {
            return Err(VsockPersistError::Features(state.acked_features));
        }
        dev.set_acked_features(state.acked_features);
        Ok(dev)
    }

    /// When `state` is active: activates the device with its saved queues (checked against
    /// `mem`) and `irq` (its transport's), and queues a transport reset for the guest.
    pub fn resume(
        &mut self,
        state: &VsockState,
        mem: &GuestMemory,
        irq: &Arc<IrqTrigger>,
    ) -> Result<(), VsockPersistError> {
        let Some(queues) = &state.queues else {
            return Ok(());
        };
        let queues =
            build_queues(queues, &[QUEUE_SIZE; 3], Some(mem)).map_err(VsockPersistError::Queues)?;
        self.activate(mem.clone(), queues, irq.clone())
            .map_err(|e| VsockPersistError::Activate(e.to_string()))?;
        self.failed = state.failed;
        if !self.failed {
            // Delivered from the event loop (on the kick below) into the guest's event buffer.
            self.queue_transport_reset();
        }
        // Notifications the guest made before the snapshot may not have been handled.
        self.kick(&[RXQ, TXQ, EVQ]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{DescSpec, TestQueue, test_memory};
    use crate::devices::virtio::vsock::VsockUnixBackend;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn restored_device_resumes_its_queues_and_sends_a_transport_reset() {
        let dir = tempfile::tempdir().expect("dir");
        let mem = test_memory(0x20_0000);
        let rx = TestQueue::new(&mem, GuestAddress(0x1000), QUEUE_SIZE);
        let tx = TestQueue::new(&mem, GuestAddress(0x4000), QUEUE_SIZE);
        let mut ev = TestQueue::new(&mem, GuestAddress(0x8000), QUEUE_SIZE);
        let irq = Arc::new(IrqTrigger::new().expect("irq"));
        let backend = VsockUnixBackend::new(3, &dir.path().join("a.sock")).expect("backend");
        let mut dev = Vsock::new(backend).expect("device");
        dev.set_acked_features(dev.avail_features());
        dev.activate(
            mem.clone(),
            vec![rx.queue(), tx.queue(), ev.queue()],
            irq.clone(),
        )
        .expect("activate");
        ev.add_chain(&mem, &[DescSpec::writable(0x30000, 4)]);
        let state = dev.save();
        assert_eq!(state.queues.as_ref().map(Vec::len), Some(3));
        let bytes = postcard::to_allocvec(&state).expect("encode");
        let state: VsockState = postcard::from_bytes(&bytes).expect("decode");

        let irq2 = Arc::new(IrqTrigger::new().expect("irq"));
        let backend = VsockUnixBackend::new(3, &dir.path().join("b.sock")).expect("backend");
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x30000))
            .expect("w");
        let mut back = Vsock::restore(backend, &state).expect("restore");
        back.resume(&state, &mem, &irq2).expect("resume");
        assert_eq!(back.save(), state);
        back.handle_event(crate::devices::virtio::vsock::VsockEvent::EvQueue)
            .expect("event queue");
        assert_eq!(ev.take_used(&mem), vec![(0, 4)]);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x30000)).expect("r"), 0);
        assert_eq!(irq2.status() & 1, 1);

        let backend = VsockUnixBackend::new(4, &dir.path().join("c.sock")).expect("backend");
        assert!(matches!(
            Vsock::restore(backend, &state),
            Err(VsockPersistError::Cid {
                saved: 3,
                configured: 4
            })
        ));
        let mut bad = state.clone();
        if let Some(q) = bad.queues.as_mut() {
            q[1].desc_table = 0x10_0000_0000;
        }
        let backend = VsockUnixBackend::new(3, &dir.path().join("d.sock")).expect("backend");
        let mut dev = Vsock::restore(backend, &bad).expect("restore");
        assert!(matches!(
            dev.resume(&bad, &mem, &irq2),
            Err(VsockPersistError::Queues(_))
        ));
    }
}
