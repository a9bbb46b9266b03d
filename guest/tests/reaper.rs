//! The PID 1 reaper (run in its own test process: it reaps every unmanaged child of the process).

use std::time::{Duration, Instant};

use hearth_guest::init::reaper;

#[test]
fn reaps_orphans_but_leaves_managed_children_to_their_owner() {
    reaper::start();
    let mut managed = reaper::spawn_managed(
        || {
            std::process::Command::new("sh")
                .args(["-c", "exit 3"])
                .spawn()
        },
        |c| Some(c.id()),
    )
    .unwrap();
    let unmanaged = std::process::Command::new("true").spawn().unwrap();
    let unmanaged_pid = unmanaged.id();
    drop(unmanaged);

    // The unmanaged child is reaped: its /proc entry disappears.
    let began = Instant::now();
    while std::path::Path::new(&format!("/proc/{unmanaged_pid}")).exists() {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "unmanaged child {unmanaged_pid} was not reaped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The managed one is still there for its owner, with its status.
    std::thread::sleep(Duration::from_millis(300));
    let status = managed
        .wait()
        .expect("the reaper stole a managed child's status");
    assert_eq!(status.code(), Some(3));
    reaper::release(managed.id());
    assert!(!reaper::is_managed(managed.id()));

    // An unmanaged child whose owner polls for it promptly (as tokio does on SIGCHLD) keeps its status.
    let mut polled = std::process::Command::new("sh")
        .args(["-c", "exit 5"])
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = polled
            .try_wait()
            .expect("the reaper stole a promptly polled child's status")
        {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(5));
}
