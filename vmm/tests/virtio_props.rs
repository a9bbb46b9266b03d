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

/// One step of a hostile or careless guest, or of host clients.
#[derive(Debug, Clone)]
enum Step {
    /// The guest sends `op` with arbitrary credit fields on connection slot `slot`.
    Guest {
        slot: usize,
        op: u16,
        flags: u32,
        len: usize,
        buf_alloc: u32,
        fwd_cnt: u32,
    },
    /// A host client connects to the uds and asks for guest port 1025 (or sends junk).
    HostConnect { junk: bool },
    /// A host peer writes `len` bytes.
    HostWrite { peer: usize, len: usize },
    /// A host peer closes.
    HostClose { peer: usize },
    /// Everything pending is processed; the guest answers host REQUESTs (accept or refuse).
    Poll { accept: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0usize..4, 1u16..8, 0u32..4, 0usize..3000, any::<u32>(), any::<u32>()).prop_map(
            |(slot, op, flags, len, buf_alloc, fwd_cnt)| Step::Guest { slot, op, flags, len, buf_alloc, fwd_cnt }
        ),
        1 => any::<bool>().prop_map(|junk| Step::HostConnect { junk }),
        2 => (0usize..6, 1usize..100_000).prop_map(|(peer, len)| Step::HostWrite { peer, len }),
        1 => (0usize..6).prop_map(|peer| Step::HostClose { peer }),
        3 => any::<bool>().prop_map(|accept| Step::Poll { accept }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random interleavings of guest packets (valid ops, arbitrary order and credit) and host
    /// activity: the device never stops, never panics, and keeps its bounds.
    #[test]
    fn vsock_state_machine_holds_up(steps in proptest::collection::vec(step(), 1..40)) {
        use std::io::Write;
        use std::os::unix::net::{UnixListener, UnixStream};
        use hearth_vmm::devices::virtio::vsock::unix::MAX_CONNECTIONS;

        let (dir, mut g) = guest();
        let uds = g.device().backend().path().to_owned();
        let listener = UnixListener::bind(format!("{}_1024", uds.display())).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let _ = dir;
        // Guest-side ports of up to 4 connections: (guest port, host port).
        let mut slots: Vec<(u32, u32)> = (0..4).map(|i| (6000 + i, 1024)).collect();
        let mut peers: Vec<UnixStream> = Vec::new();
        for s in steps {
            match s {
                Step::Guest { slot, op, flags, len, buf_alloc, fwd_cnt } => {
                    let (gp, hp) = slots[slot];
                    let mut h = g.header(gp, hp, op);
                    h.flags = flags;
                    h.buf_alloc = buf_alloc;
                    h.fwd_cnt = fwd_cnt;
                    let payload = vec![0x5au8; if op == 5 { len } else { 0 }];
                    prop_assert!(g.send(&h, &payload).is_ok());
                }
                Step::HostConnect { junk } => {
                    if let Ok(mut c) = UnixStream::connect(&uds) {
                        let line: &[u8] = if junk { b"CONNECT x\n" } else { b"CONNECT 1025\n" };
                        let _ = c.write_all(line);
                        c.set_nonblocking(true).expect("nonblocking");
                        peers.push(c);
                    }
                }
                Step::HostWrite { peer, len } => {
                    if let Some(p) = peers.get_mut(peer) {
                        let _ = p.write(&vec![0xa5u8; len]);
                    }
                }
                Step::HostClose { peer } => {
                    if peer < peers.len() {
                        drop(peers.remove(peer));
                    }
                }
                Step::Poll { accept } => {
                    while let Ok((s, _)) = listener.accept() {
                        s.set_nonblocking(true).expect("nonblocking");
                        peers.push(s);
                    }
                    let got = g.poll();
                    prop_assert!(got.is_ok());
                    for (h, _) in got.unwrap_or_default() {
                        if h.op == 1 {
                            // A host REQUEST: remember the connection in slot 3 and answer it.
                            slots[3] = (h.dst_port, h.src_port);
                            let op = if accept { 2 } else { 3 };
                            let resp = g.header(h.dst_port, h.src_port, op);
                            prop_assert!(g.send(&resp, &[]).is_ok());
                        }
                    }
                }
            }
            prop_assert!(!g.device().needs_reset());
            prop_assert!(g.device().backend().connection_count() <= MAX_CONNECTIONS);
        }
    }
}
