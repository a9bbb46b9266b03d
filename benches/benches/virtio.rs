//! Virtqueue and vsock packet micro-benchmarks: the checked chain walk, the vsock header and
//! payload parse, a queue round trip, and the whole guest-to-host data path into a Unix socket.
//! Run with `cargo bench -p hearth-benches --bench virtio`.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use hearth_benches::bench;
use hearth_vmm::devices::virtio::queue::{self, walk_chain};
use hearth_vmm::devices::virtio::test_utils::{DescSpec, TestQueue, test_memory};
use hearth_vmm::devices::virtio::vsock::VsockUnixBackend;
use hearth_vmm::devices::virtio::vsock::packet::{TYPE_STREAM, VsockHeader, op, parse_tx};
use hearth_vmm::devices::virtio::vsock::test_utils::GuestVsock;
use hearth_vmm::devices::virtio::vsock::unix::connection::TX_BUF_SIZE;
use vm_memory::{Bytes, GuestAddress};

const PAYLOAD: usize = 4096;

fn rw_header(len: u32) -> VsockHeader {
    VsockHeader {
        src_cid: 3,
        dst_cid: 2,
        src_port: 5000,
        dst_port: 1024,
        len,
        type_: TYPE_STREAM,
        op: op::RW,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

/// `cargo bench` passes `--bench`; under `cargo test` a short smoke pass is enough.
fn scale(samples: usize, iters: u64) -> (usize, u64) {
    if std::env::args().any(|a| a == "--bench") {
        (samples, iters)
    } else {
        (2, (iters / 100).max(1))
    }
}

fn parse_benches() {
    let mem = test_memory(0x10_0000);
    let mut tq = TestQueue::new(&mem, GuestAddress(0x1000), 256);
    mem.write_slice(
        &rw_header(PAYLOAD as u32).to_bytes(),
        GuestAddress(0x8_0000),
    )
    .expect("header");
    mem.write_slice(&[7u8; PAYLOAD], GuestAddress(0x9_0000))
        .expect("payload");
    let descs = [
        DescSpec::readable(0x8_0000, 44),
        DescSpec::readable(0x9_0000, PAYLOAD as u32),
    ];
    let head = tq.add_chain(&mem, &descs);
    let (desc_table, _, _) = tq.addresses();

    let (s, i) = scale(50, 20_000);
    bench("walk_chain (2 descriptors)", s, i, |_| {
        let chain = walk_chain(&mem, desc_table, 256, head).expect("valid chain");
        std::hint::black_box(chain);
    });

    let chain = walk_chain(&mem, desc_table, 256, head).expect("valid chain");
    let mut payload = Vec::with_capacity(64 * 1024);
    let (s, i) = scale(50, 20_000);
    bench("parse_tx (44 B header + 4 KiB)", s, i, |_| {
        let h = parse_tx(&mem, &chain, &mut payload).expect("valid packet");
        std::hint::black_box(h);
    });

    let mut q = tq.queue();
    let _ = queue::pop_chain(&mut q, &mem);
    let (s, i) = scale(50, 10_000);
    bench("queue round trip (publish+pop+parse+used)", s, i, |_| {
        tq.add_chain(&mem, &descs);
        let chain = queue::pop_chain(&mut q, &mem)
            .expect("valid queue")
            .expect("a chain");
        let h = parse_tx(&mem, &chain, &mut payload).expect("valid packet");
        queue::add_used(&mut q, &mem, chain.head, 0).expect("used");
        std::hint::black_box(h);
    });
}

fn vsock_path_bench() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("b.sock");
    let listener = UnixListener::bind(format!("{}_1024", uds.display())).expect("bind");
    let mut g = GuestVsock::new(VsockUnixBackend::new(3, &uds).expect("backend"));
    let req = g.header(5000, 1024, op::REQUEST);
    g.send(&req, &[]).expect("request");
    let got = g.poll_until(Duration::from_secs(5), |p| {
        p.iter().any(|(h, _)| h.op == op::RESPONSE)
    });
    assert!(got.iter().any(|(h, _)| h.op == op::RESPONSE), "no RESPONSE");
    let (mut host, _) = listener.accept().expect("accept");
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        while let Ok(n) = host.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });

    let rw = g.header(5000, 1024, op::RW);
    let data = vec![9u8; PAYLOAD];
    let mut sent: u32 = 0;
    let mut fwd_cnt: u32 = 0;
    let (s, i) = scale(30, 2_000);
    bench("vsock guest->host 4 KiB (tx queue to socket)", s, i, |_| {
        // Stay within the credit the device advertises, as a driver must.
        while sent.wrapping_sub(fwd_cnt) + PAYLOAD as u32 > TX_BUF_SIZE {
            for (h, _) in g.poll().expect("poll") {
                fwd_cnt = h.fwd_cnt;
            }
        }
        g.send(&rw, &data).expect("send");
        sent = sent.wrapping_add(PAYLOAD as u32);
        for (h, _) in g.take_rx() {
            fwd_cnt = h.fwd_cnt;
        }
    });
    assert_eq!(
        g.device().backend().connection_count(),
        1,
        "connection reset during the bench"
    );
    let mut shut = g.header(5000, 1024, op::SHUTDOWN);
    shut.flags = 3;
    g.send(&shut, &[]).expect("shutdown");
    let _ = g.poll_until(Duration::from_secs(5), |p| {
        p.iter().any(|(h, _)| h.op == op::RST)
    });
    let total = drain.join().expect("drain thread");
    assert_eq!(total, sent as usize, "bytes lost on the way");
}

fn main() {
    parse_benches();
    vsock_path_bench();
}
