//! Invoke: resolves the function and qualifier (an alias picks its version by weight), checks
//! the payload and throttles, answers DryRun itself and hands the rest to the [`Invoker`](crate::invoker::Invoker).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use rand::Rng as _;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::{function_ref, load_version, resolve};
use crate::AppState;
use crate::body::{LambdaPath, LambdaQuery, RawBody, RequestId};
use crate::error::ApiError;
use crate::invoker::{InvocationType, InvokeRequest};
use crate::model::{FunctionConfiguration, QualifierQuery};
use crate::names::merge_qualifier;
use crate::store::{Reader, Table};

/// The largest `X-Amz-Client-Context` (base64) Lambda accepts.
const MAX_CLIENT_CONTEXT: usize = 3583;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/2015-03-31/functions/{name}/invocations", post(invoke))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn invoke(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    RawBody(payload): RawBody,
) -> Result<Response, ApiError> {
    run(&state, &raw, q, request_id, &headers, payload).await
}

/// An authenticated Invoke whose body was read under its limit ([`crate::body`]): resolves the
/// function and qualifier and runs it. Both the router's handler and [`crate::service`]'s direct
/// path end here.
pub async fn run(
    state: &AppState,
    raw: &str,
    q: QualifierQuery,
    request_id: String,
    headers: &HeaderMap,
    payload: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let invocation_type = match header(headers, "x-amz-invocation-type") {
        None | Some("RequestResponse") => InvocationType::RequestResponse,
        Some("Event") => InvocationType::Event,
        Some("DryRun") => InvocationType::DryRun,
        Some(other) => {
            return Err(ApiError::Validation(format!(
                "1 validation error detected: Value '{other}' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]"
            )));
        }
    };
    let log_tail = match header(headers, "x-amz-log-type") {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return Err(ApiError::Validation(format!(
                "1 validation error detected: Value '{other}' at 'logType' failed to satisfy constraint: Member must satisfy enum value set: [None, Tail]"
            )));
        }
    };
    let client_context = header(headers, "x-amz-client-context").map(str::to_string);
    if let Some(cc) = &client_context
        && (cc.len() > MAX_CLIENT_CONTEXT
            || base64::engine::general_purpose::STANDARD
                .decode(cc)
                .is_err())
    {
        return Err(ApiError::InvalidParameterValue(
            "Client context must be a base64-encoded JSON object of at most 3583 bytes.".into(),
        ));
    }
    if !payload.iter().all(u8::is_ascii_whitespace)
        && serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_err()
    {
        return Err(ApiError::InvalidRequestContent(
            "Could not parse request body into json: the payload is not valid JSON".into(),
        ));
    }
    let fref = function_ref(state, raw)?;
    let qualifier = merge_qualifier(&fref, q.qualifier.as_deref())?;
    let target = state
        .inner
        .invoke_cache
        .get(state, &fref.name, qualifier.as_deref())?;
    let (config, code_hex) = target.pick();
    let reserved = target.reserved;
    check_invocable(&config)?;
    if reserved == Some(0) {
        return Err(ApiError::TooManyRequests {
            message: "Rate Exceeded.".into(),
            reason: "ReservedFunctionConcurrentInvocationLimitExceeded",
            retry_after_seconds: 1,
        });
    }
    let executed = HeaderValue::from_str(&config.version)
        .map_err(|e| ApiError::internal("bad version header", &e))?;
    if invocation_type == InvocationType::DryRun {
        let mut response = StatusCode::NO_CONTENT.into_response();
        response
            .headers_mut()
            .insert("x-amz-executed-version", executed);
        return Ok(response);
    }
    let request = InvokeRequest {
        request_id,
        config,
        code_sha256_hex: code_hex,
        invocation_type,
        payload,
        log_tail,
        client_context,
        reserved_concurrency: reserved,
    };
    let result = state.inner.invoker.invoke(request).await?;
    if invocation_type == InvocationType::Event {
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let mut response = (StatusCode::OK, result.payload).into_response();
    let h = response.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("x-amz-executed-version", executed);
    if let Some(fe) = result
        .function_error
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        h.insert("x-amz-function-error", fe);
    }
    if let Some(log) = result
        .log_result
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        h.insert("x-amz-log-result", log);
    }
    Ok(response)
}

/// What an invoke of one (function, qualifier) resolves to.
#[derive(Debug)]
pub struct InvokeTarget {
    generation: u64,
    primary: (Arc<FunctionConfiguration>, String),
    /// An alias's `AdditionalVersionWeights` entry: its weight and that version.
    weighted: Option<(f64, Arc<FunctionConfiguration>, String)>,
    reserved: Option<u32>,
}

impl InvokeTarget {
    /// The version to run: an alias with `AdditionalVersionWeights` sends that share of invokes
    /// to the other version.
    fn pick(&self) -> (Arc<FunctionConfiguration>, String) {
        match &self.weighted {
            Some((weight, config, code)) if rand::rng().random::<f64>() < *weight => {
                (config.clone(), code.clone())
            }
            _ => self.primary.clone(),
        }
    }
}

/// The most (function, qualifier) pairs cached before the cache starts over.
const INVOKE_CACHE_ENTRIES: usize = 10_000;

/// A function name and the qualifier of an invoke.
type TargetKey = (String, Option<String>);

/// Resolved invoke targets; an entry is used only while no write has committed since it was
/// read (the store's generation), so it is never stale.
#[derive(Debug, Default)]
pub struct InvokeCache {
    entries: RwLock<HashMap<TargetKey, Arc<InvokeTarget>>>,
}

impl InvokeCache {
    fn get(
        &self,
        state: &AppState,
        name: &str,
        qualifier: Option<&str>,
    ) -> Result<Arc<InvokeTarget>, ApiError> {
        let generation = state.store().generation();
        let key = (name.to_string(), qualifier.map(str::to_string));
        if let Ok(entries) = self.entries.read()
            && let Some(hit) = entries.get(&key)
            && hit.generation == generation
        {
            return Ok(hit.clone());
        }
        let partition = state.partition();
        let target = state.store().read(|r| {
            let resolved = resolve(r, partition, name, qualifier)?;
            let weighted = match resolved
                .alias
                .as_ref()
                .and_then(|a| a.routing_config.as_ref())
                .and_then(|rc| rc.additional_version_weights.iter().next())
            {
                Some((version, weight)) => {
                    let (config, code) = load_version(r, partition, name, version)?;
                    Some((*weight, Arc::new(config), code))
                }
                None => None,
            };
            let reserved: Option<u32> = r.get(Table::Concurrency, name)?;
            Ok::<_, ApiError>(InvokeTarget {
                generation,
                primary: (Arc::new(resolved.config), resolved.code_hex),
                weighted,
                reserved,
            })
        })?;
        let target = Arc::new(target);
        if let Ok(mut entries) = self.entries.write() {
            if entries.len() >= INVOKE_CACHE_ENTRIES {
                entries.clear();
            }
            entries.insert(key, target.clone());
        }
        Ok(target)
    }
}

/// Lambda refuses invokes until the function is Active.
fn check_invocable(config: &FunctionConfiguration) -> Result<(), ApiError> {
    match config.state.as_str() {
        "Active" => Ok(()),
        "Failed" => Err(ApiError::ResourceConflict(format!(
            "Lambda is unable to invoke {} because its state is Failed: {}",
            config.function_arn,
            config.state_reason.as_deref().unwrap_or("")
        ))),
        other => Err(ApiError::ResourceConflict(format!(
            "The operation cannot be performed at this time. The function is currently in the following state: {other}"
        ))),
    }
}
