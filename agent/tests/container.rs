//! The container sandbox end to end: a real Lambda function (the `lambda_runtime` crate, built as a
//! static `bootstrap` from `tests/functions/echo`) in a real container with `hearth-init` as PID 1.
//!
//! Needs root (namespaces, cgroups) and the static `hearth-init` (`HEARTH_INIT`, or where
//! `hearth_guest::image::locate_init` finds it). Missing either fails the test loudly.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hearth_agent::sandbox::container::{ContainerConfig, ContainerSandbox};
use hearth_agent::sandbox::{Environment, FunctionSpec, InvokeRequest, Sandbox};
use hearth_agent::testing;
use serde_json::{Value, json};

/// The echo function's zip, built once per test process (`hearth_agent::testing::echo_zip`).
fn echo_zip() -> Vec<u8> {
    static ZIP: OnceLock<Vec<u8>> = OnceLock::new();
    ZIP.get_or_init(|| {
        let path = testing::echo_zip().unwrap_or_else(|e| panic!("the echo function: {e}"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    })
    .clone()
}

fn config() -> ContainerConfig {
    let init = match std::env::var_os("HEARTH_INIT") {
        Some(p) => PathBuf::from(p),
        None => hearth_guest::image::locate_init().expect(
            "hearth-init not found: build it static (see guest/src/main.rs) or set HEARTH_INIT",
        ),
    };
    assert!(init.is_file(), "hearth-init {} is missing", init.display());
    assert!(
        rustix::process::geteuid().is_root(),
        "container sandboxes need root (namespaces and cgroups)"
    );
    ContainerConfig::new(init)
}

fn function(timeout_ms: u64, concurrency: u32, env: Vec<(&str, &str)>) -> FunctionSpec {
    testing::echo_function(echo_zip(), timeout_ms, concurrency, &env)
}

fn req(payload: Value) -> InvokeRequest {
    InvokeRequest {
        payload: payload.to_string().into_bytes(),
        ..Default::default()
    }
}

fn ok_json(r: &hearth_agent::sandbox::InvokeResponse) -> Value {
    match &r.result {
        Ok(bytes) => serde_json::from_slice(bytes).unwrap(),
        Err(e) => panic!("invoke failed: {}: {}", e.error_type, e.error_message),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_env_deadline_logs_errors_and_panics() {
    let cfg = config();
    // A generous timeout: the machine running the tests may be busy.
    let spec = function(30_000, 1, vec![("GREETING", "hello")]);
    let (sb, init) = ContainerSandbox::start(&cfg, &spec)
        .await
        .expect("sandbox starts");
    assert!(init.duration > Duration::ZERO);
    assert!(
        init.logs.iter().any(|l| l.line == b"echo function init"),
        "{:?}",
        init.logs
    );

    let r = sb.invoke(req(json!({"op": "echo", "x": 1}))).await.unwrap();
    assert_eq!(ok_json(&r), json!({"op": "echo", "x": 1}));
    assert!(r.max_memory_used_mb > 0);

    let r = sb.invoke(req(json!({"op": "env"}))).await.unwrap();
    let v = ok_json(&r);
    let env = &v["env"];
    assert_eq!(env["GREETING"], "hello");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_NAME"], "echo");
    assert_eq!(env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"], "256");
    assert_eq!(env["AWS_LAMBDA_RUNTIME_API"], "127.0.0.1:9001");
    assert_eq!(env["LAMBDA_TASK_ROOT"], "/var/task");
    assert_eq!(env["_HANDLER"], "bootstrap");
    assert_eq!(env["AWS_REGION"], "us-east-1");
    assert_eq!(v["cwd"], "/var/task");
    assert_eq!(v["request_id"], r.request_id.as_str());
    assert_eq!(
        v["arn"],
        "arn:aws:lambda:us-east-1:000000000000:function:echo"
    );
    let remaining =
        v["deadline_ms"].as_u64().unwrap() as i64 - v["now_ms"].as_u64().unwrap() as i64;
    assert!(
        (20_000..=30_000).contains(&remaining),
        "deadline {remaining} ms away"
    );
    assert!(
        v["uid"].as_str().unwrap().contains("993"),
        "the function runs as uid 993: {}",
        v["uid"]
    );

    let r = sb
        .invoke(req(json!({"op": "log", "lines": 3})))
        .await
        .unwrap();
    ok_json(&r);
    let lines: Vec<String> = r
        .logs
        .iter()
        .map(|l| String::from_utf8_lossy(&l.line).into_owned())
        .collect();
    for want in ["stdout line 0", "stdout line 2", "stderr line 1"] {
        assert!(
            lines.iter().any(|l| l == want),
            "missing {want:?} in {lines:?}"
        );
    }
    assert!(
        r.logs
            .iter()
            .all(|l| l.request_id.as_deref() == Some(r.request_id.as_str()))
    );
    assert!(String::from_utf8_lossy(&r.logs_tail).contains("stderr line 2"));

    let r = sb.invoke(req(json!({"op": "error"}))).await.unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(
        (e.error_type.as_str(), e.error_message.as_str()),
        ("EchoError", "handled failure")
    );

    let r = sb.invoke(req(json!({"op": "panic"}))).await.unwrap();
    let e = r.result.unwrap_err();
    assert!(
        e.error_message.contains("function panicked on purpose"),
        "{e:?}"
    );

    let r = sb
        .invoke(req(json!({"op": "big", "bytes": 5_000_000})))
        .await
        .unwrap();
    assert_eq!(r.result.unwrap().len(), 5_000_002);
    let r = sb
        .invoke(req(json!({"op": "big", "bytes": 7_000_000})))
        .await
        .unwrap();
    assert_eq!(
        r.result.unwrap_err().error_type,
        "Function.ResponseSizeTooLarge"
    );

    // lambda_runtime treats the 413 as fatal and exits; the sandbox then reports itself dead.
    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_then_a_working_invoke() {
    let mut envt: Environment<ContainerSandbox> =
        Environment::new(config(), function(1000, 1, vec![]));
    let r = envt.invoke(req(json!({"op": "echo"}))).await.unwrap();
    assert!(
        r.init_duration.is_some(),
        "the first invoke is a cold start"
    );
    ok_json(&r);
    let old_pids = envt.sandbox().unwrap().pids();
    let r = envt
        .invoke(req(json!({"op": "sleep", "ms": 5000})))
        .await
        .unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(e.error_type, "Sandbox.Timedout");
    assert_eq!(e.error_message, "Task timed out after 1.00 seconds");
    assert!(
        envt.sandbox().is_none(),
        "the timed-out environment was destroyed"
    );
    for pid in old_pids {
        // Gone, or a zombie waiting for its (host-side) parent to reap it.
        assert!(
            !testing::process_runs(pid as u32),
            "pid {pid} survived the sandbox"
        );
    }
    let r = envt
        .invoke(req(json!({"op": "echo", "after": "timeout"})))
        .await
        .unwrap();
    assert!(r.init_duration.is_some(), "a new environment");
    assert_eq!(ok_json(&r)["after"], "timeout");
    envt.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_then_a_working_invoke() {
    let mut envt: Environment<ContainerSandbox> =
        Environment::new(config(), function(5000, 1, vec![]));
    let r = envt
        .invoke(req(json!({"op": "exit", "code": 3})))
        .await
        .unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(e.error_type, "Runtime.ExitError");
    assert!(
        e.error_message.contains("exit status 3"),
        "{}",
        e.error_message
    );
    let r = envt
        .invoke(req(json!({"op": "echo", "after": "exit"})))
        .await
        .unwrap();
    assert_eq!(ok_json(&r)["after"], "exit");
    envt.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_failure_is_the_invokes_error() {
    let mut envt: Environment<ContainerSandbox> =
        Environment::new(config(), function(5000, 1, vec![("ECHO_FAIL_INIT", "1")]));
    let r = envt.invoke(req(json!({}))).await.unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(e.error_type, "Runtime.ExitError", "{e:?}");
    envt.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_invokes_with_max_concurrency_2() {
    let cfg = config();
    let (sb, _) = ContainerSandbox::start(&cfg, &function(10_000, 2, vec![]))
        .await
        .expect("sandbox starts");
    let r = sb.invoke(req(json!({"op": "env"}))).await.unwrap();
    assert_eq!(ok_json(&r)["env"]["AWS_LAMBDA_MAX_CONCURRENCY"], "2");
    let started = Instant::now();
    let (a, b) = tokio::join!(
        sb.invoke(req(json!({"op": "sleep", "ms": 1500}))),
        sb.invoke(req(json!({"op": "sleep", "ms": 1500})))
    );
    let elapsed = started.elapsed();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(ok_json(&a)["request_id"], a.request_id.as_str());
    assert_eq!(ok_json(&b)["request_id"], b.request_id.as_str());
    assert!(
        elapsed < Duration::from_millis(2900),
        "ran one after the other: {elapsed:?}"
    );
    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_is_confined() {
    let cfg = config();
    let (sb, _) = ContainerSandbox::start(&cfg, &function(30_000, 1, vec![]))
        .await
        .expect("sandbox starts");
    let r = sb.invoke(req(json!({"op": "probe"}))).await.unwrap();
    let v = ok_json(&r);
    let denied = |k: &str| {
        let s = v[k].as_str().unwrap_or_default();
        assert!(
            s.contains("Operation not permitted") || s.contains("Permission denied"),
            "{k}: {s} (all: {v})"
        );
    };
    // Its own pid namespace: it is PID 1 there and sees no other process (not the init).
    assert_eq!(v["pid"], 1, "{v}");
    assert_eq!(v["visible_pids"], json!(["1"]), "{v}");
    // Another uid than the init's, without privilege.
    denied("setuid_root");
    // The seccomp filter and the lack of privilege.
    denied("unshare_user");
    denied("mount");
    denied("io_uring");
    // The code folder is the init's; /tmp is the function's.
    denied("write_task");
    assert_eq!(v["write_tmp"], "ok");
    // No network but the loopback, and the sandbox's own hostname.
    assert_eq!(v["interfaces"], json!(["lo"]));
    assert_eq!(v["hostname"], "hearth");
    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_is_bounded() {
    let cfg = config();
    let (sb, _) = ContainerSandbox::start(&cfg, &function(60_000, 1, vec![]))
        .await
        .expect("sandbox starts");
    let r = sb
        .invoke(req(json!({"op": "flood", "lines": 200_000})))
        .await
        .unwrap();
    assert_eq!(ok_json(&r)["flooded"], 200_000);
    assert!(r.logs.len() <= 10_000, "{} lines kept", r.logs.len());
    assert!(r.logs_tail.len() <= 4096);
    // Still working afterwards.
    let r = sb
        .invoke(req(json!({"op": "echo", "after": "flood"})))
        .await
        .unwrap();
    assert_eq!(ok_json(&r)["after"], "flood");
    sb.destroy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_limit_holds_and_the_environment_recovers() {
    let mut envt: Environment<ContainerSandbox> =
        Environment::new(config(), function(30_000, 1, vec![]));
    let r = envt
        .invoke(req(json!({"op": "alloc", "mb": 64})))
        .await
        .unwrap();
    assert_eq!(ok_json(&r)["allocated_mb"], 64);
    assert!(
        r.max_memory_used_mb >= 64,
        "max memory used {}",
        r.max_memory_used_mb
    );
    // 256 MB of memory: 400 MB cannot fit.
    let r = envt
        .invoke(req(json!({"op": "alloc", "mb": 400})))
        .await
        .unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(e.error_type, "Runtime.ExitError", "{e:?}");
    assert!(
        e.error_message.contains("signal: killed"),
        "{}",
        e.error_message
    );
    let r = envt
        .invoke(req(json!({"op": "echo", "after": "oom"})))
        .await
        .unwrap();
    assert_eq!(ok_json(&r)["after"], "oom");
    envt.destroy().await;
}

#[test]
fn hearth_run_runs_one_function_once() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: hearth_agent::sandbox::run::RunArgs,
    }
    let zip = testing::echo_zip().unwrap_or_else(|e| panic!("the echo function: {e}"));
    let init = config().init_path;
    let run = |event: &str| {
        let cli = Cli::try_parse_from([
            "hearth-run",
            "--code",
            zip.to_str().unwrap(),
            "--memory",
            "256",
            "--timeout",
            "30",
            "--env",
            "K=V",
            "--event",
            event,
            "--init",
            init.to_str().unwrap(),
        ])
        .unwrap();
        hearth_agent::sandbox::run::run(cli.run).unwrap()
    };
    assert_eq!(run(r#"{"op":"echo"}"#), 0);
    assert_eq!(run(r#"{"op":"error"}"#), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_zip_is_an_invalid_zip_file_exception() {
    let mut spec = function(5000, 1, vec![]);
    spec.code = b"PK\x03\x04 this is not really a zip".to_vec();
    let mut envt: Environment<ContainerSandbox> = Environment::new(config(), spec);
    let r = envt.invoke(req(json!({}))).await.unwrap();
    let e = r.result.unwrap_err();
    assert_eq!(e.error_type, "InvalidZipFileException", "{e:?}");
    assert!(
        e.error_message.starts_with("Could not unzip uploaded file"),
        "{}",
        e.error_message
    );
    envt.destroy().await;
}
