//! A Linux guest boots in a `hearth vmm` process (through the test host where this machine has
//! no hardware KVM), its init reports ready over vsock, host and guest exchange messages both
//! ways, the control socket pauses and resumes it, and the VM ends cleanly when the guest reboots.

mod common;

use common::*;
use hearth_guest::protocol::client::ControlClient;
use hearth_vmm::arch::memory::hugetlb_free_bytes;
use hearth_vmm::config::HugePages;
use hearth_vmm::kvm_test::{hearth_binary, in_kvm, in_kvm_appending};
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

/// Guest RAM from the hugetlbfs pool (`huge_pages: hugetlb`): with a pool large enough, the guest
/// boots on it and answers, and its RAM is the VMM's hugetlb memory; with too small a pool, the
/// VMM fails at start with an error naming `vm.nr_hugepages`. The test host boots with a pool
/// (`hugepages=72`: 144 MiB, for a 128 MiB guest); on a hardware host the outcome follows its pool.
#[test]
fn boots_on_hugetlb_pages_or_says_the_pool_is_short() {
    in_kvm_appending(
        "boots_on_hugetlb_pages_or_says_the_pool_is_short",
        &[],
        "hugepages=72",
        || {
            let dir = VmDir::new();
            let initrd = guest_initrd(&dir);
            let listener = ready_listener(&dir);
            let mut config = config(&dir, &initrd, 128, 1, "");
            config.huge_pages = HugePages::Hugetlb;
            let free_mib = hugetlb_free_bytes().expect("/proc/meminfo has the hugetlb pool") >> 20;
            let spawned = VmmProcess::spawn(&hearth_binary(), &config);
            if free_mib < 128 {
                let err = match spawned {
                    Ok(_) => panic!("a VMM started on {free_mib} MiB of free hugetlb pages"),
                    Err(e) => format!("{e} {e:?}"),
                };
                assert!(err.contains("nr_hugepages"), "{err}");
                eprintln!("hugetlb pool too small here ({free_mib} MiB free): refused clearly");
                return;
            }
            let mut vmm = spawned.expect("spawn hearth vmm with hugetlb guest RAM");
            {
                let r = vmm.start();
                ok(&mut vmm, "start", r)
            };
            if let Err(e) = wait_ready(&listener, &mut vmm, READY_TIMEOUT) {
                panic!("{e}\n{}\n{}", vmm.stderr_tail(), serial_tail(&dir));
            }
            let mut client = ControlClient::connect_uds(&dir.uds()).expect("connect");
            assert_eq!(client.ping(b"huge".to_vec()).expect("ping"), b"huge");
            let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", vmm.pid()))
                .expect("read the VMM's smaps_rollup");
            let hugetlb_kib: u64 = rollup
                .lines()
                .find_map(|l| l.strip_prefix("Private_Hugetlb:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(
                hugetlb_kib >= 2048,
                "guest RAM is not on hugetlb pages:\n{rollup}"
            );
            eprintln!("guest RAM on hugetlb pages: {hugetlb_kib} KiB touched");
            let status = vmm.stop().expect("stop");
            assert!(status.success(), "{status}");
        },
    );
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
