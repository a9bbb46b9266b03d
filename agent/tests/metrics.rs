//! The agent's metrics end to end: invokes of the real echo function (`lambda_runtime`) in real
//! container sandboxes through the invoke-proxy socket, then `GET /metrics` over HTTP from the
//! agent's metrics endpoint, checking that the counts, stage histograms and gauges moved.
//!
//! Needs root (namespaces, cgroups), the static `hearth-init` and cargo (to build the echo
//! function); a missing one fails the test loudly.

use std::sync::Arc;
use std::time::Duration;

use hearth_agent::code_cache::{CodeCache, DirectorySource};
use hearth_agent::concurrency::{Concurrency, ConcurrencyConfig};
use hearth_agent::environment::{EnvironmentConfig, Environments};
use hearth_agent::metrics::{self, Metrics};
use hearth_agent::proxy::client::ProxyClient;
use hearth_agent::proxy::protocol::{InvokeRequest, Outcome};
use hearth_agent::proxy::server::{InvokeHandler, ProxyServer};
use hearth_agent::sandbox::container::{ContainerConfig, ContainerSandbox};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn request(code_hex: &str, payload: Value, reserved: Option<u32>) -> InvokeRequest {
    let mut request = hearth_agent::testing::echo_invoke("echo", code_hex, &payload);
    request.function.reserved_concurrency = reserved;
    request
}

/// `GET /metrics` over a plain TCP connection: (status line, content type, body).
async fn scrape(address: std::net::SocketAddr) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or("").to_string();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// The value of the sample `series` (name and labels as rendered), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invokes_move_the_counts_on_the_metrics_endpoint() {
    let init = hearth_guest::image::locate_init().expect(
        "hearth-init not found: build it static (see guest/src/main.rs) or set HEARTH_INIT",
    );
    assert!(
        rustix::process::geteuid().is_root(),
        "container sandboxes need root (namespaces and cgroups)"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let zip = std::fs::read(hearth_agent::testing::echo_zip().expect("the echo function builds"))
        .unwrap();
    let code_hex = hex::encode(Sha256::digest(&zip));
    std::fs::write(store.join(format!("{code_hex}.zip")), &zip).unwrap();
    let code = CodeCache::open(
        &dir.path().join("cache"),
        1 << 30,
        DirectorySource { dir: store },
    )
    .unwrap();
    // Metrics of this agent alone, not the process's.
    let registry = Metrics::new();
    // The cache's gauges are registered once per cache, as the agent does.
    let cache_metrics = Arc::new(code.clone());
    let collector: std::sync::Weak<dyn hearth_agent::metrics::Collect> =
        Arc::downgrade(&cache_metrics) as _;
    registry.register(collector);
    let envs = Environments::<ContainerSandbox>::with_metrics(
        ContainerConfig::new(init),
        code,
        Concurrency::new(ConcurrencyConfig::default()),
        EnvironmentConfig::default(),
        "us-east-1".into(),
        registry.clone(),
    );
    let socket = dir.path().join("agent.sock");
    let server = ProxyServer::bind(&socket).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let handler: Arc<dyn InvokeHandler> = envs.clone();
    let serving = tokio::spawn(server.run(handler, stopped, Duration::from_secs(10)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let endpoint = tokio::spawn(metrics::serve(listener, registry.clone()));

    let (status, content_type, before) = scrape(address).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(
        value(&before, "hearth_invokes_total{outcome=\"success\"}"),
        0.0
    );
    assert_eq!(value(&before, "hearth_environments{state=\"idle\"}"), 0.0);
    assert!(
        before.contains("\nhearth_code_cache_entries 0\n"),
        "the entry count is there before any code: {before}"
    );

    let client = ProxyClient::connect(&socket).unwrap();
    for i in 0..3 {
        let r = client
            .invoke(request(&code_hex, json!({"op": "echo", "i": i}), None))
            .await
            .unwrap();
        assert!(matches!(r.outcome, Outcome::Success { .. }), "{r:?}");
    }
    let failed = client
        .invoke(request(&code_hex, json!({"op": "error"}), None))
        .await
        .unwrap();
    assert!(
        matches!(failed.outcome, Outcome::FunctionError { .. }),
        "{failed:?}"
    );
    let throttled = client
        .invoke(request(&code_hex, json!({}), Some(0)))
        .await
        .unwrap();
    assert!(
        matches!(throttled.outcome, Outcome::Throttled { .. }),
        "{throttled:?}"
    );

    let (_, _, after) = scrape(address).await;
    let v = |series: &str| value(&after, series);
    assert_eq!(
        v("hearth_invokes_total{outcome=\"success\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(v("hearth_invokes_total{outcome=\"function_error\"}"), 1.0);
    assert_eq!(v("hearth_invokes_total{outcome=\"throttled\"}"), 1.0);
    assert_eq!(v("hearth_invokes_total{outcome=\"error\"}"), 0.0);
    assert_eq!(
        v("hearth_throttles_total{reason=\"ReservedFunctionConcurrentInvocationLimitExceeded\"}"),
        1.0
    );
    assert_eq!(
        v("hearth_invoke_duration_seconds_count{outcome=\"success\"}"),
        3.0
    );
    // One cold start: the handled error leaves the environment warm for reuse.
    assert_eq!(v("hearth_cold_starts_total"), 1.0);
    assert_eq!(v("hearth_environments_started_total"), 1.0);
    assert_eq!(
        v("hearth_invoke_stage_duration_seconds_count{stage=\"claim\"}"),
        5.0,
        "every invoke past the shutdown check claims"
    );
    assert_eq!(
        v("hearth_invoke_stage_duration_seconds_count{stage=\"queue\"}"),
        5.0,
        "every invoke past the shutdown check waited (however briefly) before its claim"
    );
    assert!(v("hearth_invoke_stage_duration_seconds_sum{stage=\"queue\"}") > 0.0);
    assert_eq!(
        v("hearth_invoke_stage_duration_seconds_count{stage=\"code\"}"),
        1.0
    );
    assert_eq!(
        v("hearth_invoke_stage_duration_seconds_count{stage=\"init\"}"),
        1.0
    );
    assert_eq!(
        v("hearth_invoke_stage_duration_seconds_count{stage=\"invoke\"}"),
        4.0
    );
    assert_eq!(
        v("hearth_invoke_stage_duration_seconds_count{stage=\"response\"}"),
        4.0
    );
    assert_eq!(v("hearth_function_duration_seconds_count"), 4.0);
    assert!(v("hearth_invoke_stage_duration_seconds_sum{stage=\"init\"}") > 0.0);
    assert_eq!(v("hearth_environments{state=\"idle\"}"), 1.0);
    assert_eq!(v("hearth_environments{state=\"busy\"}"), 0.0);
    assert_eq!(v("hearth_invokes_in_flight"), 0.0);
    assert_eq!(v("hearth_code_cache_bytes"), zip.len() as f64);
    assert_eq!(v("hearth_code_cache_entries"), 1.0);
    assert_eq!(v("hearth_code_cache_events_total{event=\"fill\"}"), 1.0);

    // While an invoke runs, its environment is busy and the invoke is in flight.
    let slow = {
        let client = client.clone();
        let r = request(&code_hex, json!({"op": "sleep", "ms": 1500}), None);
        tokio::spawn(async move { client.invoke(r).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, during) = scrape(address).await;
    assert_eq!(
        value(&during, "hearth_environments{state=\"busy\"}"),
        1.0,
        "{during}"
    );
    assert_eq!(value(&during, "hearth_invokes_in_flight"), 1.0);
    assert!(matches!(
        slow.await.unwrap().unwrap().outcome,
        Outcome::Success { .. }
    ));

    stop.send(true).unwrap();
    serving.await.unwrap();
    let (_, _, drained) = scrape(address).await;
    assert_eq!(
        value(
            &drained,
            "hearth_environments_ended_total{reason=\"drained\"}"
        ),
        1.0,
        "{drained}"
    );
    assert_eq!(value(&drained, "hearth_environments{state=\"idle\"}"), 0.0);
    endpoint.abort();
}
