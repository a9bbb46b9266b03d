//! The Lambda Runtime API (`2018-06-01`) served to the function's runtime on the loopback.
//!
//! Each connection's hot requests (`GET .../invocation/next`, `POST .../invocation/{id}/response`
//! and `.../error`) are served by [`super::connection`] without hyper; at the first other request
//! the connection goes to hyper 1's HTTP/1 server, on the session's current-thread tokio runtime.
//! Both answer through the handlers here ([`Reply`]). No header read timeout is set: the only
//! client is the function inside the same sandbox, so a slow client only slows itself (and the
//! host's invoke timeout bounds every invoke).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::protocol::function::{FunctionError, Invoke, LOG_TAIL, MAX_PAYLOAD, Outcome};

pub(crate) const PREFIX: &str = "/2018-06-01/runtime/";
/// How many finished request ids are remembered, to answer a late second response with 403.
const REMEMBER_DONE: usize = 1024;

/// An invoke handed to the runtime and not yet answered.
#[derive(Debug)]
pub(crate) struct Inflight {
    pub started: Instant,
    /// The last log bytes printed while it ran.
    pub tail: VecDeque<u8>,
}

impl Inflight {
    pub(crate) fn push_log(&mut self, line: &[u8]) {
        self.tail
            .extend(line.iter().copied().chain(std::iter::once(b'\n')));
        let excess = self.tail.len().saturating_sub(LOG_TAIL);
        self.tail.drain(..excess);
    }
}

/// What the Runtime API tells the session.
#[derive(Debug)]
pub(crate) enum ApiEvent {
    /// The runtime asked for its first invoke: init is done.
    FirstNext,
    /// The runtime answered an invoke.
    Done {
        request_id: String,
        outcome: Outcome,
        inflight: Inflight,
    },
    /// The runtime reported an init error.
    InitError(FunctionError),
}

/// State shared by the Runtime API handlers and the session.
pub(crate) struct ApiState {
    invokes: tokio::sync::Mutex<mpsc::UnboundedReceiver<Invoke>>,
    pub(crate) inflight: Mutex<HashMap<String, Inflight>>,
    done: Mutex<(HashSet<String>, VecDeque<String>)>,
    events: mpsc::UnboundedSender<ApiEvent>,
    first_next: AtomicBool,
}

impl ApiState {
    pub(crate) fn new(
        invokes: mpsc::UnboundedReceiver<Invoke>,
        events: mpsc::UnboundedSender<ApiEvent>,
    ) -> Arc<Self> {
        Arc::new(ApiState {
            invokes: tokio::sync::Mutex::new(invokes),
            inflight: Mutex::new(HashMap::new()),
            done: Mutex::new((HashSet::new(), VecDeque::new())),
            events,
            first_next: AtomicBool::new(false),
        })
    }

    /// Removes an in-flight invoke (the runtime answered, or it died) and remembers it as done.
    pub(crate) fn finish(&self, request_id: &str) -> Option<Inflight> {
        let taken = lock(&self.inflight).remove(request_id)?;
        let mut done = lock(&self.done);
        if done.0.insert(request_id.to_string()) {
            done.1.push_back(request_id.to_string());
        }
        while done.1.len() > REMEMBER_DONE {
            if let Some(old) = done.1.pop_front() {
                done.0.remove(&old);
            }
        }
        Some(taken)
    }

    fn is_done(&self, request_id: &str) -> bool {
        lock(&self.done).0.contains(request_id)
    }
}

/// Locks a std mutex, recovering from a poisoned one (the data is plain bookkeeping).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves the Runtime API on `listener` until the task is dropped: each connection's hot
/// requests by [`super::connection`], the rest by hyper.
pub(crate) async fn serve(listener: TcpListener, state: Arc<ApiState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "runtime API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            if let super::connection::Ended::HandOver(stream) =
                super::connection::serve(stream, &state).await
            {
                serve_hyper(stream, state).await;
            }
        });
    }
}

/// Serves the rest of a connection with hyper.
async fn serve_hyper<S>(stream: S, state: Arc<ApiState>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(to_response(route(&state, req).await)) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "runtime API connection ended");
    }
}

/// An answer of the Runtime API, written by hyper ([`to_response`]) or by the connection loop
/// ([`super::connection`]).
pub(crate) enum Reply {
    /// A JSON body (`content-type: application/json`) with this status.
    Json(StatusCode, Bytes),
    /// The next invoke: 200, its payload, and the `Lambda-Runtime-*` headers.
    Invoke(Invoke),
}

impl Reply {
    /// The invoke's headers (`content-type` first), each whose value a header may carry.
    pub(crate) fn invoke_headers(invoke: &Invoke) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("content-type", Some("application/json")),
            ("lambda-runtime-aws-request-id", Some(&*invoke.request_id)),
            (
                "lambda-runtime-invoked-function-arn",
                Some(&*invoke.invoked_function_arn),
            ),
            ("lambda-runtime-trace-id", invoke.trace_id.as_deref()),
            (
                "lambda-runtime-client-context",
                invoke.client_context.as_deref(),
            ),
            (
                "lambda-runtime-cognito-identity",
                invoke.cognito_identity.as_deref(),
            ),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .filter(|(_, value)| header_value_ok(value))
    }
}

/// Whether `value` may be a header value as is (what `HeaderValue::from_str` accepts).
pub(crate) fn header_value_ok(value: &str) -> bool {
    value.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t')
}

type Resp = Response<Full<Bytes>>;

/// The hyper response for `reply`.
fn to_response(reply: Reply) -> Resp {
    use hyper::header::HeaderValue;
    match reply {
        Reply::Json(status, body) => {
            let mut resp = Response::new(Full::new(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Reply::Invoke(invoke) => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            let h = resp.headers_mut();
            for (name, value) in Reply::invoke_headers(&invoke) {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            }
            h.insert(
                "lambda-runtime-deadline-ms",
                HeaderValue::from(invoke.deadline_ms),
            );
            *resp.body_mut() = Full::new(Bytes::from(invoke.payload));
            resp
        }
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Reply {
    Reply::Json(status, Bytes::from(body.to_string()))
}

pub(crate) fn error(status: StatusCode, error_type: &str, message: &str) -> Reply {
    json(
        status,
        serde_json::json!({"errorType": error_type, "errorMessage": message}),
    )
}

/// 202 `{"status":"OK"}`.
pub(crate) fn accepted() -> Reply {
    Reply::Json(
        StatusCode::ACCEPTED,
        Bytes::from_static(b"{\"status\":\"OK\"}"),
    )
}

/// The answer to a path this API does not have.
pub(crate) fn not_found() -> Reply {
    error(StatusCode::NOT_FOUND, "NotFound", "unknown path")
}

async fn route(state: &ApiState, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return not_found();
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["invocation", "next"]) => next(state).await,
        (&Method::POST, ["invocation", id, "response"]) => {
            if let Err(reply) = check_open(state, id) {
                return *reply;
            }
            let body = read_body(req).await;
            response(state, id, body)
        }
        (&Method::POST, ["invocation", id, "error"]) => {
            if let Err(reply) = check_open(state, id) {
                return *reply;
            }
            let header_type = error_type_header(req.headers());
            let body = read_body(req).await;
            invocation_error(state, id, header_type, body)
        }
        (&Method::POST, ["init", "error"]) => {
            let header_type = error_type_header(req.headers());
            match read_error(header_type, read_body(req).await) {
                Ok(err) => {
                    let _ = state.events.send(ApiEvent::InitError(err));
                    accepted()
                }
                Err(reply) => *reply,
            }
        }
        (
            _,
            ["invocation", "next"] | ["invocation", _, "response" | "error"] | ["init", "error"],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
        _ => not_found(),
    }
}

/// `Lambda-Runtime-Function-Error-Type`, if set and text.
fn error_type_header(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `GET .../invocation/next`: waits for the next invoke and marks it in flight. Cancel-safe:
/// dropped before it resolves, it has taken no invoke.
pub(crate) async fn next(state: &ApiState) -> Reply {
    if !state.first_next.swap(true, Ordering::SeqCst) {
        let _ = state.events.send(ApiEvent::FirstNext);
    }
    let invoke = {
        let mut rx = state.invokes.lock().await;
        rx.recv().await
    };
    let Some(invoke) = invoke else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceException",
            "the sandbox is shutting down",
        );
    };
    lock(&state.inflight).insert(
        invoke.request_id.clone(),
        Inflight {
            started: Instant::now(),
            tail: VecDeque::new(),
        },
    );
    Reply::Invoke(invoke)
}

/// Checks that `id` may still be answered; `Err` is the answer when it may not.
pub(crate) fn check_open(state: &ApiState, id: &str) -> Result<(), Box<Reply>> {
    if lock(&state.inflight).contains_key(id) {
        Ok(())
    } else if state.is_done(id) {
        Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "InvalidStateTransition",
            &format!("Invalid state transition: request {id} was already answered"),
        )))
    } else {
        Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "InvalidRequestID",
            &format!("Invalid request ID: {id}"),
        )))
    }
}

/// A request body as read.
pub(crate) enum Body {
    Ok(Vec<u8>),
    /// Over [`MAX_PAYLOAD`].
    TooLarge,
    /// The connection failed before its end.
    Broken,
}

async fn read_body(req: Request<Incoming>) -> Body {
    match Limited::new(req.into_body(), MAX_PAYLOAD).collect().await {
        Ok(collected) => Body::Ok(Vec::from(collected.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Body::TooLarge
        }
        Err(_) => Body::Broken,
    }
}

fn too_large() -> Reply {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."),
    )
}

fn broken() -> Reply {
    error(
        StatusCode::BAD_REQUEST,
        "InvalidRequest",
        "could not read the request body",
    )
}

fn complete(state: &ApiState, id: &str, outcome: Outcome) {
    if let Some(inflight) = state.finish(id) {
        let _ = state.events.send(ApiEvent::Done {
            request_id: id.to_string(),
            outcome,
            inflight,
        });
    }
}

/// `POST .../invocation/{id}/response` with its body read.
pub(crate) fn response(state: &ApiState, id: &str, body: Body) -> Reply {
    match body {
        Body::Ok(bytes) => {
            if let Err(reply) = check_open(state, id) {
                return *reply;
            }
            complete(state, id, Outcome::Response(bytes));
            accepted()
        }
        Body::TooLarge => {
            complete(
                state,
                id,
                Outcome::Error(FunctionError::new(
                    "Function.ResponseSizeTooLarge",
                    format!(
                        "Response payload size exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."
                    ),
                )),
            );
            too_large()
        }
        Body::Broken => broken(),
    }
}

/// `POST .../invocation/{id}/error` with its body read (`header_type`: the
/// `Lambda-Runtime-Function-Error-Type` header).
pub(crate) fn invocation_error(
    state: &ApiState,
    id: &str,
    header_type: Option<String>,
    body: Body,
) -> Reply {
    match read_error(header_type, body) {
        Ok(err) => {
            if let Err(reply) = check_open(state, id) {
                return *reply;
            }
            complete(state, id, Outcome::Error(err));
            accepted()
        }
        Err(reply) => *reply,
    }
}

/// An error body (`{"errorType":..,"errorMessage":..}`), kept as posted.
fn read_error(header_type: Option<String>, body: Body) -> Result<FunctionError, Box<Reply>> {
    let bytes = match body {
        Body::Ok(b) => b,
        Body::TooLarge => return Err(Box::new(too_large())),
        Body::Broken => return Err(Box::new(broken())),
    };
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let error_type = field("errorType")
        .or(header_type)
        .unwrap_or_else(|| "Unhandled".to_string());
    let error_message = field("errorMessage").unwrap_or_default();
    if parsed.is_some() {
        Ok(FunctionError {
            error_type,
            error_message,
            body: bytes,
        })
    } else {
        Ok(FunctionError::new(
            error_type,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    }
}
