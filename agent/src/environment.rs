//! Execution environments: the assignment and placement of invokes on sandboxes of one host.
//!
//! [`Environments`] keeps, per function and version, the idle warm sandboxes of the function's
//! current revision. An invoke takes a concurrency [`Permit`], then the most recently used idle
//! environment of its function, version and revision; without one it starts a new sandbox (code
//! from the [`CodeCache`], then the runtime's init) within the function's scaling rate. An init
//! failure is the invoke's `Unhandled` function error, as in Lambda.
//!
//! Leases: an idle environment is reaped after `idle_timeout`, any environment after
//! `max_lifetime` (a busy one when its invoke ends). An environment whose invoke failed fatally
//! (timeout, the runtime's exit or crash) is destroyed, never reused. A request carrying a new
//! revision of its function retires the environments of the old one. Draining stops new invokes,
//! lets those in flight finish within a grace period and ends every sandbox.
//!
//! Observability: every invoke's stages (from its queueing: its arrival at the agent, as
//! [`crate::metrics::arrival`] tells, to the start of its claim), outcome and environment changes
//! are recorded in a [`Metrics`] (the process's own unless given one), which also reads the
//! environments by state, the invokes in flight and the code cache's size from here when scraped.
//! Each invoke that reached its function logs Lambda's `REPORT` record (target `hearth::report`,
//! level info, with the request id as a field); the other events on the invoke path carry the
//! request id too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::code_cache::CodeCache;
use crate::concurrency::{Concurrency, Permit};
use crate::metrics::{Collect, EndReason, GaugeSet, InvokeRecord, Metrics, OutcomeKind};
use crate::placement::{CpuLease, CpuPlacement, SandboxAffinity};
use crate::proxy::protocol::{
    self, FunctionErrorKind, InvokeRequest, InvokeResult, LOG_TAIL, Outcome, Timings,
};
use crate::proxy::server::{BoxFuture, InvokeHandler};
use crate::sandbox::{self, Bundle, LogLine, Sandbox, SandboxError};

/// Leases and timing.
#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    /// An idle environment is ended after this long without an invoke.
    pub idle_timeout: Duration,
    /// No environment lives longer than this.
    pub max_lifetime: Duration,
    /// How often idle environments are checked.
    pub reap_interval: Duration,
    /// Whether a core pins each new sandbox to one CPU ([`crate::placement`]).
    pub sandbox_affinity: SandboxAffinity,
}

impl Default for EnvironmentConfig {
    fn default() -> Self {
        EnvironmentConfig {
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(2 * 3600),
            reap_interval: Duration::from_secs(1),
            sandbox_affinity: SandboxAffinity::default(),
        }
    }
}

/// Counters, for tests and (later) metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnvironmentStats {
    pub idle: usize,
    pub in_flight: usize,
    pub started: u64,
    pub destroyed: u64,
}

/// One function version: `(function name, version)`.
type PoolKey = (String, String);

struct Warm<S> {
    sandbox: S,
    revision: String,
    created: Instant,
    last_used: Instant,
    /// Its CPU, counted while it lives.
    _cpu: Option<CpuLease>,
}

struct Pool<S> {
    revision: String,
    /// Most recently used last.
    idle: Vec<Warm<S>>,
}

/// The execution environments of one sandbox kind.
pub struct Environments<S: Sandbox + 'static> {
    sandbox_config: S::Config,
    code: CodeCache,
    limits: Arc<Concurrency>,
    config: EnvironmentConfig,
    region: String,
    pools: Mutex<HashMap<PoolKey, Pool<S>>>,
    accepting: AtomicBool,
    in_flight: AtomicUsize,
    /// Environments starting (sandbox start and init).
    starting: AtomicUsize,
    /// Environments running an invoke.
    busy: AtomicUsize,
    quiet: Notify,
    started: AtomicU64,
    destroyed: AtomicU64,
    metrics: Arc<Metrics>,
    placement: Arc<CpuPlacement>,
}

/// The target of the `REPORT` records.
pub const REPORT_TARGET: &str = "hearth::report";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts one while it lives.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts an invoke in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize, &'a Notify);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.1.notify_waiters();
        }
    }
}

fn service_error(message: impl Into<String>) -> Outcome {
    Outcome::Error {
        error_type: "ServiceException".into(),
        status: 500,
        message: message.into(),
    }
}

fn unhandled(error: &sandbox::FunctionError) -> Outcome {
    Outcome::FunctionError {
        kind: FunctionErrorKind::Unhandled,
        payload: error.body.clone(),
    }
}

fn outcome_kind(outcome: &Outcome) -> OutcomeKind {
    match outcome {
        Outcome::Success { .. } => OutcomeKind::Success,
        Outcome::FunctionError { .. } => OutcomeKind::FunctionError,
        Outcome::Throttled { .. } => OutcomeKind::Throttled,
        Outcome::Error { .. } => OutcomeKind::Error,
    }
}

/// Where one invoke's time went, while it runs.
#[derive(Default)]
struct Stages {
    record: InvokeRecord,
    /// When the sandbox answered (the response stage starts).
    answered: Option<Instant>,
}

/// How the sandbox step of an invoke went.
enum Ran {
    Done(Box<sandbox::InvokeResponse>),
    /// A warm environment turned out to be gone before the invoke reached its runtime.
    WarmGone,
    Failed(Outcome),
}

impl<S: Sandbox + 'static> Environments<S>
where
    S::Config: 'static,
{
    /// Environments of sandboxes made with `sandbox_config`; `region` goes into the functions'
    /// environment. Starts the reaper, which ends with the last reference. Records into the
    /// process's [`Metrics::global`].
    pub fn new(
        sandbox_config: S::Config,
        code: CodeCache,
        limits: Arc<Concurrency>,
        config: EnvironmentConfig,
        region: String,
    ) -> Arc<Self> {
        Self::with_metrics(
            sandbox_config,
            code,
            limits,
            config,
            region,
            Metrics::global().clone(),
        )
    }

    /// [`Environments::new`], recording into `metrics` (which reads the gauges from here while
    /// this lives).
    pub fn with_metrics(
        sandbox_config: S::Config,
        code: CodeCache,
        limits: Arc<Concurrency>,
        config: EnvironmentConfig,
        region: String,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let placement = CpuPlacement::new(config.sandbox_affinity);
        let this = Arc::new(Environments {
            sandbox_config,
            code,
            limits,
            config,
            region,
            pools: Mutex::default(),
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            quiet: Notify::new(),
            started: AtomicU64::new(0),
            destroyed: AtomicU64::new(0),
            metrics,
            placement,
        });
        let collector: Arc<dyn Collect> = this.clone();
        this.metrics.register(Arc::downgrade(&collector));
        tokio::spawn(reap_loop(Arc::downgrade(&this)));
        this
    }

    /// The metrics this records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn stats(&self) -> EnvironmentStats {
        EnvironmentStats {
            idle: lock(&self.pools).values().map(|p| p.idle.len()).sum(),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            started: self.started.load(Ordering::SeqCst),
            destroyed: self.destroyed.load(Ordering::SeqCst),
        }
    }

    /// Runs one invoke. Every failure is an outcome.
    pub async fn invoke(&self, request: InvokeRequest) -> InvokeResult {
        let started = Instant::now();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.in_flight, &self.quiet);
        let mut stages = Stages::default();
        let executed_version = request.function.version.clone();
        let request_id = if request.request_id.is_empty() {
            sandbox::new_request_id()
        } else {
            request.request_id.clone()
        };
        let (outcome, log_tail) = if !self.accepting.load(Ordering::SeqCst) {
            (
                service_error("The Hearth agent is shutting down and takes no new invokes."),
                Vec::new(),
            )
        } else {
            let arrived = crate::metrics::arrival().unwrap_or(started);
            stages.record.queue = Some(arrived.elapsed());
            self.run(&request, &request_id, &mut stages).await
        };
        let mut record = stages.record;
        record.response = stages.answered.map(|t| t.elapsed());
        record.total = started.elapsed();
        let kind = outcome_kind(&outcome);
        if let Outcome::Throttled { reason, .. } = &outcome {
            self.metrics.throttled(*reason);
        }
        self.metrics.invoke(kind, &record);
        tracing::debug!(
            request_id = %request_id,
            function = %request.function.function_name,
            outcome = kind.as_str(),
            cold = record.cold,
            total_us = protocol::micros(record.total),
            "invoke finished"
        );
        let us = |d: Option<Duration>| d.map(protocol::micros).unwrap_or(0);
        let timings = Timings {
            claim_us: us(record.claim),
            code_us: us(record.code),
            init_us: us(record.init),
            invoke_us: us(record.invoke),
            total_us: protocol::micros(record.total),
        };
        InvokeResult {
            request_id,
            outcome,
            log_tail: if request.log_tail {
                log_tail
            } else {
                Vec::new()
            },
            executed_version,
            timings,
        }
    }

    async fn run(
        &self,
        request: &InvokeRequest,
        request_id: &str,
        stages: &mut Stages,
    ) -> (Outcome, Vec<u8>) {
        let f = &request.function;
        let claim = Instant::now();
        let permit = match self
            .limits
            .acquire(&f.function_name, f.reserved_concurrency)
        {
            Ok(p) => p,
            Err(t) => {
                stages.record.claim = Some(claim.elapsed());
                return (
                    Outcome::Throttled {
                        reason: t.reason,
                        message: t.message,
                    },
                    Vec::new(),
                );
            }
        };
        let key: PoolKey = (f.function_name.clone(), f.version.clone());
        let mut warm = self.take_idle(&key, &f.revision_id);
        stages.record.claim = Some(claim.elapsed());
        loop {
            let (env, init) = match warm.take() {
                Some(env) => (env, None),
                None => match self.start(request, request_id, &permit, stages).await {
                    Ok(started) => started,
                    Err(failed) => return failed,
                },
            };
            let was_warm = init.is_none();
            let invoke = Instant::now();
            let ran = {
                let _busy = Counted::new(&self.busy);
                self.invoke_in(&env, request, request_id, was_warm).await
            };
            let answered = Instant::now();
            stages.record.invoke = Some(answered.duration_since(invoke));
            stages.answered = Some(answered);
            match ran {
                Ran::WarmGone => {
                    tracing::info!(request_id, function = %f.function_name, "warm environment ended between invokes; starting a new one");
                    self.destroy(env, EndReason::Expired).await;
                    continue;
                }
                Ran::Failed(outcome) => {
                    tracing::warn!(request_id, function = %f.function_name, "the environment failed during the invoke; destroying it");
                    self.destroy(env, EndReason::Failed).await;
                    return (outcome, Vec::new());
                }
                Ran::Done(response) => {
                    stages.record.function = Some(response.duration);
                    let report = report(request, request_id, &response, init.as_ref());
                    let tail = log_tail(request, request_id, &response, init.as_ref(), &report);
                    let outcome = match &response.result {
                        Ok(payload) => Outcome::Success {
                            payload: payload.clone(),
                        },
                        Err(e) => unhandled(e),
                    };
                    self.release(key, env).await;
                    drop(permit);
                    return (outcome, tail);
                }
            }
        }
    }

    /// The most recently used idle environment of `key` at `revision`; retires the idle
    /// environments of any other revision.
    fn take_idle(&self, key: &PoolKey, revision: &str) -> Option<Warm<S>> {
        let mut retired = Vec::new();
        let mut expired = Vec::new();
        let found = {
            let mut pools = lock(&self.pools);
            let pool = pools.entry(key.clone()).or_insert_with(|| Pool {
                revision: revision.to_string(),
                idle: Vec::new(),
            });
            if pool.revision != revision {
                tracing::info!(function = %key.0, version = %key.1, old = %pool.revision, new = %revision, "new revision; retiring its old environments");
                retired = std::mem::take(&mut pool.idle);
                pool.revision = revision.to_string();
            }
            let mut found = None;
            while let Some(env) = pool.idle.pop() {
                if env.sandbox.is_alive() && env.created.elapsed() < self.config.max_lifetime {
                    found = Some(env);
                    break;
                }
                expired.push(env);
            }
            found
        };
        if !retired.is_empty() {
            self.destroy_later(retired, EndReason::Retired);
        }
        if !expired.is_empty() {
            self.destroy_later(expired, EndReason::Expired);
        }
        found
    }

    /// A new environment: code from the cache, sandbox start and the runtime's init.
    async fn start(
        &self,
        request: &InvokeRequest,
        request_id: &str,
        permit: &Permit,
        stages: &mut Stages,
    ) -> Result<(Warm<S>, Option<sandbox::InitReport>), (Outcome, Vec<u8>)> {
        let f = &request.function;
        if let Err(t) = permit.allow_new_environment() {
            return Err((
                Outcome::Throttled {
                    reason: t.reason,
                    message: t.message,
                },
                Vec::new(),
            ));
        }
        stages.record.cold = true;
        let _starting = Counted::new(&self.starting);
        let fetch = Instant::now();
        let code = self.code.get(&f.code_sha256_hex).await.map_err(|e| {
            tracing::error!(request_id, error = %e, function = %f.function_name, "cannot get the function's code");
            (
                service_error(format!("The function's code could not be loaded: {e}")),
                Vec::new(),
            )
        })?;
        stages.record.code = Some(fetch.elapsed());
        let cpu = self.placement.choose();
        let spec = sandbox::FunctionSpec {
            bundle: self.bundle(request),
            code,
            cpu: cpu.as_ref().map(CpuLease::cpu),
        };
        let init = Instant::now();
        let started = S::start(&self.sandbox_config, &spec).await;
        stages.record.init = Some(init.elapsed());
        match started {
            Ok((sandbox, report)) => {
                self.started.fetch_add(1, Ordering::SeqCst);
                self.metrics.environment_started();
                let now = Instant::now();
                Ok((
                    Warm {
                        sandbox,
                        revision: f.revision_id.clone(),
                        created: now,
                        last_used: now,
                        _cpu: cpu,
                    },
                    Some(report),
                ))
            }
            Err(SandboxError::Init {
                error, logs_tail, ..
            }) => {
                tracing::info!(request_id, function = %f.function_name, error_type = %error.error_type, "init failed");
                Err((unhandled(&error), cut_tail(logs_tail)))
            }
            Err(e) => {
                tracing::error!(request_id, error = %e, function = %f.function_name, "cannot start a sandbox");
                Err((
                    service_error(format!("The function's environment could not start: {e}")),
                    Vec::new(),
                ))
            }
        }
    }

    fn bundle(&self, request: &InvokeRequest) -> Bundle {
        let f = &request.function;
        let region = f
            .function_arn
            .split(':')
            .nth(3)
            .filter(|r| !r.is_empty())
            .unwrap_or(&self.region)
            .to_string();
        Bundle {
            function_arn: f.function_arn.clone(),
            function_name: f.function_name.clone(),
            function_version: f.version.clone(),
            runtime: f.runtime.clone(),
            handler: f.handler.clone(),
            memory_mb: f.memory_mib,
            timeout_ms: u64::from(f.timeout_s.max(1)) * 1000,
            region,
            log_group: format!("/aws/lambda/{}", f.function_name),
            log_stream: format!("[{}]{}", f.version, &sandbox::new_request_id()[..8]),
            env: f.environment.clone(),
            credentials: None,
            max_concurrency: 1,
            code_len: 0,
        }
    }

    async fn invoke_in(
        &self,
        env: &Warm<S>,
        request: &InvokeRequest,
        request_id: &str,
        was_warm: bool,
    ) -> Ran {
        let sreq = sandbox::InvokeRequest {
            request_id: request_id.to_string(),
            payload: request.payload.clone(),
            trace_id: request.trace_id.clone(),
            client_context: request.client_context.clone(),
            cognito_identity: None,
        };
        match env.sandbox.invoke(sreq).await {
            Ok(response) => Ran::Done(Box::new(response)),
            Err(SandboxError::Gone(_)) if was_warm => Ran::WarmGone,
            Err(SandboxError::Gone(why)) => Ran::Failed(unhandled(&sandbox::FunctionError::new(
                "Runtime.ExitError",
                format!(
                    "RequestId: {request_id} Error: the environment ended during the invoke: {why}"
                ),
            ))),
            Err(e) => Ran::Failed(service_error(format!(
                "The function's environment failed: {e}"
            ))),
        }
    }

    /// Back to the idle pool if it may be reused, else ended.
    async fn release(&self, key: PoolKey, mut env: Warm<S>) {
        let now = Instant::now();
        let reason = if !env.sandbox.is_alive() {
            EndReason::Failed
        } else if !self.accepting.load(Ordering::SeqCst) {
            EndReason::Drained
        } else if now.duration_since(env.created) >= self.config.max_lifetime {
            EndReason::Expired
        } else {
            let mut pools = lock(&self.pools);
            if let Some(pool) = pools.get_mut(&key)
                && pool.revision == env.revision
            {
                env.last_used = now;
                pool.idle.push(env);
                return;
            }
            EndReason::Retired
        };
        self.destroy(env, reason).await;
    }

    async fn destroy(&self, env: Warm<S>, reason: EndReason) {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
        self.metrics.environments_ended(reason, 1);
        env.sandbox.destroy().await;
    }

    fn destroy_later(&self, envs: Vec<Warm<S>>, reason: EndReason) {
        self.destroyed
            .fetch_add(envs.len() as u64, Ordering::SeqCst);
        self.metrics.environments_ended(reason, envs.len() as u64);
        tokio::spawn(async move {
            for env in envs {
                env.sandbox.destroy().await;
            }
        });
    }

    /// Takes the idle environments past their idle timeout or lifetime, or dead.
    fn expired(&self) -> Vec<Warm<S>> {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut pools = lock(&self.pools);
        for pool in pools.values_mut() {
            let (keep, gone): (Vec<_>, Vec<_>) =
                std::mem::take(&mut pool.idle).into_iter().partition(|env| {
                    env.sandbox.is_alive()
                        && now.duration_since(env.last_used) < self.config.idle_timeout
                        && now.duration_since(env.created) < self.config.max_lifetime
                });
            pool.idle = keep;
            out.extend(gone);
        }
        out
    }

    /// Stops taking invokes, waits up to `grace` for those in flight, ends every sandbox.
    pub async fn drain(&self, grace: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        let waited = tokio::time::timeout(grace, async {
            loop {
                let quiet = self.quiet.notified();
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                quiet.await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(
                left = self.in_flight.load(Ordering::SeqCst),
                "invokes still running after the grace period; their environments end when they do"
            );
        }
        let all: Vec<Warm<S>> = {
            let mut pools = lock(&self.pools);
            pools.drain().flat_map(|(_, p)| p.idle).collect()
        };
        tracing::info!(environments = all.len(), "ending idle environments");
        self.destroyed.fetch_add(all.len() as u64, Ordering::SeqCst);
        self.metrics
            .environments_ended(EndReason::Drained, all.len() as u64);
        let mut ending = tokio::task::JoinSet::new();
        for env in all {
            ending.spawn(env.sandbox.destroy());
        }
        while ending.join_next().await.is_some() {}
    }
}

async fn reap_loop<S: Sandbox + 'static>(this: Weak<Environments<S>>)
where
    S::Config: 'static,
{
    loop {
        let interval = match this.upgrade() {
            Some(e) => e.config.reap_interval,
            None => return,
        };
        tokio::time::sleep(interval).await;
        let Some(envs) = this.upgrade() else { return };
        if !envs.accepting.load(Ordering::SeqCst) {
            return;
        }
        let expired = envs.expired();
        if !expired.is_empty() {
            tracing::info!(environments = expired.len(), "reaping idle environments");
            for env in expired {
                envs.destroy(env, EndReason::Expired).await;
            }
        }
    }
}

/// Lambda's `REPORT` record of an invoke that reached its function (without a line end), logged
/// at info (target [`REPORT_TARGET`]) with its figures as fields. Empty, and neither built nor
/// logged, when neither the log tail nor that log wants it.
fn report(
    request: &InvokeRequest,
    request_id: &str,
    response: &sandbox::InvokeResponse,
    init: Option<&sandbox::InitReport>,
) -> String {
    let logged = tracing::enabled!(target: REPORT_TARGET, tracing::Level::INFO);
    if !request.log_tail && !logged {
        return String::new();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let duration_ms = ms(response.duration);
    let billed_ms = (duration_ms.ceil() as u64).max(1);
    let init_ms = response.init_duration.or(init.map(|i| i.duration)).map(ms);
    let init_part = init_ms
        .map(|ms| format!("\tInit Duration: {ms:.2} ms"))
        .unwrap_or_default();
    let line = format!(
        "REPORT RequestId: {request_id}\tDuration: {duration_ms:.2} ms\tBilled Duration: {billed_ms} ms\tMemory Size: {} MB\tMax Memory Used: {} MB{init_part}\t",
        request.function.memory_mib, response.max_memory_used_mb,
    );
    if logged {
        tracing::info!(
            target: REPORT_TARGET,
            request_id,
            function = %request.function.function_name,
            version = %request.function.version,
            duration_ms,
            billed_duration_ms = billed_ms,
            memory_size_mb = request.function.memory_mib,
            max_memory_used_mb = response.max_memory_used_mb,
            init_duration_ms = init_ms,
            "{line}"
        );
    }
    line
}

/// Lambda's tail: init logs (cold start), START, the invoke's logs, END, REPORT; the last 4 KB.
fn log_tail(
    request: &InvokeRequest,
    request_id: &str,
    response: &sandbox::InvokeResponse,
    init: Option<&sandbox::InitReport>,
    report: &str,
) -> Vec<u8> {
    use std::io::Write as _;
    if !request.log_tail {
        return Vec::new();
    }
    let mut out = Vec::new();
    let lines = |logs: &[LogLine], out: &mut Vec<u8>| {
        for l in logs {
            out.extend_from_slice(&l.line);
            out.push(b'\n');
        }
    };
    if let Some(init) = init {
        lines(&init.logs, &mut out);
    }
    let _ = writeln!(
        out,
        "START RequestId: {request_id} Version: {}",
        request.function.version
    );
    if response.logs.is_empty() {
        out.extend_from_slice(&response.logs_tail);
    } else {
        lines(&response.logs, &mut out);
    }
    let _ = writeln!(out, "END RequestId: {request_id}");
    let _ = writeln!(out, "{report}");
    cut_tail(out)
}

fn cut_tail(mut bytes: Vec<u8>) -> Vec<u8> {
    let cut = bytes.len().saturating_sub(LOG_TAIL);
    bytes.split_off(cut)
}

impl<S: Sandbox + 'static> InvokeHandler for Environments<S>
where
    S::Config: 'static,
{
    fn invoke(&self, request: InvokeRequest) -> BoxFuture<'_, InvokeResult> {
        Box::pin(Environments::invoke(self, request))
    }

    fn drain(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(Environments::drain(self, grace))
    }
}

impl<S: Sandbox + 'static> Collect for Environments<S>
where
    S::Config: 'static,
{
    fn collect(&self, gauges: &mut GaugeSet) {
        let (idle, warm_functions) = {
            let pools = lock(&self.pools);
            let idle: usize = pools.values().map(|p| p.idle.len()).sum();
            let warm = pools.values().filter(|p| !p.idle.is_empty()).count();
            (idle, warm)
        };
        const ENVS: &str = "hearth_environments";
        const ENVS_HELP: &str = "Execution environments, by state.";
        gauges.add(ENVS, ENVS_HELP, &[("state", "idle")], idle as f64);
        let busy = self.busy.load(Ordering::Relaxed);
        gauges.add(ENVS, ENVS_HELP, &[("state", "busy")], busy as f64);
        let starting = self.starting.load(Ordering::Relaxed);
        gauges.add(ENVS, ENVS_HELP, &[("state", "starting")], starting as f64);
        gauges.add(
            "hearth_warm_function_versions",
            "Function versions with at least one idle environment.",
            &[],
            warm_functions as f64,
        );
        gauges.add(
            "hearth_invokes_in_flight",
            "Invokes the agent is running.",
            &[],
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
    }
}
