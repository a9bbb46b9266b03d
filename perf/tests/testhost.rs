//! `hearth testhost` end to end: the real `hearth` binary boots the real QEMU test host with the
//! cached Debian kernel and runs commands inside.
//!
//! Needs `cargo build --bins` (the `hearth` binary next to this test's target folder), the static
//! `hearth-init` (see `hearth_guest::image::locate_init`), `hearth image` (the kernel cache) and
//! `qemu-system-x86_64`; each test fails with the instruction when one is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `hearth` binary, or a loud failure saying how to build it; also checks the kernel cache.
fn hearth() -> PathBuf {
    let hearth = hearth_perf::testhost::find_hearth().unwrap_or_else(|err| {
        panic!("{err}: these tests run the real `hearth` binary; run `cargo build --bins` first")
    });
    if let Err(err) = hearth_guest::image::KernelImage::locate() {
        panic!(
            "the kernel cache is empty ({err}): run `{} image` first",
            hearth.display()
        );
    }
    hearth
}

/// Runs `hearth ARGS` with the given extra environment, echoes its output, and returns it.
fn run_hearth(args: &[&str], env: &[(&str, &str)]) -> Output {
    let hearth = hearth();
    let output = Command::new(&hearth)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {hearth:?}: {err}"));
    println!(
        "$ hearth {}\n--- stdout\n{}--- stderr\n{}--- {}",
        args.join(" "),
        text(&output.stdout),
        text(&output.stderr),
        output.status
    );
    output
}

fn testhost(args: &[&str]) -> Output {
    let mut all = vec!["testhost"];
    all.extend_from_slice(args);
    run_hearth(&all, &[])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn true_exits_zero() {
    assert_eq!(testhost(&["--", "/bin/true"]).status.code(), Some(0));
}

#[test]
fn false_exits_one() {
    assert_eq!(testhost(&["--", "/bin/false"]).status.code(), Some(1));
}

#[test]
fn a_shell_from_path_gives_its_exit_status_and_output() {
    let out = testhost(&["--", "sh", "-c", "echo from-the-shell; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(
        text(&out.stdout).contains("from-the-shell"),
        "the command's output is streamed to stdout"
    );
}

#[test]
fn a_missing_command_gives_127_with_a_message() {
    let out = testhost(&["--", "no-such-command-in-the-testhost"]);
    assert_eq!(out.status.code(), Some(127));
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(
        all.contains("no-such-command-in-the-testhost"),
        "the message names the command"
    );
}

#[test]
fn with_packs_a_script_and_its_interpreter() {
    // Not under /tmp: the init mounts a fresh tmpfs there.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("testhost-with");
    std::fs::create_dir_all(&dir).expect("create the script folder");
    let script = dir.join("hello.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"hello from $0 in $PWD\"\nexit 3\n",
    )
    .expect("write the script");
    let mut perms = std::fs::metadata(&script)
        .expect("script metadata")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).expect("make the script executable");
    let script = script.to_str().expect("UTF-8 path");
    let out = testhost(&["--with", script, "--", "hello.sh"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stdout).contains("hello from"), "the script ran");
}

#[test]
fn the_testhost_has_hardware_kvm() {
    let out = testhost(&[
        "--",
        "sh",
        "-c",
        "test -c /dev/kvm && test -d /sys/module/kvm_amd && test \"$HEARTH_IN_TESTHOST\" = 1 && hearth doctor",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "/dev/kvm, kvm_amd, HEARTH_IN_TESTHOST and `hearth doctor` inside"
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("kvm: hardware (AMD SVM)"),
        "`hearth doctor` inside reports hardware KVM"
    );
    assert!(
        stdout.contains("kernel: "),
        "`hearth doctor` inside finds the kernel cache"
    );
}

#[test]
fn a_command_that_hangs_is_killed_at_the_timeout() {
    // QEMU inherits this variable: any process still carrying it afterwards is a stray.
    let marker = format!("timeout-test-{}", std::process::id());
    let out = run_hearth(
        &[
            "testhost",
            "--timeout",
            "30",
            "--with",
            "/usr/bin/sleep",
            "--",
            "sleep",
            "600",
        ],
        &[("HEARTH_PERF_TEST_MARKER", &marker)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("did not finish within 30 s"),
        "the timeout is named"
    );
    let needle = format!("HEARTH_PERF_TEST_MARKER={marker}");
    let strays: Vec<String> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        strays.is_empty(),
        "processes left behind after the timeout: {strays:?}"
    );
}

#[test]
fn an_empty_kernel_cache_names_hearth_image() {
    let empty = tempfile::tempdir().expect("tempdir");
    let cache = empty.path().to_str().expect("UTF-8 path");
    let out = run_hearth(
        &["testhost", "--", "/bin/true"],
        &[("HEARTH_CACHE_DIR", cache)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("hearth image"),
        "the error says to run `hearth image`"
    );
}

#[test]
fn a_missing_qemu_names_the_debian_package() {
    let out = run_hearth(
        &["testhost", "--", "/bin/true"],
        &[("PATH", "/nonexistent")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("qemu-system-x86"),
        "the error names the package"
    );
}
