//! A Linux guest boots in a `hearth vmm` process (through the test host where this machine has
//! no hardware KVM), its init reports ready over vsock, host and guest exchange messages both
//! ways, the control socket pauses and resumes it, and the VM ends cleanly when the guest reboots.

mod common;

use common::*;
use hearth_guest::protocol::client::ControlClient;
use hearth_vmm::kvm_test::{hearth_binary, in_kvm};
use hearth_vmm::{VmState, VmmProcess};
use std::time::{Duration, Instant};

fn boot_ping_reboot(mem_mib: u32, vcpus: u8) {
    let dir = VmDir::new();
    let initrd = guest_initrd(&dir);
    let listener = ready_listener(&dir);
    let config = config(&dir, &initrd, mem_mib, vcpus, "");
    let t0 = Instant::now();
    let mut vmm = VmmProcess::spawn(&hearth_binary(), &config).expect("spawn hearth vmm");
    assert_eq!(
        {
            let r = vmm.status();
            ok(&mut vmm, "status", r)
        },
        VmState::Created
    );
    assert_eq!(
        {
            let r = vmm.start();
            ok(&mut vmm, "start", r)
        },
        VmState::Running
    );
    let (_ready_conn, ready) = match wait_ready(&listener, &mut vmm, READY_TIMEOUT) {
        Ok(r) => r,
        Err(e) => panic!(
            "{e}\nVMM stderr:\n{}\nserial:\n{}",
            vmm.stderr_tail(),
            serial_tail(&dir)
        ),
    };
    eprintln!(
        "guest ready: {:?} after process start; init started {} ms, ready {} ms after kernel start; {}",
        t0.elapsed(),
        ready.init_start_ms,
        ready.ready_ms,
        ready.kernel_release
    );
    assert!(
        ready.kernel_release.contains("cloud-amd64"),
        "{}",
        ready.kernel_release
    );
    eprintln!("VMM log so far:\n{}", vmm.stderr_tail());
    let mem = vmm.memory_usage().expect("memory usage");
    eprintln!(
        "VMM memory apart from guest RAM: RSS {} KiB, PSS {} KiB (guest RAM resident {} KiB)",
        mem.own_rss_kib(),
        mem.own_pss_kib(),
        mem.guest_rss_kib
    );
    assert!(
        mem.guest_rss_kib > 0 && mem.guest_rss_kib <= u64::from(mem_mib) * 1024,
        "{mem:?}"
    );

    // Host to guest and back, on the control port.
    let mut client =
        ControlClient::connect_uds(&dir.uds()).expect("connect to the guest's control port");
    let payload: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    assert_eq!(client.ping(payload.clone()).expect("ping"), payload);
    let status = client.status().expect("guest status");
    assert_eq!(status.cpus_online, u32::from(vcpus));
    let total_mib = status.mem_total_kib / 1024;
    assert!(
        total_mib > u64::from(mem_mib) / 2 && total_mib <= u64::from(mem_mib),
        "guest sees {total_mib} MiB of {mem_mib}"
    );

    // Pause and resume through the control socket; the guest still answers afterwards.
    assert_eq!(
        {
            let r = vmm.pause();
            ok(&mut vmm, "pause", r)
        },
        VmState::Paused
    );
    assert_eq!(
        {
            let r = vmm.status();
            ok(&mut vmm, "status", r)
        },
        VmState::Paused
    );
    assert_eq!(
        {
            let r = vmm.resume();
            ok(&mut vmm, "resume", r)
        },
        VmState::Running
    );
    assert_eq!(
        client
            .ping(b"after resume".to_vec())
            .expect("ping after resume"),
        b"after resume"
    );

    // The guest reboots: the VM ends, the process exits 0.
    client.reboot().expect("reboot");
    let status = vmm
        .wait(Duration::from_secs(60))
        .expect("wait")
        .expect("the VMM did not exit after the guest rebooted");
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        vmm.stderr_tail()
    );
    let pid = vmm.pid();
    drop(vmm);
    assert!(!process_exists(pid));
}

#[test]
fn boots_with_one_vcpu_and_128_mib() {
    in_kvm("boots_with_one_vcpu_and_128_mib", || {
        boot_ping_reboot(128, 1)
    });
}

#[test]
fn boots_with_two_vcpus_and_512_mib() {
    in_kvm("boots_with_two_vcpus_and_512_mib", || {
        boot_ping_reboot(512, 2)
    });
}

#[test]
fn stop_and_drop_leave_no_process() {
    in_kvm("stop_and_drop_leave_no_process", || {
        let dir = VmDir::new();
        let initrd = guest_initrd(&dir);
        let listener = ready_listener(&dir);
        let mut vmm =
            VmmProcess::spawn(&hearth_binary(), &config(&dir, &initrd, 128, 1, "")).expect("spawn");
        {
            let r = vmm.start();
            ok(&mut vmm, "start", r)
        };
        if let Err(e) = wait_ready(&listener, &mut vmm, READY_TIMEOUT) {
            panic!("{e}\n{}", vmm.stderr_tail());
        }
        let status = vmm.stop().expect("stop");
        assert!(status.success(), "{status}");
        // SIGTERM ends a VM cleanly.
        let mut vmm3 =
            VmmProcess::spawn(&hearth_binary(), &config(&dir, &initrd, 128, 1, "")).expect("spawn");
        {
            let r = vmm3.start();
            ok(&mut vmm3, "start", r)
        };
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (no reuse).
        assert_eq!(unsafe { libc::kill(vmm3.pid() as i32, libc::SIGTERM) }, 0);
        let status = vmm3
            .wait(Duration::from_secs(30))
            .expect("wait")
            .expect("no exit after SIGTERM");
        assert!(status.success(), "{status}: {}", vmm3.stderr_tail());

        // A second VM is killed by dropping its handle.
        let vmm2 =
            VmmProcess::spawn(&hearth_binary(), &config(&dir, &initrd, 128, 1, "")).expect("spawn");
        vmm2.start().expect("start");
        let pid = vmm2.pid();
        assert!(process_exists(pid));
        drop(vmm2);
        assert!(!process_exists(pid), "process {pid} survived its handle");
    });
}
