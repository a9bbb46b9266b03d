//! CreateFunction and UpdateFunctionCode with `S3Bucket`/`S3Key` from the local object store
//! (a real directory through `object_store`): the code lands as with `ZipFile`, missing objects
//! and buckets come back as Lambda's GetObject errors, keys cannot leave their bucket, versions
//! are refused, and the zipped and unzipped limits hold.

mod common;

use std::path::Path;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::*;
use hearth_api::buckets::{Buckets, BucketsConfig};
use hearth_api::{AppState, NoAgent, Partition, Store};
use serde_json::{Value, json};

/// An app whose object store is `<tmp>/objects`, with bucket `code-bucket` made.
fn app_with_buckets() -> (TestApp, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(objects.join("code-bucket")).unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let partition = Partition {
        region: REGION.into(),
        account: ACCOUNT.into(),
    };
    let buckets = Buckets::open(&BucketsConfig::Local(objects.clone())).unwrap();
    let state = AppState::new(store, auth(), partition, Arc::new(NoAgent)).with_buckets(buckets);
    let app = TestApp {
        router: hearth_api::ApiService::new(state.clone()),
        state,
        dir,
    };
    (app, objects)
}

fn put_object(objects: &Path, bucket: &str, key: &str, bytes: &[u8]) {
    let path = objects.join(bucket).join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn s3_create_body(name: &str, code: Value) -> Value {
    json!({
        "FunctionName": name,
        "Runtime": "provided.al2023",
        "Role": ROLE,
        "Handler": "bootstrap",
        "Code": code,
    })
}

async fn create_s3(app: &TestApp, name: &str, code: Value) -> Reply {
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(s3_create_body(name, code)),
    )
    .await
}

fn message(reply: &Reply) -> String {
    let body = reply.json();
    body.get("message")
        .or_else(|| body.get("Message"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn create_and_update_from_a_local_bucket() {
    let (app, objects) = app_with_buckets();
    let zip = zip_with(b"#!/bin/sh\necho from s3\n");
    put_object(&objects, "code-bucket", "fns/v1/code.zip", &zip);
    let reply = create_s3(
        &app,
        "from-s3",
        json!({"S3Bucket": "code-bucket", "S3Key": "fns/v1/code.zip"}),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    let (sha_b64, sha_hex) = hearth_api::util::sha256_b64_hex(&zip);
    assert_eq!(reply.json()["CodeSha256"], sha_b64);
    assert_eq!(reply.json()["CodeSize"], zip.len());
    let active = wait_until(&app, "from-s3", |c| c["State"] == "Active").await;
    assert_eq!(active["CodeSha256"], sha_b64);
    // The code is in the code store under its hash, as a ZipFile upload would be.
    assert_eq!(app.state.store().get_code(&sha_hex).unwrap(), zip);

    let zip2 = zip_with(b"#!/bin/sh\necho v2\n");
    put_object(&objects, "code-bucket", "fns/v2/code.zip", &zip2);
    let reply = send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/from-s3/code",
        Some(json!({"S3Bucket": "code-bucket", "S3Key": "fns/v2/code.zip", "Publish": true})),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    let (sha2_b64, _) = hearth_api::util::sha256_b64_hex(&zip2);
    assert_eq!(reply.json()["CodeSha256"], sha2_b64);
    assert_eq!(reply.json()["Version"], "1");
    let updated = wait_until(&app, "from-s3", |c| c["LastUpdateStatus"] == "Successful").await;
    assert_eq!(updated["CodeSha256"], sha2_b64);
    let got = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/from-s3",
        None,
    )
    .await;
    assert_eq!(got.json()["Configuration"]["CodeSha256"], sha2_b64);
}

#[tokio::test]
async fn missing_objects_and_buckets_are_lambdas_get_object_errors() {
    let (app, _objects) = app_with_buckets();
    let reply = create_s3(
        &app,
        "no-key",
        json!({"S3Bucket": "code-bucket", "S3Key": "absent.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert_eq!(
        message(&reply),
        "Error occurred while GetObject. S3 Error Code: NoSuchKey. S3 Error Message: The specified key does not exist."
    );
    let reply = create_s3(
        &app,
        "no-bucket",
        json!({"S3Bucket": "absent-bucket", "S3Key": "x.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(
        message(&reply).contains("S3 Error Code: NoSuchBucket"),
        "{}",
        message(&reply)
    );
    // A key that names a folder is no object either.
    let reply = create_s3(
        &app,
        "a-folder",
        json!({"S3Bucket": "code-bucket", "S3Key": "fns"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    // Nothing was created along the way.
    let list = send(&app.router, Method::GET, "/2015-03-31/functions", None).await;
    assert_eq!(list.json()["Functions"], json!([]));
    // UpdateFunctionCode reports the same.
    create_active(&app, "existing").await;
    let reply = send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/existing/code",
        Some(json!({"S3Bucket": "code-bucket", "S3Key": "absent.zip"})),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(message(&reply).contains("NoSuchKey"));
}

#[tokio::test]
async fn keys_and_buckets_cannot_leave_the_store() {
    let (app, objects) = app_with_buckets();
    let zip = zip_with(b"secret");
    // A file next to the store and one in another bucket.
    std::fs::write(objects.parent().unwrap().join("outside.zip"), &zip).unwrap();
    put_object(&objects, "other-bucket", "x.zip", &zip);
    for key in [
        "../outside.zip",
        "../other-bucket/x.zip",
        "a/../../other-bucket/x.zip",
        "./x.zip",
        "a//b.zip",
    ] {
        let reply = create_s3(
            &app,
            "escape",
            json!({"S3Bucket": "code-bucket", "S3Key": key}),
        )
        .await;
        reply.assert_error(400, "InvalidParameterValueException");
        assert!(
            message(&reply).contains("S3Key"),
            "{key}: {}",
            message(&reply)
        );
    }
    for bucket in ["..", "../objects", "a/b", "x.", "ab"] {
        let reply = create_s3(
            &app,
            "escape",
            json!({"S3Bucket": bucket, "S3Key": "x.zip"}),
        )
        .await;
        reply.assert_error(400, "ValidationException");
    }
    // A link inside the bucket that leads out of it.
    std::os::unix::fs::symlink(
        objects.parent().unwrap().join("outside.zip"),
        objects.join("code-bucket/link.zip"),
    )
    .unwrap();
    let reply = create_s3(
        &app,
        "escape",
        json!({"S3Bucket": "code-bucket", "S3Key": "link.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(message(&reply).contains("outside its bucket"));
}

#[tokio::test]
async fn object_versions_are_refused_by_the_local_store() {
    let (app, objects) = app_with_buckets();
    put_object(&objects, "code-bucket", "x.zip", &zip_with(b"x"));
    let reply = create_s3(
        &app,
        "versioned",
        json!({"S3Bucket": "code-bucket", "S3Key": "x.zip", "S3ObjectVersion": "3"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(message(&reply).contains("S3ObjectVersion"));
}

#[tokio::test]
async fn s3_code_has_the_zipped_and_unzipped_limits() {
    let (app, objects) = app_with_buckets();
    // 50 MB + 1 byte, sparse: refused from its size, never read whole.
    let big = objects.join("code-bucket/big.zip");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(hearth_api::code::MAX_ZIPPED as u64 + 1)
        .unwrap();
    let reply = create_s3(
        &app,
        "big",
        json!({"S3Bucket": "code-bucket", "S3Key": "big.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(message(&reply).contains("Zipped size must be smaller than 52428800 bytes"));
    // A zip whose central directory declares 300 MB unzipped.
    let mut zip = zip_with(b"tiny");
    let cd = zip
        .windows(4)
        .position(|w| w == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    zip[cd + 24..cd + 28].copy_from_slice(&300_000_000u32.to_le_bytes());
    put_object(&objects, "code-bucket", "bomb.zip", &zip);
    let reply = create_s3(
        &app,
        "bomb",
        json!({"S3Bucket": "code-bucket", "S3Key": "bomb.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(message(&reply).contains("Unzipped size must be smaller than 262144000 bytes"));
    // Not a zip at all.
    put_object(&objects, "code-bucket", "text.zip", b"not a zip");
    let reply = create_s3(
        &app,
        "text",
        json!({"S3Bucket": "code-bucket", "S3Key": "text.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
}

#[tokio::test]
async fn without_an_object_store_s3_code_is_refused() {
    let app = new_app();
    let reply = create_s3(
        &app,
        "nostore",
        json!({"S3Bucket": "code-bucket", "S3Key": "x.zip"}),
    )
    .await;
    reply.assert_error(400, "InvalidParameterValueException");
    assert!(message(&reply).contains("no object store"));
}
