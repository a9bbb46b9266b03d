//! The request pipeline before any handler: a request id on every response, the body read under
//! the operation's size limit (counted while reading, never buffered first), its sha256 taken on
//! the way, then SigV4 verified. Handlers get the body through `LambdaJson`/`RawBody`.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::auth;
use crate::error::ApiError;

/// Synchronous invoke payloads: 6 MB.
pub const INVOKE_SYNC_LIMIT: usize = 6 * 1024 * 1024;
/// Asynchronous (`Event`) invoke payloads: 1 MB.
pub const INVOKE_ASYNC_LIMIT: usize = 1024 * 1024;
/// CreateFunction and UpdateFunctionCode bodies: 50 MB of zip as base64 inside JSON.
pub const CODE_REQUEST_LIMIT: usize = 69_905_067;
/// Every other control-plane body.
pub const CONTROL_REQUEST_LIMIT: usize = 1024 * 1024;
/// How much of an oversized body is still read (and dropped) so the client sees the 413
/// instead of a reset connection.
const DRAIN_CAP: usize = 64 * 1024 * 1024;
/// How many code uploads (up to ~70 MB each, decoded in memory) are read at once.
pub const CONCURRENT_CODE_UPLOADS: usize = 4;
/// The longest wait for the next piece of a body.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The request id of this request (`x-amzn-RequestId`).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// The request body, read and verified by the middleware.
#[derive(Clone, Debug, Default)]
pub struct RawBody(pub Bytes);

/// Adds `x-amzn-RequestId` to every response, including errors and unknown routes.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = crate::util::uuid_v4();
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut response = next.run(req).await;
    stamp_request_id(&mut response, &method, &path, &id);
    response
}

/// Logs a finished request and adds its `x-amzn-RequestId` header.
pub fn stamp_request_id(response: &mut Response, method: &Method, path: &str, id: &str) {
    tracing::debug!(%method, %path, status = response.status().as_u16(), request_id = %id, "request");
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-amzn-RequestId", value);
    }
}

/// The size limit and operation name for a request, by method and path.
fn limit_for(method: &Method, path: &str, invocation_type: Option<&[u8]>) -> (usize, &'static str) {
    if method == Method::POST && path.ends_with("/invocations") {
        if invocation_type == Some(b"Event") {
            (INVOKE_ASYNC_LIMIT, "InvokeAsync")
        } else {
            (INVOKE_SYNC_LIMIT, "InvokeFunction")
        }
    } else if method == Method::POST && path.trim_end_matches('/') == "/2015-03-31/functions" {
        (CODE_REQUEST_LIMIT, "CreateFunction")
    } else if method == Method::PUT
        && path.starts_with("/2015-03-31/functions/")
        && path.ends_with("/code")
    {
        (CODE_REQUEST_LIMIT, "UpdateFunctionCode")
    } else {
        (CONTROL_REQUEST_LIMIT, "this")
    }
}

fn too_large(limit: usize, operation: &str) -> ApiError {
    ApiError::RequestEntityTooLarge(format!(
        "Request must be smaller than {limit} bytes for the {operation} operation"
    ))
}

/// Reads the body frame by frame; fails as soon as it passes `limit` (after draining a bounded
/// amount more). Returns the bytes and their hex sha256.
async fn read_limited(
    body: Body,
    limit: usize,
    operation: &str,
) -> Result<(Bytes, String), ApiError> {
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut hasher = Sha256::new();
    let mut seen: usize = 0;
    loop {
        let frame = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => {
                return Err(ApiError::InvalidRequestContent(
                    "Timed out reading the request body".into(),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => {
                return Err(ApiError::InvalidRequestContent(
                    "The request body could not be read".into(),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            buf = Vec::new();
            if seen <= limit.saturating_add(DRAIN_CAP) {
                continue;
            }
            return Err(too_large(limit, operation));
        }
        hasher.update(&data);
        buf.extend_from_slice(&data);
    }
    if seen > limit {
        return Err(too_large(limit, operation));
    }
    Ok((Bytes::from(buf), crate::auth::hex_lower(&hasher.finalize())))
}

/// Authenticates the request and reads its body under the operation's limit.
pub async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match authenticate_inner(&state, req).await {
        Ok(req) => next.run(req).await,
        Err(err) => err.into_response(),
    }
}

pub(crate) async fn authenticate_inner(
    state: &AppState,
    req: Request,
) -> Result<Request, ApiError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (parts, body) = req.into_parts();
    let pre = auth::precheck(&state.inner.auth, &parts.headers, now)?;
    let invocation_type = parts
        .headers
        .get("x-amz-invocation-type")
        .map(|v| v.as_bytes());
    let (limit, operation) = limit_for(&parts.method, parts.uri.path(), invocation_type);
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > (limit.saturating_add(DRAIN_CAP)) as u64) {
        return Err(too_large(limit, operation));
    }
    // Code uploads are large: bound how many are in memory at once.
    let _permit = if limit == CODE_REQUEST_LIMIT {
        Some(
            state
                .inner
                .code_uploads
                .acquire()
                .await
                .map_err(|e| ApiError::internal("upload gate closed", &e))?,
        )
    } else {
        None
    };
    let (bytes, sha) = read_limited(body, limit, operation).await?;
    auth::verify(&pre, &parts.method, &parts.uri, &parts.headers, &sha)?;
    let mut req = Request::from_parts(parts, Body::empty());
    req.extensions_mut().insert(RawBody(bytes));
    Ok(req)
}

/// Authenticates a request whose body was already read within its limit (the Invoke connection
/// loop, [`crate::invoke_connection`]): the same two SigV4 steps as [`authenticate_inner`].
pub(crate) fn authenticate_read(
    state: &AppState,
    parts: &Parts,
    body: &[u8],
) -> Result<(), ApiError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let pre = auth::precheck(&state.inner.auth, &parts.headers, now)?;
    let sha = auth::hex_lower(&Sha256::digest(body));
    auth::verify(&pre, &parts.method, &parts.uri, &parts.headers, &sha)
}

impl<S: Send + Sync> FromRequestParts<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RawBody>()
            .cloned()
            .unwrap_or_default())
    }
}

/// A JSON body; a malformed one is an `InvalidRequestContentException`, an empty one is `{}`.
#[derive(Debug)]
pub struct LambdaJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for LambdaJson<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request_parts(parts, state).await?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text).map(LambdaJson).map_err(|e| {
            ApiError::InvalidRequestContent(format!("Could not parse request body into json: {e}"))
        })
    }
}

/// Query parameters; a bad one is a `ValidationException`.
#[derive(Debug)]
pub struct LambdaQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for LambdaQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| LambdaQuery(q.0))
            .map_err(|e| {
                ApiError::Validation(format!("1 validation error detected: {}", e.body_text()))
            })
    }
}

/// Path parameters; a bad one is a `ValidationException`.
#[derive(Debug)]
pub struct LambdaPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for LambdaPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| LambdaPath(p.0))
            .map_err(|e| {
                ApiError::Validation(format!("1 validation error detected: {}", e.body_text()))
            })
    }
}

/// Unknown routes and methods, in Lambda's error shape.
pub async fn unknown_operation(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::UnknownOperation(format!("Unknown operation: {method} {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limit_is_enforced_while_reading() {
        let body = Body::from(vec![0u8; 100]);
        let (bytes, _) = read_limited(body, 100, "x").await.unwrap();
        assert_eq!(bytes.len(), 100);
        let err = read_limited(Body::from(vec![0u8; 101]), 100, "Op")
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::RequestEntityTooLarge(m) if m.contains("100 bytes for the Op"))
        );
    }

    #[test]
    fn limits_by_operation() {
        assert_eq!(
            limit_for(&Method::POST, "/2015-03-31/functions/f/invocations", None).0,
            INVOKE_SYNC_LIMIT
        );
        assert_eq!(
            limit_for(
                &Method::POST,
                "/2015-03-31/functions/f/invocations",
                Some(b"Event")
            )
            .0,
            INVOKE_ASYNC_LIMIT
        );
        assert_eq!(
            limit_for(&Method::POST, "/2015-03-31/functions", None).0,
            CODE_REQUEST_LIMIT
        );
        assert_eq!(
            limit_for(&Method::PUT, "/2015-03-31/functions/f/code", None).0,
            CODE_REQUEST_LIMIT
        );
        assert_eq!(
            limit_for(&Method::PUT, "/2015-03-31/functions/f/configuration", None).0,
            CONTROL_REQUEST_LIMIT
        );
    }
}
