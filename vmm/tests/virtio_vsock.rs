//! The virtio-vsock device with its Unix-socket backend, driven without a guest: virtqueues in
//! ordinary memory (`GuestVsock`), the real MMIO transport, real Unix sockets on the host side.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use hearth_vmm::devices::virtio::VirtioDevice;
use hearth_vmm::devices::virtio::status::DEVICE_NEEDS_RESET;
use hearth_vmm::devices::virtio::vsock::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND, VsockHeader, op};
use hearth_vmm::devices::virtio::vsock::test_utils::GuestVsock;
use hearth_vmm::devices::virtio::vsock::unix::connection::TX_BUF_SIZE;
use hearth_vmm::devices::virtio::vsock::{HOST_CID, TXQ, VsockUnixBackend};

const WAIT: Duration = Duration::from_secs(5);

struct Rig {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    guest: GuestVsock<VsockUnixBackend>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("v.sock");
    let backend = VsockUnixBackend::new(3, &uds).expect("backend");
    Rig {
        _dir: dir,
        guest: GuestVsock::new(backend),
        uds,
    }
}

fn ops(pkts: &[(VsockHeader, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

fn has_op(op: u16) -> impl FnMut(&[(VsockHeader, Vec<u8>)]) -> bool {
    move |p| p.iter().any(|(h, _)| h.op == op)
}

fn data_of(pkts: &[(VsockHeader, Vec<u8>)]) -> Vec<u8> {
    pkts.iter()
        .filter(|(h, _)| h.op == op::RW)
        .flat_map(|(_, d)| d.clone())
        .collect()
}

/// The guest connects to host port 1024 and gets the host's Unix socket `<uds>_1024`.
fn guest_connect(r: &mut Rig, guest_port: u32) -> UnixStream {
    let listener = UnixListener::bind(format!("{}_1024", r.uds.display())).expect("bind _1024");
    let req = r.guest.header(guest_port, 1024, op::REQUEST);
    r.guest.send(&req, &[]).expect("send request");
    let got = r.guest.poll_until(WAIT, has_op(op::RESPONSE));
    let (resp, _) = got
        .iter()
        .find(|(h, _)| h.op == op::RESPONSE)
        .expect("a RESPONSE");
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, 3));
    assert_eq!((resp.src_port, resp.dst_port), (1024, guest_port));
    let (stream, _) = listener.accept().expect("the backend connected");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
}

#[test]
fn guest_to_host_stream_both_ways_then_close() {
    let mut r = rig();
    let mut host = guest_connect(&mut r, 5000);

    let rw = r.guest.header(5000, 1024, op::RW);
    r.guest.send(&rw, b"hello host").expect("send");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).expect("host reads");
    assert_eq!(&buf, b"hello host");

    host.write_all(b"hello guest").expect("host writes");
    let got = r.guest.poll_until(WAIT, |p| data_of(p).len() >= 11);
    assert_eq!(data_of(&got), b"hello guest");
    let (h, _) = &got[0];
    assert_eq!((h.src_port, h.dst_port, h.op), (1024, 5000, op::RW));
    assert_eq!(h.buf_alloc, TX_BUF_SIZE);

    // The guest closes both ways: the host sees end of file, the guest gets the final RST.
    let mut shut = r.guest.header(5000, 1024, op::SHUTDOWN);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    r.guest.send(&shut, &[]).expect("send");
    let got = r.guest.poll_until(WAIT, has_op(op::RST));
    assert!(has_op(op::RST)(&got), "{:?}", ops(&got));
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
    assert_eq!(r.guest.device().backend().connection_count(), 0);
}

#[test]
fn guest_connect_without_host_listener_is_reset() {
    let mut r = rig();
    let req = r.guest.header(5001, 4444, op::REQUEST);
    r.guest.send(&req, &[]).expect("send");
    let got = r.guest.poll_until(WAIT, has_op(op::RST));
    let (rst, _) = got.iter().find(|(h, _)| h.op == op::RST).expect("RST");
    assert_eq!((rst.src_port, rst.dst_port), (4444, 5001));
    // Data for an unknown connection is answered with RST too; a stray RST is not answered.
    let rw = r.guest.header(5002, 4444, op::RW);
    r.guest.send(&rw, b"x").expect("send");
    let stray = r.guest.header(5003, 4444, op::RST);
    r.guest.send(&stray, &[]).expect("send");
    let got = r.guest.poll_until(Duration::from_millis(200), |_| false);
    assert_eq!(ops(&got), vec![op::RST]);
    assert_eq!(got[0].0.dst_port, 5002);
}

/// A host client: CONNECT to guest port 1025, the guest accepts.
fn host_connect(r: &mut Rig) -> (BufReader<UnixStream>, u32) {
    let mut client = UnixStream::connect(&r.uds).expect("connect to the uds");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"CONNECT 1025\n").expect("write");
    let got = r.guest.poll_until(WAIT, has_op(op::REQUEST));
    let (req, _) = got
        .iter()
        .find(|(h, _)| h.op == op::REQUEST)
        .expect("a REQUEST");
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, 3, 1025)
    );
    let local_port = req.src_port;
    let resp = r.guest.header(1025, local_port, op::RESPONSE);
    r.guest.send(&resp, &[]).expect("send response");
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    reader.read_line(&mut line).expect("OK line");
    assert_eq!(line, format!("OK {local_port}\n"));
    (reader, local_port)
}

#[test]
fn host_to_guest_connect_data_and_host_close() {
    let mut r = rig();
    let (mut client, local_port) = host_connect(&mut r);

    client.get_mut().write_all(b"ping").expect("write");
    let got = r.guest.poll_until(WAIT, |p| data_of(p).len() >= 4);
    assert_eq!(data_of(&got), b"ping");
    assert_eq!(got[0].0.dst_port, 1025);

    let rw = r.guest.header(1025, local_port, op::RW);
    r.guest.send(&rw, b"pong").expect("send");
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"pong");

    // The host closes: the guest hears SHUTDOWN (no more data from the host) and resets.
    drop(client);
    let got = r.guest.poll_until(WAIT, has_op(op::SHUTDOWN));
    let (shut, _) = got
        .iter()
        .find(|(h, _)| h.op == op::SHUTDOWN)
        .expect("SHUTDOWN");
    assert_eq!(shut.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    let rst = r.guest.header(1025, local_port, op::RST);
    r.guest.send(&rst, &[]).expect("send");
    assert_eq!(r.guest.device().backend().connection_count(), 0);
}

#[test]
fn bytes_sent_with_the_connect_line_reach_the_guest_with_its_accept() {
    let mut r = rig();
    let mut client = UnixStream::connect(&r.uds).expect("connect to the uds");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"CONNECT 1025\nearly").expect("write");
    let got = r.guest.poll_until(WAIT, has_op(op::REQUEST));
    let (req, _) = got
        .iter()
        .find(|(h, _)| h.op == op::REQUEST)
        .expect("a REQUEST");
    assert!(data_of(&got).is_empty(), "nothing before the guest accepts");
    let local_port = req.src_port;
    let resp = r.guest.header(1025, local_port, op::RESPONSE);
    // The data goes out while the device handles the RESPONSE: no backend event needed.
    r.guest.send(&resp, &[]).expect("send response");
    let got = r.guest.take_rx();
    assert_eq!(data_of(&got), b"early", "{:?}", ops(&got));
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    reader.read_line(&mut line).expect("OK line");
    assert_eq!(line, format!("OK {local_port}\n"));
}

#[test]
fn host_connect_refused_by_guest_closes_the_client() {
    let mut r = rig();
    let mut client = UnixStream::connect(&r.uds).expect("connect");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"CONNECT 7777\n").expect("write");
    let got = r.guest.poll_until(WAIT, has_op(op::REQUEST));
    let (req, _) = got
        .iter()
        .find(|(h, _)| h.op == op::REQUEST)
        .expect("REQUEST");
    let rst = r.guest.header(7777, req.src_port, op::RST);
    r.guest.send(&rst, &[]).expect("send");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty(), "no OK line for a refused connection");

    // A bad handshake line is dropped without bothering the guest.
    let mut bad = UnixStream::connect(&r.uds).expect("connect");
    bad.set_read_timeout(Some(WAIT)).expect("timeout");
    bad.write_all(b"HELLO\n").expect("write");
    let got = r.guest.poll_until(Duration::from_millis(200), |_| false);
    assert!(got.is_empty(), "{:?}", ops(&got));
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest).expect("eof");
}

#[test]
fn unanswered_host_request_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("t.sock");
    let mut backend = VsockUnixBackend::new(3, &uds).expect("backend");
    backend.set_request_timeout(Duration::from_millis(100));
    let mut guest = GuestVsock::new(backend);
    let mut client = UnixStream::connect(&uds).expect("connect");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"CONNECT 1025\n").expect("write");
    let got = guest.poll_until(WAIT, has_op(op::REQUEST));
    let (req, _) = got
        .iter()
        .find(|(h, _)| h.op == op::REQUEST)
        .expect("REQUEST");
    let local_port = req.src_port;
    // The guest never answers: after the timeout it gets a reset and the client is closed.
    let got = guest.poll_until(WAIT, has_op(op::RST));
    let (rst, _) = got
        .iter()
        .find(|(h, _)| h.op == op::RST)
        .expect("RST after the timeout");
    assert_eq!((rst.src_port, rst.dst_port), (local_port, 1025));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
    assert_eq!(guest.device().backend().connection_count(), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut r = rig();
    let mut client = UnixStream::connect(&r.uds).expect("connect");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    client.write_all(b"CONNECT 1025\n").expect("write");
    let got = r.guest.poll_until(WAIT, has_op(op::REQUEST));
    let local_port = got
        .iter()
        .find(|(h, _)| h.op == op::REQUEST)
        .expect("REQUEST")
        .0
        .src_port;
    // The guest accepts with a 6000-byte receive buffer.
    let mut resp = r.guest.header(1025, local_port, op::RESPONSE);
    resp.buf_alloc = 6000;
    r.guest.send(&resp, &[]).expect("send");
    let mut ok = [0u8; 64];
    let n = client.read(&mut ok).expect("OK line");
    assert!(ok[..n].starts_with(b"OK "));

    client
        .write_all(&vec![0xabu8; 20_000])
        .expect("host writes 20000 bytes");
    let got = r
        .guest
        .poll_until(Duration::from_millis(500), |p| data_of(p).len() >= 6000);
    assert_eq!(data_of(&got).len(), 6000, "no more than the guest's credit");
    let got = r.guest.poll_until(Duration::from_millis(200), |_| false);
    assert!(data_of(&got).is_empty());

    // The guest consumed everything: a credit update lets the rest through.
    let mut upd = r.guest.header(1025, local_port, op::CREDIT_UPDATE);
    upd.buf_alloc = 6000;
    upd.fwd_cnt = 6000;
    r.guest.send(&upd, &[]).expect("send");
    let got = r
        .guest
        .poll_until(Duration::from_millis(500), |p| data_of(p).len() >= 6000);
    assert_eq!(data_of(&got).len(), 6000);

    // A credit request is answered with our credit.
    let req = r.guest.header(1025, local_port, op::CREDIT_REQUEST);
    r.guest.send(&req, &[]).expect("send");
    let got = r.guest.poll_until(WAIT, has_op(op::CREDIT_UPDATE));
    let (upd, _) = got
        .iter()
        .find(|(h, _)| h.op == op::CREDIT_UPDATE)
        .expect("CREDIT_UPDATE");
    assert_eq!(upd.buf_alloc, TX_BUF_SIZE);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut r = rig();
    let _host = guest_connect(&mut r, 5005);
    // The host never reads; the guest sends far past the credit it was given.
    let chunk = vec![1u8; 60_000];
    let rw = r.guest.header(5005, 1024, op::RW);
    let mut reset = false;
    for _ in 0..64 {
        r.guest.send(&rw, &chunk).expect("send");
        let got = r.guest.poll_until(Duration::from_millis(1), |_| false);
        if has_op(op::RST)(&got) {
            reset = true;
            break;
        }
    }
    assert!(reset, "the connection was not reset");
    assert_eq!(r.guest.device().backend().connection_count(), 0);
}

#[test]
fn guest_to_host_credit_updates_flow_as_the_host_reads() {
    let mut r = rig();
    let mut host = guest_connect(&mut r, 5006);
    host.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![2u8; 32 * 1024];
    let rw = r.guest.header(5006, 1024, op::RW);
    let mut received = 0usize;
    let mut sent = 0usize;
    let mut fwd_cnt_seen = 0u32;
    let mut sink = vec![0u8; 1 << 20];
    // Send 1 MiB, never exceeding the credit the device advertises.
    let deadline = std::time::Instant::now() + WAIT;
    while received < (1 << 20) {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled at {received} bytes"
        );
        let in_flight = sent as u32 - fwd_cnt_seen;
        if sent < (1 << 20) && in_flight + chunk.len() as u32 <= TX_BUF_SIZE {
            r.guest.send(&rw, &chunk).expect("send");
            sent += chunk.len();
        }
        if let Ok(n) = host.read(&mut sink) {
            received += n;
        }
        for (h, _) in r.guest.poll().expect("poll") {
            fwd_cnt_seen = fwd_cnt_seen.max(h.fwd_cnt);
        }
    }
    assert_eq!(received, 1 << 20);
    assert!(fwd_cnt_seen > 0, "no credit update came back");
    assert_eq!(r.guest.device().backend().connection_count(), 1);
}

#[test]
fn transport_reset_drops_connections_and_tells_the_guest() {
    let mut r = rig();
    let mut host = guest_connect(&mut r, 5007);
    r.guest
        .device()
        .send_transport_reset()
        .expect("transport reset");
    assert_eq!(r.guest.take_events(), vec![0], "one TRANSPORT_RESET event");
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).expect("host sees end of file");
    assert_eq!(r.guest.device().backend().connection_count(), 0);
}

#[test]
fn malformed_queue_needs_reset_and_recovers() {
    let mut r = rig();
    // A descriptor loop on the tx queue.
    let mem = r.guest.mem.clone();
    let txq = r.guest.queue(TXQ);
    txq.set_desc(&mem, 10, 0x80_0000, 44, 1, 11);
    txq.set_desc(&mem, 11, 0x80_0000, 44, 1, 10);
    txq.publish(&mem, &[10]);
    let rw = r.guest.header(1, 2, op::RW);
    assert!(r.guest.send(&rw, b"x").is_err());
    assert!(r.guest.device().needs_reset());
    assert_ne!(r.guest.transport.status() & DEVICE_NEEDS_RESET, 0);
    // The driver resets the device and sets it up again: it works.
    r.guest.driver_init();
    assert!(!r.guest.device().needs_reset());
    let _host = guest_connect(&mut r, 5008);
}
