//! The saved state of virtqueues and of the virtio-mmio transport, and rebuilding queues from it
//! with every check a guest's own set-up gets (size, ring layout inside guest memory).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::GuestMemory;
use super::queue::{QueueError, check_layout};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};

/// Rebuilding saved virtio state failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The snapshot has another number of queues than the device.
    #[error("the snapshot has {saved} queues; the device has {device}")]
    QueueCount {
        /// In the snapshot.
        saved: usize,
        /// The device's.
        device: usize,
    },
    /// A queue's maximum size is not the device's.
    #[error("queue {index}: the snapshot's maximum size {saved} is not the device's {device}")]
    MaxSize {
        /// Queue index.
        index: usize,
        /// In the snapshot.
        saved: u16,
        /// The device's.
        device: u16,
    },
    /// `virtio_queue` refuses the queue's state.
    #[error("queue {index}: invalid saved state")]
    Queue {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// An active queue's rings do not fit guest memory, or it is not ready.
    #[error("queue {index}: invalid saved layout")]
    Layout {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: QueueError,
    },
    /// The saved device status is not one the transport can reach.
    #[error("the snapshot's device status {0:#x} is not a valid virtio status")]
    Status(u32),
}

/// The saved state of one virtqueue (the fields of `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePersist {
    /// The device's maximum size.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver marked it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<&Queue> for QueuePersist {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueuePersist {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Rebuilds queue `index` (not necessarily set up) for a device whose maximum size is `max`.
pub fn build_queue(index: usize, state: &QueuePersist, max: u16) -> Result<Queue, PersistError> {
    if state.max_size != max {
        return Err(PersistError::MaxSize {
            index,
            saved: state.max_size,
            device: max,
        });
    }
    Queue::try_from(QueueState {
        max_size: state.max_size,
        next_avail: state.next_avail,
        next_used: state.next_used,
        event_idx_enabled: state.event_idx_enabled,
        size: state.size,
        ready: state.ready,
        desc_table: state.desc_table,
        avail_ring: state.avail_ring,
        used_ring: state.used_ring,
    })
    .map_err(|source| PersistError::Queue { index, source })
}

/// Rebuilds a device's queues; with `mem`, they must be active: ready, and laid out inside it.
pub fn build_queues(
    states: &[QueuePersist],
    max_sizes: &[u16],
    mem: Option<&GuestMemory>,
) -> Result<Vec<Queue>, PersistError> {
    if states.len() != max_sizes.len() {
        return Err(PersistError::QueueCount {
            saved: states.len(),
            device: max_sizes.len(),
        });
    }
    let mut queues = Vec::with_capacity(states.len());
    for (index, (state, &max)) in states.iter().zip(max_sizes).enumerate() {
        let q = build_queue(index, state, max)?;
        if let Some(mem) = mem {
            check_layout(&q, mem).map_err(|source| PersistError::Layout { index, source })?;
        }
        queues.push(q);
    }
    Ok(queues)
}

/// The saved state of a virtio-mmio transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The device status register (the transport's part).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues as the driver set them up (the device keeps the live copies once active).
    pub queues: Vec<QueuePersist>,
}

/// Checks that `status` is a stage of the virtio initialisation sequence (with FAILED or
/// DEVICE_NEEDS_RESET possibly set).
pub fn check_status(status: u32) -> Result<(), PersistError> {
    let stage = status & !(FAILED | DEVICE_NEEDS_RESET);
    let valid = [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ];
    if valid.contains(&stage) {
        Ok(())
    } else {
        Err(PersistError::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{TestQueue, test_memory};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    #[test]
    fn queues_round_trip_and_bad_ones_are_refused() {
        let mem = test_memory(0x10_0000);
        let tq = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        let mut q = tq.queue();
        q.set_next_avail(3);
        let saved = QueuePersist::from(&q);
        let back = build_queues(&[saved], &[16], Some(&mem)).unwrap();
        assert_eq!(QueuePersist::from(&back[0]), saved);
        assert!(matches!(
            build_queues(&[saved], &[32], Some(&mem)),
            Err(PersistError::MaxSize { .. })
        ));
        assert!(matches!(
            build_queues(&[saved, saved], &[16], Some(&mem)),
            Err(PersistError::QueueCount { .. })
        ));
        let outside = QueuePersist {
            used_ring: 0x10_0000_0000,
            ..saved
        };
        assert!(matches!(
            build_queues(&[outside], &[16], Some(&mem)),
            Err(PersistError::Layout { .. })
        ));
        let odd = QueuePersist { size: 5, ..saved };
        assert!(matches!(
            build_queues(&[odd], &[16], None),
            Err(PersistError::Queue { .. })
        ));
        // Not ready is fine for a queue the driver has not finished, not for an active one.
        let unready = QueuePersist {
            ready: false,
            ..saved
        };
        assert!(build_queues(&[unready], &[16], None).is_ok());
        assert!(build_queues(&[unready], &[16], Some(&mem)).is_err());
    }

    #[test]
    fn status_stages() {
        check_status(0).unwrap();
        check_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK).unwrap();
        check_status(ACKNOWLEDGE | DRIVER | FAILED).unwrap();
        assert!(check_status(DRIVER_OK).is_err());
        assert!(check_status(ACKNOWLEDGE | FEATURES_OK).is_err());
    }
}
