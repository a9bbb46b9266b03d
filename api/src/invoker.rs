//! The seam between the API and the agent: the API resolves the function, checks limits and
//! throttles, then hands the invoke to an [`Invoker`].

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use axum::body::Bytes;
use base64::Engine as _;
use hearth_agent::proxy::client::{ClientError, ProxyClient};
use hearth_agent::proxy::protocol as proxy;

use crate::error::ApiError;
use crate::model::FunctionConfiguration;

/// `X-Amz-Invocation-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

/// One invoke, resolved to a version.
#[derive(Clone, Debug)]
pub struct InvokeRequest {
    pub request_id: String,
    /// The configuration of the version that runs (its `Version` is the executed version).
    pub config: std::sync::Arc<FunctionConfiguration>,
    /// The hex sha256 of the code zip (the code object's name in the store).
    pub code_sha256_hex: String,
    pub invocation_type: InvocationType,
    pub payload: Bytes,
    /// `X-Amz-Log-Type: Tail`.
    pub log_tail: bool,
    /// `X-Amz-Client-Context` (base64 JSON), passed through.
    pub client_context: Option<String>,
    /// The function's reserved concurrency (`Some(0)`: throttled always).
    pub reserved_concurrency: Option<u32>,
}

/// The result of a RequestResponse invoke (an Event invoke only needs `Ok`).
#[derive(Clone, Debug, Default)]
pub struct InvokeResponse {
    pub payload: Bytes,
    /// `X-Amz-Function-Error` (`Unhandled` or `Handled`), with the error JSON as the payload.
    pub function_error: Option<String>,
    /// Base64 of the last 4 KB of logs, when `log_tail` was asked for.
    pub log_result: Option<String>,
}

/// The invoke path. The agent implements it over its invoke-proxy socket.
pub trait Invoker: Send + Sync + 'static {
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InvokeResponse, ApiError>> + Send + '_>>;
}

/// The invoker used while no agent is connected: every invoke fails with a `ServiceException`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoAgent;

impl Invoker for NoAgent {
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InvokeResponse, ApiError>> + Send + '_>> {
        Box::pin(async move {
            Err(ApiError::Service(format!(
                "No Hearth agent is connected to run {} (the invoke path is not available on this server)",
                request.config.function_arn
            )))
        })
    }
}

/// The invoker that hands invokes to the agent over its invoke-proxy socket.
#[derive(Clone, Debug)]
pub struct ProxyInvoker {
    client: ProxyClient,
}

impl ProxyInvoker {
    /// Connects to the agent's socket (inside a tokio runtime).
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        Ok(ProxyInvoker {
            client: ProxyClient::connect(socket)?,
        })
    }

    /// What the agent needs to know about the version that runs.
    fn request(request: InvokeRequest) -> proxy::InvokeRequest {
        let c = &request.config;
        let environment = c
            .environment
            .as_ref()
            .map(|e| {
                e.variables
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let deadline_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 + u64::from(c.timeout) * 1000)
            .unwrap_or(0);
        proxy::InvokeRequest {
            request_id: request.request_id,
            function: proxy::FunctionSpec {
                function_arn: c.function_arn.clone(),
                function_name: c.function_name.clone(),
                version: c.version.clone(),
                code_sha256_hex: request.code_sha256_hex,
                runtime: c.runtime.clone().unwrap_or_default(),
                handler: c.handler.clone().unwrap_or_default(),
                memory_mib: c.memory_size,
                timeout_s: c.timeout,
                environment,
                reserved_concurrency: request.reserved_concurrency,
                revision_id: c.revision_id.clone(),
            },
            payload: request.payload.to_vec(),
            invocation_type: match request.invocation_type {
                InvocationType::RequestResponse => proxy::InvocationType::RequestResponse,
                InvocationType::Event => proxy::InvocationType::Event,
                InvocationType::DryRun => proxy::InvocationType::DryRun,
            },
            client_context: request.client_context,
            trace_id: None,
            deadline_ms,
            log_tail: request.log_tail,
        }
    }
}

/// The API's answer to an agent's result.
pub fn response_from(result: proxy::InvokeResult) -> Result<InvokeResponse, ApiError> {
    let log_result = (!result.log_tail.is_empty())
        .then(|| base64::engine::general_purpose::STANDARD.encode(&result.log_tail));
    match result.outcome {
        proxy::Outcome::Success { payload } => Ok(InvokeResponse {
            payload: Bytes::from(payload),
            function_error: None,
            log_result,
        }),
        proxy::Outcome::FunctionError { kind, payload } => Ok(InvokeResponse {
            payload: Bytes::from(payload),
            function_error: Some(kind.as_str().to_string()),
            log_result,
        }),
        proxy::Outcome::Throttled { reason, message } => Err(ApiError::TooManyRequests {
            message,
            reason: reason.as_str(),
            retry_after_seconds: 1,
        }),
        proxy::Outcome::Error {
            error_type,
            status,
            message,
        } => {
            tracing::warn!(%error_type, status, %message, "the agent could not run the invoke");
            Err(ApiError::Service(message))
        }
    }
}

/// Event invokes wait for the async queue.
fn refuse_event(request: &InvokeRequest) -> Result<(), ApiError> {
    if request.invocation_type == InvocationType::Event {
        return Err(ApiError::Service(
            "Event invokes need Hearth's async queue, which this server does not have yet; invoke with RequestResponse".into(),
        ));
    }
    Ok(())
}

impl Invoker for ProxyInvoker {
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InvokeResponse, ApiError>> + Send + '_>> {
        Box::pin(async move {
            refuse_event(&request)?;
            let result = self
                .client
                .invoke(Self::request(request))
                .await
                .map_err(|e| ApiError::internal("the agent did not answer the invoke", &e))?;
            response_from(result)
        })
    }
}

/// The invoker of a frontend that embeds its agent (`hearth serve`): the same invoke-proxy
/// requests and results as [`ProxyInvoker`], handed to the agent's cores in process
/// (`hearth_agent::cores::Dispatcher`) instead of framed through its socket. The socket stays
/// for everything outside the process (pollers, benchmarks, a frontend elsewhere).
#[derive(Clone)]
pub struct LocalInvoker {
    agent: std::sync::Arc<dyn hearth_agent::proxy::server::InvokeHandler>,
}

impl LocalInvoker {
    pub fn new(agent: std::sync::Arc<dyn hearth_agent::proxy::server::InvokeHandler>) -> Self {
        LocalInvoker { agent }
    }
}

impl Invoker for LocalInvoker {
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InvokeResponse, ApiError>> + Send + '_>> {
        Box::pin(async move {
            refuse_event(&request)?;
            response_from(self.agent.invoke(ProxyInvoker::request(request)).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: proxy::Outcome, tail: &[u8]) -> proxy::InvokeResult {
        proxy::InvokeResult {
            log_tail: tail.to_vec(),
            executed_version: "1".into(),
            ..proxy::InvokeResult::bare("r".into(), outcome)
        }
    }

    #[test]
    fn outcomes_map_to_lambda_answers() {
        let ok = response_from(result(
            proxy::Outcome::Success {
                payload: b"{}".to_vec(),
            },
            b"REPORT x",
        ))
        .unwrap();
        assert_eq!(ok.payload, Bytes::from_static(b"{}"));
        assert_eq!(ok.function_error, None);
        assert_eq!(ok.log_result.as_deref(), Some("UkVQT1JUIHg="));
        let fe = response_from(result(
            proxy::Outcome::FunctionError {
                kind: proxy::FunctionErrorKind::Unhandled,
                payload: br#"{"errorType":"Sandbox.Timedout"}"#.to_vec(),
            },
            b"",
        ))
        .unwrap();
        assert_eq!(fe.function_error.as_deref(), Some("Unhandled"));
        assert_eq!(fe.log_result, None);
        let throttled = response_from(result(
            proxy::Outcome::Throttled {
                reason: proxy::ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
                message: "Rate Exceeded.".into(),
            },
            b"",
        ))
        .unwrap_err();
        assert_eq!(throttled.status().as_u16(), 429);
        assert_eq!(
            throttled.body()["Reason"],
            "ReservedFunctionConcurrentInvocationLimitExceeded"
        );
        let failed = response_from(result(
            proxy::Outcome::Error {
                error_type: "ServiceException".into(),
                status: 500,
                message: "no".into(),
            },
            b"",
        ))
        .unwrap_err();
        assert_eq!(failed.status().as_u16(), 500);
    }
}
