//! Checked access to split virtqueues: every descriptor chain the guest makes available is walked
//! here by hand, and every index, flag, address and length is checked before a device touches the
//! buffers. Any violation is a [`QueueError`]; devices treat it as fatal (they stop and ask for a
//! reset) rather than guess.
//!
//! `virtio_queue::DescriptorChain` ends a chain silently on a loop, a bad index or an unreadable
//! descriptor; that is why the walk is done here, with an error for each case.

use std::num::Wrapping;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::GuestMemory;

/// Size of one descriptor in the table.
const DESC_SIZE: u64 = 16;

/// What is wrong with a queue or a descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue was used before the driver made it ready.
    #[error("the queue is not ready")]
    NotReady,
    /// The driver's available index is more than a queue's worth ahead of the device.
    #[error("the available index is more than the queue size ahead of the device")]
    AvailIndexAhead,
    /// A chain names a descriptor beyond the table.
    #[error("descriptor index {index} is outside a queue of size {size}")]
    DescriptorIndex {
        /// The index named.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain is longer than the queue (a loop, or a chain longer than allowed).
    #[error("descriptor chain longer than the queue size {size} (a loop?)")]
    ChainTooLong {
        /// The queue size.
        size: u16,
    },
    /// A descriptor could not be read from the table.
    #[error("descriptor {index} cannot be read")]
    DescriptorRead {
        /// The descriptor index.
        index: u16,
        /// Why.
        #[source]
        source: GuestMemoryError,
    },
    /// An indirect descriptor, a feature this device does not offer.
    #[error("indirect descriptor {index}, but VIRTIO_F_INDIRECT_DESC was not offered")]
    Indirect {
        /// The descriptor index.
        index: u16,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} lies outside guest memory")]
    BufferOutOfMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// The lengths of a chain add up past 4 GiB.
    #[error("the chain's buffers add up to more than 4 GiB")]
    ChainLengthOverflow,
    /// A ring of the queue lies (partly) outside guest memory.
    #[error("the {ring} at {addr:#x} lies outside guest memory")]
    RingOutOfMemory {
        /// Which ring.
        ring: &'static str,
        /// Its guest address.
        addr: u64,
    },
    /// Guest memory refused an access to a checked buffer or ring.
    #[error("guest memory access failed")]
    Memory(#[source] GuestMemoryError),
    /// The rust-vmm queue reported an error (used ring update, ring address).
    #[error("virtqueue error")]
    Queue(#[source] virtio_queue::Error),
}

/// One guest buffer of a chain, checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A descriptor chain, walked and checked: its device-readable buffers then its device-writable
/// buffers, each inside guest memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainBuffers {
    /// Index of the head descriptor (what goes in the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
    /// Total bytes of the readable buffers.
    pub readable_len: u32,
    /// Total bytes of the writable buffers.
    pub writable_len: u32,
}

/// Walk the chain starting at `head` in the descriptor table at `desc_table` of a queue of
/// `queue_size` entries, checking everything (see [`QueueError`]).
pub fn walk_chain(
    mem: &GuestMemory,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<ChainBuffers, QueueError> {
    let mut chain = ChainBuffers {
        head,
        ..ChainBuffers::default()
    };
    let mut index = head;
    let mut seen: u16 = 0;
    loop {
        if index >= queue_size {
            return Err(QueueError::DescriptorIndex {
                index,
                size: queue_size,
            });
        }
        if seen >= queue_size {
            return Err(QueueError::ChainTooLong { size: queue_size });
        }
        seen += 1;
        let addr = desc_table
            .0
            .checked_add(u64::from(index) * DESC_SIZE)
            .map(GuestAddress)
            .ok_or(QueueError::DescriptorIndex {
                index,
                size: queue_size,
            })?;
        let desc: Descriptor = mem
            .read_obj(addr)
            .map_err(|source| QueueError::DescriptorRead { index, source })?;
        let flags = u32::from(desc.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(QueueError::Indirect { index });
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if seg.len > 0 && !GuestMemoryBackend::check_range(mem, seg.addr, seg.len as usize) {
            return Err(QueueError::BufferOutOfMemory {
                addr: seg.addr.0,
                len: seg.len,
            });
        }
        if flags & VRING_DESC_F_WRITE != 0 {
            chain.writable_len = chain
                .writable_len
                .checked_add(seg.len)
                .ok_or(QueueError::ChainLengthOverflow)?;
            chain.writable.push(seg);
        } else {
            if !chain.writable.is_empty() {
                return Err(QueueError::ReadableAfterWritable);
            }
            chain.readable_len = chain
                .readable_len
                .checked_add(seg.len)
                .ok_or(QueueError::ChainLengthOverflow)?;
            chain.readable.push(seg);
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
}

/// Check a queue the driver set up: ready, and its three rings inside guest memory. (Sizes and
/// alignments are checked by `virtio_queue` when the driver writes them.)
pub fn check_layout(queue: &Queue, mem: &GuestMemory) -> Result<(), QueueError> {
    if !queue.ready() {
        return Err(QueueError::NotReady);
    }
    let size = u64::from(queue.size());
    let rings = [
        ("descriptor table", queue.desc_table(), DESC_SIZE * size),
        ("available ring", queue.avail_ring(), 6 + 2 * size),
        ("used ring", queue.used_ring(), 6 + 8 * size),
    ];
    for (ring, addr, len) in rings {
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(QueueError::RingOutOfMemory { ring, addr });
        }
    }
    Ok(())
}

/// Take the next available chain of `queue`, checked; `Ok(None)` when the driver made none
/// available.
pub fn pop_chain(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<ChainBuffers>, QueueError> {
    if !queue.ready() {
        return Err(QueueError::NotReady);
    }
    let desc_table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut iter = queue.iter(mem).map_err(|e| match e {
        virtio_queue::Error::InvalidAvailRingIndex => QueueError::AvailIndexAhead,
        virtio_queue::Error::QueueNotReady => QueueError::NotReady,
        other => QueueError::Queue(other),
    })?;
    let Some(desc_chain) = iter.next() else {
        return Ok(None);
    };
    walk_chain(mem, desc_table, size, desc_chain.head_index()).map(Some)
}

/// Put the chain taken last by [`pop_chain`] back (the device could not use it now).
pub fn undo_pop(queue: &mut Queue) {
    queue.set_next_avail((Wrapping(queue.next_avail()) - Wrapping(1)).0);
}

/// Return a chain to the driver with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<(), QueueError> {
    queue.add_used(mem, head, len).map_err(QueueError::Queue)
}

/// Whether the driver has made chains available that the device has not taken.
pub fn has_available(queue: &Queue, mem: &GuestMemory) -> Result<bool, QueueError> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(QueueError::Queue)?;
    Ok(avail.0 != queue.next_avail())
}

impl ChainBuffers {
    /// Copy readable bytes from `offset` into `buf`; the chain must hold them all.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<(), QueueError> {
        let mut done = 0usize;
        for (addr, len) in spans(&self.readable, offset, buf.len()) {
            mem.read_slice(&mut buf[done..done + len], addr)
                .map_err(QueueError::Memory)?;
            done += len;
        }
        if done != buf.len() {
            return Err(QueueError::Memory(GuestMemoryError::PartialBuffer {
                expected: buf.len(),
                completed: done,
            }));
        }
        Ok(())
    }

    /// Copy `data` into the writable buffers from `offset`; the chain must have room for it all.
    pub fn write_at(&self, mem: &GuestMemory, offset: u32, data: &[u8]) -> Result<(), QueueError> {
        let mut done = 0usize;
        for (addr, len) in spans(&self.writable, offset, data.len()) {
            mem.write_slice(&data[done..done + len], addr)
                .map_err(QueueError::Memory)?;
            done += len;
        }
        if done != data.len() {
            return Err(QueueError::Memory(GuestMemoryError::PartialBuffer {
                expected: data.len(),
                completed: done,
            }));
        }
        Ok(())
    }
}

/// The (address, length) pieces of `segs` covering `len` bytes from byte `offset`; shorter when
/// the segments end first.
fn spans(
    segs: &[Segment],
    offset: u32,
    len: usize,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut skip = offset as usize;
    let mut left = len;
    segs.iter().filter_map(move |seg| {
        let seg_len = seg.len as usize;
        if skip >= seg_len {
            skip -= seg_len;
            return None;
        }
        if left == 0 {
            return None;
        }
        let take = (seg_len - skip).min(left);
        let addr = GuestAddress(seg.addr.0 + skip as u64);
        skip = 0;
        left -= take;
        Some((addr, take))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{DescSpec, TestQueue, test_memory};

    #[test]
    fn walks_a_good_chain() {
        let mem = test_memory(0x10_0000);
        let mut tq = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        tq.add_chain(
            &mem,
            &[
                DescSpec::readable(0x8000, 44),
                DescSpec::readable(0x9000, 100),
                DescSpec::writable(0xa000, 8),
            ],
        );
        let mut q = tq.queue();
        let chain = pop_chain(&mut q, &mem).expect("valid").expect("one chain");
        assert_eq!(chain.readable.len(), 2);
        assert_eq!(chain.readable_len, 144);
        assert_eq!(chain.writable_len, 8);
        assert!(pop_chain(&mut q, &mem).expect("valid").is_none());
    }

    #[test]
    fn rejects_loops() {
        let mem = test_memory(0x10_0000);
        let tq = TestQueue::new(&mem, GuestAddress(0x1000), 8);
        // 0 -> 1 -> 0 -> ...
        tq.set_desc(&mem, 0, 0x8000, 16, VRING_DESC_F_NEXT as u16, 1);
        tq.set_desc(&mem, 1, 0x8000, 16, VRING_DESC_F_NEXT as u16, 0);
        tq.publish(&mem, &[0]);
        let mut q = tq.queue();
        let err = pop_chain(&mut q, &mem).expect_err("a loop");
        assert!(matches!(err, QueueError::ChainTooLong { size: 8 }), "{err}");
    }

    #[test]
    fn rejects_bad_index_address_and_order() {
        let mem = test_memory(0x10_0000);
        let tq = TestQueue::new(&mem, GuestAddress(0x1000), 8);
        tq.set_desc(&mem, 0, 0x8000, 16, VRING_DESC_F_NEXT as u16, 9);
        tq.publish(&mem, &[0]);
        let mut q = tq.queue();
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::DescriptorIndex { index: 9, size: 8 })
        ));

        tq.set_desc(&mem, 1, 0xf_ff00, 0x200, 0, 0);
        tq.publish(&mem, &[1]);
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::BufferOutOfMemory { .. })
        ));

        tq.set_desc(&mem, 2, u64::MAX - 4, 16, 0, 0);
        tq.publish(&mem, &[2]);
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::BufferOutOfMemory { .. })
        ));

        tq.set_desc(
            &mem,
            3,
            0x8000,
            16,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            4,
        );
        tq.set_desc(&mem, 4, 0x8000, 16, 0, 0);
        tq.publish(&mem, &[3]);
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::ReadableAfterWritable)
        ));

        tq.set_desc(&mem, 5, 0x8000, 16, VRING_DESC_F_INDIRECT as u16, 0);
        tq.publish(&mem, &[5]);
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::Indirect { index: 5 })
        ));

        // A head index past the table straight from the available ring.
        tq.publish(&mem, &[200]);
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::DescriptorIndex { index: 200, .. })
        ));
    }

    #[test]
    fn rejects_avail_index_far_ahead() {
        let mem = test_memory(0x10_0000);
        let tq = TestQueue::new(&mem, GuestAddress(0x1000), 8);
        tq.set_avail_idx(&mem, 9);
        let mut q = tq.queue();
        assert!(matches!(
            pop_chain(&mut q, &mem),
            Err(QueueError::AvailIndexAhead)
        ));
    }

    #[test]
    fn reads_and_writes_span_segments() {
        let mem = test_memory(0x10_0000);
        let chain = ChainBuffers {
            head: 0,
            readable: vec![
                Segment {
                    addr: GuestAddress(0x8000),
                    len: 3,
                },
                Segment {
                    addr: GuestAddress(0x9000),
                    len: 5,
                },
            ],
            writable: vec![
                Segment {
                    addr: GuestAddress(0xa000),
                    len: 2,
                },
                Segment {
                    addr: GuestAddress(0xb000),
                    len: 6,
                },
            ],
            readable_len: 8,
            writable_len: 8,
        };
        mem.write_slice(&[1, 2, 3], GuestAddress(0x8000))
            .expect("write");
        mem.write_slice(&[4, 5, 6, 7, 8], GuestAddress(0x9000))
            .expect("write");
        let mut buf = [0u8; 6];
        chain.read_at(&mem, 1, &mut buf).expect("read");
        assert_eq!(buf, [2, 3, 4, 5, 6, 7]);
        let mut too_long = [0u8; 9];
        assert!(chain.read_at(&mem, 0, &mut too_long).is_err());

        chain.write_at(&mem, 1, &[9, 9, 9]).expect("write");
        let mut out = [0u8; 2];
        mem.read_slice(&mut out, GuestAddress(0xa000))
            .expect("read");
        assert_eq!(out, [0, 9]);
        mem.read_slice(&mut out, GuestAddress(0xb000))
            .expect("read");
        assert_eq!(out, [9, 9]);
        assert!(chain.write_at(&mem, 4, &[0; 5]).is_err());
    }
}
