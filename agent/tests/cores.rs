//! The whole agent ([`Agent`]: thread-per-core, `hearth serve`'s agent) with real container
//! sandboxes and the `lambda_runtime` echo function: a function's invokes reach the one core that
//! owns its environments whichever connection (Unix or TCP) they come on; each core places its
//! container sandboxes on CPUs (its own first, then the least used); the account-wide
//! concurrency limit holds across cores; shutdown lets in-flight invokes finish and closes the
//! listeners.
//!
//! Needs root (namespaces, cgroups), the static `hearth-init` and cargo (to build the echo
//! function); a missing one fails the test loudly.

use std::path::PathBuf;
use std::time::Duration;

use hearth_agent::concurrency::ConcurrencyConfig;
use hearth_agent::cores::{CoresConfig, shard_of};
use hearth_agent::environment::EnvironmentConfig;
use hearth_agent::host::{Agent, AgentConfig};
use hearth_agent::proxy::client::ProxyClient;
use hearth_agent::proxy::protocol::{InvokeRequest, InvokeResult, Outcome, ThrottleReason};
use hearth_agent::sandbox::run::SandboxKind;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

struct Setup {
    dir: tempfile::TempDir,
    code_hex: String,
}

fn setup() -> Setup {
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
    Setup { dir, code_hex }
}

fn config(s: &Setup, concurrency: ConcurrencyConfig) -> AgentConfig {
    let root = s.dir.path();
    AgentConfig {
        socket: root.join("agent.sock"),
        tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
        cores: CoresConfig {
            threads: 2,
            pin: true,
        },
        sandbox: SandboxKind::Container,
        init_path: Some(hearth_guest::image::locate_init().expect(
            "hearth-init not found: build it static (see guest/src/main.rs) or set HEARTH_INIT",
        )),
        hearth_binary: PathBuf::from("/nonexistent/hearth"),
        state_dir: root.join("state"),
        code_source_dir: root.join("store"),
        code_cache_dir: root.join("cache"),
        code_cache_max_bytes: 1 << 30,
        environments: EnvironmentConfig::default(),
        concurrency,
        grace: Duration::from_secs(10),
        region: "us-east-1".into(),
        pools: Vec::new(),
        template_dir: root.join("templates"),
        jail: None,
    }
}

fn arn(function: &str) -> String {
    format!("arn:aws:lambda:us-east-1:000000000000:function:{function}")
}

fn request(s: &Setup, function: &str, payload: Value) -> InvokeRequest {
    hearth_agent::testing::echo_invoke(function, &s.code_hex, &payload)
}

fn success(r: &InvokeResult) -> Value {
    match &r.outcome {
        Outcome::Success { payload } => serde_json::from_slice(payload).unwrap(),
        other => panic!("invoke failed: {other:?}"),
    }
}

/// A function name of each core (of 2).
fn one_per_core() -> [String; 2] {
    let mut found: [Option<String>; 2] = [None, None];
    for i in 0.. {
        let name = format!("echo{i}");
        let core = shard_of(&arn(&name), 2);
        found[core].get_or_insert(name);
        if let [Some(a), Some(b)] = &found {
            return [a.clone(), b.clone()];
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_core_owns_a_functions_environments_whatever_the_connection() {
    let s = setup();
    let agent = Agent::start(config(&s, ConcurrencyConfig::default()))
        .await
        .unwrap();
    assert_eq!(agent.cores(), 2);
    // Two Unix connections (dealt to both cores) and one TCP connection.
    let a = ProxyClient::connect(agent.socket()).unwrap();
    let b = ProxyClient::connect(agent.socket()).unwrap();
    let t = ProxyClient::connect_tcp(agent.tcp_address().unwrap())
        .await
        .unwrap();
    let mut boots = Vec::new();
    for (i, client) in [&a, &b, &t, &a, &b].into_iter().enumerate() {
        let r = client
            .invoke(request(&s, "echo", json!({"op": "whoami"})))
            .await
            .unwrap();
        let v = success(&r);
        assert_eq!(v["invokes"], i + 1, "one warm environment served them all");
        boots.push(v["boot"].as_str().unwrap().to_string());
    }
    boots.dedup();
    assert_eq!(boots.len(), 1, "{boots:?}");

    // Shutdown: an invoke in flight finishes; then the listeners are gone.
    let slow = {
        let b = b.clone();
        let r = request(&s, "echo", json!({"op": "sleep", "ms": 1500}));
        tokio::spawn(async move { b.invoke(r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = agent.tcp_address().unwrap();
    let socket = agent.socket().to_path_buf();
    agent.shutdown().await;
    assert_eq!(success(&slow.await.unwrap().unwrap())["slept"], 1500);
    assert!(!socket.exists());
    assert!(ProxyClient::connect(&socket).is_err());
    assert!(ProxyClient::connect_tcp(tcp).await.is_err());
}

/// The CPUs a function's process may run on, as its /proc/self/status lists them.
async fn cpus_of(client: &ProxyClient, s: &Setup, function: &str) -> String {
    let r = client
        .invoke(request(s, function, json!({"op": "cpus"})))
        .await
        .unwrap();
    success(&r)["cpus"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_sandboxes_run_on_their_cores_cpu_first_then_spread() {
    let s = setup();
    let cpus = hearth_agent::cores::allowed_cpus().unwrap();
    assert!(
        cpus.len() >= 2,
        "placement needs two CPUs; this machine lets the test use {cpus:?}"
    );
    let agent = Agent::start(config(&s, ConcurrencyConfig::default()))
        .await
        .unwrap();
    let client = ProxyClient::connect(agent.socket()).unwrap();
    let [on0, on1] = one_per_core();
    // Each function's first environment runs on the CPU of the core that owns it.
    assert_eq!(cpus_of(&client, &s, &on0).await, cpus[0].to_string());
    assert_eq!(cpus_of(&client, &s, &on1).await, cpus[1].to_string());
    // While that one is busy, a second environment of the same function goes to the other CPU.
    let busy = {
        let (c, r) = (
            client.clone(),
            request(&s, &on0, json!({"op": "sleep", "ms": 1500})),
        );
        tokio::spawn(async move { c.invoke(r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = ProxyClient::connect(agent.socket()).unwrap();
    let second = cpus_of(&other, &s, &on0).await;
    assert_eq!(second, cpus[1].to_string(), "the least used CPU");
    assert_eq!(success(&busy.await.unwrap().unwrap())["slept"], 1500);
    agent.shutdown().await;

    // `any`: every CPU the agent may use.
    let mut any = config(&s, ConcurrencyConfig::default());
    any.socket = s.dir.path().join("agent-any.sock");
    any.environments.sandbox_affinity = hearth_agent::placement::SandboxAffinity::Any;
    let agent = Agent::start(any).await.unwrap();
    let client = ProxyClient::connect(agent.socket()).unwrap();
    let listed = cpus_of(&client, &s, &on0).await;
    let first = cpus[0].to_string();
    let last = cpus[cpus.len() - 1].to_string();
    assert!(
        listed == format!("{first}-{last}") || listed.split(',').count() == cpus.len(),
        "{listed} against {cpus:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_limit_holds_across_cores() {
    let s = setup();
    let agent = Agent::start(config(
        &s,
        ConcurrencyConfig {
            account_limit: 1,
            ..ConcurrencyConfig::default()
        },
    ))
    .await
    .unwrap();
    let [on0, on1] = one_per_core();
    let client = ProxyClient::connect(agent.socket()).unwrap();
    // Warm both functions, one after the other (the limit allows one invoke at a time).
    success(
        &client
            .invoke(request(&s, &on0, json!({"op": "whoami"})))
            .await
            .unwrap(),
    );
    success(
        &client
            .invoke(request(&s, &on1, json!({"op": "whoami"})))
            .await
            .unwrap(),
    );
    let busy = {
        let c = client.clone();
        let r = request(&s, &on0, json!({"op": "sleep", "ms": 1500}));
        tokio::spawn(async move { c.invoke(r).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = client
        .invoke(request(&s, &on1, json!({"op": "whoami"})))
        .await
        .unwrap();
    match other.outcome {
        Outcome::Throttled { reason, .. } => {
            assert_eq!(reason, ThrottleReason::ConcurrentInvocationLimitExceeded)
        }
        o => panic!("the other core's function was not throttled: {o:?}"),
    }
    assert_eq!(success(&busy.await.unwrap().unwrap())["slept"], 1500);
    success(
        &client
            .invoke(request(&s, &on1, json!({"op": "whoami"})))
            .await
            .unwrap(),
    );
    agent.shutdown().await;
}
