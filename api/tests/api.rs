//! The Lambda API in process (`tower::ServiceExt::oneshot`): every route group, every error
//! shape, the limits, pagination, SigV4, and persistence across a reopen.

mod common;

use std::time::{Duration, SystemTime};

use axum::http::{Method, StatusCode};
use common::*;
use serde_json::{Value, json};

/// Sends a request that must fail with `status` and `error_type` in Lambda's shape.
async fn expect_error(
    router: &hearth_api::ApiService,
    method: Method,
    path: &str,
    body: Option<Value>,
    status: u16,
    error_type: &str,
) -> Reply {
    let reply = send(router, method, path, body).await;
    reply.assert_error(status, error_type);
    reply
}

#[tokio::test]
async fn create_has_lambda_defaults_then_goes_active() {
    let app = new_app();
    let zip = zip_with(b"#!/bin/sh\necho hi\n");
    let reply = send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(create_body("f1", &zip)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert!(reply.headers.contains_key("x-amzn-requestid"));
    let cfg = reply.json();
    assert_eq!(cfg["FunctionName"], "f1");
    assert_eq!(
        cfg["FunctionArn"],
        "arn:aws:lambda:us-east-1:123456789012:function:f1"
    );
    assert_eq!(cfg["Timeout"], 3);
    assert_eq!(cfg["MemorySize"], 128);
    assert_eq!(cfg["Architectures"], json!(["x86_64"]));
    assert_eq!(cfg["Version"], "$LATEST");
    assert_eq!(cfg["State"], "Pending");
    assert_eq!(cfg["PackageType"], "Zip");
    assert_eq!(cfg["CodeSize"], zip.len());
    let (sha_b64, _) = hearth_api::util::sha256_b64_hex(&zip);
    assert_eq!(cfg["CodeSha256"], sha_b64);
    let active = wait_until(&app, "f1", |c| c["State"] == "Active").await;
    assert_eq!(active["LastUpdateStatus"], "Successful");
    assert_eq!(active["RevisionId"], cfg["RevisionId"]);
}

#[tokio::test]
async fn names_partial_and_full_arns_and_qualifiers() {
    let app = new_app();
    create_active(&app, "named").await;
    for name in [
        "named",
        "123456789012:function:named",
        "arn:aws:lambda:us-east-1:123456789012:function:named",
        "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Anamed",
        "named:$LATEST",
    ] {
        let reply = send(
            &app.router,
            Method::GET,
            &format!("/2015-03-31/functions/{name}"),
            None,
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{name}: {}",
            String::from_utf8_lossy(&reply.bytes)
        );
        assert_eq!(reply.json()["Configuration"]["FunctionName"], "named");
        assert_eq!(reply.json()["Code"]["RepositoryType"], "S3");
    }
    expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/named:1/configuration?Qualifier=2",
        None,
        400,
        "InvalidParameterValueException",
    )
    .await;
    let reply = expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/named/configuration?Qualifier=7",
        None,
        404,
        "ResourceNotFoundException",
    )
    .await;
    assert!(
        reply.json()["Message"]
            .as_str()
            .unwrap()
            .contains("function:named:7")
    );
    expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/arn:aws:lambda:eu-west-1:123456789012:function:named",
        None,
        404,
        "ResourceNotFoundException",
    )
    .await;
    expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/bad%20name",
        None,
        400,
        "ValidationException",
    )
    .await;
}

#[tokio::test]
async fn update_configuration_and_code_with_revision_checks() {
    let app = new_app();
    let cfg = create_active(&app, "upd").await;
    let rev = cfg["RevisionId"].as_str().unwrap().to_string();

    let reply = expect_error(&app.router, Method::PUT, "/2015-03-31/functions/upd/configuration", Some(json!({"Timeout": 30, "MemorySize": 512, "RevisionId": "stale", "Environment": {"Variables": {"AA": "1"}}})), 412, "PreconditionFailedException").await;
    assert!(reply.json()["message"].is_string());

    let reply = send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/upd/configuration",
        Some(json!({"Timeout": 30, "MemorySize": 512, "RevisionId": rev, "Environment": {"Variables": {"AA": "1"}}})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let updated = reply.json();
    assert_eq!(updated["LastUpdateStatus"], "InProgress");
    assert_eq!(updated["Timeout"], 30);
    assert_ne!(updated["RevisionId"], rev);
    let done = wait_until(&app, "upd", |c| c["LastUpdateStatus"] == "Successful").await;
    assert_eq!(done["Environment"]["Variables"]["AA"], "1");
    assert_eq!(done["MemorySize"], 512);

    let new_zip = zip_with(b"new code");
    expect_error(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/upd/code",
        Some(json!({"ZipFile": b64(&new_zip), "RevisionId": "stale"})),
        412,
        "PreconditionFailedException",
    )
    .await;
    let reply = send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/upd/code",
        Some(json!({"ZipFile": b64(&new_zip)})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json()["CodeSha256"],
        hearth_api::util::sha256_b64_hex(&new_zip).0
    );
    wait_until(&app, "upd", |c| c["LastUpdateStatus"] == "Successful").await;

    for (body, error) in [
        (json!({"Timeout": 0}), "ValidationException"),
        (json!({"MemorySize": 64}), "ValidationException"),
        (
            json!({"Environment": {"Variables": {"AWS_REGION": "x"}}}),
            "InvalidParameterValueException",
        ),
        (
            json!({"Environment": {"Variables": {"BIG": "x".repeat(4100)}}}),
            "InvalidParameterValueException",
        ),
        (
            json!({"Runtime": "cobol"}),
            "InvalidParameterValueException",
        ),
        (json!({"Timeout": "soon"}), "InvalidRequestContentException"),
    ] {
        let reply = send(
            &app.router,
            Method::PUT,
            "/2015-03-31/functions/upd/configuration",
            Some(body.clone()),
        )
        .await;
        reply.assert_error(400, error);
    }
}

#[tokio::test]
async fn versions_aliases_and_weighted_routing() {
    let app = new_app();
    create_active(&app, "ver").await;
    let reply = send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/versions",
        Some(json!({})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.json()["Version"], "1");
    assert_eq!(
        reply.json()["FunctionArn"],
        "arn:aws:lambda:us-east-1:123456789012:function:ver:1"
    );
    // Nothing changed: the same version comes back.
    let reply = send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/versions",
        None,
    )
    .await;
    assert_eq!(reply.json()["Version"], "1");
    send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/ver/configuration",
        Some(json!({"Description": "two"})),
    )
    .await;
    wait_until(&app, "ver", |c| c["LastUpdateStatus"] == "Successful").await;
    expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/versions",
        Some(json!({"RevisionId": "x"})),
        412,
        "PreconditionFailedException",
    )
    .await;
    let reply = send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/versions",
        None,
    )
    .await;
    assert_eq!(reply.json()["Version"], "2");

    let reply = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/ver/versions?MaxItems=2",
        None,
    )
    .await;
    let page = reply.json();
    assert_eq!(page["Versions"][0]["Version"], "$LATEST");
    assert_eq!(page["Versions"][1]["Version"], "1");
    let marker = page["NextMarker"].as_str().unwrap().to_string();
    let reply = send(
        &app.router,
        Method::GET,
        &format!("/2015-03-31/functions/ver/versions?Marker={marker}"),
        None,
    )
    .await;
    assert_eq!(reply.json()["Versions"][0]["Version"], "2");

    let alias = json!({"Name": "live", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.25}}});
    let reply = send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/aliases",
        Some(alias.clone()),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    let created = reply.json();
    assert_eq!(
        created["AliasArn"],
        "arn:aws:lambda:us-east-1:123456789012:function:ver:live"
    );
    assert_eq!(
        created["RoutingConfig"]["AdditionalVersionWeights"]["2"],
        0.25
    );
    expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/aliases",
        Some(alias),
        409,
        "ResourceConflictException",
    )
    .await;
    for bad in [
        json!({"Name": "a", "FunctionVersion": "9"}),
        json!({"Name": "b", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"1": 0.5}}}),
        json!({"Name": "c", "FunctionVersion": "$LATEST", "RoutingConfig": {"AdditionalVersionWeights": {"2": 0.5}}}),
        json!({"Name": "d", "FunctionVersion": "1", "RoutingConfig": {"AdditionalVersionWeights": {"2": 1.5}}}),
        json!({"Name": "123", "FunctionVersion": "1"}),
    ] {
        let reply = send(
            &app.router,
            Method::POST,
            "/2015-03-31/functions/ver/aliases",
            Some(bad.clone()),
        )
        .await;
        assert!(reply.status.is_client_error(), "{bad}: {}", reply.status);
    }
    let reply = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/ver/aliases/live",
        None,
    )
    .await;
    assert_eq!(reply.json()["FunctionVersion"], "1");
    let rev = reply.json()["RevisionId"].as_str().unwrap().to_string();
    expect_error(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/ver/aliases/live",
        Some(json!({"RevisionId": "old"})),
        412,
        "PreconditionFailedException",
    )
    .await;
    let reply = send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/ver/aliases/live",
        Some(json!({"RevisionId": rev, "FunctionVersion": "2", "RoutingConfig": {"AdditionalVersionWeights": {}}})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["FunctionVersion"], "2");
    assert!(reply.json().get("RoutingConfig").is_none());

    // DryRun through the alias and through a version.
    expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver:live/invocations",
        None,
        500,
        "ServiceException",
    )
    .await;
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/ver/invocations?Qualifier=live",
        b"{}".to_vec(),
        &[("x-amz-invocation-type", "DryRun")],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.headers["x-amz-executed-version"], "2");

    // A version an alias uses cannot be deleted; the alias can.
    expect_error(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/ver?Qualifier=2",
        None,
        409,
        "ResourceConflictException",
    )
    .await;
    let reply = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/ver/aliases",
        None,
    )
    .await;
    assert_eq!(reply.json()["Aliases"].as_array().unwrap().len(), 1);
    let reply = send(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/ver/aliases/live",
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    expect_error(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/ver/aliases/live",
        None,
        404,
        "ResourceNotFoundException",
    )
    .await;
    let reply = send(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/ver?Qualifier=2",
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    expect_error(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/ver?Qualifier=$LATEST",
        None,
        400,
        "InvalidParameterValueException",
    )
    .await;
}

#[tokio::test]
async fn list_functions_paginates_every_function_once() {
    let app = new_app();
    let mut names: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    for name in &names {
        create_active(&app, name).await;
    }
    let mut seen = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let path = match &marker {
            Some(m) => format!("/2015-03-31/functions?MaxItems=3&Marker={m}"),
            None => "/2015-03-31/functions?MaxItems=3".to_string(),
        };
        let page = send(&app.router, Method::GET, &path, None).await.json();
        let functions = page["Functions"].as_array().unwrap();
        assert!(functions.len() <= 3);
        seen.extend(
            functions
                .iter()
                .map(|f| f["FunctionName"].as_str().unwrap().to_string()),
        );
        match page["NextMarker"].as_str() {
            Some(m) => marker = Some(m.to_string()),
            None => break,
        }
    }
    names.sort();
    assert_eq!(seen, names);
    expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions?MaxItems=0",
        None,
        400,
        "ValidationException",
    )
    .await;
    expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions?Marker=!!",
        None,
        400,
        "InvalidParameterValueException",
    )
    .await;
}

#[tokio::test]
async fn concurrency_routes_and_throttle() {
    let app = new_app();
    create_active(&app, "conc").await;
    let reply = send(
        &app.router,
        Method::GET,
        "/2019-09-30/functions/conc/concurrency",
        None,
    )
    .await;
    assert_eq!(reply.json(), json!({}));
    expect_error(
        &app.router,
        Method::PUT,
        "/2017-10-31/functions/conc/concurrency",
        Some(json!({"ReservedConcurrentExecutions": 901})),
        400,
        "InvalidParameterValueException",
    )
    .await;
    let reply = send(
        &app.router,
        Method::PUT,
        "/2017-10-31/functions/conc/concurrency",
        Some(json!({"ReservedConcurrentExecutions": 0})),
    )
    .await;
    assert_eq!(reply.json(), json!({"ReservedConcurrentExecutions": 0}));
    let reply = send(
        &app.router,
        Method::GET,
        "/2019-09-30/functions/conc/concurrency",
        None,
    )
    .await;
    assert_eq!(reply.json(), json!({"ReservedConcurrentExecutions": 0}));
    let reply = send(
        &app.router,
        Method::GET,
        "/2016-08-19/account-settings",
        None,
    )
    .await;
    assert_eq!(
        reply.json()["AccountLimit"]["UnreservedConcurrentExecutions"],
        1000
    );
    assert_eq!(reply.json()["AccountUsage"]["FunctionCount"], 1);

    // Reserved concurrency 0 throttles every invoke.
    let reply = expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/conc/invocations",
        Some(json!({})),
        429,
        "TooManyRequestsException",
    )
    .await;
    assert_eq!(
        reply.json()["Reason"],
        "ReservedFunctionConcurrentInvocationLimitExceeded"
    );
    assert_eq!(reply.headers["retry-after"], "1");

    let reply = send(
        &app.router,
        Method::DELETE,
        "/2017-10-31/functions/conc/concurrency",
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    let reply = send(
        &app.router,
        Method::GET,
        "/2019-09-30/functions/conc/concurrency",
        None,
    )
    .await;
    assert_eq!(reply.json(), json!({}));
    expect_error(
        &app.router,
        Method::GET,
        "/2017-10-31/functions/conc/concurrency",
        None,
        404,
        "UnknownOperationException",
    )
    .await;
}

#[tokio::test]
async fn event_invoke_config_lifecycle_and_ranges() {
    let app = new_app();
    create_active(&app, "eic").await;
    let path = "/2019-09-25/functions/eic/event-invoke-config";
    let reply = send(&app.router, Method::GET, path, None).await;
    reply.assert_error(404, "ResourceNotFoundException");
    for bad in [
        json!({"MaximumRetryAttempts": 3}),
        json!({"MaximumRetryAttempts": -1}),
        json!({"MaximumEventAgeInSeconds": 59}),
        json!({"MaximumEventAgeInSeconds": 21601}),
    ] {
        send(&app.router, Method::PUT, path, Some(bad))
            .await
            .assert_error(400, "ValidationException");
    }
    let reply = send(
        &app.router,
        Method::PUT,
        path,
        Some(json!({
            "MaximumRetryAttempts": 1,
            "MaximumEventAgeInSeconds": 600,
            "DestinationConfig": {"OnFailure": {"Destination": "arn:aws:sqs:us-east-1:123456789012:dlq"}}
        })),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );
    let row = reply.json();
    assert_eq!(
        row["FunctionArn"],
        "arn:aws:lambda:us-east-1:123456789012:function:eic:$LATEST"
    );
    assert!(row["LastModified"].is_number());
    let reply = send(
        &app.router,
        Method::POST,
        path,
        Some(json!({"MaximumRetryAttempts": 0})),
    )
    .await;
    assert_eq!(reply.json()["MaximumRetryAttempts"], 0);
    assert_eq!(reply.json()["MaximumEventAgeInSeconds"], 600);
    assert_eq!(
        reply.json()["DestinationConfig"]["OnFailure"]["Destination"],
        "arn:aws:sqs:us-east-1:123456789012:dlq"
    );
    let reply = send(&app.router, Method::GET, &format!("{path}/list"), None).await;
    assert_eq!(
        reply.json()["FunctionEventInvokeConfigs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let reply = send(&app.router, Method::DELETE, path, None).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    send(&app.router, Method::GET, path, None)
        .await
        .assert_error(404, "ResourceNotFoundException");
    send(
        &app.router,
        Method::PUT,
        &format!("{path}?Qualifier=9"),
        Some(json!({})),
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn error_shapes_for_routes_bodies_and_conflicts() {
    let app = new_app();
    let reply = send(&app.router, Method::GET, "/2015-03-31/nothing-here", None).await;
    reply.assert_error(404, "UnknownOperationException");
    let reply = send(&app.router, Method::PATCH, "/2015-03-31/functions", None).await;
    reply.assert_error(404, "UnknownOperationException");
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        b"{not json".to_vec(),
        &[],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(400, "InvalidRequestContentException");
    let reply = expect_error(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/missing",
        None,
        404,
        "ResourceNotFoundException",
    )
    .await;
    assert_eq!(
        reply.json()["Message"],
        "Function not found: arn:aws:lambda:us-east-1:123456789012:function:missing"
    );

    create_active(&app, "dup").await;
    expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(create_body("dup", &zip_with(b"x"))),
        409,
        "ResourceConflictException",
    )
    .await;

    let mut body = create_body("badzip", b"not a zip");
    expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(body.clone()),
        400,
        "InvalidParameterValueException",
    )
    .await;
    body["Code"] = json!({"S3Bucket": "bucket", "S3Key": "key.zip"});
    let reply = expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(body.clone()),
        400,
        "InvalidParameterValueException",
    )
    .await;
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("object store")
    );
    let mut body = create_body("arm", &zip_with(b"x"));
    body["Architectures"] = json!(["arm64"]);
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(body),
    )
    .await
    .assert_error(400, "InvalidParameterValueException");
    let mut body = create_body("role", &zip_with(b"x"));
    body["Role"] = json!("not-a-role");
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(body),
    )
    .await
    .assert_error(400, "ValidationException");
}

/// A zip whose central directory declares 300 MB unzipped: refused without extracting.
#[tokio::test]
async fn unzipped_size_limit_uses_the_central_directory() {
    let app = new_app();
    let mut zip = zip_with(b"tiny");
    let declared: u32 = 300_000_000;
    let cd = zip
        .windows(4)
        .position(|w| w == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    zip[cd + 24..cd + 28].copy_from_slice(&declared.to_le_bytes());
    let reply = expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(create_body("bomb", &zip)),
        400,
        "InvalidParameterValueException",
    )
    .await;
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("Unzipped size must be smaller than 262144000 bytes")
    );
}

#[tokio::test]
async fn payload_limits_are_413() {
    let app = new_app();
    create_active(&app, "big").await;
    let sync = vec![b' '; 6 * 1024 * 1024 + 1];
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/big/invocations",
        sync,
        &[],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(413, "RequestEntityTooLargeException");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("6291456 bytes for the InvokeFunction operation")
    );
    let event = vec![b' '; 1024 * 1024 + 1];
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/big/invocations",
        event,
        &[("x-amz-invocation-type", "Event")],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(413, "RequestEntityTooLargeException");
    // Just under the async limit passes the size check (and fails later: no agent).
    let ok = vec![b' '; 1024 * 1024];
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/big/invocations",
        ok,
        &[("x-amz-invocation-type", "Event")],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(500, "ServiceException");
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/big/invocations",
        b"{oops".to_vec(),
        &[],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(400, "InvalidRequestContentException");
    let huge = vec![b' '; 1024 * 1024 + 10];
    let reply = common::send_with(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/big/configuration",
        huge,
        &[],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(413, "RequestEntityTooLargeException");
}

#[tokio::test]
async fn sigv4_good_bad_unknown_skewed_and_missing() {
    let app = new_app();
    let path = "/2015-03-31/functions?MaxItems=5&Marker=";
    let now = SystemTime::now();
    let reply = common::send_with(
        &app.router,
        Method::GET,
        path,
        vec![],
        &[],
        Some((KEY, SECRET, now)),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.bytes)
    );

    let reply = common::send_with(
        &app.router,
        Method::GET,
        path,
        vec![],
        &[],
        Some((KEY, "wrong", now)),
    )
    .await;
    reply.assert_error(403, "InvalidSignatureException");
    let reply = common::send_with(
        &app.router,
        Method::GET,
        path,
        vec![],
        &[],
        Some(("AKIDUNKNOWN", SECRET, now)),
    )
    .await;
    reply.assert_error(403, "UnrecognizedClientException");
    let old = now - Duration::from_secs(6 * 60);
    let reply = common::send_with(
        &app.router,
        Method::GET,
        path,
        vec![],
        &[],
        Some((KEY, SECRET, old)),
    )
    .await;
    reply.assert_error(403, "InvalidSignatureException");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature expired")
    );
    let late = now + Duration::from_secs(6 * 60);
    let reply = common::send_with(
        &app.router,
        Method::GET,
        path,
        vec![],
        &[],
        Some((KEY, SECRET, late)),
    )
    .await;
    reply.assert_error(403, "InvalidSignatureException");
    let within = now - Duration::from_secs(4 * 60);
    let reply = common::send_with(
        &app.router,
        Method::GET,
        path,
        vec![],
        &[],
        Some((KEY, SECRET, within)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = common::send_with(&app.router, Method::GET, path, vec![], &[], None).await;
    reply.assert_error(403, "MissingAuthenticationTokenException");

    // A body changed after signing.
    let body = serde_json::to_vec(&create_body("tamper", &zip_with(b"x"))).unwrap();
    let mut req = axum::http::Request::builder()
        .method(Method::POST)
        .uri("/2015-03-31/functions")
        .header("host", "localhost")
        .body(axum::body::Body::from(body.clone()))
        .unwrap();
    sign_request(&mut req, &body, KEY, SECRET, now);
    let mut tampered = body.clone();
    tampered[2] = b'X';
    let (parts, _) = req.into_parts();
    let req = axum::http::Request::from_parts(parts, axum::body::Body::from(tampered));
    let response = tower::ServiceExt::oneshot(app.router.clone(), req)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        response.headers()["x-amzn-errortype"],
        "InvalidSignatureException"
    );
}

#[tokio::test]
async fn accept_any_key_still_needs_a_signature() {
    let dir = tempfile::tempdir().unwrap();
    let store = hearth_api::Store::open(dir.path()).unwrap();
    let partition = hearth_api::Partition {
        region: REGION.into(),
        account: ACCOUNT.into(),
    };
    let state = hearth_api::AppState::new(
        store,
        hearth_api::Auth::AcceptAnySigned,
        partition,
        std::sync::Arc::new(hearth_api::NoAgent),
    );
    let router = hearth_api::ApiService::new(state);
    let path = "/2016-08-19/account-settings";
    let reply = common::send_with(
        &router,
        Method::GET,
        path,
        vec![],
        &[],
        Some(("ANYKEY", "any", SystemTime::now())),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = common::send_with(&router, Method::GET, path, vec![], &[], None).await;
    reply.assert_error(403, "MissingAuthenticationTokenException");
}

#[tokio::test]
async fn everything_survives_a_reopen_and_delete_removes_it() {
    let app = new_app();
    create_active(&app, "keep").await;
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/keep/versions",
        None,
    )
    .await;
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/keep/aliases",
        Some(json!({"Name": "prod", "FunctionVersion": "1"})),
    )
    .await;
    send(
        &app.router,
        Method::PUT,
        "/2017-10-31/functions/keep/concurrency",
        Some(json!({"ReservedConcurrentExecutions": 5})),
    )
    .await;
    send(
        &app.router,
        Method::PUT,
        "/2019-09-25/functions/keep/event-invoke-config",
        Some(json!({"MaximumRetryAttempts": 2})),
    )
    .await;
    let before = send(&app.router, Method::GET, "/2015-03-31/functions/keep", None)
        .await
        .json();

    // A deleted function's code goes at the next start; code in use stays.
    create_active(&app, "gone").await;
    send(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/gone",
        None,
    )
    .await;
    let code_files = |dir: &std::path::Path| std::fs::read_dir(dir.join("code")).unwrap().count();
    assert_eq!(code_files(app.dir.path()), 2);

    let common::TestApp { router, state, dir } = app;
    drop(router);
    drop(state);
    let app = open_at(dir);
    app.state.collect_garbage();
    assert_eq!(code_files(app.dir.path()), 1);
    let after = send(&app.router, Method::GET, "/2015-03-31/functions/keep", None)
        .await
        .json();
    assert_eq!(before, after);
    assert_eq!(after["Concurrency"]["ReservedConcurrentExecutions"], 5);
    let alias = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/keep/aliases/prod",
        None,
    )
    .await;
    assert_eq!(alias.json()["FunctionVersion"], "1");
    let eic = send(
        &app.router,
        Method::GET,
        "/2019-09-25/functions/keep/event-invoke-config",
        None,
    )
    .await;
    assert_eq!(eic.json()["MaximumRetryAttempts"], 2);
    let v1 = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/keep/configuration?Qualifier=1",
        None,
    )
    .await;
    assert_eq!(v1.json()["Version"], "1");

    let reply = send(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/keep",
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    send(&app.router, Method::GET, "/2015-03-31/functions/keep", None)
        .await
        .assert_error(404, "ResourceNotFoundException");
    send(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/keep",
        None,
    )
    .await
    .assert_error(404, "ResourceNotFoundException");
    // Re-creating the name starts clean.
    create_active(&app, "keep").await;
    let aliases = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/keep/aliases",
        None,
    )
    .await
    .json();
    assert_eq!(aliases["Aliases"], json!([]));
    let versions: Value = send(
        &app.router,
        Method::GET,
        "/2015-03-31/functions/keep/versions",
        None,
    )
    .await
    .json();
    assert_eq!(versions["Versions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn invoke_without_agent_is_a_service_exception_and_pending_is_a_conflict() {
    let app = new_app();
    create_active(&app, "inv").await;
    let reply = expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/inv/invocations",
        Some(json!({"k": 1})),
        500,
        "ServiceException",
    )
    .await;
    assert!(reply.json()["Message"].as_str().unwrap().contains("agent"));
    expect_error(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/nope/invocations",
        Some(json!({})),
        404,
        "ResourceNotFoundException",
    )
    .await;
    let reply = common::send_with(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/inv/invocations",
        vec![],
        &[("x-amz-invocation-type", "Sometimes")],
        Some((KEY, SECRET, SystemTime::now())),
    )
    .await;
    reply.assert_error(400, "ValidationException");
}

/// Invokes read through a cache; every write must show at once.
#[tokio::test]
async fn invoke_sees_every_write_at_once() {
    let app = new_app();
    create_active(&app, "fresh").await;
    let dry_run = |path: &'static str| {
        let router = app.router.clone();
        async move {
            common::send_with(
                &router,
                Method::POST,
                path,
                vec![],
                &[("x-amz-invocation-type", "DryRun")],
                Some((KEY, SECRET, SystemTime::now())),
            )
            .await
        }
    };
    let path = "/2015-03-31/functions/fresh/invocations";
    assert_eq!(dry_run(path).await.status, StatusCode::NO_CONTENT);
    let body = json!({"ReservedConcurrentExecutions": 0});
    send(
        &app.router,
        Method::PUT,
        "/2017-10-31/functions/fresh/concurrency",
        Some(body),
    )
    .await;
    dry_run(path)
        .await
        .assert_error(429, "TooManyRequestsException");
    send(
        &app.router,
        Method::DELETE,
        "/2017-10-31/functions/fresh/concurrency",
        None,
    )
    .await;
    assert_eq!(dry_run(path).await.status, StatusCode::NO_CONTENT);

    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/fresh/versions",
        None,
    )
    .await;
    send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/fresh/configuration",
        Some(json!({"Timeout": 9})),
    )
    .await;
    wait_until(&app, "fresh", |c| c["LastUpdateStatus"] == "Successful").await;
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/fresh/versions",
        None,
    )
    .await;
    let alias = json!({"Name": "cur", "FunctionVersion": "1"});
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions/fresh/aliases",
        Some(alias),
    )
    .await;
    let via_alias = "/2015-03-31/functions/fresh:cur/invocations";
    assert_eq!(
        dry_run(via_alias).await.headers["x-amz-executed-version"],
        "1"
    );
    let update = json!({"FunctionVersion": "2"});
    send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/fresh/aliases/cur",
        Some(update),
    )
    .await;
    assert_eq!(
        dry_run(via_alias).await.headers["x-amz-executed-version"],
        "2"
    );
    // Weighted routing: all-or-nothing weights pick deterministically.
    let weights =
        json!({"FunctionVersion": "2", "RoutingConfig": {"AdditionalVersionWeights": {"1": 1.0}}});
    send(
        &app.router,
        Method::PUT,
        "/2015-03-31/functions/fresh/aliases/cur",
        Some(weights),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            dry_run(via_alias).await.headers["x-amz-executed-version"],
            "1"
        );
    }
    send(
        &app.router,
        Method::DELETE,
        "/2015-03-31/functions/fresh",
        None,
    )
    .await;
    dry_run(path)
        .await
        .assert_error(404, "ResourceNotFoundException");
}

#[tokio::test]
async fn invokes_answer_the_same_directly_and_through_the_router() {
    let app = new_app();
    let zip = zip_with(b"#!/bin/sh\necho hi\n");
    send(
        &app.router,
        Method::POST,
        "/2015-03-31/functions",
        Some(create_body("same", &zip)),
    )
    .await;
    wait_until(&app, "same", |c| c["State"] == "Active").await;
    let router = hearth_api::app(app.state.clone());
    let cases = common::invoke_cases("same", SystemTime::now());
    for (path, body, headers, signer) in cases {
        let direct = common::send_with(
            &app.router,
            Method::POST,
            &path,
            body.clone(),
            &headers,
            signer,
        )
        .await;
        let routed = common::send_with(&router, Method::POST, &path, body, &headers, signer).await;
        assert_eq!(direct.status, routed.status, "{path} {headers:?}");
        assert_eq!(
            direct.headers.get("x-amzn-errortype"),
            routed.headers.get("x-amzn-errortype"),
            "{path} {headers:?}"
        );
        assert_eq!(
            direct.headers.get("x-amz-executed-version"),
            routed.headers.get("x-amz-executed-version"),
            "{path} {headers:?}"
        );
        assert!(direct.headers.contains_key("x-amzn-requestid"));
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).to_string();
        assert_eq!(
            text(&direct.bytes),
            text(&routed.bytes),
            "{path} {headers:?}"
        );
    }
}
