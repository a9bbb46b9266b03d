//! The agent end to end with real container sandboxes and a real Lambda function (the
//! `lambda_runtime` echo function): warm reuse, leases, fatal failures, concurrency limits,
//! revisions and draining, through [`Environments`] and through the invoke-proxy socket.
//!
//! Needs root (namespaces, cgroups), the static `hearth-init` and cargo (to build the echo
//! function); a missing one fails the test loudly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hearth_agent::code_cache::{CodeCache, DirectorySource};
use hearth_agent::concurrency::{Concurrency, ConcurrencyConfig};
use hearth_agent::environment::{EnvironmentConfig, Environments};
use hearth_agent::proxy::client::ProxyClient;
use hearth_agent::proxy::protocol::{InvokeRequest, InvokeResult, Outcome, ThrottleReason};
use hearth_agent::proxy::server::{InvokeHandler, ProxyServer};
use hearth_agent::sandbox::container::{ContainerConfig, ContainerSandbox};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

struct Host {
    _dir: tempfile::TempDir,
    store: PathBuf,
    envs: Arc<Environments<ContainerSandbox>>,
    code_hex: String,
}

fn init_path() -> PathBuf {
    let init = hearth_guest::image::locate_init().expect(
        "hearth-init not found: build it static (see guest/src/main.rs) or set HEARTH_INIT",
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "container sandboxes need root (namespaces and cgroups)"
    );
    init
}

fn put_code(store: &Path, zip: &[u8]) -> String {
    let hex = hex::encode(Sha256::digest(zip));
    std::fs::write(store.join(format!("{hex}.zip")), zip).unwrap();
    hex
}

fn host(config: EnvironmentConfig, limits: ConcurrencyConfig) -> Host {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let zip = std::fs::read(hearth_agent::testing::echo_zip().expect("the echo function builds"))
        .unwrap();
    let code_hex = put_code(&store, &zip);
    let code = CodeCache::open(
        &dir.path().join("cache"),
        1 << 30,
        DirectorySource { dir: store.clone() },
    )
    .unwrap();
    let envs = Environments::<ContainerSandbox>::new(
        ContainerConfig::new(init_path()),
        code,
        Concurrency::new(limits),
        config,
        "us-east-1".into(),
    );
    Host {
        _dir: dir,
        store,
        envs,
        code_hex,
    }
}

fn default_host() -> Host {
    host(EnvironmentConfig::default(), ConcurrencyConfig::default())
}

/// An echo invoke that asks for the log tail.
fn request(h: &Host, payload: Value) -> InvokeRequest {
    let mut request = hearth_agent::testing::echo_invoke("echo", &h.code_hex, &payload);
    request.log_tail = true;
    request
}

fn success(r: &InvokeResult) -> Value {
    match &r.outcome {
        Outcome::Success { payload } => serde_json::from_slice(payload).unwrap(),
        other => panic!("invoke failed: {other:?}"),
    }
}

fn function_error(r: &InvokeResult) -> Value {
    match &r.outcome {
        Outcome::FunctionError { payload, .. } => serde_json::from_slice(payload).unwrap(),
        other => panic!("expected a function error, got {other:?}"),
    }
}

fn boot(r: &InvokeResult) -> String {
    success(r)["boot"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reuse_through_the_invoke_proxy_socket() {
    let h = default_host();
    let socket = h._dir.path().join("agent.sock");
    let server = ProxyServer::bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let handler: Arc<dyn InvokeHandler> = h.envs.clone();
    let serving = tokio::spawn(server.run(handler, stopped, Duration::from_secs(10)));
    let client = ProxyClient::connect(&socket).unwrap();

    let first = client
        .invoke(request(&h, json!({"op": "whoami"})))
        .await
        .unwrap();
    let tail = String::from_utf8_lossy(&first.log_tail).into_owned();
    assert!(tail.contains("echo function init"), "{tail}");
    assert!(tail.contains("REPORT RequestId: "), "{tail}");
    assert!(tail.contains("Init Duration"), "{tail}");
    assert_eq!(first.executed_version, "$LATEST");
    assert!(first.timings.init_us > 0 && first.timings.total_us >= first.timings.invoke_us);
    let second = client
        .invoke(request(&h, json!({"op": "whoami"})))
        .await
        .unwrap();
    assert_eq!(boot(&first), boot(&second), "the same environment");
    assert_eq!(success(&second)["invokes"], 2);
    assert_eq!(second.timings.init_us, 0, "a warm invoke");
    assert!(!String::from_utf8_lossy(&second.log_tail).contains("Init Duration"));
    assert_eq!(h.envs.stats().started, 1);

    // Two at once need two environments; results come back matched by request id.
    let (a, b) = tokio::join!(
        client.invoke(request(&h, json!({"op": "sleep", "ms": 800}))),
        client.invoke(request(&h, json!({"op": "echo", "n": 2})))
    );
    assert_eq!(success(&a.unwrap())["slept"], 800);
    assert_eq!(success(&b.unwrap())["n"], 2);
    assert_eq!(h.envs.stats().started, 2);
    assert_eq!(h.envs.stats().idle, 2);

    // Draining lets an in-flight invoke finish, then ends every environment.
    let slow = {
        let client = client.clone();
        let r = request(&h, json!({"op": "sleep", "ms": 1500}));
        tokio::spawn(async move { client.invoke(r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    serving.await.unwrap();
    assert_eq!(success(&slow.await.unwrap().unwrap())["slept"], 1500);
    let stats = h.envs.stats();
    assert_eq!((stats.idle, stats.in_flight), (0, 0), "{stats:?}");
    assert_eq!(stats.destroyed, 2);
    assert!(!socket.exists());
    assert!(ProxyClient::connect(&socket).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_environments_are_reaped() {
    let h = host(
        EnvironmentConfig {
            idle_timeout: Duration::from_millis(1000),
            max_lifetime: Duration::from_secs(3600),
            reap_interval: Duration::from_millis(100),
            ..Default::default()
        },
        ConcurrencyConfig::default(),
    );
    let a = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    let b = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    assert_eq!(boot(&a), boot(&b));
    assert_eq!(h.envs.stats().idle, 1);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let stats = h.envs.stats();
    assert_eq!((stats.idle, stats.destroyed), (0, 1), "{stats:?}");
    let c = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    assert_ne!(boot(&a), boot(&c), "a new environment");
    h.envs.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_end_at_their_maximum_lifetime() {
    let h = host(
        EnvironmentConfig {
            idle_timeout: Duration::from_secs(3600),
            max_lifetime: Duration::from_millis(2500),
            reap_interval: Duration::from_secs(3600),
            ..Default::default()
        },
        ConcurrencyConfig::default(),
    );
    let a = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    let b = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    assert_eq!(boot(&a), boot(&b));
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let c = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    assert_ne!(
        boot(&a),
        boot(&c),
        "past its lifetime the environment was replaced"
    );
    assert_eq!(h.envs.stats().started, 2);
    h.envs.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_or_a_crash_destroys_the_environment_and_the_next_invoke_works() {
    let h = default_host();
    let short = |payload: Value| {
        let mut r = request(&h, payload);
        r.function.timeout_s = 2;
        r
    };
    let warm = h.envs.invoke(short(json!({"op": "whoami"}))).await;
    let r = h
        .envs
        .invoke(short(json!({"op": "sleep", "ms": 6000})))
        .await;
    let e = function_error(&r);
    assert_eq!(e["errorType"], "Sandbox.Timedout", "{e}");
    assert_eq!(e["errorMessage"], "Task timed out after 2.00 seconds");
    assert!(String::from_utf8_lossy(&r.log_tail).contains("REPORT RequestId"));
    assert_eq!(h.envs.stats().idle, 0, "the timed-out environment is gone");
    let after = h.envs.invoke(short(json!({"op": "whoami"}))).await;
    assert_ne!(
        boot(&warm),
        boot(&after),
        "the timed-out environment was not reused"
    );

    let crash = h.envs.invoke(short(json!({"op": "exit", "code": 3}))).await;
    let e = function_error(&crash);
    assert_eq!(e["errorType"], "Runtime.ExitError", "{e}");
    let next = h.envs.invoke(short(json!({"op": "whoami"}))).await;
    assert_ne!(
        boot(&after),
        boot(&next),
        "the crashed environment was not reused"
    );
    assert_eq!(success(&next)["invokes"], 1);
    let stats = h.envs.stats();
    assert_eq!((stats.idle, stats.started), (1, 3), "{stats:?}");
    h.envs.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_failure_is_the_invokes_unhandled_error() {
    let h = default_host();
    let mut r = request(&h, json!({}));
    r.function.environment = vec![("ECHO_FAIL_INIT".into(), "1".into())];
    let result = h.envs.invoke(r).await;
    let e = function_error(&result);
    assert_eq!(e["errorType"], "Runtime.ExitError", "{e}");
    assert_eq!(h.envs.stats().idle, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_concurrency_throttles() {
    let h = default_host();
    let mut off = request(&h, json!({}));
    off.function.reserved_concurrency = Some(0);
    match h.envs.invoke(off).await.outcome {
        Outcome::Throttled { reason, message } => {
            assert_eq!(
                reason,
                ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
            );
            assert_eq!(message, "Rate Exceeded.");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.envs.stats().started, 0);

    // Five at once against a reservation of two: two run, three are throttled.
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let envs = h.envs.clone();
            let mut r = request(&h, json!({"op": "sleep", "ms": 1500}));
            r.function.reserved_concurrency = Some(2);
            tokio::spawn(async move { envs.invoke(r).await })
        })
        .collect();
    let mut ok = 0;
    let mut throttled = 0;
    for c in calls {
        match c.await.unwrap().outcome {
            Outcome::Success { .. } => ok += 1,
            Outcome::Throttled { reason, .. } => {
                assert_eq!(
                    reason,
                    ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
                );
                throttled += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((ok, throttled), (2, 3));
    h.envs.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scaling_rate_throttles_new_environments_only() {
    let h = host(
        EnvironmentConfig::default(),
        ConcurrencyConfig {
            account_limit: 1000,
            scale_limit: 1,
            scale_window: Duration::from_secs(3600),
        },
    );
    let a = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    success(&a);
    // Warm invokes need no new environment.
    success(&h.envs.invoke(request(&h, json!({"op": "whoami"}))).await);
    let (busy, second) = tokio::join!(
        h.envs
            .invoke(request(&h, json!({"op": "sleep", "ms": 1000}))),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            h.envs.invoke(request(&h, json!({"op": "whoami"}))).await
        }
    );
    success(&busy);
    match second.outcome {
        Outcome::Throttled { reason, .. } => {
            assert_eq!(reason, ThrottleReason::FunctionInvocationRateLimitExceeded)
        }
        other => panic!("{other:?}"),
    }
    h.envs.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_revision_retires_the_old_environments() {
    let h = default_host();
    let a = h.envs.invoke(request(&h, json!({"op": "whoami"}))).await;
    assert_eq!(success(&a)["marker"], Value::Null);
    // New code (the same binary with another file beside it) and configuration.
    let binary = std::fs::read(
        hearth_agent::testing::functions_dir().join("x86_64-unknown-linux-gnu/release/bootstrap"),
    )
    .unwrap();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file("bootstrap", opts).unwrap();
    std::io::Write::write_all(&mut zip, &binary).unwrap();
    zip.start_file("README", opts).unwrap();
    std::io::Write::write_all(&mut zip, b"version 2").unwrap();
    let new_hex = put_code(&h.store, &zip.finish().unwrap().into_inner());
    assert_ne!(new_hex, h.code_hex);
    let mut updated = request(&h, json!({"op": "whoami"}));
    updated.function.code_sha256_hex = new_hex;
    updated.function.revision_id = "rev-2".into();
    updated.function.environment = vec![("ECHO_MARKER".into(), "v2".into())];
    let b = h.envs.invoke(updated.clone()).await;
    assert_eq!(success(&b)["marker"], "v2");
    assert_ne!(boot(&a), boot(&b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = h.envs.stats();
    assert_eq!((stats.idle, stats.destroyed), (1, 1), "{stats:?}");
    updated.request_id = hearth_agent::sandbox::new_request_id();
    assert_eq!(boot(&h.envs.invoke(updated).await), boot(&b));
    h.envs.drain(Duration::from_secs(5)).await;
}
