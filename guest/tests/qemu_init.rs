//! hearth-init under QEMU TCG (no KVM needed): the `testhost` role runs a command end to end, and the
//! `vm` role boots, loads its modules and, with no vsock device in plain QEMU, reports that it cannot
//! reach the host and reboots (ends the VM).
//!
//! Needs: `qemu-system-x86_64` (Debian package qemu-system-x86), apt access for the kernel, and the
//! static init (`RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hearth-guest
//! --bin hearth-init --target x86_64-unknown-linux-gnu`). Missing pieces fail the tests loudly.

mod common;

use std::path::Path;

use common::{Qemu, add_with_libs, init, kernel, one_at_a_time};
use hearth_guest::image::{base_initramfs, guest_initramfs, modules};

#[test]
fn testhost_role_runs_a_command_with_kvm_and_reports_its_exit() {
    let _one = one_at_a_time();
    let kernel = kernel();
    let init = init();
    let mut ir = base_initramfs(&init).unwrap();
    add_with_libs(&mut ir, Path::new("/bin/sh"));
    let kvm = modules::resolve(kernel.modules_dir.as_ref().unwrap(), &["kvm-amd"]).unwrap();
    let mut inside = Vec::new();
    for m in &kvm {
        let at = format!("/lib/modules/{}", m.file_name().unwrap().to_str().unwrap());
        ir.add_file_from_host(&at, m, 0o644).unwrap();
        inside.push(at);
    }
    let spec = serde_json::json!({
        "argv": ["/bin/sh", "-c", "test -c /dev/kvm && echo kvm-present; echo \"hello $X from $(pwd) home=$HOME in=$HEARTH_IN_TESTHOST\"; printf no-newline; exit 7"],
        "env": {"X": "world"},
        "cwd": "/tmp",
        "modules": inside,
    });
    ir.add_file("/testhost/spec.json", spec.to_string(), 0o644)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, ir.to_bytes().unwrap()).unwrap();

    let qemu = Qemu::start(
        &kernel.vmlinuz,
        &initrd,
        "console=ttyS0 quiet panic=-1 hearth.role=testhost",
        &["-cpu", "EPYC,+svm,+npt", "-m", "2048", "-smp", "2"],
    );
    let out = qemu.wait();
    assert!(out.contains("kvm-present"), "kvm_amd did not load:\n{out}");
    assert!(
        out.contains("hello world from /tmp home=/root in=1"),
        "{out}"
    );
    let markers: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("HEARTH-TESTHOST-EXIT"))
        .collect();
    assert_eq!(markers.len(), 1, "{out}");
    assert_eq!(markers[0].trim(), "HEARTH-TESTHOST-EXIT 7", "{out}");
}

#[test]
fn testhost_role_reports_127_when_the_command_cannot_start() {
    let _one = one_at_a_time();
    let kernel = kernel();
    let init = init();
    let mut ir = base_initramfs(&init).unwrap();
    ir.add_file(
        "/testhost/spec.json",
        r#"{"argv": ["/no/such/program"]}"#,
        0o644,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, ir.to_bytes().unwrap()).unwrap();
    let qemu = Qemu::start(
        &kernel.vmlinuz,
        &initrd,
        "console=ttyS0 quiet panic=-1 hearth.role=testhost",
        &["-cpu", "EPYC", "-m", "512"],
    );
    let out = qemu.wait();
    assert!(out.contains("cannot start \"/no/such/program\""), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "HEARTH-TESTHOST-EXIT 127"),
        "{out}"
    );
}

#[test]
fn vm_role_loads_modules_and_reboots_when_the_host_is_unreachable() {
    let _one = one_at_a_time();
    let kernel = kernel();
    let init = init();
    let bytes = guest_initramfs(&kernel, &init).unwrap();
    assert_eq!(
        bytes,
        guest_initramfs(&kernel, &init).unwrap(),
        "the initramfs is reproducible"
    );
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, &bytes).unwrap();
    let qemu = Qemu::start(
        &kernel.vmlinuz,
        &initrd,
        "console=ttyS0 quiet panic=-1 reboot=k",
        &["-cpu", "EPYC", "-m", "512"],
    );
    let out = qemu.wait();
    assert!(out.contains("role vm"), "{out}");
    assert!(out.contains("loaded 6 modules"), "{out}");
    assert!(
        out.contains("vsock connect to host port 1024 failed"),
        "{out}"
    );
    assert!(
        out.contains(
            "FATAL: host link: could not connect to the host (CID 2) on vsock port 1024 within 5000 ms"
        ),
        "{out}"
    );
}

#[test]
fn hearth_image_cli_writes_the_microvm_initramfs() {
    use hearth_guest::image::cli::{ImageArgs, run};
    use hearth_guest::image::initramfs::parse;
    let _ = kernel();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("initrd");
    let args = ImageArgs {
        cache_dir: None,
        initramfs: Some(out.clone()),
        init: Some(init()),
        json: true,
    };
    assert_eq!(run(args).unwrap(), 0);
    let bytes = std::fs::read(&out).unwrap();
    let entries = parse(&bytes).unwrap();
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name} in the initramfs"))
    };
    assert!(get("init").is_file());
    assert_eq!(get("init").mode & 0o777, 0o755);
    assert!(
        get("init").data.len() < 8 << 20,
        "the init is packed without debug info"
    );
    assert_eq!(get("dev/console").rdev_major, 5);
    let order = String::from_utf8(get("lib/modules/load-order").data.clone()).unwrap();
    let order: Vec<&str> = order.lines().collect();
    assert_eq!(
        order,
        [
            "/lib/modules/virtio_ring.ko",
            "/lib/modules/virtio.ko",
            "/lib/modules/virtio_mmio.ko",
            "/lib/modules/vsock.ko",
            "/lib/modules/vmw_vsock_virtio_transport_common.ko",
            "/lib/modules/vmw_vsock_virtio_transport.ko"
        ]
    );
    for m in order {
        assert!(
            get(m.trim_start_matches('/')).data.starts_with(b"\x7fELF"),
            "{m}"
        );
    }
}
