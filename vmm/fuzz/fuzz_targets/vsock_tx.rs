//! Fuzz the guest-facing tx path: the input is a descriptor table, an available ring and the
//! bytes the descriptors point at. Every chain is walked and checked, every packet parsed; the
//! only acceptable outcomes are a valid packet or an error.
#![no_main]

use hearth_vmm::devices::virtio::queue::pop_chain;
use hearth_vmm::devices::virtio::test_utils::{TestQueue, test_memory};
use hearth_vmm::devices::virtio::vsock::packet::{HDR_SIZE, MAX_PAYLOAD, parse_tx};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const QUEUE: u16 = 16;
const MEM: usize = 0x2_0000;
const DATA: u64 = 0x8000;

fuzz_target!(|input: &[u8]| {
    let mem = test_memory(MEM);
    let tq = TestQueue::new(&mem, GuestAddress(0x1000), QUEUE);
    // 16 descriptors (16 bytes each), then the avail index and 16 ring entries, then data.
    let table_len = 16 * usize::from(QUEUE);
    let ring_len = 2 + 2 * usize::from(QUEUE);
    let (table, rest) = input.split_at(input.len().min(table_len));
    let (ring, data) = rest.split_at(rest.len().min(ring_len));
    let (desc, avail, _) = tq.addresses();
    let _ = mem.write_slice(table, desc);
    let _ = mem.write_slice(ring, GuestAddress(avail.0 + 2));
    let _ = mem.write_slice(
        &data[..data.len().min(MEM - DATA as usize)],
        GuestAddress(DATA),
    );

    let mut q = tq.queue();
    let mut payload = Vec::new();
    for _ in 0..=QUEUE {
        match pop_chain(&mut q, &mem) {
            Ok(Some(chain)) => {
                if let Ok(h) = parse_tx(&mem, &chain, &mut payload) {
                    assert!(h.len <= MAX_PAYLOAD);
                    assert_eq!(payload.len(), h.len as usize);
                    assert!(HDR_SIZE + payload.len() <= chain.readable_len as usize);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
