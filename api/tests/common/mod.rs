//! Shared test helpers: an in-process app over a temporary data directory, SigV4 signing with
//! the real `aws-sigv4` signer, and code zips.
#![allow(dead_code)]

use std::io::{Cursor, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use base64::Engine as _;
use hearth_api::{ApiService, AppState, Auth, NoAgent, Partition, Store};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

pub const KEY: &str = "AKIDHEARTHTEST";
pub const SECRET: &str = "hearth-test-secret";
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";
pub const ROLE: &str = "arn:aws:iam::123456789012:role/lambda-role";

pub struct TestApp {
    /// The API as the servers run it (Invoke served directly, the rest by the router).
    pub router: ApiService,
    pub state: AppState,
    pub dir: tempfile::TempDir,
}

pub fn auth() -> Auth {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "# test keys\n{KEY} {SECRET}").unwrap();
    Auth::from_file(file.path()).unwrap()
}

pub fn open_at(dir: tempfile::TempDir) -> TestApp {
    let store = Store::open(dir.path()).unwrap();
    let partition = Partition {
        region: REGION.into(),
        account: ACCOUNT.into(),
    };
    let state = AppState::new(store, auth(), partition, Arc::new(NoAgent));
    state.finish_pending();
    TestApp {
        router: ApiService::new(state.clone()),
        state,
        dir,
    }
}

pub fn new_app() -> TestApp {
    open_at(tempfile::tempdir().unwrap())
}

/// Signs `req` (whose body is `body`) as the AWS SDKs do, with the given key, secret and time.
pub fn sign_request(
    req: &mut Request<Body>,
    body: &[u8],
    key: &str,
    secret: &str,
    time: SystemTime,
) {
    let identity = Credentials::new(key, secret, None, None, "test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("lambda")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let uri = format!("http://localhost{}", req.uri());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
        .collect();
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    instructions.apply_to_request_http1x(req);
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }

    pub fn error_type(&self) -> &str {
        self.headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts a Lambda-shaped error: status, header, `Type` and the message field.
    pub fn assert_error(&self, status: u16, error_type: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.bytes)
        );
        assert_eq!(self.error_type(), error_type);
        let body = self.json();
        assert!(
            body["Type"] == "User" || body["Type"] == "Service",
            "{body}"
        );
        assert!(
            body.get("message")
                .or_else(|| body.get("Message"))
                .is_some_and(Value::is_string),
            "{body}"
        );
        assert!(self.headers.contains_key("x-amzn-requestid"));
    }
}

/// Sends one request through the API (or the bare router); `signer` is (key, secret, time) or
/// None for unsigned.
pub async fn send_with<S>(
    router: &S,
    method: Method,
    path: &str,
    body: Vec<u8>,
    extra_headers: &[(&str, &str)],
    signer: Option<(&str, &str, SystemTime)>,
) -> Reply
where
    S: tower::Service<
            Request<Body>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone,
{
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in extra_headers {
        req = req.header(*k, *v);
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let mut req = req.body(Body::from(body.clone())).unwrap();
    if let Some((key, secret, time)) = signer {
        sign_request(&mut req, &body, key, secret, time);
    }
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        bytes,
    }
}

pub async fn send(router: &ApiService, method: Method, path: &str, body: Option<Value>) -> Reply {
    let bytes = body
        .map(|b| serde_json::to_vec(&b).unwrap())
        .unwrap_or_default();
    send_with(
        router,
        method,
        path,
        bytes,
        &[],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await
}

/// A zip with a `bootstrap` of the given content.
pub fn zip_with(content: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o755);
    w.start_file("bootstrap", options).unwrap();
    w.write_all(content).unwrap();
    w.finish().unwrap().into_inner()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn create_body(name: &str, zip: &[u8]) -> Value {
    serde_json::json!({
        "FunctionName": name,
        "Runtime": "provided.al2023",
        "Role": ROLE,
        "Handler": "bootstrap",
        "Code": { "ZipFile": b64(zip) },
    })
}

/// Creates a function and waits until it is Active.
pub async fn create_active(app: &TestApp, name: &str) -> Value {
    let reply = send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(create_body(name, &zip_with(name.as_bytes()))),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    wait_until(app, name, |c| {
        c["State"] == "Active" && c["LastUpdateStatus"] == "Successful"
    })
    .await
}

/// Polls GetFunctionConfiguration until `done` holds (at most 10 s).
pub async fn wait_until(app: &TestApp, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let reply = send(
            &app.router,
            Method::GET,
            &format!("/2015-03-31/functions/{name}/configuration"),
            None,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let cfg = reply.json();
        if done(&cfg) {
            return cfg;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("function {name} never reached the wanted state");
}

/// One Invoke to send: path, body, extra headers, signer (key, secret, time) or None.
pub type InvokeCase = (
    String,
    Vec<u8>,
    Vec<(&'static str, &'static str)>,
    Option<(&'static str, &'static str, SystemTime)>,
);

/// Invokes of the Active function `name` that together reach every answer of the Invoke path:
/// DryRun (with and without a qualifier), a real invoke, bad JSON, bad invocation and log types,
/// an unknown qualifier, function and name, unsigned, a bad signature, Event, and last a body one
/// byte over the 6 MB limit.
pub fn invoke_cases(name: &str, now: SystemTime) -> Vec<InvokeCase> {
    let signed = Some((KEY, SECRET, now));
    let invoke = format!("/2015-03-31/functions/{name}/invocations");
    let json = || b"{}".to_vec();
    vec![
        (
            invoke.clone(),
            json(),
            vec![("x-amz-invocation-type", "DryRun")],
            signed,
        ),
        (
            format!("{invoke}?Qualifier=%24LATEST"),
            json(),
            vec![("x-amz-invocation-type", "DryRun")],
            signed,
        ),
        (invoke.clone(), json(), vec![], signed),
        (invoke.clone(), b"{not json".to_vec(), vec![], signed),
        (
            invoke.clone(),
            json(),
            vec![("x-amz-invocation-type", "Later")],
            signed,
        ),
        (
            invoke.clone(),
            json(),
            vec![("x-amz-log-type", "All")],
            signed,
        ),
        (format!("{invoke}?Qualifier=nope"), json(), vec![], signed),
        (
            "/2015-03-31/functions/missing/invocations".into(),
            json(),
            vec![],
            signed,
        ),
        (
            "/2015-03-31/functions/bad%20name/invocations".into(),
            json(),
            vec![],
            signed,
        ),
        (invoke.clone(), json(), vec![], None),
        (invoke.clone(), json(), vec![], Some((KEY, "wrong", now))),
        (
            invoke.clone(),
            json(),
            vec![("x-amz-invocation-type", "Event")],
            signed,
        ),
        (invoke, vec![b' '; 6 * 1024 * 1024 + 1], vec![], signed),
    ]
}
