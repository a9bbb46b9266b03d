//! A syscall outside a thread's seccomp allow-list kills the whole process with SIGSYS. The test
//! re-runs this test binary with one child test that installs the vCPU filter on a thread and
//! then calls `socket(2)`, which that list does not allow.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

const CHILD_ENV: &str = "HEARTH_SECCOMP_CHILD";

#[test]
fn seccomp_child() {
    // Run directly (not as the child), this checks that an allowed syscall passes the filter.
    let forbidden = std::env::var_os(CHILD_ENV).is_some();
    if forbidden {
        hearth_vmm::seccomp::install_reporter().expect("install the SIGSYS reporter");
    }
    let t = std::thread::spawn(move || {
        hearth_vmm::seccomp::install(hearth_vmm::seccomp::ThreadKind::Vcpu)
            .expect("install the vCPU filter");
        // futex/write are allowed: printing works.
        eprintln!("filter installed");
        if forbidden {
            // SAFETY: socket(2) with constant arguments; the filter kills the process first.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            eprintln!("socket returned {fd}: the filter did not stop it");
        }
    });
    t.join().expect("the filtered thread ran to its end");
}

#[test]
fn a_forbidden_syscall_kills_the_process() {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .env(CHILD_ENV, "1")
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("filter installed"),
        "the child did not get to install the filter: {stderr}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "child status {:?}; stderr: {stderr}",
        out.status
    );
    let socket_nr = libc::SYS_socket.to_string();
    assert!(
        stderr.contains(&format!("forbidden system call {socket_nr}")),
        "the reporter did not name socket ({socket_nr}): {stderr}"
    );
}
