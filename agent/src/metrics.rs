//! The agent's metrics: counters and latency histograms of every stage of an invoke, per-outcome
//! counts and latencies, and gauges read when scraped, in the Prometheus text format (version
//! 0.0.4) on `GET /metrics` ([`serve`]).
//!
//! Recording is a few relaxed atomic additions on fixed, preallocated series (no lock, no
//! allocation, no label lookup): a histogram finds its bucket by a binary search over 22 bounds.
//! Gauges that describe state held elsewhere (environments by state, the code cache's size,
//! invokes in flight, pools when they exist) are not kept up to date on the hot path; their
//! owners register a [`Collect`] that is asked for them at scrape time.
//!
//! Figures: recording one warm invoke's worth ([`Metrics::invoke`]: three stage observations (four
//! since the queue stage), the function's duration, the outcome's count and latency) costs a median
//! of 57 ns on one thread and 109 ns per invoke with two threads recording at once (93 and 180 ns
//! while other builds loaded this 2-core machine): `hearth-perf throughput`, its
//! `metrics_record_t1`/`_t2` figures, 2026-11-29. Two threads share the counters' cache lines;
//! per-core shards are the next step if thread-per-core executors make that line hot.
//!
//! [`Stage::Queue`] is the time between an invoke's arrival at the agent (its frame read on a
//! connection, or its hand-over to the owning core from outside a connection) and the start of its
//! claim: the core hand-over and the wait before the environments take it up. The arrival instant
//! travels with the invoke's future as a task-local ([`with_arrival`], read by [`arrival`]), so the
//! handler trait and the wire protocol stay as they are; the environments record the stage.
//!
//! A hand-written renderer rather than `prometheus-client`: that crate writes OpenMetrics text
//! (`_total` samples under a counter's bare name, `# EOF`) and its histograms take a lock per
//! observation; this exposition is the 0.0.4 text format that every Prometheus scraper reads.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::proxy::protocol::ThrottleReason;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the latency buckets, in nanoseconds: 5 us to 30 s.
const BOUNDS_NS: [u64; 22] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    15_000_000_000,
    30_000_000_000,
];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram with fixed buckets (`BOUNDS_NS`).
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The sum of the observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }
}

/// The stages of one invoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting before the agent starts on the invoke (recorded by whoever queues it).
    Queue,
    /// The concurrency check and finding (or failing to find) an idle environment.
    Claim,
    /// Reading the code from the cache into a new environment (cold starts only).
    Code,
    /// Starting the sandbox and the runtime's init (cold starts only).
    Init,
    /// The invoke in the sandbox, from the request sent to the response back.
    Invoke,
    /// From the response back to the result handed to the caller (releasing the environment,
    /// the log tail, the REPORT record).
    Response,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Queue,
        Stage::Claim,
        Stage::Code,
        Stage::Init,
        Stage::Invoke,
        Stage::Response,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Claim => "claim",
            Stage::Code => "code",
            Stage::Init => "init",
            Stage::Invoke => "invoke",
            Stage::Response => "response",
        }
    }
}

/// How an invoke ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    Success,
    /// The function's error, its init's, or its timeout (`X-Amz-Function-Error`).
    FunctionError,
    /// A 429.
    Throttled,
    /// The platform failed.
    Error,
}

impl OutcomeKind {
    pub const ALL: [OutcomeKind; 4] = [
        OutcomeKind::Success,
        OutcomeKind::FunctionError,
        OutcomeKind::Throttled,
        OutcomeKind::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Success => "success",
            OutcomeKind::FunctionError => "function_error",
            OutcomeKind::Throttled => "throttled",
            OutcomeKind::Error => "error",
        }
    }
}

const THROTTLE_REASONS: [ThrottleReason; 4] = [
    ThrottleReason::ConcurrentInvocationLimitExceeded,
    ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
    ThrottleReason::FunctionInvocationRateLimitExceeded,
    ThrottleReason::ReservedFunctionInvocationRateLimitExceeded,
];

/// Why an environment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Idle past its timeout, or past its lifetime, or found dead while idle.
    Expired,
    /// Its invoke failed fatally (timeout, crash).
    Failed,
    /// Its function got a new revision.
    Retired,
    /// The agent shut down.
    Drained,
}

impl EndReason {
    pub const ALL: [EndReason; 4] = [
        EndReason::Expired,
        EndReason::Failed,
        EndReason::Retired,
        EndReason::Drained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Failed => "failed",
            EndReason::Retired => "retired",
            EndReason::Drained => "drained",
        }
    }
}

tokio::task_local! {
    /// When the invoke this task runs arrived at the agent.
    static ARRIVAL: std::time::Instant;
}

/// Runs `invoke` with `arrived` as its arrival at the agent (the start of [`Stage::Queue`]),
/// unless an arrival is already set for this task (the earliest one counts).
pub async fn with_arrival<F: std::future::Future>(
    arrived: std::time::Instant,
    invoke: F,
) -> F::Output {
    let arrived = arrival().unwrap_or(arrived);
    ARRIVAL.scope(arrived, invoke).await
}

/// When the invoke of this task arrived at the agent, if whoever took it in said so
/// ([`with_arrival`]).
pub fn arrival() -> Option<std::time::Instant> {
    ARRIVAL.try_with(|t| *t).ok()
}

/// What one finished invoke recorded (durations of the stages it passed through).
#[derive(Debug, Clone, Copy, Default)]
pub struct InvokeRecord {
    /// From its arrival at the agent to the start of its claim.
    pub queue: Option<Duration>,
    pub claim: Option<Duration>,
    pub code: Option<Duration>,
    pub init: Option<Duration>,
    pub invoke: Option<Duration>,
    pub response: Option<Duration>,
    /// The function's own duration (the REPORT record's `Duration`).
    pub function: Option<Duration>,
    /// Everything in the agent.
    pub total: Duration,
    /// Whether it started a new environment.
    pub cold: bool,
}

/// Samples handed over by a [`Collect`] at scrape time: gauges, and counters kept by their owners.
/// Samples of the same name and labels from several collectors are added up.
#[derive(Debug, Default)]
pub struct GaugeSet {
    /// name -> (help, type, labels -> value)
    gauges: BTreeMap<&'static str, (&'static str, &'static str, BTreeMap<String, f64>)>,
}

impl GaugeSet {
    /// Adds `value` to the gauge `name` with `labels` (label values are escaped here).
    pub fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        self.add_typed(name, help, "gauge", labels, value);
    }

    /// Adds `value` to the counter `name` (a count its owner keeps; the name ends in `_total`).
    pub fn add_counter(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        self.add_typed(name, help, "counter", labels, value);
    }

    fn add_typed(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let mut key = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            let _ = write!(key, "{k}=\"{}\"", escape_label(v));
        }
        let (_, _, series) = self
            .gauges
            .entry(name)
            .or_insert((help, kind, BTreeMap::new()));
        *series.entry(key).or_insert(0.0) += value;
    }
}

/// Something whose state is read at scrape time.
pub trait Collect: Send + Sync {
    fn collect(&self, gauges: &mut GaugeSet);
}

/// The agent's metrics. One per process ([`Metrics::global`]) unless a test makes its own.
#[derive(Default)]
pub struct Metrics {
    stages: [Histogram; Stage::ALL.len()],
    function: Histogram,
    outcomes: [Counter; OutcomeKind::ALL.len()],
    outcome_latency: [Histogram; OutcomeKind::ALL.len()],
    cold_starts: Counter,
    throttles: [Counter; THROTTLE_REASONS.len()],
    started: Counter,
    ended: [Counter; EndReason::ALL.len()],
    collectors: Mutex<Vec<Weak<dyn Collect>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stage_index(s: Stage) -> usize {
    s as usize
}

fn outcome_index(o: OutcomeKind) -> usize {
    o as usize
}

fn throttle_index(r: ThrottleReason) -> usize {
    THROTTLE_REASONS.iter().position(|&x| x == r).unwrap_or(0)
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The process's metrics: what `hearth serve` exposes and what environments record into
    /// unless given others.
    pub fn global() -> &'static Arc<Metrics> {
        static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
        GLOBAL.get_or_init(Metrics::new)
    }

    /// Asks `collector` for gauges at every scrape while it lives.
    pub fn register(&self, collector: Weak<dyn Collect>) {
        let mut collectors = lock(&self.collectors);
        collectors.retain(|c| c.strong_count() > 0);
        collectors.push(collector);
    }

    /// One stage of an invoke took `d` (for stages recorded outside [`Metrics::invoke`], such as
    /// [`Stage::Queue`]).
    pub fn observe(&self, stage: Stage, d: Duration) {
        self.stages[stage_index(stage)].observe(d);
    }

    /// The histogram of `stage`.
    pub fn stage(&self, stage: Stage) -> &Histogram {
        &self.stages[stage_index(stage)]
    }

    /// Records one finished invoke.
    pub fn invoke(&self, outcome: OutcomeKind, r: &InvokeRecord) {
        let stages = [
            (Stage::Queue, r.queue),
            (Stage::Claim, r.claim),
            (Stage::Code, r.code),
            (Stage::Init, r.init),
            (Stage::Invoke, r.invoke),
            (Stage::Response, r.response),
        ];
        for (stage, d) in stages {
            if let Some(d) = d {
                self.observe(stage, d);
            }
        }
        if let Some(d) = r.function {
            self.function.observe(d);
        }
        if r.cold {
            self.cold_starts.inc();
        }
        self.outcomes[outcome_index(outcome)].inc();
        self.outcome_latency[outcome_index(outcome)].observe(r.total);
    }

    /// An invoke was throttled for `reason` (counted besides its outcome).
    pub fn throttled(&self, reason: ThrottleReason) {
        self.throttles[throttle_index(reason)].inc();
    }

    /// A new environment started.
    pub fn environment_started(&self) {
        self.started.inc();
    }

    /// `n` environments ended.
    pub fn environments_ended(&self, reason: EndReason, n: u64) {
        self.ended[reason as usize].add(n);
    }

    /// Invokes that ended with `outcome`.
    pub fn outcomes(&self, outcome: OutcomeKind) -> u64 {
        self.outcomes[outcome_index(outcome)].get()
    }

    /// Everything, in the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        header(
            &mut out,
            "hearth_invoke_stage_duration_seconds",
            "Time spent in each stage of an invoke.",
            "histogram",
        );
        for s in Stage::ALL {
            histogram(
                &mut out,
                "hearth_invoke_stage_duration_seconds",
                &format!("stage=\"{}\"", s.as_str()),
                self.stage(s),
            );
        }
        header(
            &mut out,
            "hearth_function_duration_seconds",
            "The function's own duration, as the REPORT record gives it.",
            "histogram",
        );
        histogram(
            &mut out,
            "hearth_function_duration_seconds",
            "",
            &self.function,
        );
        header(
            &mut out,
            "hearth_invokes_total",
            "Invokes the agent finished, by outcome.",
            "counter",
        );
        for o in OutcomeKind::ALL {
            sample(
                &mut out,
                "hearth_invokes_total",
                &format!("outcome=\"{}\"", o.as_str()),
                self.outcomes(o) as f64,
            );
        }
        header(
            &mut out,
            "hearth_invoke_duration_seconds",
            "Time an invoke spent in the agent, by outcome.",
            "histogram",
        );
        for o in OutcomeKind::ALL {
            histogram(
                &mut out,
                "hearth_invoke_duration_seconds",
                &format!("outcome=\"{}\"", o.as_str()),
                &self.outcome_latency[outcome_index(o)],
            );
        }
        header(
            &mut out,
            "hearth_cold_starts_total",
            "Invokes that started a new environment.",
            "counter",
        );
        sample(
            &mut out,
            "hearth_cold_starts_total",
            "",
            self.cold_starts.get() as f64,
        );
        header(
            &mut out,
            "hearth_throttles_total",
            "Invokes answered with 429 TooManyRequestsException, by Reason.",
            "counter",
        );
        for r in THROTTLE_REASONS {
            sample(
                &mut out,
                "hearth_throttles_total",
                &format!("reason=\"{}\"", r.as_str()),
                self.throttles[throttle_index(r)].get() as f64,
            );
        }
        header(
            &mut out,
            "hearth_environments_started_total",
            "Execution environments started.",
            "counter",
        );
        sample(
            &mut out,
            "hearth_environments_started_total",
            "",
            self.started.get() as f64,
        );
        header(
            &mut out,
            "hearth_environments_ended_total",
            "Execution environments ended, by reason.",
            "counter",
        );
        for r in EndReason::ALL {
            sample(
                &mut out,
                "hearth_environments_ended_total",
                &format!("reason=\"{}\"", r.as_str()),
                self.ended[r as usize].get() as f64,
            );
        }
        let mut gauges = GaugeSet::default();
        let collectors: Vec<Arc<dyn Collect>> = lock(&self.collectors)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for c in collectors {
            c.collect(&mut gauges);
        }
        for (name, (help, kind, series)) in &gauges.gauges {
            header(&mut out, name, help, kind);
            for (labels, value) in series {
                sample(&mut out, name, labels, *value);
            }
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: f64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {}", number(value));
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {}", number(value));
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0u64;
    for (i, bucket) in h.buckets.iter().enumerate() {
        cumulative += bucket.load(Ordering::Relaxed);
        let le = match BOUNDS_NS.get(i) {
            Some(&ns) => number(ns as f64 / 1e9),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    sample(out, &format!("{name}_sum"), labels, h.sum().as_secs_f64());
    sample(out, &format!("{name}_count"), labels, cumulative as f64);
}

/// A sample value as Prometheus writes it.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Serves `metrics` on `listener` (`GET /metrics`) until the task is dropped or aborted.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors or a connection reset before it was taken: back off.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = answer(&metrics, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn answer<B>(metrics: &Metrics, request: &hyper::Request<B>) -> hyper::Response<String> {
    let mut response = hyper::Response::new(String::new());
    let get = request.method() == hyper::Method::GET || request.method() == hyper::Method::HEAD;
    if request.uri().path() != "/metrics" {
        *response.status_mut() = hyper::StatusCode::NOT_FOUND;
        *response.body_mut() = "not found: the metrics are at /metrics\n".into();
    } else if !get {
        *response.status_mut() = hyper::StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    } else {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(CONTENT_TYPE),
        );
        *response.body_mut() = metrics.render();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name and labels exactly as rendered).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let m = Metrics::new();
        m.observe(Stage::Claim, Duration::from_micros(3));
        m.observe(Stage::Claim, Duration::from_micros(5));
        m.observe(Stage::Claim, Duration::from_micros(7));
        m.observe(Stage::Claim, Duration::from_secs(60));
        let text = m.render();
        let b = |le: &str| {
            value(
                &text,
                &format!(
                    "hearth_invoke_stage_duration_seconds_bucket{{stage=\"claim\",le=\"{le}\"}}"
                ),
            )
        };
        // 5 us is its bucket's upper bound, inclusive.
        assert_eq!(b("0.000005"), Some(2.0), "{text}");
        assert_eq!(b("0.00001"), Some(3.0));
        assert_eq!(b("30"), Some(3.0));
        assert_eq!(b("+Inf"), Some(4.0));
        let sum = value(
            &text,
            "hearth_invoke_stage_duration_seconds_sum{stage=\"claim\"}",
        )
        .unwrap();
        assert!((sum - 60.000015).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(
                &text,
                "hearth_invoke_stage_duration_seconds_count{stage=\"claim\"}"
            ),
            Some(4.0)
        );
        assert_eq!(
            value(
                &text,
                "hearth_invoke_stage_duration_seconds_count{stage=\"init\"}"
            ),
            Some(0.0)
        );
        assert_eq!(m.stage(Stage::Claim).count(), 4);
    }

    #[test]
    fn every_family_has_one_help_and_type_before_its_samples() {
        let m = Metrics::new();
        m.invoke(
            OutcomeKind::Success,
            &InvokeRecord {
                claim: Some(Duration::from_micros(2)),
                invoke: Some(Duration::from_micros(80)),
                response: Some(Duration::from_micros(4)),
                function: Some(Duration::from_micros(40)),
                total: Duration::from_micros(90),
                ..Default::default()
            },
        );
        m.throttled(ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded);
        let text = m.render();
        let mut typed: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(typed.iter().all(|(n, _)| n != name), "{name} typed twice");
                typed.push((name.into(), kind.into()));
            } else if !line.starts_with('#') {
                let series = line.split([' ', '{']).next().unwrap();
                let (family, kind) = typed.last().expect("a sample before any TYPE");
                let ok = series == family
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| series == format!("{family}{s}")));
                assert!(ok, "{series} under {family}");
                let v = line.rsplit(' ').next().unwrap();
                assert!(v.parse::<f64>().is_ok() || v == "+Inf", "{line}");
            }
        }
        assert_eq!(
            value(&text, "hearth_invokes_total{outcome=\"success\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "hearth_throttles_total{reason=\"ReservedFunctionConcurrentInvocationLimitExceeded\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "hearth_function_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "hearth_invoke_stage_duration_seconds_count{stage=\"code\"}"
            ),
            Some(0.0),
            "a warm invoke has no code stage"
        );
    }

    struct Fixed(&'static str, f64);

    impl Collect for Fixed {
        fn collect(&self, gauges: &mut GaugeSet) {
            gauges.add("hearth_test_gauge", "A gauge.", &[("name", self.0)], self.1);
        }
    }

    #[test]
    fn gauges_come_from_living_collectors_and_add_up() {
        let m = Metrics::new();
        let a: Arc<dyn Collect> = Arc::new(Fixed("a\"b\\c\nd", 2.0));
        let b: Arc<dyn Collect> = Arc::new(Fixed("a\"b\\c\nd", 3.0));
        let gone: Arc<dyn Collect> = Arc::new(Fixed("gone", 1.0));
        for c in [&a, &b, &gone] {
            m.register(Arc::downgrade(c));
        }
        drop(gone);
        let text = m.render();
        assert_eq!(text.matches("# TYPE hearth_test_gauge gauge").count(), 1);
        assert_eq!(
            value(&text, "hearth_test_gauge{name=\"a\\\"b\\\\c\\nd\"}"),
            Some(5.0),
            "{text}"
        );
        assert!(!text.contains("gone"));
    }

    #[test]
    fn numbers_are_written_as_prometheus_reads_them() {
        assert_eq!(number(0.000005), "0.000005");
        assert_eq!(number(30.0), "30");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
    }

    #[tokio::test]
    async fn the_endpoint_answers_get_metrics_only() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let m = Metrics::new();
        m.observe(Stage::Queue, Duration::from_micros(1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, m));
        let get = |request: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("hearth_invoke_stage_duration_seconds_count{stage=\"queue\"} 1"));
        let missing = get("GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        server.abort();
    }
}
