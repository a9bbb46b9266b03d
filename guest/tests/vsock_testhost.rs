//! The init's vsock code and control protocol over a real AF_VSOCK socket: inside the QEMU test
//! host (TCG, no KVM needed) with `vsock_loopback`, this test binary connects to the init's
//! `serve` through `VMADDR_CID_LOCAL`.

mod common;

use std::path::Path;

use common::{Qemu, add_with_libs, init, kernel, one_at_a_time};
use hearth_guest::image::{base_initramfs, modules};
use hearth_guest::init::{sys, vm};
use hearth_guest::protocol::client::ControlClient;
use hearth_guest::protocol::{Hello, Message, check_hello, encode_frame, expect_frame};
use std::io::Write;

const TEST: &str = "control_protocol_over_real_vsock";
const PORT: u32 = 1025;
/// VMADDR_CID_LOCAL: the loopback transport.
const CID_LOCAL: u32 = 1;

#[test]
fn control_protocol_over_real_vsock() {
    if std::env::var_os("HEARTH_IN_TESTHOST").is_some() {
        inside();
        return;
    }
    let _one = one_at_a_time();
    let kernel = kernel();
    let init = init();
    let exe = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The test binary at its own path, without debug info, with its libraries.
    let stripped = dir.path().join("test-exe");
    let ok = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&exe)
        .arg(&stripped)
        .status()
        .unwrap();
    assert!(ok.success(), "objcopy --strip-debug failed");
    let mut ir = base_initramfs(&init).unwrap();
    ir.add_file_from_host(&exe, &stripped, 0o755).unwrap();
    add_with_libs(&mut ir, Path::new("/bin/sh"));
    for lib in common::ldd(&exe) {
        if !ir.contains(&lib) {
            ir.add_file_from_host(&lib, &lib, 0o755).unwrap();
        }
    }
    let mods = modules::resolve(kernel.modules_dir.as_ref().unwrap(), &["vsock_loopback"]).unwrap();
    let mut inside = Vec::new();
    for m in &mods {
        let at = format!("/lib/modules/{}", m.file_name().unwrap().to_str().unwrap());
        ir.add_file_from_host(&at, m, 0o644).unwrap();
        inside.push(at);
    }
    let spec = serde_json::json!({
        "argv": [exe, "--exact", TEST, "--nocapture", "--test-threads", "1"],
        "modules": inside,
    });
    ir.add_file("/testhost/spec.json", spec.to_string(), 0o644)
        .unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, ir.to_bytes().unwrap()).unwrap();
    let out = Qemu::start(
        &kernel.vmlinuz,
        &initrd,
        "console=ttyS0 quiet panic=-1 hearth.role=testhost",
        &["-cpu", "EPYC", "-m", "1024"],
    )
    .wait();
    assert!(out.contains("vsock round trips ok"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "HEARTH-TESTHOST-EXIT 0"),
        "{out}"
    );
}

fn inside() {
    let listener = sys::vsock_listen(PORT).expect("vsock listen");
    std::thread::spawn(move || {
        loop {
            let conn = sys::accept(&listener).expect("vsock accept");
            std::thread::spawn(move || vm::serve(conn));
        }
    });
    let conn = sys::vsock_connect(CID_LOCAL, PORT).expect("vsock connect to the local CID");
    let mut client = ControlClient::handshake(conn).expect("hello over vsock");
    assert!(client.peer.agent.starts_with("hearth-init"));
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(client.ping(big.clone()).unwrap(), big);
    let status = client.status().unwrap();
    assert_eq!(status.role, "vm");
    assert!(
        status.mem_total_kib > 0 && status.cpus_online >= 1,
        "{status:?}"
    );
    // A second, concurrent connection.
    let mut second =
        ControlClient::handshake(sys::vsock_connect(CID_LOCAL, PORT).unwrap()).unwrap();
    assert_eq!(second.ping(b"second".to_vec()).unwrap(), b"second");
    assert_eq!(client.ping(b"first".to_vec()).unwrap(), b"first");
    // A host that sends its first request with its Hello, in one write, gets our Hello and then
    // the answer (held back for one write: `sys::readable_now` below says that poll sees it).
    let mut pipelined = sys::vsock_connect(CID_LOCAL, PORT).unwrap();
    let ping = Message::Ping {
        bytes: b"pipelined".to_vec(),
    };
    let mut out = encode_frame(&Message::Hello(Hello::ours("testhost"))).unwrap();
    out.extend(encode_frame(&ping).unwrap());
    pipelined.write_all(&out).unwrap();
    check_hello(expect_frame(&mut pipelined).unwrap()).unwrap();
    assert_eq!(
        expect_frame::<_, Message>(&mut pipelined).unwrap(),
        Message::Pong {
            bytes: b"pipelined".to_vec()
        }
    );
    // `readable_now` on an AF_VSOCK stream: nothing before the peer writes, then its bytes.
    let listener = sys::vsock_listen(PORT + 1).expect("vsock listen");
    let mut near = sys::vsock_connect(CID_LOCAL, PORT + 1).unwrap();
    let far = sys::accept(&listener).unwrap();
    assert!(!sys::readable_now(&far));
    near.write_all(b"x").unwrap();
    let began = std::time::Instant::now();
    while !sys::readable_now(&far) {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(5),
            "poll never saw the byte"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    println!("vsock round trips ok");
}
