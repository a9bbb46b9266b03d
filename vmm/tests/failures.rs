//! Failures give clear errors and leave no process behind: a missing kernel, a corrupt kernel
//! (both found before KVM is touched, so these run on any host), and a guest that never reports
//! ready (which needs a booting VM).

mod common;

use common::*;
use hearth_vmm::kvm_test::{hearth_binary, in_kvm};
use hearth_vmm::{ProcessError, VmConfig, VmmProcess};

fn spawn_error(config: &VmConfig) -> String {
    match VmmProcess::spawn(&hearth_binary(), config) {
        Ok(mut p) => {
            let _ = p.kill();
            panic!("the VMM started with a bad configuration")
        }
        Err(e @ ProcessError::ExitedEarly { .. }) => e.to_string(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn a_missing_kernel_is_named_in_the_error() {
    let dir = VmDir::new();
    let mut c = VmConfig::new("/nonexistent/vmlinuz");
    c.control_socket = Some(dir.path("control.sock"));
    let err = spawn_error(&c);
    assert!(
        err.contains("/nonexistent/vmlinuz") && err.contains("cannot open the kernel"),
        "{err}"
    );
    assert!(!dir.path("control.sock").exists());
}

/// Both VMM executables, `hearth vmm` and the small `hearth-vmm` (with or without the leading
/// `vmm` that spawns pass), run the same VMM: each names a missing kernel.
#[test]
fn hearth_vmm_and_the_small_executable_both_name_a_missing_kernel() {
    let dir = VmDir::new();
    let mut c = VmConfig::new("/nonexistent/vmlinuz");
    c.control_socket = Some(dir.path("control.sock"));
    let hearth = hearth_binary();
    let small = std::path::Path::new(env!("CARGO_BIN_EXE_hearth-vmm"));
    for program in [hearth.as_path(), small] {
        let err = match VmmProcess::spawn_program(program, &c) {
            Ok(mut p) => {
                let _ = p.kill();
                panic!("{} started with a bad configuration", program.display())
            }
            Err(e @ ProcessError::ExitedEarly { .. }) => e.to_string(),
            Err(e) => panic!("unexpected error from {}: {e}", program.display()),
        };
        assert!(
            err.contains("/nonexistent/vmlinuz") && err.contains("cannot open the kernel"),
            "{}: {err}",
            program.display()
        );
    }
    let out = std::process::Command::new(small)
        .args(["--kernel", "/nonexistent/vmlinuz"])
        .output()
        .expect("run hearth-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/nonexistent/vmlinuz"),
        "{stderr}"
    );
}

#[test]
fn a_corrupt_kernel_is_refused() {
    let dir = VmDir::new();
    let kernel = dir.path("vmlinuz");
    // A real bzImage's first 4 KiB, then garbage: the header is gone.
    std::fs::write(&kernel, vec![0x90u8; 3 << 20]).expect("write");
    let mut c = VmConfig::new(&kernel);
    c.control_socket = Some(dir.path("control.sock"));
    let err = spawn_error(&c);
    assert!(err.contains("is not a loadable kernel"), "{err}");
}

#[test]
fn a_truncated_elf_kernel_is_refused() {
    let dir = VmDir::new();
    let vmlinux = kernel()
        .vmlinux
        .expect("`hearth image` extracts the ELF kernel");
    let real = std::fs::read(vmlinux).expect("read the cached ELF kernel");
    let kernel = dir.path("vmlinux");
    std::fs::write(&kernel, &real[..real.len() / 8]).expect("write");
    let mut c = VmConfig::new(&kernel);
    c.control_socket = Some(dir.path("control.sock"));
    let err = spawn_error(&c);
    assert!(err.contains("is not a loadable kernel"), "{err}");
}

#[test]
fn a_truncated_kernel_is_refused() {
    let dir = VmDir::new();
    let real = std::fs::read(kernel().vmlinuz).expect("read the cached kernel");
    let kernel = dir.path("vmlinuz");
    std::fs::write(&kernel, &real[..real.len() / 8]).expect("write");
    let mut c = VmConfig::new(&kernel);
    c.control_socket = Some(dir.path("control.sock"));
    let err = spawn_error(&c);
    assert!(err.contains("is truncated"), "{err}");
}

#[test]
fn a_guest_that_never_reports_ready_is_an_error_and_leaves_no_process() {
    in_kvm(
        "a_guest_that_never_reports_ready_is_an_error_and_leaves_no_process",
        || {
            let dir = VmDir::new();
            let initrd = guest_initrd(&dir);
            let listener = ready_listener(&dir);
            // The kernel finds no init in the initramfs: it panics and (panic=-1) reboots.
            let c = config(&dir, &initrd, 128, 1, "rdinit=/nonexistent");
            let mut vmm = VmmProcess::spawn(&hearth_binary(), &c).expect("spawn");
            vmm.start().expect("start");
            let err = wait_ready(&listener, &mut vmm, READY_TIMEOUT)
                .map(|_| ())
                .expect_err("the guest cannot be ready");
            eprintln!("as expected: {err}");
            assert!(
                err.contains("before the guest reported ready")
                    || err.contains("did not report ready"),
                "{err}"
            );
            let pid = vmm.pid();
            drop(vmm);
            assert!(!process_exists(pid));
        },
    );
}

#[test]
fn a_host_without_hardware_kvm_fails_at_once_naming_the_test_host() {
    let dir = VmDir::new();
    let mut c = VmConfig::new(kernel().vmlinuz);
    c.control_socket = Some(dir.path("control.sock"));
    let kind = hearth_vmm::kvm::detect_kind();
    match VmmProcess::spawn(&hearth_binary(), &c) {
        Ok(mut p) if kind.is_hardware() => {
            let status = p.stop().expect("stop");
            assert!(status.success(), "{status}");
        }
        Ok(mut p) => {
            let _ = p.kill();
            panic!("a VM was built on a host whose /dev/kvm is {kind}");
        }
        Err(e) if !kind.is_hardware() => {
            let msg = e.to_string();
            assert!(msg.contains("hearth testhost"), "{msg}");
        }
        Err(e) => panic!("spawn failed on a hardware KVM host: {e}"),
    }
}
