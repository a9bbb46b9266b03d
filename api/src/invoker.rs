//! The seam between the API and the agent: the API resolves the function, checks limits and
//! throttles, then hands the invoke to an [`Invoker`].

use std::future::Future;
use std::pin::Pin;

use axum::body::Bytes;

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
