//! The microVM sandbox end to end: a real Lambda function (the `lambda_runtime` crate, built as a
//! static `bootstrap` from `tests/functions/echo`) in a real `hearth vmm` microVM with `hearth-init`
//! as PID 1, through the QEMU test host where this machine has no hardware KVM.
//!
//! Needs the `hearth` binary (`cargo build --bins`), the static `hearth-init` and the cached guest
//! kernel (`hearth image`); missing any fails the test loudly. The function is built and zipped on
//! this host before the test host starts, and the zip travels into it at the same path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hearth_agent::sandbox::microvm::{MicrovmConfig, MicrovmSandbox};
use hearth_agent::sandbox::{Bundle, Environment, FunctionSpec, InvokeRequest, InvokeResponse};
use hearth_vmm::kvm_test::{hearth_binary, in_kvm_with};
use serde_json::{Value, json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where the echo function's zip is written (the same absolute path inside the test host).
fn zip_path() -> PathBuf {
    workspace().join("target/functions/echo-microvm.zip")
}

/// Builds the echo function (static, release) and writes its zip to [`zip_path`]; inside the test
/// host (no cargo there) the zip must already be at that path.
fn echo_zip() -> PathBuf {
    let path = zip_path();
    if std::env::var_os("HEARTH_IN_TESTHOST").is_some() {
        assert!(
            path.is_file(),
            "{} did not reach the test host",
            path.display()
        );
        return path;
    }
    let target = workspace().join("target/functions");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/functions/echo");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu"])
        .current_dir(&dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the echo function failed");
    let binary = std::fs::read(target.join("x86_64-unknown-linux-gnu/release/bootstrap")).unwrap();
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    w.start_file("bootstrap", opts).unwrap();
    w.write_all(&binary).unwrap();
    std::fs::write(&path, w.finish().unwrap().into_inner()).unwrap();
    path
}

fn config() -> MicrovmConfig {
    let init = match std::env::var_os("HEARTH_INIT") {
        Some(p) => PathBuf::from(p),
        None => hearth_guest::image::locate_init().expect(
            "hearth-init not found: build it static (see guest/src/main.rs) or set HEARTH_INIT",
        ),
    };
    let mut c = MicrovmConfig::new(hearth_binary(), &init, std::env::temp_dir())
        .expect("microVM configuration (kernel, initramfs)");
    // The test host is QEMU TCG: everything is slow.
    c.boot_timeout = Duration::from_secs(180);
    c.init_timeout = Duration::from_secs(120);
    c
}

fn function(zip: &Path, timeout_ms: u64) -> FunctionSpec {
    FunctionSpec {
        bundle: Bundle {
            function_name: "echo".into(),
            function_version: "$LATEST".into(),
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:echo".into(),
            runtime: "provided.al2023".into(),
            handler: "bootstrap".into(),
            memory_mb: 256,
            timeout_ms,
            region: "us-east-1".into(),
            log_group: "/aws/lambda/echo".into(),
            log_stream: "2026/11/28/[$LATEST]test".into(),
            env: vec![("GREETING".into(), "hello".into())],
            credentials: None,
            max_concurrency: 1,
            code_len: 0,
        },
        code: std::fs::read(zip).expect("read the function zip"),
    }
}

fn req(payload: Value) -> InvokeRequest {
    InvokeRequest {
        payload: payload.to_string().into_bytes(),
        ..Default::default()
    }
}

fn ok_json(r: &InvokeResponse) -> Value {
    match &r.result {
        Ok(bytes) => serde_json::from_slice(bytes).unwrap(),
        Err(e) => panic!("invoke failed: {}: {}", e.error_type, e.error_message),
    }
}

/// Whether process `pid` still runs (a zombie counts as gone).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Ends the process loudly if the test is still running after `limit`, printing every thread's
/// state, kernel wait channel and system call first, so a hang is a diagnosable failure.
fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("WATCHDOG: still running after {limit:?}; threads:");
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        for proc_dir in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let tasks = proc_dir.path().join("task");
            for task in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
                let t = task.path();
                let stat = read(t.join("stat"));
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                eprintln!(
                    "  {} {} state={} wchan={} syscall={}",
                    t.display(),
                    read(t.join("comm")).trim(),
                    state.chars().next().unwrap_or('?'),
                    read(t.join("wchan")).trim(),
                    read(t.join("syscall"))
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                );
            }
        }
        std::process::exit(101);
    });
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

#[test]
fn echo_then_timeout_then_a_working_invoke() {
    let zip = echo_zip();
    in_kvm_with("echo_then_timeout_then_a_working_invoke", &[&zip], || {
        watchdog(Duration::from_secs(300));
        block_on(async {
            // Generous: the nested guest runs under QEMU TCG.
            let timeout_ms = 20_000;
            let started = std::time::Instant::now();
            let mut envt: Environment<MicrovmSandbox> =
                Environment::new(config(), function(&zip, timeout_ms));

            let r = envt
                .invoke(req(json!({"op": "echo", "x": 1})))
                .await
                .expect("echo");
            assert_eq!(ok_json(&r), json!({"op": "echo", "x": 1}));
            assert!(
                r.init_duration.is_some(),
                "the first invoke is a cold start"
            );
            assert!(
                r.logs.iter().any(|l| l.line == b"echo function init"),
                "{:?}",
                r.logs
            );
            let sb = envt.sandbox().expect("a warm sandbox");
            assert!(sb.ready().kernel_release.contains("cloud-amd64"));
            let first_vmm = sb.vmm_pid().expect("the VMM runs");
            eprintln!(
                "cold echo: init {:?}, duration {:?}",
                r.init_duration, r.duration
            );

            eprintln!("[{:?}] warm invoke", started.elapsed());
            // Warm: the same VM answers.
            let r = envt
                .invoke(req(json!({"op": "env"})))
                .await
                .expect("warm invoke");
            assert!(r.init_duration.is_none(), "a warm invoke");
            let v = ok_json(&r);
            assert_eq!(v["env"]["GREETING"], "hello");
            assert_eq!(v["env"]["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "256");
            assert_eq!(envt.sandbox().and_then(|s| s.vmm_pid()), Some(first_vmm));

            eprintln!("[{:?}] an invoke past its timeout", started.elapsed());
            // Past the timeout: Sandbox.Timedout, the VM is destroyed.
            let r = envt
                .invoke(req(json!({"op": "sleep", "ms": timeout_ms * 3})))
                .await
                .expect("the timed-out invoke has a result");
            let e = r.result.unwrap_err();
            assert_eq!(e.error_type, "Sandbox.Timedout");
            assert_eq!(e.error_message, "Task timed out after 20.00 seconds");
            assert!(envt.sandbox().is_none(), "the timed-out VM was destroyed");
            assert!(
                !process_runs(first_vmm),
                "the VMM process {first_vmm} survived its sandbox"
            );

            eprintln!("[{:?}] an invoke in a new VM", started.elapsed());
            // The next invoke works, in a new VM.
            let r = envt
                .invoke(req(json!({"op": "echo", "after": "timeout"})))
                .await
                .expect("invoke after the timeout");
            assert!(r.init_duration.is_some(), "a new environment");
            assert_eq!(ok_json(&r)["after"], "timeout");
            let second_vmm = envt.sandbox().and_then(|s| s.vmm_pid()).expect("a VMM");
            assert_ne!(second_vmm, first_vmm);
            eprintln!("[{:?}] destroy", started.elapsed());
            envt.destroy().await;
            assert!(!process_runs(second_vmm), "destroy left the VMM running");
        });
    });
}

/// `hearth run --sandbox microvm`, the binary itself: the response on stdout, the logs and the
/// REPORT line on stderr, exit status 0; a handled error gives its Lambda-shaped body and status 1.
#[test]
fn hearth_run_in_a_microvm() {
    let zip = echo_zip();
    in_kvm_with("hearth_run_in_a_microvm", &[&zip], || {
        watchdog(Duration::from_secs(300));
        let run = |event: &str| {
            let out = Command::new(hearth_binary())
                .args(["run", "--sandbox", "microvm", "--code"])
                .arg(&zip)
                .args([
                    "--memory",
                    "256",
                    "--timeout",
                    "60",
                    "--init-timeout",
                    "120",
                ])
                .args(["--env", "K=V", "--event", event])
                .output()
                .expect("hearth run starts");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!("hearth run {event}: {}\n{stdout}{stderr}", out.status);
            (out.status.code(), stdout, stderr)
        };
        let (code, stdout, stderr) = run(r#"{"op":"echo","x":1}"#);
        assert_eq!(code, Some(0), "{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).expect("the response is JSON");
        assert_eq!(v, json!({"op": "echo", "x": 1}));
        assert!(stderr.contains("echo function init"), "{stderr}");
        assert!(
            stderr.contains("REPORT RequestId: ")
                && stderr.contains("Memory Size: 256 MB")
                && stderr.contains("Init Duration: "),
            "{stderr}"
        );

        let (code, stdout, stderr) = run(r#"{"op":"error"}"#);
        assert_eq!(code, Some(1), "{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).expect("the error is JSON");
        assert_eq!(v["errorType"], "EchoError");
        assert_eq!(v["errorMessage"], "handled failure");
    });
}
