//! The whole API as one tower service, as the HTTP servers run it: an Invoke
//! (`POST /2015-03-31/functions/{name}/invocations`) is served directly (request id, SigV4 and
//! the body limit from [`crate::body`], then [`crate::routes::invoke::run`]); every other request
//! goes through the router ([`crate::app`]). The answers are the same either way; the direct
//! path skips the router's matching, its two middleware layers and the extractors on the one
//! operation whose latency the frontend is measured by (`hearth-perf api`: on this host the
//! frontend's code runs with cold caches between invokes, so each layer it passes costs several
//! times what it costs in a hot loop).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::{Method, Request};
use axum::response::{IntoResponse as _, Response};
use tower::Service;

use crate::AppState;
use crate::body::RawBody;
use crate::error::ApiError;
use crate::model::QualifierQuery;

/// The API: the router, with Invoke served directly.
#[derive(Clone)]
pub struct ApiService {
    state: AppState,
    router: Router,
}

impl ApiService {
    pub fn new(state: AppState) -> Self {
        ApiService {
            router: crate::app(state.clone()),
            state,
        }
    }

    /// What the handlers share.
    pub(crate) fn state(&self) -> &AppState {
        &self.state
    }
}

impl<B> Service<Request<B>> for ApiService
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let req = req.map(Body::new);
        let name = (req.method() == Method::POST)
            .then(|| crate::names::invoke_path_name(req.uri().path()))
            .flatten();
        match name {
            Some(name) => Box::pin(invoke_directly(self.state.clone(), name, req)),
            None => {
                let router = self.router.clone();
                Box::pin(async move { tower::ServiceExt::oneshot(router, req).await })
            }
        }
    }
}

/// An Invoke without the router; the same checks, answers and `x-amzn-RequestId` as through it.
async fn invoke_directly(
    state: AppState,
    name: String,
    req: Request<Body>,
) -> Result<Response, Infallible> {
    let request_id = crate::util::uuid_v4();
    let result = async {
        let req = crate::body::authenticate_inner(&state, req).await?;
        let (parts, _) = req.into_parts();
        let payload = parts
            .extensions
            .get::<RawBody>()
            .map(|body| body.0.clone())
            .unwrap_or_default();
        run_authenticated(&state, &name, request_id.clone(), &parts, payload).await
    }
    .await;
    Ok(stamped(result, &name, &request_id))
}

/// An Invoke whose body its connection has read, within the invoke limit
/// ([`crate::invoke_connection`]): the same checks, answers and `x-amzn-RequestId` as
/// [`invoke_directly`].
pub(crate) async fn invoke_read(
    state: &AppState,
    name: String,
    parts: Parts,
    payload: Bytes,
) -> Response {
    let request_id = crate::util::uuid_v4();
    let result = async {
        crate::body::authenticate_read(state, &parts, &payload)?;
        run_authenticated(state, &name, request_id.clone(), &parts, payload).await
    }
    .await;
    stamped(result, &name, &request_id)
}

/// Runs an authenticated Invoke (its qualifier from the query).
async fn run_authenticated(
    state: &AppState,
    name: &str,
    request_id: String,
    parts: &Parts,
    payload: Bytes,
) -> Result<Response, ApiError> {
    let query = qualifier_query(&parts.uri)?;
    crate::routes::invoke::run(state, name, query, request_id, &parts.headers, payload).await
}

/// The answer, with its `x-amzn-RequestId`.
fn stamped(result: Result<Response, ApiError>, name: &str, request_id: &str) -> Response {
    let mut response = result.unwrap_or_else(|err| err.into_response());
    crate::body::stamp_request_id(&mut response, &Method::POST, name, request_id);
    response
}

/// The `Qualifier` query parameter; a bad query is a `ValidationException`.
fn qualifier_query(uri: &axum::http::Uri) -> Result<QualifierQuery, ApiError> {
    if uri.query().is_none() {
        return Ok(QualifierQuery { qualifier: None });
    }
    axum::extract::Query::<QualifierQuery>::try_from_uri(uri)
        .map(|query| query.0)
        .map_err(|e| {
            ApiError::Validation(format!("1 validation error detected: {}", e.body_text()))
        })
}
