//! `hearth-perf api`: what the Lambda API frontend itself costs on a warm synchronous invoke.
//!
//! Starts `hearth serve` (which runs the agent in the same process, its invoke-proxy socket at
//! `<data-dir>/agent.sock`) on a temporary data directory and a free port, creates the
//! `lambda_runtime` echo function (`hearth_agent::testing`) and warms it. Then it measures the same
//! invoke two ways, interleaved so both see the same machine: over HTTP (SigV4-signed, as an SDK
//! sends it, one keep-alive connection) and straight through the invoke-proxy socket with the
//! request the frontend would have sent. The timed requests go through minimal clients
//! ([`super::lean_client`]) that write and read on the timing task itself, so neither path's
//! figure carries client machinery (hyper's client is used for the set-up and the throughput). The paired difference is the frontend's own cost: HTTP,
//! SigV4 verification, routing and the metadata read. Throughput is measured the same two ways
//! with several invokes in flight, in one-second windows. A DryRun invoke (authenticated, routed
//! and resolved, then answered without the agent) times the frontend alone.
//!
//! The invoke-proxy path is timed twice: over its Unix socket (`frontend_cost` = HTTP minus this),
//! and over its TCP listener (`--agent-listen`) on the same loopback as the HTTP requests
//! (`frontend_cost_same_transport` = HTTP minus this). The first includes what TCP costs over a
//! Unix socket on this host; the second holds the transport equal, leaving what the frontend
//! itself adds: HTTP parsing, SigV4 verification, routing, the metadata read and the response.
//!
//! Placement is held equal too: the function's name is picked so that its agent core is the one
//! that serves the benchmark's Unix connection, and `hearth serve` steers the HTTP connection to
//! that core by its first request; neither path hands invokes between cores. (The TCP
//! invoke-proxy connection lands where the kernel's `SO_REUSEPORT` hash puts it.)

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use bytes::Bytes;
use hearth_agent::proxy::client::ProxyClient;
use hearth_agent::proxy::protocol as proxy;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::lean_client::{LeanHttp, LeanProxy};
use crate::report::Report;

const KEY: &str = "AKIDHEARTHPERF";
const SECRET: &str = "hearth-perf-secret";
const REGION: &str = "us-east-1";
/// The echo function's name ([`function_name`]).
static FUNCTION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The echo function's name: the first of `perf-echo`, `perf-echo-1`, ... that the agent's
/// `cores` shard to core 0, the core that serves the benchmark's (first) invoke-proxy Unix
/// connection. So both paths are served on the function's own core: the HTTP connection is
/// steered there by its first request, and neither path pays a hand-over between cores.
fn pick_function_name(cores: usize) -> String {
    (0..)
        .map(|i| match i {
            0 => "perf-echo".to_string(),
            i => format!("perf-echo-{i}"),
        })
        .find(|name| {
            let arn = format!("arn:aws:lambda:{REGION}:000000000000:function:{name}");
            hearth_agent::cores::shard_of(&arn, cores) == 0
        })
        .unwrap_or_else(|| "perf-echo".to_string())
}

fn function_name() -> &'static str {
    FUNCTION.get().map(String::as_str).unwrap_or("perf-echo")
}
const ROLE: &str = "arn:aws:iam::000000000000:role/hearth-perf";

/// `hearth-perf api` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Latency samples per path (HTTP and invoke-proxy, interleaved).
    #[arg(long, default_value_t = 2000)]
    pub invokes: usize,
    /// Invokes per path before measuring.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Invokes in flight at once for the throughput figures (HTTP: one connection each).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Seconds of throughput measurement per path.
    #[arg(long, default_value_t = 5)]
    pub throughput_secs: u64,
    /// The size of the JSON event sent, in bytes (about).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// The function's memory size. Lambda gives a function CPU in proportion to its memory (one
    /// vCPU at 1769 MB) and the sandbox enforces it with a CFS quota per 100 ms period: below
    /// 1769 MB the echo function is throttled for tens of milliseconds whenever it uses up its
    /// quota, which measures the quota, not the frontend.
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u32,
    /// The function's code zip; by default the echo function is built (`hearth_agent::testing`).
    #[arg(long)]
    pub code: Option<PathBuf>,
    /// The `hearth` binary; by default the one next to `hearth-perf`.
    #[arg(long)]
    pub hearth: Option<PathBuf>,
    /// `hearth serve --agent-cores N`: the agent's threads (default: one per CPU).
    #[arg(long)]
    pub agent_cores: Option<usize>,
}

/// A `hearth serve` child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Serve {
    child: Child,
    address: String,
    /// The agent's TCP invoke-proxy listener (`--agent-listen`).
    agent_tcp: std::net::SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Serve {
    fn start(hearth: &Path, work: &Path, agent_cores: Option<usize>) -> anyhow::Result<Serve> {
        let credentials = work.join("credentials");
        std::fs::write(&credentials, format!("{KEY} {SECRET}\n"))
            .context("cannot write the credentials file")?;
        let data_dir = work.join("data");
        let log = work.join("serve.log");
        let log_file = std::fs::File::create(&log).context("cannot create the server log")?;
        let agent_tcp = free_loopback_port()?;
        let mut child = Command::new(hearth)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .arg("--agent-listen")
            .arg(agent_tcp.to_string())
            .args(agent_cores.map(|n| format!("--agent-cores={n}")))
            .arg("--credentials")
            .arg(&credentials)
            .env(
                "HEARTH_LOG",
                std::env::var("HEARTH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {} serve", hearth.display()))?;
        let stdout = child.stdout.take().context("no stdout from hearth serve")?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let address = line
            .trim()
            .strip_prefix("hearth-api listening on ")
            .map(str::to_owned);
        let serve = Serve {
            child,
            address: address.clone().unwrap_or_default(),
            agent_tcp,
            data_dir,
            log,
        };
        match (read, address) {
            (Ok(_), Some(_)) => Ok(serve),
            _ => bail!(
                "hearth serve did not start (it printed {line:?}); its log: {}",
                serve.log_tail()
            ),
        }
    }

    fn log_tail(&self) -> String {
        super::file_tail(&self.log, 2000)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        super::stop_child(&mut self.child, Duration::from_secs(15));
    }
}

/// A loopback address with a port that was free a moment ago (the kernel picks it; `hearth serve`
/// binds it right after).
fn free_loopback_port() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free loopback port for the agent's TCP listener")?;
    listener
        .local_addr()
        .context("cannot read the free port's address")
}

/// One HTTP/1.1 keep-alive connection that sends SigV4-signed Lambda requests.
struct Http {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// A response: status and body.
struct Reply {
    status: u16,
    body: Bytes,
}

impl Http {
    async fn connect(address: &str) -> anyhow::Result<Http> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("cannot connect to {address}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "HTTP connection closed");
            }
        });
        Ok(Http {
            sender,
            host: address.to_owned(),
        })
    }

    /// Builds and signs a request, as the AWS SDKs do.
    fn signed(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        extra_headers: &[(&str, &str)],
    ) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json");
        for (name, value) in extra_headers {
            builder = builder.header(*name, *value);
        }
        let mut request = builder
            .body(Full::new(Bytes::new()))
            .context("building a request")?;
        let identity = Credentials::new(KEY, SECRET, None, None, "hearth-perf").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(REGION)
            .name("lambda")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .context("signing parameters")?
            .into();
        let uri = format!("http://{}{path}", self.host);
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let signable = SignableRequest::new(
            method,
            uri,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(&body),
        )
        .context("a signable request")?;
        let (instructions, _) = sign(signable, &params)
            .context("signing the request")?
            .into_parts();
        instructions.apply_to_request_http1x(&mut request);
        *request.body_mut() = Full::new(Bytes::from(body));
        Ok(request)
    }

    async fn send(&mut self, request: http::Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        self.sender
            .ready()
            .await
            .context("the HTTP connection closed")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("the HTTP request failed")?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the HTTP response")?
            .to_bytes();
        Ok(Reply { status, body })
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let bytes = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let request = self.signed(method, path, bytes, &[])?;
        let reply = self.send(request).await?;
        ensure!(
            (200..300).contains(&reply.status),
            "{method} {path}: HTTP {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        if reply.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&reply.body).with_context(|| format!("{method} {path}: not JSON"))
    }

    /// One signed RequestResponse invoke; fails unless the function answered `expected`.
    async fn invoke(&mut self, payload: &[u8], expected: &[u8]) -> anyhow::Result<()> {
        let request = self.signed(
            "POST",
            &format!("/2015-03-31/functions/{}/invocations", function_name()),
            payload.to_vec(),
            &[],
        )?;
        let reply = self.send(request).await?;
        ensure!(
            reply.status == 200 && reply.body.as_ref() == expected,
            "HTTP invoke: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        Ok(())
    }
}

/// The request the frontend sends the agent for this function's `$LATEST`.
fn proxy_request(config: &Value, payload: &[u8], n: u64) -> anyhow::Result<proxy::InvokeRequest> {
    let text = |k: &str| -> anyhow::Result<String> {
        config[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("the function configuration has no {k}"))
    };
    let sha = base64::engine::general_purpose::STANDARD
        .decode(text("CodeSha256")?)
        .context("CodeSha256 is not base64")?;
    let timeout_s = config["Timeout"].as_u64().unwrap_or(3) as u32;
    let deadline_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64 + u64::from(timeout_s) * 1000)
        .unwrap_or(0);
    Ok(proxy::InvokeRequest {
        request_id: format!("hearth-perf-{n}"),
        function: proxy::FunctionSpec {
            function_arn: text("FunctionArn")?,
            function_name: text("FunctionName")?,
            version: text("Version")?,
            code_sha256_hex: hex::encode(sha),
            runtime: text("Runtime")?,
            handler: text("Handler")?,
            memory_mib: config["MemorySize"].as_u64().unwrap_or(128) as u32,
            timeout_s,
            environment: Vec::new(),
            reserved_concurrency: None,
            revision_id: text("RevisionId")?,
        },
        payload: payload.to_vec(),
        invocation_type: proxy::InvocationType::RequestResponse,
        client_context: None,
        trace_id: None,
        deadline_ms,
        log_tail: false,
    })
}

/// One invoke through the invoke-proxy socket; fails unless the function answered `expected`.
async fn proxy_invoke(
    client: &ProxyClient,
    config: &Value,
    payload: &[u8],
    expected: &[u8],
    n: u64,
) -> anyhow::Result<()> {
    let result = client
        .invoke(proxy_request(config, payload, n)?)
        .await
        .context("the invoke-proxy invoke failed")?;
    match result.outcome {
        proxy::Outcome::Success { payload } if payload == expected => Ok(()),
        other => bail!("invoke-proxy invoke: {other:?}"),
    }
}

/// Microseconds since `start`.
fn us_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

/// Runs the scenario.
pub fn run(args: &ApiArgs) -> anyhow::Result<Report> {
    ensure!(args.invokes > 0, "--invokes must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let hearth = match &args.hearth {
        Some(path) => path.clone(),
        None => crate::testhost::find_hearth()?,
    };
    let code_path = match &args.code {
        Some(path) => path.clone(),
        None => hearth_agent::testing::echo_zip().context("building the echo function")?,
    };
    let code = std::fs::read(&code_path)
        .with_context(|| format!("cannot read {}", code_path.display()))?;
    let work = tempfile::Builder::new()
        .prefix("hearth-perf-api-")
        .tempdir()
        .context("cannot make a work folder")?;
    let cores = match args.agent_cores {
        Some(n) => n,
        None => hearth_agent::cores::allowed_cpus()
            .context("reading the CPUs this process may use")?
            .len(),
    };
    let _ = FUNCTION.set(pick_function_name(cores.max(1)));
    let serve = Serve::start(&hearth, work.path(), args.agent_cores)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let measured = runtime.block_on(measure(args, &serve, code));
    let measured = measured.with_context(|| format!("hearth serve's log: {}", serve.log_tail()))?;
    drop(serve);

    let mut report = Report::new("api", super::machine());
    report.parameter("invokes", args.invokes);
    report.parameter("warmup", args.warmup);
    report.parameter("concurrency", args.concurrency);
    report.parameter("throughput_secs", args.throughput_secs);
    report.parameter("payload_bytes", measured.payload_len);
    report.parameter("memory_mib", args.memory_mib);
    if let Some(n) = args.agent_cores {
        report.parameter("agent_cores", n);
    }
    report.add("http_invoke", &measured.http, "us");
    report.add("proxy_invoke", &measured.proxy, "us");
    // Each HTTP sample minus the invoke-proxy sample taken beside it.
    let paired = |proxy: &[f64]| -> Vec<f64> {
        measured
            .http
            .iter()
            .zip(proxy)
            .map(|(h, p)| h - p)
            .collect()
    };
    report.add("frontend_cost", &paired(&measured.proxy), "us");
    report.add("proxy_tcp_invoke", &measured.proxy_tcp, "us");
    report.add(
        "frontend_cost_same_transport",
        &paired(&measured.proxy_tcp),
        "us",
    );
    if let (Some(h), Some(p)) = (
        report.metrics.get("http_invoke"),
        report.metrics.get("proxy_invoke"),
    ) {
        // The difference of the medians, next to the median of the paired differences.
        report.parameter("frontend_cost_p50_of_medians_us", h.p50 - p.p50);
    }
    report.add("http_dry_run", &measured.dry_run, "us");
    report.add("http_throughput", &measured.http_rps, "req/s");
    report.add("proxy_throughput", &measured.proxy_rps, "req/s");
    Ok(report)
}

/// What [`measure`] found.
struct Measured {
    http: Vec<f64>,
    proxy: Vec<f64>,
    proxy_tcp: Vec<f64>,
    dry_run: Vec<f64>,
    http_rps: Vec<f64>,
    proxy_rps: Vec<f64>,
    payload_len: usize,
}

async fn measure(args: &ApiArgs, serve: &Serve, code: Vec<u8>) -> anyhow::Result<Measured> {
    let mut http = Http::connect(&serve.address).await?;
    let create = json!({
        "FunctionName": function_name(),
        "Runtime": "provided.al2023",
        "Role": ROLE,
        "Handler": "bootstrap",
        "MemorySize": args.memory_mib,
        "Timeout": 30,
        "Code": { "ZipFile": base64::engine::general_purpose::STANDARD.encode(&code) },
    });
    http.call("POST", "/2015-03-31/functions", Some(&create))
        .await
        .context("CreateFunction")?;
    let config = wait_active(&mut http).await?;

    let payload =
        serde_json::to_vec(&json!({ "pad": "x".repeat(args.payload_bytes.saturating_sub(10)) }))?;
    let expected = payload.clone();
    let socket = serve.data_dir.join("agent.sock");
    // The timing connection first: the agent deals Unix connections to its cores round-robin
    // from core 0, the core that owns the function ([`pick_function_name`]).
    let mut lean_unix = LeanProxy::start(
        tokio::net::UnixStream::connect(&socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?,
    )
    .await?;
    let proxy = ProxyClient::connect(&socket)
        .with_context(|| format!("connecting to the invoke-proxy socket {}", socket.display()))?;
    let proxy_tcp = connect_agent_tcp(serve.agent_tcp).await?;
    let mut lean_tcp = LeanProxy::start(
        tokio::net::TcpStream::connect(serve.agent_tcp)
            .await
            .context("connecting to the agent's TCP listener")?,
    )
    .await?;
    lean_tcp.set_nodelay()?;
    let mut lean_http = LeanHttp::connect(&serve.address).await?;

    // The first invoke starts the environment (a cold start); then both paths warm up.
    http.invoke(&payload, &expected)
        .await
        .context("the first (cold) invoke")?;
    let mut n: u64 = 0;
    for _ in 0..args.warmup {
        http.invoke(&payload, &expected).await?;
        n += 1;
        proxy_invoke(&proxy, &config, &payload, &expected, n).await?;
        n += 1;
        proxy_invoke(&proxy_tcp, &config, &payload, &expected, n).await?;
        time_http(&http, &mut lean_http, &payload, &expected).await?;
        n += 1;
        time_proxy(&mut lean_unix, &config, &payload, &expected, n).await?;
        n += 1;
        time_proxy(&mut lean_tcp, &config, &payload, &expected, n).await?;
    }

    // Latency: interleaved, one invoke in flight; the three paths take turns going first, so
    // none always follows another.
    let mut http_us = Vec::with_capacity(args.invokes);
    let mut proxy_us = Vec::with_capacity(args.invokes);
    let mut proxy_tcp_us = Vec::with_capacity(args.invokes);
    for i in 0..args.invokes {
        for step in 0..3 {
            n += 1;
            match (i + step) % 3 {
                0 => http_us.push(time_http(&http, &mut lean_http, &payload, &expected).await?),
                1 => proxy_us
                    .push(time_proxy(&mut lean_unix, &config, &payload, &expected, n).await?),
                _ => proxy_tcp_us
                    .push(time_proxy(&mut lean_tcp, &config, &payload, &expected, n).await?),
            }
        }
    }

    // The frontend alone: a DryRun is authenticated, routed and resolved like an invoke, then
    // answered (204) without the agent.
    let mut dry_us = Vec::with_capacity(args.invokes);
    for _ in 0..args.invokes {
        dry_us.push(time_dry_run(&http, &mut lean_http, &payload).await?);
    }

    // Throughput: `concurrency` loops per path, counted in one-second windows.
    let window = Duration::from_secs(1);
    let windows = args.throughput_secs.max(1) as usize;
    let mut connections = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        connections.push(Http::connect(&serve.address).await?);
    }
    let shared = std::sync::Arc::new((payload.clone(), expected.clone(), config.clone()));
    let on = shared.clone();
    // One window first at this concurrency, not counted: the agent starts the extra
    // environments that this many invokes in flight need.
    let warm_on = shared.clone();
    let connections = warm_throughput(connections, move |mut c: Http| {
        let on = warm_on.clone();
        async move {
            c.invoke(&on.0, &on.1).await?;
            Ok(c)
        }
    })
    .await?;
    let http_rps = throughput(windows, window, connections, move |mut c: Http| {
        let on = on.clone();
        async move {
            c.invoke(&on.0, &on.1).await?;
            Ok(c)
        }
    })
    .await?;
    // Each loop numbers its own request ids, apart from the others'.
    let proxy_loops: Vec<(ProxyClient, u64)> = (0..args.concurrency)
        .map(|i| (proxy.clone(), 1_000_000_000 * (i as u64 + 1)))
        .collect();
    let on = shared.clone();
    let proxy_rps = throughput(
        windows,
        window,
        proxy_loops,
        move |(client, n): (ProxyClient, u64)| {
            let on = on.clone();
            async move {
                proxy_invoke(&client, &on.2, &on.0, &on.1, n).await?;
                Ok((client, n + 1))
            }
        },
    )
    .await?;
    Ok(Measured {
        http: http_us,
        proxy: proxy_us,
        proxy_tcp: proxy_tcp_us,
        dry_run: dry_us,
        http_rps,
        proxy_rps,
        payload_len: payload.len(),
    })
}

/// Connects to the agent's TCP invoke-proxy listener, waiting briefly for it to listen.
async fn connect_agent_tcp(address: std::net::SocketAddr) -> anyhow::Result<ProxyClient> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ProxyClient::connect_tcp(address).await {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to the agent at {address}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One timed HTTP invoke over the lean connection; `http` signs it (untimed, as the SDKs sign
/// before they send).
async fn time_http(
    http: &Http,
    lean: &mut LeanHttp,
    payload: &[u8],
    expected: &[u8],
) -> anyhow::Result<f64> {
    let path = format!("/2015-03-31/functions/{}/invocations", function_name());
    let request = http.signed("POST", &path, payload.to_vec(), &[])?;
    let bytes = LeanHttp::encode(&request, payload);
    let start = Instant::now();
    let reply = lean.round_trip(&bytes).await?;
    let us = us_since(start);
    ensure!(
        reply.status == 200 && reply.body == expected,
        "HTTP invoke: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    Ok(us)
}

async fn time_dry_run(http: &Http, lean: &mut LeanHttp, payload: &[u8]) -> anyhow::Result<f64> {
    let path = format!("/2015-03-31/functions/{}/invocations", function_name());
    let request = http.signed(
        "POST",
        &path,
        payload.to_vec(),
        &[("x-amz-invocation-type", "DryRun")],
    )?;
    let bytes = LeanHttp::encode(&request, payload);
    let start = Instant::now();
    let reply = lean.round_trip(&bytes).await?;
    let us = us_since(start);
    ensure!(
        reply.status == 204,
        "DryRun invoke: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    Ok(us)
}

/// One timed invoke over a lean invoke-proxy connection (the request is built untimed).
async fn time_proxy<S>(
    proxy: &mut LeanProxy<S>,
    config: &Value,
    payload: &[u8],
    expected: &[u8],
    n: u64,
) -> anyhow::Result<f64>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = proxy_request(config, payload, n)?;
    let start = Instant::now();
    let result = proxy
        .invoke(request)
        .await
        .context("the invoke-proxy invoke failed")?;
    let us = us_since(start);
    match result.outcome {
        proxy::Outcome::Success { payload } if payload == expected => Ok(us),
        other => bail!("invoke-proxy invoke: {other:?}"),
    }
}

/// Runs one loop per `worker` (each invoke hands the worker back) for `windows` windows and
/// returns the completed invokes per second of each window.
async fn throughput<W, F, Fut>(
    windows: usize,
    window: Duration,
    workers: Vec<W>,
    step: F,
) -> anyhow::Result<Vec<f64>>
where
    W: Send + 'static,
    F: Fn(W) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<W>> + Send,
{
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in workers {
        let (done, stop, step) = (done.clone(), stop.clone(), step.clone());
        tasks.spawn(async move {
            let mut worker = worker;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                worker = step(worker).await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    let mut rates = Vec::with_capacity(windows);
    let mut last = 0;
    let mut failure = None;
    for _ in 0..windows {
        let start = Instant::now();
        tokio::time::sleep(window).await;
        let now = done.load(std::sync::atomic::Ordering::Relaxed);
        rates.push((now - last) as f64 / start.elapsed().as_secs_f64());
        last = now;
        if let Some(Ok(Err(err))) = tasks.try_join_next() {
            failure = Some(err);
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failure = failure.or(Some(err)),
            Err(err) => failure = failure.or(Some(anyhow::anyhow!("a load task failed: {err}"))),
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(rates),
    }
}

/// Runs each worker's step a few times at once (the same concurrency as the measurement) and
/// hands the workers back.
async fn warm_throughput<W, F, Fut>(workers: Vec<W>, step: F) -> anyhow::Result<Vec<W>>
where
    W: Send + 'static,
    F: Fn(W) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<W>> + Send,
{
    let mut tasks = tokio::task::JoinSet::new();
    for worker in workers {
        let step = step.clone();
        tasks.spawn(async move {
            let mut worker = worker;
            for _ in 0..20 {
                worker = step(worker).await?;
            }
            Ok::<_, anyhow::Error>(worker)
        });
    }
    let mut back = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        back.push(joined.map_err(|e| anyhow::anyhow!("a warm-up task failed: {e}"))??);
    }
    Ok(back)
}

/// Polls GetFunctionConfiguration until the function is Active (60 s at most).
async fn wait_active(http: &mut Http) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let config = http
            .call(
                "GET",
                &format!("/2015-03-31/functions/{}/configuration", function_name()),
                None,
            )
            .await?;
        match config["State"].as_str() {
            Some("Active") => return Ok(config),
            Some("Failed") => bail!("the function failed: {config}"),
            _ if Instant::now() > deadline => bail!("the function never became Active: {config}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_request_matches_the_stored_configuration() {
        let config = json!({
            "FunctionName": "f",
            "FunctionArn": "arn:aws:lambda:us-east-1:000000000000:function:f",
            "Version": "$LATEST",
            "CodeSha256": base64::engine::general_purpose::STANDARD.encode([0xabu8; 32]),
            "Runtime": "provided.al2023",
            "Handler": "bootstrap",
            "MemorySize": 256,
            "Timeout": 30,
            "RevisionId": "r1",
        });
        let request = proxy_request(&config, b"{}", 7).unwrap();
        assert_eq!(request.request_id, "hearth-perf-7");
        assert_eq!(request.function.code_sha256_hex, "ab".repeat(32));
        assert_eq!(request.function.memory_mib, 256);
        assert_eq!(request.function.timeout_s, 30);
        assert_eq!(request.function.revision_id, "r1");
        assert!(proxy_request(&json!({}), b"{}", 1).is_err());
    }
}
