//! Sandboxes: where a function's code runs. One trait, [`Sandbox`], is the seam between the agent
//! and how isolation is done; [`container::ContainerSandbox`] is the container implementation (the
//! microVM one comes with the VMM).
//!
//! A sandbox is started with a function (its bundle and code) and is then invoked, possibly
//! several times at once when the function's `max_concurrency` > 1. The host enforces each invoke's
//! timeout: past it the invoke gets `Sandbox.Timedout` and the sandbox is marked for replacement.
//! [`Environment`] wraps a sandbox kind and replaces a dead sandbox on the next invoke.

pub mod cgroup;
pub mod container;
pub mod link;
pub mod microvm;
pub mod run;

use std::future::Future;
use std::time::Duration;

pub use hearth_guest::protocol::function::{Bundle, FunctionError, LogLine};

/// A function as a sandbox needs it.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// Everything but the code (`code_len` is filled in by the sandbox).
    pub bundle: Bundle,
    /// The code zip.
    pub code: Vec<u8>,
    /// The one CPU the sandbox's processes run on ([`crate::placement`]); `None`: any CPU the
    /// agent may use. Container sandboxes apply it; a microVM's VMM runs on any CPU.
    pub cpu: Option<usize>,
}

impl FunctionSpec {
    /// The function's timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.bundle.timeout_ms)
    }
}

/// One invoke.
#[derive(Debug, Clone, Default)]
pub struct InvokeRequest {
    /// Empty: the sandbox makes one up.
    pub request_id: String,
    pub payload: Vec<u8>,
    pub trace_id: Option<String>,
    pub client_context: Option<String>,
    pub cognito_identity: Option<String>,
}

/// How an invoke went.
#[derive(Debug, Clone)]
pub struct InvokeResponse {
    pub request_id: String,
    /// The function's response, or a Lambda-shaped error.
    pub result: Result<Vec<u8>, FunctionError>,
    /// The lines the function printed while this invoke was the only one in flight (bounded).
    pub logs: Vec<LogLine>,
    /// The last 4 KB of log output of this invoke.
    pub logs_tail: Vec<u8>,
    pub duration: Duration,
    /// Set on the invoke that paid for a cold start.
    pub init_duration: Option<Duration>,
    pub max_memory_used_mb: u64,
}

/// What a sandbox's start reports.
#[derive(Debug, Clone, Default)]
pub struct InitReport {
    /// From handing the bundle over to the runtime's first request for an invoke.
    pub duration: Duration,
    /// What the runtime printed during init (bounded).
    pub logs: Vec<LogLine>,
}

/// Why a sandbox could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox could not be set up: {what}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the function failed to initialise: {}: {}", .error.error_type, .error.error_message)]
    Init {
        error: FunctionError,
        logs_tail: Vec<u8>,
        init_duration: Duration,
    },
    #[error("the host link to the sandbox failed")]
    Link(#[source] hearth_guest::protocol::ProtocolError),
    #[error("the sandbox is gone ({0})")]
    Gone(String),
}

/// A place where a function runs.
pub trait Sandbox: Send + Sync + Sized {
    /// How sandboxes of this kind are made.
    type Config: Clone + Send + Sync;

    /// Starts a sandbox for `function` and waits for its runtime to be ready for invokes.
    fn start(
        config: &Self::Config,
        function: &FunctionSpec,
    ) -> impl Future<Output = Result<(Self, InitReport), SandboxError>> + Send;

    /// Runs one invoke; several may run at once up to the function's `max_concurrency`.
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> impl Future<Output = Result<InvokeResponse, SandboxError>> + Send;

    /// Whether the sandbox can take more invokes (false after a timeout or the runtime's exit).
    fn is_alive(&self) -> bool;

    /// Ends the sandbox and everything in it.
    fn destroy(self) -> impl Future<Output = ()> + Send;
}

/// `Task timed out after N.NN seconds`, as Lambda says it.
pub fn timed_out(timeout: Duration) -> FunctionError {
    FunctionError::new(
        "Sandbox.Timedout",
        format!("Task timed out after {:.2} seconds", timeout.as_secs_f64()),
    )
}

/// A fresh request id (UUID v4 layout).
pub fn new_request_id() -> String {
    let v: u128 = rand::random();
    let v =
        (v & !(0xf000u128 << 64) | (0x4000u128 << 64)) & !(0xc000u128 << 48) | (0x8000u128 << 48);
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// One function's execution environment: a sandbox, started on first use and replaced after a
/// timeout or the runtime's exit.
pub struct Environment<S: Sandbox> {
    config: S::Config,
    function: FunctionSpec,
    current: Option<S>,
}

impl<S: Sandbox> Environment<S> {
    pub fn new(config: S::Config, function: FunctionSpec) -> Self {
        Environment {
            config,
            function,
            current: None,
        }
    }

    /// Invokes, starting (or replacing) the sandbox first when needed. An init failure is the
    /// invoke's result, as in Lambda.
    pub async fn invoke(
        &mut self,
        mut request: InvokeRequest,
    ) -> Result<InvokeResponse, SandboxError> {
        if request.request_id.is_empty() {
            request.request_id = new_request_id();
        }
        let warm = self.current.as_ref().is_some_and(|s| s.is_alive());
        match self.invoke_once(request.clone()).await {
            // A warm sandbox that ended between invokes closes the link without a result: the
            // invoke never reached a runtime, so it is safe to run it in a fresh sandbox.
            Err(SandboxError::Gone(why)) if warm => {
                tracing::info!(%why, "environment ended between invokes; starting a new one");
                self.invoke_once(request).await
            }
            other => other,
        }
    }

    async fn invoke_once(
        &mut self,
        request: InvokeRequest,
    ) -> Result<InvokeResponse, SandboxError> {
        let mut init: Option<InitReport> = None;
        if self.current.as_ref().is_some_and(|s| !s.is_alive())
            && let Some(old) = self.current.take()
        {
            old.destroy().await;
        }
        let sandbox = match self.current.take() {
            Some(s) => s,
            None => match S::start(&self.config, &self.function).await {
                Ok((s, report)) => {
                    init = Some(report);
                    s
                }
                Err(SandboxError::Init {
                    error,
                    logs_tail,
                    init_duration,
                }) => {
                    return Ok(InvokeResponse {
                        request_id: request.request_id,
                        result: Err(error),
                        logs: Vec::new(),
                        logs_tail,
                        duration: Duration::ZERO,
                        init_duration: Some(init_duration),
                        max_memory_used_mb: 0,
                    });
                }
                Err(e) => return Err(e),
            },
        };
        let result = sandbox.invoke(request).await;
        if sandbox.is_alive() {
            self.current = Some(sandbox);
        } else {
            sandbox.destroy().await;
        }
        let mut response = result?;
        if let Some(init) = init {
            // As in Lambda, the cold start's init logs come with its first invoke.
            response.init_duration = Some(init.duration);
            let mut logs = init.logs;
            logs.append(&mut response.logs);
            response.logs = logs;
        }
        Ok(response)
    }

    /// The running sandbox, if any (for concurrent invokes through [`Sandbox::invoke`]).
    pub fn sandbox(&self) -> Option<&S> {
        self.current.as_ref()
    }

    /// Ends the environment.
    pub async fn destroy(mut self) {
        if let Some(s) = self.current.take() {
            s.destroy().await;
        }
    }
}
