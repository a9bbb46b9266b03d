//! A VMM started ahead of its restore (`hearth vmm --await-restore`, through the test host where
//! this machine has no hardware KVM): a booted guest is snapshotted; a VMM spawned ahead with
//! another shape (vCPUs, memory) refuses a Restore of it with a clear error and keeps awaiting;
//! a VMM of the snapshot's shape refuses a corrupted copy, then restores the good snapshot, and
//! the restored init re-announces Ready and answers on vsock; a Restore with `resume` runs the
//! VM without a Start.

mod common;

use common::*;
use hearth_guest::protocol::client::ControlClient;
use hearth_vmm::kvm_test::{hearth_binary, in_kvm};
use hearth_vmm::{ProcessError, RestoreMode, SnapshotFiles, VmConfig, VmState, VmmProcess};
use std::os::unix::fs::FileExt;
use std::time::Instant;

/// As in the snapshot test: freed guest pages are zeroed, so they stay holes.
const TEMPLATE_CMDLINE: &str = "init_on_free=1";

/// A Restore of `files` into `vmm` must be refused with `needle` in the message, and leave the
/// VMM awaiting.
fn restore_refused(vmm: &mut VmmProcess, files: &SnapshotFiles, needle: &str) {
    match vmm.restore(files, RestoreMode::file()) {
        Err(ProcessError::Refused(_, m)) => {
            assert!(m.contains(needle), "expected `{needle}` in: {m}");
            eprintln!("refused as expected: {m}");
        }
        other => panic!(
            "a Restore ({needle}) was not refused: {other:?}\n{}",
            vmm.stderr_tail()
        ),
    }
    let r = vmm.status();
    assert_eq!(
        ok(vmm, "status after a refused Restore", r),
        VmState::AwaitingRestore
    );
}

/// Spawns a VMM ahead for `config` and checks it awaits a restore and refuses `Start`.
fn spawn_ahead(config: &VmConfig) -> VmmProcess {
    let mut vmm = VmmProcess::spawn_awaiting_restore(&hearth_binary(), config)
        .unwrap_or_else(|e| panic!("spawn a VMM ahead: {e}"));
    let r = vmm.status();
    assert_eq!(ok(&mut vmm, "status", r), VmState::AwaitingRestore);
    match vmm.start() {
        Err(ProcessError::Refused(_, m)) => assert!(m.contains("awaits a restore"), "{m}"),
        other => panic!("Start before a Restore was not refused: {other:?}"),
    }
    vmm
}

#[test]
fn a_vmm_spawned_ahead_restores_and_refuses_a_mismatched_snapshot() {
    in_kvm(
        "a_vmm_spawned_ahead_restores_and_refuses_a_mismatched_snapshot",
        || {
            let dir = VmDir::new();
            let initrd = guest_initrd(&dir);
            let listener = ready_listener(&dir);
            let config = config(&dir, &initrd, 128, 1, TEMPLATE_CMDLINE);
            let files = SnapshotFiles {
                state: dir.path("vm.state"),
                mem: dir.path("vm.mem"),
            };
            {
                let mut vmm = VmmProcess::spawn(&hearth_binary(), &config).expect("spawn");
                let r = vmm.start();
                ok(&mut vmm, "start the template", r);
                let _ready = wait_ready(&listener, &mut vmm, READY_TIMEOUT).unwrap_or_else(|e| {
                    panic!("{e}\n{}\n{}", vmm.stderr_tail(), serial_tail(&dir))
                });
                let r = vmm.pause();
                ok(&mut vmm, "pause", r);
                let r = vmm.snapshot(&files);
                ok(&mut vmm, "snapshot", r);
            }

            // Another shape: refused before anything is built, and the VMM keeps awaiting.
            let mut two = config.clone();
            two.vcpus = 2;
            let mut vmm = spawn_ahead(&two);
            restore_refused(&mut vmm, &files, "vCPUs");
            let status = vmm.stop().expect("stop");
            assert!(status.success(), "{status}: {}", vmm.stderr_tail());
            drop(vmm);
            let mut bigger = config.clone();
            bigger.mem_mib = 256;
            let mut vmm = spawn_ahead(&bigger);
            restore_refused(&mut vmm, &files, "does not match the VM configuration");
            drop(vmm);

            // The snapshot's shape: a corrupted state file is refused; the good one restores.
            let corrupted = SnapshotFiles {
                state: dir.path("corrupted.state"),
                mem: files.mem.clone(),
            };
            std::fs::copy(&files.state, &corrupted.state).expect("copy the state file");
            let len = std::fs::metadata(&corrupted.state).expect("meta").len();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&corrupted.state)
                .expect("open");
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, len - 10).expect("read");
            f.write_all_at(&[b[0] ^ 0x5a], len - 10).expect("write");
            let mut vmm = spawn_ahead(&config);
            restore_refused(&mut vmm, &corrupted, "corrupted");
            while listener.accept().is_ok() {}
            let t = Instant::now();
            let r = vmm.restore(&files, RestoreMode::file());
            assert_eq!(ok(&mut vmm, "restore", r), VmState::Created);
            let restored = t.elapsed();
            let r = vmm.restore(&files, RestoreMode::file());
            match r {
                Err(ProcessError::Refused(_, m)) => assert!(m.contains("not valid"), "{m}"),
                other => panic!("a second Restore was not refused: {other:?}"),
            }
            let r = vmm.start();
            assert_eq!(ok(&mut vmm, "start", r), VmState::Running);
            let _ready = wait_ready(&listener, &mut vmm, READY_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}\n{}\n{}", vmm.stderr_tail(), serial_tail(&dir)));
            let mut client = ControlClient::connect_uds(&dir.uds()).expect("control port");
            assert_eq!(client.ping(b"ahead".to_vec()).expect("ping"), b"ahead");
            eprintln!(
                "Restore answered in {:.1} ms; ping answered {:.1} ms after the Restore\nVMM log:\n{}",
                restored.as_secs_f64() * 1000.0,
                t.elapsed().as_secs_f64() * 1000.0,
                vmm.stderr_tail()
            );
            drop(client);
            let status = vmm.stop().expect("stop");
            assert!(status.success(), "{status}: {}", vmm.stderr_tail());
            // A Restore with `resume` runs the VM at once: no Start, and the init answers.
            let mut vmm = spawn_ahead(&config);
            let r = vmm.restore_and_resume(&files, RestoreMode::file());
            assert_eq!(ok(&mut vmm, "restore and resume", r), VmState::Running);
            let mut client = ControlClient::connect_uds(&dir.uds()).expect("control port");
            assert_eq!(client.ping(b"resumed".to_vec()).expect("ping"), b"resumed");
            let r = vmm.status();
            assert_eq!(ok(&mut vmm, "status", r), VmState::Running);
            drop(client);
            let status = vmm.stop().expect("stop");
            assert!(status.success(), "{status}: {}", vmm.stderr_tail());
        },
    );
}
