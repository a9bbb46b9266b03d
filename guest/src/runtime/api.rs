//! The Lambda Runtime API (`2018-06-01`) served to the function's runtime on the loopback.
//!
//! hyper 1's HTTP/1 server on the session's current-thread tokio runtime. No header read timeout is
//! set: the only client is the function inside the same sandbox, so a slow client only slows itself
//! (and the host's invoke timeout bounds every invoke).

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

const PREFIX: &str = "/2018-06-01/runtime/";
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

/// Serves the Runtime API on `listener` until the task is dropped.
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
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&state, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "runtime API connection ended");
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, error_type: &str, message: &str) -> Resp {
    json(
        status,
        serde_json::json!({"errorType": error_type, "errorMessage": message}),
    )
}

fn accepted() -> Resp {
    json(StatusCode::ACCEPTED, serde_json::json!({"status": "OK"}))
}

async fn route(state: &ApiState, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["invocation", "next"]) => next(state).await,
        (&Method::POST, ["invocation", id, "response"]) => {
            let id = id.to_string();
            response(state, &id, req).await
        }
        (&Method::POST, ["invocation", id, "error"]) => {
            let id = id.to_string();
            invocation_error(state, &id, req).await
        }
        (&Method::POST, ["init", "error"]) => {
            let err = read_error(req).await;
            match err {
                Ok(err) => {
                    let _ = state.events.send(ApiEvent::InitError(err));
                    accepted()
                }
                Err(resp) => resp,
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
        _ => error(StatusCode::NOT_FOUND, "NotFound", "unknown path"),
    }
}

async fn next(state: &ApiState) -> Resp {
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
    let mut resp = Response::new(Full::new(Bytes::from(invoke.payload)));
    let h = resp.headers_mut();
    let mut put = |name: &'static str, value: &str| {
        if let Ok(v) = hyper::header::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    put("content-type", "application/json");
    put("lambda-runtime-aws-request-id", &invoke.request_id);
    put(
        "lambda-runtime-deadline-ms",
        &invoke.deadline_ms.to_string(),
    );
    put(
        "lambda-runtime-invoked-function-arn",
        &invoke.invoked_function_arn,
    );
    if let Some(v) = &invoke.trace_id {
        put("lambda-runtime-trace-id", v);
    }
    if let Some(v) = &invoke.client_context {
        put("lambda-runtime-client-context", v);
    }
    if let Some(v) = &invoke.cognito_identity {
        put("lambda-runtime-cognito-identity", v);
    }
    resp
}

/// Checks that `id` may still be answered; `Err` is the HTTP answer when it may not.
fn check_open(state: &ApiState, id: &str) -> Result<(), Box<Resp>> {
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

enum Body {
    Ok(Bytes),
    TooLarge,
    Broken,
}

async fn read_body(req: Request<Incoming>) -> Body {
    match Limited::new(req.into_body(), MAX_PAYLOAD).collect().await {
        Ok(collected) => Body::Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Body::TooLarge
        }
        Err(_) => Body::Broken,
    }
}

fn too_large() -> Resp {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        &format!("Exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."),
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

async fn response(state: &ApiState, id: &str, req: Request<Incoming>) -> Resp {
    if let Err(resp) = check_open(state, id) {
        return *resp;
    }
    match read_body(req).await {
        Body::Ok(bytes) => {
            if let Err(resp) = check_open(state, id) {
                return *resp;
            }
            complete(state, id, Outcome::Response(bytes.to_vec()));
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
        Body::Broken => error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "could not read the request body",
        ),
    }
}

async fn invocation_error(state: &ApiState, id: &str, req: Request<Incoming>) -> Resp {
    if let Err(resp) = check_open(state, id) {
        return *resp;
    }
    match read_error(req).await {
        Ok(err) => {
            if let Err(resp) = check_open(state, id) {
                return *resp;
            }
            complete(state, id, Outcome::Error(err));
            accepted()
        }
        Err(resp) => resp,
    }
}

/// Reads an error body (`{"errorType":..,"errorMessage":..}`), keeping it as posted.
async fn read_error(req: Request<Incoming>) -> Result<FunctionError, Resp> {
    let header_type = req
        .headers()
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = match read_body(req).await {
        Body::Ok(b) => b,
        Body::TooLarge => return Err(too_large()),
        Body::Broken => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "InvalidRequest",
                "could not read the request body",
            ));
        }
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
            body: bytes.to_vec(),
        })
    } else {
        Ok(FunctionError::new(
            error_type,
            String::from_utf8_lossy(&bytes).into_owned(),
        ))
    }
}
