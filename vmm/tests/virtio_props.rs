//! Property tests: arbitrary descriptor tables, available rings and packet headers from a hostile
//! guest. The queue walk and the vsock device must never panic or touch memory outside the
//! guest's: they return a checked chain or an error, and a malformed queue stops the device.

use std::sync::atomic::{AtomicU32, Ordering};

use hearth_vmm::devices::virtio::VirtioDevice;
use hearth_vmm::devices::virtio::queue::{QueueError, pop_chain};
use hearth_vmm::devices::virtio::test_utils::{TestQueue, test_memory};
use hearth_vmm::devices::virtio::vsock::packet::{HDR_SIZE, VsockHeader};
use hearth_vmm::devices::virtio::vsock::test_utils::GuestVsock;
use hearth_vmm::devices::virtio::vsock::{RXQ, TXQ, VsockError, VsockEvent, VsockUnixBackend};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MEM: usize = 0x10_0000;

/// Descriptor addresses: mostly inside memory, some straddling its end, some far outside.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0x8000u64..(MEM as u64),
        1 => (MEM as u64 - 64)..(MEM as u64 + 64),
        1 => any::<u64>(),
    ]
}

fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        addr(),
        prop_oneof![4 => 0u32..0x2000, 1 => any::<u32>()],
        0u16..8,
        prop_oneof![4 => 0u16..16, 1 => any::<u16>()],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any table and ring: every chain popped is inside guest memory, no longer than the queue,
    /// readable before writable; otherwise an error.
    #[test]
    fn queue_walk_is_total(
        descs in proptest::collection::vec(desc(), 16),
        heads in proptest::collection::vec(prop_oneof![4 => 0u16..16, 1 => any::<u16>()], 0..20),
        idx_skew in prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
    ) {
        let mem = test_memory(MEM);
        let tq = TestQueue::new(&mem, GuestAddress(0x1000), 16);
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            tq.set_desc(&mem, i as u16, a, l, f, n);
        }
        tq.publish(&mem, &heads);
        let idx = tq.avail_idx(&mem).wrapping_add(idx_skew);
        tq.set_avail_idx(&mem, idx);
        let mut q = tq.queue();
        for _ in 0..40 {
            match pop_chain(&mut q, &mem) {
                Ok(None) => break,
                Ok(Some(chain)) => {
                    prop_assert!(chain.readable.len() + chain.writable.len() <= 16);
                    for seg in chain.readable.iter().chain(&chain.writable) {
                        prop_assert!(seg.len == 0 || mem.check_range(seg.addr, seg.len as usize));
                    }
                }
                Err(QueueError::AvailIndexAhead) => {
                    prop_assert!(idx_skew > 0 || heads.len() > 16);
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

static CASE: AtomicU32 = AtomicU32::new(0);

fn guest() -> (tempfile::TempDir, GuestVsock<VsockUnixBackend>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = CASE.fetch_add(1, Ordering::Relaxed);
    let backend =
        VsockUnixBackend::new(3, &dir.path().join(format!("p{n}.sock"))).expect("backend");
    (dir, GuestVsock::new(backend))
}

fn header() -> impl Strategy<Value = VsockHeader> {
    (
        prop_oneof![Just(3u64), any::<u64>()],
        prop_oneof![Just(2u64), any::<u64>()],
        any::<u32>(),
        prop_oneof![Just(1024u32), any::<u32>()],
        prop_oneof![0u32..100, any::<u32>()],
        0u16..4,
        0u16..10,
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(src_cid, dst_cid, src_port, dst_port, len, type_, op, flags, buf_alloc, fwd_cnt)| {
                VsockHeader {
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    len,
                    type_,
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Arbitrary headers and payloads on a well-formed queue: the device consumes every packet
    /// and stays healthy.
    #[test]
    fn vsock_survives_arbitrary_packets(
        pkts in proptest::collection::vec((header(), proptest::collection::vec(any::<u8>(), 0..64)), 1..12),
    ) {
        let (_dir, mut g) = guest();
        for (h, payload) in &pkts {
            // The header goes out as is: its len may lie about the payload.
            g.post_raw(h, payload);
        }
        prop_assert!(g.device().handle_event(VsockEvent::TxQueue).is_ok());
        prop_assert!(!g.device().needs_reset());
        let _ = g.poll();
    }

    /// Arbitrary tx and rx tables: an error stops the device; nothing panics.
    #[test]
    fn vsock_survives_arbitrary_tables(
        tx in proptest::collection::vec(desc(), 16),
        rx in proptest::collection::vec(desc(), 16),
        heads in proptest::collection::vec(prop_oneof![4 => 0u16..16, 1 => any::<u16>()], 1..8),
        junk in proptest::collection::vec(any::<u8>(), HDR_SIZE..HDR_SIZE + 16),
    ) {
        let (_dir, mut g) = guest();
        let mem = g.mem.clone();
        // Junk (maybe a valid header) wherever the descriptors point inside memory.
        for &(a, _, _, _) in tx.iter() {
            if a < MEM as u64 - 64 {
                mem.write_slice(&junk, GuestAddress(a)).expect("inside");
            }
        }
        for (qi, table) in [(TXQ, &tx), (RXQ, &rx)] {
            let q = g.queue(qi);
            for (i, &(a, l, f, n)) in table.iter().enumerate() {
                q.set_desc(&mem, 200 + i as u16, a, l, f, n.wrapping_add(200));
            }
            let hs: Vec<u16> = heads.iter().map(|h| h.wrapping_add(200)).collect();
            q.publish(&mem, &hs);
        }
        for ev in [VsockEvent::TxQueue, VsockEvent::RxQueue, VsockEvent::Backend] {
            let result = g.device().handle_event(ev);
            match result {
                Ok(()) => {}
                Err(VsockError::Queue(_)) | Err(VsockError::NeedsReset) => {
                    prop_assert!(g.device().needs_reset());
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
