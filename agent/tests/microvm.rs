//! The microVM sandbox end to end: a real Lambda function (the `lambda_runtime` crate, built as a
//! static `bootstrap` from `tests/functions/echo`) in a real `hearth vmm` microVM with `hearth-init`
//! as PID 1, through the QEMU test host where this machine has no hardware KVM.
//!
//! Needs the `hearth` binary (`cargo build --bins`), the static `hearth-init` and the cached guest
//! kernel (`hearth image`); missing any fails the test loudly. The function is built and zipped on
//! this host before the test host starts, and the zip travels into it at the same path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_agent::sandbox::microvm::{MicrovmConfig, MicrovmSandbox};
use hearth_agent::sandbox::{Environment, FunctionSpec, InvokeRequest, InvokeResponse};
use hearth_agent::testing::{self, process_runs, watchdog};
use hearth_vmm::kvm_test::{hearth_binary, in_kvm_with};
use serde_json::{Value, json};

/// The echo function's zip ([`testing::echo_zip`]): built here, found at the same path inside the
/// test host.
fn echo_zip() -> PathBuf {
    testing::echo_zip().unwrap_or_else(|e| panic!("the echo function: {e}"))
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

fn function(zip: &Path, timeout_ms: u64, max_concurrency: u32) -> FunctionSpec {
    let code = std::fs::read(zip).expect("read the function zip");
    testing::echo_function(code, timeout_ms, max_concurrency, &[("GREETING", "hello")])
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
            let started = Instant::now();
            let mut envt: Environment<MicrovmSandbox> =
                Environment::new(config(), function(&zip, timeout_ms, 1));

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

/// The agent's jail around the VMM: the function runs as in a plain VMM, the VMM process runs
/// under the jail's own uid in its own mount namespace, and destroying the sandbox leaves
/// neither the process nor the jail folder.
#[test]
fn a_jailed_microvm_runs_the_function() {
    let zip = echo_zip();
    in_kvm_with("a_jailed_microvm_runs_the_function", &[&zip], || {
        watchdog(Duration::from_secs(300));
        block_on(async {
            let mut c = config();
            let jail_base =
                std::env::temp_dir().join(format!("hearth-jails-{}", std::process::id()));
            let mut jails = hearth_agent::jail::JailConfig::new(hearth_binary());
            jails.jail_base = jail_base.clone();
            c.jail = Some(jails);
            let mut envt: Environment<MicrovmSandbox> =
                Environment::new(c, function(&zip, 20_000, 1));
            let r = envt
                .invoke(req(json!({"op": "env"})))
                .await
                .expect("an invoke in a jailed VM");
            assert_eq!(ok_json(&r)["env"]["GREETING"], "hello");
            let vmm = envt
                .sandbox()
                .and_then(|s| s.vmm_pid())
                .expect("the VMM runs");
            let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse::<u32>().ok())
                .expect("the VMM's uid");
            assert!(
                uid >= hearth_agent::jail::UID_BASE,
                "the jailed VMM runs as uid {uid}, not a jail uid"
            );
            let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
            assert_ne!(
                ns(&vmm.to_string()),
                ns("self"),
                "the VMM shares our mounts"
            );
            let r = envt
                .invoke(req(json!({"op": "echo", "warm": true})))
                .await
                .expect("a warm invoke in the jailed VM");
            assert_eq!(ok_json(&r)["warm"], true);
            envt.destroy().await;
            assert!(!process_runs(vmm), "destroy left the jailed VMM running");
            // The jailer removes the jail folder once its VMM is gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left: Vec<_> = std::fs::read_dir(&jail_base)
                    .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
                    .unwrap_or_default();
                if left.is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "jail folders left: {left:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = std::fs::remove_dir(&jail_base);
        });
    });
}

/// Prints how long the test has run, so the slow steps inside the test host show.
fn step(started: Instant, what: &str) {
    eprintln!("[{:>6.1} s] {what}", started.elapsed().as_secs_f64());
}

/// The environment variables and the context deadline the function sees; the function asked for
/// `AWS_LAMBDA_MAX_CONCURRENCY=2` but a microVM runs one invoke at a time, so it sees none (1).
async fn check_env_and_deadline(envt: &mut Environment<MicrovmSandbox>, timeout_ms: u64) {
    let r = envt
        .invoke(req(json!({"op": "echo", "x": 1})))
        .await
        .expect("the cold echo invoke");
    assert_eq!(
        ok_json(&r),
        json!({"op": "echo", "x": 1}),
        "cold start: the echo"
    );
    assert!(
        r.init_duration.is_some(),
        "cold start: the first invoke pays for the init"
    );
    assert!(
        r.logs.iter().any(|l| l.line == b"echo function init"),
        "cold start: the init's log lines come with the first invoke: {:?}",
        r.logs
    );
    // Warm, so the invoke's time on the host is known closely.
    let sent_ms = epoch_ms();
    let r = envt
        .invoke(req(json!({"op": "env"})))
        .await
        .expect("the env invoke");
    let received_ms = epoch_ms();
    assert!(r.init_duration.is_none(), "env: a warm invoke");
    let v = ok_json(&r);
    let env = &v["env"];
    for (name, want) in [
        ("GREETING", "hello"),
        ("AWS_LAMBDA_FUNCTION_NAME", "echo"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/echo"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("LAMBDA_TASK_ROOT", "/var/task"),
        ("_HANDLER", "bootstrap"),
    ] {
        assert_eq!(env[name], want, "env: {name} (all: {env})");
    }
    assert_eq!(
        env.get("AWS_LAMBDA_MAX_CONCURRENCY"),
        None,
        "env: a microVM takes one invoke at a time, whatever the function asked"
    );
    assert_eq!(v["cwd"], "/var/task", "env: the working folder");
    assert_eq!(
        v["request_id"],
        r.request_id.as_str(),
        "env: the request id"
    );
    assert_eq!(
        v["arn"], "arn:aws:lambda:us-east-1:000000000000:function:echo",
        "env: the invoked function ARN"
    );
    // The deadline the function sees is the host's clock at the invoke plus the timeout.
    let deadline = v["deadline_ms"].as_u64().expect("deadline_ms");
    assert!(
        (sent_ms + timeout_ms..=received_ms + timeout_ms).contains(&deadline),
        "deadline: {deadline} is not the invoke's time ({sent_ms}..={received_ms}) plus the \
         timeout {timeout_ms} ms"
    );
    // The function measures its remaining time against the guest's clock. Under the emulated
    // test host that clock drifts from the host's (seconds seen); report it, bound it loosely.
    let guest_now = v["now_ms"].as_u64().expect("now_ms") as i64;
    let skew = if guest_now < sent_ms as i64 {
        guest_now - sent_ms as i64
    } else {
        (guest_now - received_ms as i64).max(0)
    };
    eprintln!(
        "deadline: {} ms remaining as the function saw it; guest clock skew {skew} ms",
        deadline as i64 - guest_now
    );
    assert!(
        skew.abs() < 30_000,
        "deadline: the guest's clock is {skew} ms off the host's"
    );
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The function's stdout and stderr come back line by line, tagged with the request id.
async fn check_logs(envt: &mut Environment<MicrovmSandbox>) {
    let r = envt
        .invoke(req(json!({"op": "log", "lines": 3})))
        .await
        .expect("the log invoke");
    assert_eq!(ok_json(&r), json!({"logged": 3}), "logs: the response");
    assert!(r.init_duration.is_none(), "logs: a warm invoke");
    let lines: Vec<String> = r
        .logs
        .iter()
        .map(|l| String::from_utf8_lossy(&l.line).into_owned())
        .collect();
    for want in [
        "stdout line 0",
        "stdout line 2",
        "stderr line 0",
        "stderr line 2",
    ] {
        assert!(
            lines.iter().any(|l| l == want),
            "logs: missing {want:?} in {lines:?}"
        );
    }
    assert!(
        r.logs
            .iter()
            .all(|l| l.request_id.as_deref() == Some(r.request_id.as_str())),
        "logs: every line is tagged with the request id {}: {:?}",
        r.request_id,
        r.logs
    );
    assert!(
        String::from_utf8_lossy(&r.logs_tail).contains("stdout line 2"),
        "logs: the tail holds the last lines"
    );
}

/// A handled error is the function's errorType and errorMessage; the VM stays.
async fn check_handled_error(envt: &mut Environment<MicrovmSandbox>, vmm: u32) {
    let r = envt
        .invoke(req(json!({"op": "error"})))
        .await
        .expect("the error invoke");
    let e = r.result.expect_err("handled error: the invoke fails");
    assert_eq!(e.error_type, "EchoError", "handled error: errorType");
    assert_eq!(
        e.error_message, "handled failure",
        "handled error: errorMessage"
    );
    let body: Value = serde_json::from_slice(&e.body).expect("handled error: a JSON body");
    assert_eq!(
        (&body["errorType"], &body["errorMessage"]),
        (&json!("EchoError"), &json!("handled failure")),
        "handled error: the body"
    );
    assert_eq!(
        envt.sandbox().and_then(|s| s.vmm_pid()),
        Some(vmm),
        "handled error: the same VM stays warm"
    );
}

/// A panic is an error of the invoke, not of the environment.
async fn check_panic(envt: &mut Environment<MicrovmSandbox>, vmm: u32) {
    let r = envt
        .invoke(req(json!({"op": "panic"})))
        .await
        .expect("the panic invoke");
    let e = r.result.expect_err("panic: the invoke fails");
    assert!(
        e.error_message.contains("function panicked on purpose"),
        "panic: the message: {e:?}"
    );
    let r = envt
        .invoke(req(json!({"op": "echo", "after": "panic"})))
        .await
        .expect("the invoke after the panic");
    assert_eq!(
        ok_json(&r)["after"],
        "panic",
        "panic: the next invoke works"
    );
    assert_eq!(
        envt.sandbox().and_then(|s| s.vmm_pid()),
        Some(vmm),
        "panic: the same VM answers afterwards"
    );
}

/// A 5 MB response comes back whole.
async fn check_5mb_response(envt: &mut Environment<MicrovmSandbox>) {
    let r = envt
        .invoke(req(json!({"op": "big", "bytes": 5_000_000})))
        .await
        .expect("the 5 MB invoke");
    let body = r.result.expect("5 MB: the invoke succeeds");
    assert_eq!(body.len(), 5_000_002, "5 MB: a JSON string of 5,000,000 x");
    assert!(
        body[1..body.len() - 1].iter().all(|&b| b == b'x'),
        "5 MB: the bytes arrived intact"
    );
}

/// A runtime that exits gets `Runtime.ExitError`; the next invoke works, in a new VM, and the old
/// VMM process is gone.
async fn check_exit_then_a_working_invoke(envt: &mut Environment<MicrovmSandbox>, vmm: u32) {
    let r = envt
        .invoke(req(json!({"op": "exit", "code": 3})))
        .await
        .expect("the exit invoke has a result");
    let e = r.result.expect_err("exit: the invoke fails");
    assert_eq!(e.error_type, "Runtime.ExitError", "exit: errorType ({e:?})");
    assert!(
        e.error_message.contains("exit status 3"),
        "exit: errorMessage: {}",
        e.error_message
    );
    let r = envt
        .invoke(req(json!({"op": "echo", "after": "exit"})))
        .await
        .expect("the invoke after the exit");
    assert_eq!(ok_json(&r)["after"], "exit", "exit: the next invoke works");
    assert!(
        r.init_duration.is_some(),
        "exit: the next invoke is a cold start"
    );
    let new_vmm = envt.sandbox().and_then(|s| s.vmm_pid());
    assert!(
        new_vmm.is_some_and(|p| p != vmm),
        "exit: a new VM ({new_vmm:?}, was {vmm})"
    );
    assert!(!process_runs(vmm), "exit: the old VMM {vmm} survived");
}

/// A response over 6 MB is `Function.ResponseSizeTooLarge`.
async fn check_response_over_6mb(envt: &mut Environment<MicrovmSandbox>) {
    let r = envt
        .invoke(req(json!({"op": "big", "bytes": 7_000_000})))
        .await
        .expect("the 7 MB invoke has a result");
    let e = r.result.expect_err("over 6 MB: the invoke fails");
    assert_eq!(
        e.error_type, "Function.ResponseSizeTooLarge",
        "over 6 MB: errorType ({e:?})"
    );
}

/// One test for what needs no crash of the VM, then a crash (exit) and the recovery, then the
/// response over 6 MB (the Rust runtime gives up after its 413): two boots in all, each check
/// named in its messages.
#[test]
fn errors_panic_env_logs_big_responses_and_exit() {
    let zip = echo_zip();
    in_kvm_with(
        "errors_panic_env_logs_big_responses_and_exit",
        &[&zip],
        || {
            watchdog(Duration::from_secs(300));
            block_on(async {
                let timeout_ms = 60_000;
                let started = Instant::now();
                let mut envt: Environment<MicrovmSandbox> =
                    Environment::new(config(), function(&zip, timeout_ms, 2));
                step(started, "cold start, env and deadline");
                check_env_and_deadline(&mut envt, timeout_ms).await;
                let vmm = envt.sandbox().and_then(|s| s.vmm_pid()).expect("a VMM");
                step(started, "logs");
                check_logs(&mut envt).await;
                step(started, "handled error");
                check_handled_error(&mut envt, vmm).await;
                step(started, "panic");
                check_panic(&mut envt, vmm).await;
                step(started, "5 MB response");
                check_5mb_response(&mut envt).await;
                step(started, "exit, then a working invoke in a new VM");
                check_exit_then_a_working_invoke(&mut envt, vmm).await;
                step(started, "response over 6 MB");
                check_response_over_6mb(&mut envt).await;
                step(started, "destroy");
                envt.destroy().await;
            });
        },
    );
}

/// `hearth run --sandbox microvm`, the binary itself: the response on stdout, the function's logs
/// and the REPORT line on stderr, exit status 0; a handled error gives its Lambda-shaped body and
/// status 1.
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
        let (code, stdout, stderr) = run(r#"{"op":"log","lines":2}"#);
        assert_eq!(code, Some(0), "{stderr}");
        let v: Value = serde_json::from_str(stdout.trim()).expect("the response is JSON");
        assert_eq!(v, json!({"logged": 2}));
        for line in ["echo function init", "stdout line 1", "stderr line 1"] {
            assert!(stderr.contains(line), "logs: {line:?} missing: {stderr}");
        }
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
