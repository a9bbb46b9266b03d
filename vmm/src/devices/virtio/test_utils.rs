//! Test helpers: split virtqueues laid out in ordinary guest memory, driven the way a guest driver
//! would (descriptor table, available ring, used ring), so devices are tested without a guest.
//! Public (not `cfg(test)`) so the benches and fuzz targets use the same layout.

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::GuestMemory;

/// Guest memory of `size` bytes from address 0, in one region.
///
/// # Panics
/// When the host cannot map `size` bytes (test helper).
pub fn test_memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).expect("map test guest memory")
}

/// One buffer of a chain to lay out.
#[derive(Debug, Clone, Copy)]
pub struct DescSpec {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// Whether the device may write it.
    pub write: bool,
}

impl DescSpec {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A split virtqueue in guest memory, with the driver's side of it.
#[derive(Debug, Clone)]
pub struct TestQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_free: u16,
    used_seen: u16,
}

impl TestQueue {
    /// Lay out a queue of `size` entries from `base` (16-byte aligned) and zero it.
    ///
    /// # Panics
    /// When the rings do not fit in `mem` (test helper).
    pub fn new(mem: &GuestMemory, base: GuestAddress, size: u16) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * u64::from(size));
        let avail_end = avail.0 + 6 + 2 * u64::from(size);
        let used = GuestAddress((avail_end + 3) & !3);
        let used_end = used.0 + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; (used_end - desc.0) as usize];
        mem.write_slice(&zeros, desc).expect("queue fits in memory");
        Self {
            size,
            desc,
            avail,
            used,
            next_free: 0,
            used_seen: 0,
        }
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// First byte past the rings.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 6 + 8 * u64::from(self.size))
    }

    /// Address of the descriptor table, the available ring and the used ring.
    pub fn addresses(&self) -> (GuestAddress, GuestAddress, GuestAddress) {
        (self.desc, self.avail, self.used)
    }

    /// A ready `Queue` pointing at these rings, as the transport would build it.
    ///
    /// # Panics
    /// When the layout is invalid for `virtio_queue` (test helper).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size is a power of two");
        q.try_set_size(self.size).expect("size");
        q.try_set_desc_table_address(self.desc).expect("desc");
        q.try_set_avail_ring_address(self.avail).expect("avail");
        q.try_set_used_ring_address(self.used).expect("used");
        q.set_ready(true);
        q
    }

    /// Write descriptor `index` as is (no checks: tests write malformed ones on purpose).
    ///
    /// # Panics
    /// When the table is outside `mem` (test helper).
    pub fn set_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc.0 + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at)
            .expect("descriptor table in memory");
    }

    /// The driver's available index.
    ///
    /// # Panics
    /// When the ring is outside `mem` (test helper).
    pub fn avail_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.avail.0 + 2))
            .expect("avail ring in memory")
    }

    /// Set the driver's available index to anything (including nonsense).
    ///
    /// # Panics
    /// When the ring is outside `mem` (test helper).
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail.0 + 2))
            .expect("avail ring in memory");
    }

    /// Put `heads` in the available ring and advance its index.
    ///
    /// # Panics
    /// When the ring is outside `mem` (test helper).
    pub fn publish(&self, mem: &GuestMemory, heads: &[u16]) {
        let mut idx = self.avail_idx(mem);
        for &head in heads {
            let slot = u64::from(idx % self.size);
            mem.write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot))
                .expect("avail ring in memory");
            idx = idx.wrapping_add(1);
        }
        self.set_avail_idx(mem, idx);
    }

    /// Lay out a chain of `descs` in free descriptors, publish it, and return its head.
    ///
    /// # Panics
    /// When `descs` is empty or longer than the queue (test helper).
    pub fn add_chain(&mut self, mem: &GuestMemory, descs: &[DescSpec]) -> u16 {
        assert!(!descs.is_empty() && descs.len() <= usize::from(self.size));
        let indices: Vec<u16> = (0..descs.len() as u16)
            .map(|i| (self.next_free + i) % self.size)
            .collect();
        self.next_free = (self.next_free + descs.len() as u16) % self.size;
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = indices.get(i + 1).copied().unwrap_or(0);
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.set_desc(mem, indices[i], d.addr, d.len, flags, next);
        }
        self.publish(mem, &[indices[0]]);
        indices[0]
    }

    /// The device's used index.
    ///
    /// # Panics
    /// When the ring is outside `mem` (test helper).
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used.0 + 2))
            .expect("used ring in memory")
    }

    /// Used entries (head, length) the device added since the last call.
    ///
    /// # Panics
    /// When the ring is outside `mem` (test helper).
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != end {
            let slot = u64::from(self.used_seen % self.size);
            let at = GuestAddress(self.used.0 + 4 + 8 * slot);
            let id: u32 = mem.read_obj(at).expect("used ring in memory");
            let len: u32 = mem
                .read_obj(GuestAddress(at.0 + 4))
                .expect("used ring in memory");
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
