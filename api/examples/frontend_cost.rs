//! Measures the frontend's own cost of a warm sync invoke, in process: SigV4 verification, body
//! read, routing, metadata lookup and response, with an invoker that echoes at once (so the
//! figure excludes the agent and the TCP/HTTP parsing). Prints the median, p99 and throughput.
//!
//! `cargo run --release -p hearth-api --example frontend_cost -- [ITERATIONS]`

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::body::Body;
use axum::http::Request;
use base64::Engine as _;
use hearth_api::{
    ApiError, ApiService, AppState, Auth, InvokeRequest, InvokeResponse, Invoker, Partition, Store,
};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

struct Echo;

impl Invoker for Echo {
    fn invoke(
        &self,
        request: InvokeRequest,
    ) -> Pin<Box<dyn Future<Output = Result<InvokeResponse, ApiError>> + Send + '_>> {
        Box::pin(async move {
            Ok(InvokeResponse {
                payload: request.payload,
                ..Default::default()
            })
        })
    }
}

fn signed(method: &str, path: &str, body: &[u8]) -> Request<Body> {
    let identity = Credentials::new("AKIDBENCH", "bench-secret", None, None, "bench").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("lambda")
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .expect("signing params")
        .into();
    let signable = SignableRequest::new(
        method,
        format!("http://localhost{path}"),
        [("host", "localhost")].into_iter(),
        SignableBody::Bytes(body),
    )
    .expect("signable");
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
    instructions.apply_to_request_http1x(&mut req);
    req
}

fn clone_request(req: &Request<Body>, body: &[u8]) -> Request<Body> {
    let mut out = Request::builder().method(req.method()).uri(req.uri());
    for (k, v) in req.headers() {
        out = out.header(k, v);
    }
    out.body(Body::from(body.to_vec())).expect("request")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "AKIDBENCH bench-secret\n").expect("creds");
    let auth = Auth::from_file(&creds).expect("auth");
    let store = Store::open(&dir.path().join("data")).expect("store");
    let partition = Partition {
        region: "us-east-1".into(),
        account: "000000000000".into(),
    };
    let router = ApiService::new(AppState::new(store, auth, partition, Arc::new(Echo)));

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("bootstrap", zip::write::SimpleFileOptions::default())
        .expect("zip");
    let zip = zip.finish().expect("zip").into_inner();
    let create = serde_json::json!({
        "FunctionName": "echo", "Runtime": "provided.al2023", "Handler": "bootstrap",
        "Role": "arn:aws:iam::000000000000:role/r",
        "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
    });
    let body = serde_json::to_vec(&create).expect("json");
    let response = router
        .clone()
        .oneshot(signed("POST", "/2015-03-31/functions", &body))
        .await
        .expect("create");
    assert_eq!(response.status(), 201);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let payload = br#"{"hello":"world"}"#;
    let template = signed("POST", "/2015-03-31/functions/echo/invocations", payload);
    let mut samples = Vec::with_capacity(iterations);
    let started = Instant::now();
    for i in 0..iterations + 1000 {
        let req = clone_request(&template, payload);
        let t = Instant::now();
        let response = router.clone().oneshot(req).await.expect("invoke");
        let status = response.status();
        let _ = response.into_body().collect().await.expect("body");
        let elapsed = t.elapsed();
        assert_eq!(status, 200);
        if i >= 1000 {
            samples.push(elapsed);
        }
    }
    let total = started.elapsed();
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "frontend cost per warm sync invoke (in process, echo invoker): median {:.1} us, p99 {:.1} us, {:.0} invokes/s on one thread",
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        (iterations + 1000) as f64 / total.as_secs_f64()
    );
}
