//! CreateFunction, GetFunction, GetFunctionConfiguration, ListFunctions, UpdateFunctionCode,
//! UpdateFunctionConfiguration, DeleteFunction; and the step that takes a function from
//! `Pending`/`InProgress` to `Active`/`Successful`.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::{
    check_revision, function_ref, load_function, not_found, page_response, prefix, resolve,
    sub_key, unqualified, version_key,
};
use crate::AppState;
use crate::body::{LambdaJson, LambdaPath, LambdaQuery};
use crate::code::{self, CodeInfo};
use crate::error::{ApiError, check_range, pattern_error};
use crate::model::{
    ConfigFields, CreateFunctionRequest, EnvironmentResponse, FunctionConfiguration,
    FunctionRecord, ListQuery, QualifierQuery, UpdateFunctionCodeRequest,
    UpdateFunctionConfigurationRequest, VersionRecord,
};
use crate::names::{is_version_number, merge_qualifier};
use crate::store::{Reader, Table};
use crate::util::{lambda_timestamp_now, uuid_v4};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route(
            "/2015-03-31/functions",
            get(list_functions).post(create_function),
        )
        .route(
            "/2015-03-31/functions/",
            get(list_functions).post(create_function),
        )
        .route(
            "/2015-03-31/functions/{name}",
            get(get_function).delete(delete_function),
        )
        .route(
            "/2015-03-31/functions/{name}/configuration",
            get(get_function_configuration).put(update_function_configuration),
        )
        .route(
            "/2015-03-31/functions/{name}/code",
            axum::routing::put(update_function_code),
        )
}

/// Lambda's runtimes (botocore's `Runtime` enum).
const RUNTIMES: &[&str] = &[
    "nodejs",
    "nodejs4.3",
    "nodejs6.10",
    "nodejs8.10",
    "nodejs10.x",
    "nodejs12.x",
    "nodejs14.x",
    "nodejs16.x",
    "nodejs18.x",
    "nodejs20.x",
    "nodejs22.x",
    "nodejs24.x",
    "java8",
    "java8.al2",
    "java11",
    "java17",
    "java21",
    "java25",
    "python2.7",
    "python3.6",
    "python3.7",
    "python3.8",
    "python3.9",
    "python3.10",
    "python3.11",
    "python3.12",
    "python3.13",
    "python3.14",
    "dotnetcore1.0",
    "dotnetcore2.0",
    "dotnetcore2.1",
    "dotnetcore3.1",
    "dotnet6",
    "dotnet8",
    "dotnet10",
    "nodejs4.3-edge",
    "go1.x",
    "ruby2.5",
    "ruby2.7",
    "ruby3.2",
    "ruby3.3",
    "ruby3.4",
    "ruby4.0",
    "provided",
    "provided.al2",
    "provided.al2023",
    "nodejs26.x",
    "python3.15",
    "java8.al2023",
    "java11.al2023",
    "java17.al2023",
    "custom",
];

/// Environment variable names Lambda sets itself and refuses from the user.
const RESERVED_ENV: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

/// The largest environment (its variables as JSON): 4 KB.
pub const MAX_ENVIRONMENT_BYTES: usize = 4096;

const ROLE_PATTERN: &str = "arn:(aws[a-zA-Z-]*)?:iam::\\d{12}:role/?[a-zA-Z_0-9+=,.@\\-_/]+";

fn is_valid_role(role: &str) -> bool {
    let parts: Vec<&str> = role.splitn(6, ':').collect();
    let ["arn", partition, "iam", "", account, resource] = parts.as_slice() else {
        return false;
    };
    partition.starts_with("aws")
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit())
        && resource
            .strip_prefix("role")
            .map(|r| r.strip_prefix('/').unwrap_or(r))
            .is_some_and(|r| {
                !r.is_empty()
                    && r.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_/".contains(c))
            })
}

fn is_valid_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && k.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks environment variables: key pattern, reserved keys, 4 KB in all.
fn check_environment(vars: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for key in vars.keys() {
        if !is_valid_env_key(key) {
            return Err(pattern_error(
                "environment.variables",
                key,
                "[a-zA-Z]([a-zA-Z0-9_])+",
            ));
        }
    }
    let reserved: Vec<&str> = vars
        .keys()
        .map(String::as_str)
        .filter(|k| RESERVED_ENV.contains(k))
        .collect();
    if !reserved.is_empty() {
        return Err(ApiError::InvalidParameterValue(format!(
            "Lambda was unable to configure your environment variables because the environment variables you have provided contains reserved keys that are currently not supported for modification. Reserved keys used in this request: {}",
            reserved.join(", ")
        )));
    }
    let measured = serde_json::to_string(vars).unwrap_or_default();
    if measured.len() > MAX_ENVIRONMENT_BYTES {
        return Err(ApiError::InvalidParameterValue(format!(
            "Lambda was unable to configure your environment variables because the environment variables you have provided exceeded the 4KB limit. String measured: {measured}"
        )));
    }
    Ok(())
}

fn check_architectures(arch: Option<&Vec<String>>) -> Result<(), ApiError> {
    match arch.map(Vec::as_slice) {
        None => Ok(()),
        Some([a]) if a == "x86_64" => Ok(()),
        Some([a]) if a == "arm64" => Err(ApiError::InvalidParameterValue(
            "Hearth runs x86_64 functions only; arm64 is not supported.".into(),
        )),
        Some(other) => Err(ApiError::Validation(format!(
            "1 validation error detected: Value '{other:?}' at 'architectures' failed to satisfy constraint: Member must have length less than or equal to 1, and each member must satisfy enum value set: [x86_64, arm64]"
        ))),
    }
}

/// Applies and checks the configuration fields of Create/UpdateFunctionConfiguration.
fn apply_config(cfg: &mut FunctionConfiguration, fields: ConfigFields) -> Result<(), ApiError> {
    if let Some(runtime) = fields.runtime {
        if !RUNTIMES.contains(&runtime.as_str()) {
            return Err(ApiError::InvalidParameterValue(format!(
                "Value {runtime} at 'runtime' failed to satisfy constraint: Member must satisfy enum value set: {RUNTIMES:?} or be a valid ARN"
            )));
        }
        cfg.runtime = Some(runtime);
    }
    if let Some(role) = fields.role {
        if !is_valid_role(&role) {
            return Err(pattern_error("role", &role, ROLE_PATTERN));
        }
        cfg.role = role;
    }
    if let Some(handler) = fields.handler {
        if handler.len() > 128 || handler.chars().any(char::is_whitespace) {
            return Err(pattern_error("handler", &handler, "[^\\s]+"));
        }
        cfg.handler = Some(handler);
    }
    if let Some(description) = fields.description {
        if description.chars().count() > 256 {
            return Err(ApiError::Validation(
                "1 validation error detected: Value at 'description' failed to satisfy constraint: Member must have length less than or equal to 256".into(),
            ));
        }
        cfg.description = description;
    }
    if let Some(timeout) = fields.timeout {
        check_range("timeout", timeout, 1, 900)?;
        cfg.timeout = timeout as u32;
    }
    if let Some(memory) = fields.memory_size {
        check_range("memorySize", memory, 128, 10240)?;
        cfg.memory_size = memory as u32;
    }
    if let Some(env) = fields.environment {
        let vars = env.variables.unwrap_or_default();
        check_environment(&vars)?;
        cfg.environment = Some(EnvironmentResponse { variables: vars });
    }
    if let Some(tracing) = fields.tracing_config {
        match tracing.get("Mode").and_then(Value::as_str) {
            Some("Active" | "PassThrough") | None => {
                cfg.tracing_config = json!({"Mode": tracing.get("Mode").and_then(Value::as_str).unwrap_or("PassThrough")})
            }
            Some(other) => {
                return Err(pattern_error(
                    "tracingConfig.mode",
                    other,
                    "Active|PassThrough",
                ));
            }
        }
    }
    if let Some(storage) = fields.ephemeral_storage {
        let size = storage.get("Size").and_then(Value::as_i64).unwrap_or(512);
        check_range("ephemeralStorage.size", size, 512, 10240)?;
        cfg.ephemeral_storage = json!({ "Size": size });
    }
    if let Some(logging) = fields.logging_config {
        let mut merged = cfg.logging_config.clone();
        if let (Some(m), Some(l)) = (merged.as_object_mut(), logging.as_object()) {
            for (k, v) in l {
                m.insert(k.clone(), v.clone());
            }
        }
        cfg.logging_config = merged;
    }
    if fields.vpc_config.is_some() {
        cfg.vpc_config = fields.vpc_config;
    }
    if fields.dead_letter_config.is_some() {
        cfg.dead_letter_config = fields.dead_letter_config;
    }
    if fields.kms_key_arn.is_some() {
        cfg.kms_key_arn = fields.kms_key_arn.filter(|k| !k.is_empty());
    }
    if let Some(layers) = fields.layers {
        if !layers.is_empty() {
            return Err(ApiError::InvalidParameterValue(
                "Hearth does not support layers yet.".into(),
            ));
        }
        cfg.layers = None;
    }
    if fields.image_config.is_some() {
        return Err(ApiError::InvalidParameterValue(
            "Hearth does not support container images.".into(),
        ));
    }
    if fields
        .file_system_configs
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(ApiError::InvalidParameterValue(
            "Hearth does not support file system configs.".into(),
        ));
    }
    if let Some(snap) = fields.snap_start
        && snap
            .get("ApplyOn")
            .and_then(Value::as_str)
            .is_some_and(|a| a != "None")
    {
        return Err(ApiError::InvalidParameterValue(
            "Hearth does not support SnapStart settings yet.".into(),
        ));
    }
    Ok(())
}

fn no_object_store() -> ApiError {
    ApiError::InvalidParameterValue(
        "Hearth has no object store configured (hearth serve --object-store-dir or --s3-endpoint): upload the code as ZipFile instead of S3Bucket/S3Key.".into(),
    )
}

/// Decodes, checks and stores a `ZipFile` off the async threads.
async fn accept_zip(
    state: &AppState,
    zip_b64: String,
    dry_run: bool,
) -> Result<CodeInfo, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || code::accept_zip(state.store(), &zip_b64, dry_run))
        .await
        .map_err(|e| ApiError::internal("the code check stopped", &e))?
}

/// Reads `S3Bucket`/`S3Key` from the configured object store (under the zipped code limit, one
/// of the bounded code-upload slots held meanwhile), then checks and stores it like a `ZipFile`.
async fn accept_s3(
    state: &AppState,
    bucket: &str,
    key: &str,
    version: Option<&str>,
    dry_run: bool,
) -> Result<CodeInfo, ApiError> {
    let Some(buckets) = state.buckets() else {
        return Err(no_object_store());
    };
    let _slot = state
        .inner
        .code_uploads
        .acquire()
        .await
        .map_err(|e| ApiError::internal("upload gate closed", &e))?;
    let bytes = buckets.fetch(bucket, key, version).await?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || code::accept_bytes(state.store(), &bytes, dry_run))
        .await
        .map_err(|e| ApiError::internal("the code check stopped", &e))?
}

/// A version's configuration, copied from `$LATEST` at publish time.
pub fn version_config(
    latest: &FunctionConfiguration,
    arn: String,
    version: u64,
    description: Option<String>,
) -> FunctionConfiguration {
    let mut cfg = latest.clone();
    cfg.function_arn = arn;
    cfg.version = version.to_string();
    cfg.revision_id = uuid_v4();
    cfg.state = "Active".into();
    cfg.state_reason = None;
    cfg.state_reason_code = None;
    cfg.last_update_status = "Successful".into();
    cfg.last_update_status_reason = None;
    cfg.last_update_status_reason_code = None;
    if let Some(d) = description {
        cfg.description = d;
    }
    cfg
}

/// Publishes `$LATEST` as the next version inside a write transaction.
pub fn publish_in(
    w: &crate::store::WriteView,
    state: &AppState,
    record: &mut FunctionRecord,
    description: Option<String>,
) -> Result<FunctionConfiguration, ApiError> {
    let name = record.latest.function_name.clone();
    let n = record.last_version + 1;
    let cfg = version_config(
        &record.latest,
        state.partition().qualified_arn(&name, &n.to_string()),
        n,
        description,
    );
    w.put(
        Table::Versions,
        &version_key(&name, n),
        &VersionRecord {
            config: cfg.clone(),
            code_hex: record.code_hex.clone(),
            source_revision: record.latest.revision_id.clone(),
        },
    )?;
    record.last_version = n;
    w.put(Table::Functions, &name, record)?;
    Ok(cfg)
}

async fn create_function(
    State(state): State<AppState>,
    LambdaJson(req): LambdaJson<CreateFunctionRequest>,
) -> Result<Response, ApiError> {
    let fref = function_ref(&state, &req.function_name)?;
    if fref.qualifier.is_some() {
        return Err(ApiError::InvalidParameterValue(
            "Function name cannot include a qualifier on CreateFunction.".into(),
        ));
    }
    let name = fref.name;
    if req.package_type.as_deref().is_some_and(|p| p != "Zip") || req.code.image_uri.is_some() {
        return Err(ApiError::InvalidParameterValue(
            "Hearth does not support container images: use PackageType Zip.".into(),
        ));
    }
    check_architectures(req.architectures.as_ref())?;
    if req.config.role.is_none() {
        return Err(ApiError::InvalidParameterValue(
            "Role must be provided.".into(),
        ));
    }
    if req.config.runtime.is_none() || req.config.handler.is_none() {
        return Err(ApiError::InvalidParameterValue(
            "Runtime and Handler are mandatory parameters for functions created with deployment packages.".into(),
        ));
    }
    let arn = state.partition().function_arn(&name);
    let mut cfg = FunctionConfiguration {
        function_name: name.clone(),
        function_arn: arn.clone(),
        runtime: None,
        role: String::new(),
        handler: None,
        code_size: 0,
        description: String::new(),
        timeout: 3,
        memory_size: 128,
        last_modified: lambda_timestamp_now(),
        code_sha256: String::new(),
        version: "$LATEST".into(),
        environment: None,
        tracing_config: json!({"Mode": "PassThrough"}),
        revision_id: uuid_v4(),
        state: "Pending".into(),
        state_reason: Some("The function is being created.".into()),
        state_reason_code: Some("Creating".into()),
        last_update_status: "InProgress".into(),
        last_update_status_reason: Some("The function is being created.".into()),
        last_update_status_reason_code: Some("Creating".into()),
        package_type: "Zip".into(),
        architectures: vec!["x86_64".into()],
        ephemeral_storage: json!({"Size": 512}),
        snap_start: json!({"ApplyOn": "None", "OptimizationStatus": "Off"}),
        logging_config: json!({"LogFormat": "Text", "LogGroup": format!("/aws/lambda/{name}")}),
        vpc_config: None,
        dead_letter_config: None,
        kms_key_arn: None,
        layers: None,
    };
    apply_config(&mut cfg, req.config)?;
    // Cheap conflict check before the (possibly large) code is decoded.
    if state
        .store()
        .read(|r| r.get::<Value>(Table::Functions, &name))?
        .is_some()
    {
        return Err(ApiError::ResourceConflict(format!(
            "Function already exist: {name}"
        )));
    }
    let version = req.code.s3_object_version;
    let code = match (req.code.zip_file, req.code.s3_bucket, req.code.s3_key) {
        (Some(zip), None, None) if version.is_none() => accept_zip(&state, zip, false).await?,
        (None, Some(bucket), Some(key)) => {
            accept_s3(&state, &bucket, &key, version.as_deref(), false).await?
        }
        _ => {
            return Err(ApiError::InvalidParameterValue(
                "Please provide a source for function code: either Code.ZipFile, or Code.S3Bucket with Code.S3Key.".into(),
            ));
        }
    };
    cfg.code_sha256 = code.sha256_b64.clone();
    cfg.code_size = code.size;
    let mut record = FunctionRecord {
        latest: cfg.clone(),
        code_hex: code.sha256_hex,
        last_version: 0,
        tags: req.tags.unwrap_or_default(),
    };
    let publish = req.publish.unwrap_or(false);
    let response = state.store().write(|w| {
        if w.get::<Value>(Table::Functions, &name)?.is_some() {
            return Err(ApiError::ResourceConflict(format!(
                "Function already exist: {name}"
            )));
        }
        w.put(Table::Functions, &name, &record)?;
        if publish {
            let mut v = publish_in(w, &state, &mut record, None)?;
            v.state = "Pending".into();
            return Ok(v);
        }
        Ok(cfg)
    })?;
    spawn_finish(&state, name);
    Ok((StatusCode::CREATED, Json(response)).into_response())
}

/// Finishes a create or update in the background: checks the stored code object against its
/// hash, then marks the function `Active`/`Successful` (or `Failed`).
fn spawn_finish(state: &AppState, name: String) {
    let state = state.clone();
    tokio::task::spawn_blocking(move || finish(&state, &name));
}

fn finish(state: &AppState, name: &str) {
    let Ok(Some(record)) = state
        .store()
        .read(|r| r.get::<FunctionRecord>(Table::Functions, name))
    else {
        return;
    };
    let code_ok = match state.store().get_code(&record.code_hex) {
        Ok(bytes) => crate::util::sha256_b64_hex(&bytes).1 == record.code_hex,
        Err(err) => {
            tracing::error!(function = name, error = %err, "the function's code object is unreadable");
            false
        }
    };
    let result = state.store().write(|w| {
        let Some(mut record) = w.get::<FunctionRecord>(Table::Functions, name)? else {
            return Ok(());
        };
        let cfg = &mut record.latest;
        if cfg.state != "Pending" && cfg.last_update_status != "InProgress" {
            return Ok(());
        }
        if code_ok {
            cfg.state = "Active".into();
            cfg.state_reason = None;
            cfg.state_reason_code = None;
            cfg.last_update_status = "Successful".into();
            cfg.last_update_status_reason = None;
            cfg.last_update_status_reason_code = None;
        } else {
            let reason =
                "The function's code object is missing or corrupt on this server.".to_string();
            if cfg.state == "Pending" {
                cfg.state = "Failed".into();
                cfg.state_reason = Some(reason.clone());
                cfg.state_reason_code = Some("InternalError".into());
            }
            cfg.last_update_status = "Failed".into();
            cfg.last_update_status_reason = Some(reason);
            cfg.last_update_status_reason_code = Some("InternalError".into());
        }
        w.put(Table::Functions, name, &record)?;
        // A version published together with the create shares the state.
        if record.last_version > 0 {
            let key = version_key(name, record.last_version);
            if let Some(mut v) = w.get::<VersionRecord>(Table::Versions, &key)?
                && v.config.state == "Pending"
            {
                v.config.state = record.latest.state.clone();
                w.put(Table::Versions, &key, &v)?;
            }
        }
        Ok::<_, ApiError>(())
    });
    if let Err(err) = result {
        tracing::error!(function = name, error = %err, "could not finish the function's update");
    }
}

/// Removes code objects no function or version references (start-up).
pub fn collect_unreferenced_code(state: &AppState) {
    let referenced = state.store().read(|r| {
        let functions: Vec<(String, FunctionRecord)> = r.list(Table::Functions, None)?;
        let versions: Vec<(String, VersionRecord)> = r.list(Table::Versions, None)?;
        let mut set: std::collections::HashSet<String> =
            functions.into_iter().map(|(_, f)| f.code_hex).collect();
        set.extend(versions.into_iter().map(|(_, v)| v.code_hex));
        Ok::<_, ApiError>(set)
    });
    match referenced.map(|set| state.store().remove_unreferenced_code(&set)) {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(removed = n, "removed unreferenced code objects"),
        Ok(Err(err)) => tracing::error!(error = %err, "cannot remove unreferenced code objects"),
        Err(err) => tracing::error!(error = %err, "cannot list the code objects in use"),
    }
}

/// Finishes every function left mid-update (start-up).
pub fn finish_all_pending(state: &AppState) {
    let rows: Result<Vec<(String, FunctionRecord)>, ApiError> =
        state.store().read(|r| Ok(r.list(Table::Functions, None)?));
    match rows {
        Ok(rows) => {
            for (name, record) in rows {
                if record.latest.state == "Pending"
                    || record.latest.last_update_status == "InProgress"
                {
                    finish(state, &name);
                }
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot list functions to finish pending updates")
        }
    }
}

async fn get_function(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
) -> Result<Json<Value>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    let qualifier = merge_qualifier(&fref, q.qualifier.as_deref())?;
    let (resolved, concurrency) = state.store().read(|r| {
        let resolved = resolve(r, state.partition(), &fref.name, qualifier.as_deref())?;
        let concurrency: Option<u32> = r.get(Table::Concurrency, &fref.name)?;
        Ok::<_, ApiError>((resolved, concurrency))
    })?;
    let mut config = resolved.config;
    if let Some(alias) = &resolved.alias {
        config.function_arn = alias.alias_arn.clone();
    }
    let location = format!(
        "file://{}",
        state.store().code_path(&resolved.code_hex).display()
    );
    let mut body = json!({
        "Configuration": config,
        "Code": { "RepositoryType": "S3", "Location": location },
    });
    if !resolved.record.tags.is_empty() {
        body["Tags"] = json!(resolved.record.tags);
    }
    if let Some(n) = concurrency {
        body["Concurrency"] = json!({ "ReservedConcurrentExecutions": n });
    }
    Ok(Json(body))
}

async fn get_function_configuration(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    let qualifier = merge_qualifier(&fref, q.qualifier.as_deref())?;
    let resolved = state
        .store()
        .read(|r| resolve(r, state.partition(), &fref.name, qualifier.as_deref()))?;
    let mut config = resolved.config;
    if let Some(alias) = &resolved.alias {
        config.function_arn = alias.alias_arn.clone();
    }
    Ok(Json(config))
}

async fn list_functions(
    State(state): State<AppState>,
    LambdaQuery(q): LambdaQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let all_versions = match q.function_version.as_deref() {
        None => false,
        Some("ALL") => true,
        Some(other) => return Err(pattern_error("functionVersion", other, "ALL")),
    };
    let items = state.store().read(|r| {
        let functions: Vec<(String, FunctionRecord)> = r.list(Table::Functions, None)?;
        let mut items: Vec<(String, FunctionConfiguration)> = Vec::new();
        for (name, record) in functions {
            if all_versions {
                let versions: Vec<(String, VersionRecord)> =
                    r.list(Table::Versions, Some(&prefix(&name)))?;
                items.push((format!("{name}/$LATEST"), record.latest));
                items.extend(versions.into_iter().map(|(k, v)| (k, v.config)));
            } else {
                items.push((name, record.latest));
            }
        }
        Ok::<_, ApiError>(items)
    })?;
    page_response(
        "Functions",
        items,
        q.marker.as_deref(),
        q.max_items.as_deref(),
        10000,
    )
}

async fn update_function_code(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaJson(req): LambdaJson<UpdateFunctionCodeRequest>,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let name = fref.name;
    check_architectures(req.architectures.as_ref())?;
    if req.image_uri.is_some() {
        return Err(ApiError::InvalidParameterValue(
            "Hearth does not support container images.".into(),
        ));
    }
    // Cheap checks before the code is decoded.
    state.store().read(|r| {
        let record = load_function(r, state.partition(), &name)?;
        check_revision(req.revision_id.as_deref(), &record.latest.revision_id)?;
        check_not_in_progress(&record.latest)
    })?;
    let dry_run = req.dry_run.unwrap_or(false);
    let version = req.s3_object_version;
    let code = match (req.zip_file, req.s3_bucket, req.s3_key) {
        (Some(zip), None, None) if version.is_none() => accept_zip(&state, zip, dry_run).await?,
        (None, Some(bucket), Some(key)) => {
            accept_s3(&state, &bucket, &key, version.as_deref(), dry_run).await?
        }
        _ => {
            return Err(ApiError::InvalidParameterValue(
                "Please provide a source for function code: either ZipFile, or S3Bucket with S3Key.".into(),
            ));
        }
    };
    let publish = req.publish.unwrap_or(false);
    let revision = req.revision_id;
    let response = state.store().write(|w| {
        let mut record = load_function(w, state.partition(), &name)?;
        check_revision(revision.as_deref(), &record.latest.revision_id)?;
        check_not_in_progress(&record.latest)?;
        let cfg = &mut record.latest;
        cfg.code_sha256 = code.sha256_b64.clone();
        cfg.code_size = code.size;
        cfg.last_modified = lambda_timestamp_now();
        cfg.revision_id = uuid_v4();
        cfg.last_update_status = "InProgress".into();
        cfg.last_update_status_reason = Some("The function is being updated.".into());
        cfg.last_update_status_reason_code = None;
        record.code_hex = code.sha256_hex.clone();
        if dry_run {
            return Ok(record.latest);
        }
        w.put(Table::Functions, &name, &record)?;
        if publish {
            return publish_in(w, &state, &mut record, None);
        }
        Ok::<_, ApiError>(record.latest)
    })?;
    if !dry_run {
        spawn_finish(&state, name);
    }
    Ok(Json(response))
}

/// Lambda refuses a change while the previous one is still being applied.
pub fn check_not_in_progress(cfg: &FunctionConfiguration) -> Result<(), ApiError> {
    if cfg.last_update_status == "InProgress" || cfg.state == "Pending" {
        return Err(ApiError::ResourceConflict(format!(
            "The operation cannot be performed at this time. An update is in progress for resource: {}",
            cfg.function_arn
        )));
    }
    Ok(())
}

async fn update_function_configuration(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaJson(req): LambdaJson<UpdateFunctionConfigurationRequest>,
) -> Result<Json<FunctionConfiguration>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let name = fref.name;
    let response = state.store().write(|w| {
        let mut record = load_function(w, state.partition(), &name)?;
        check_revision(req.revision_id.as_deref(), &record.latest.revision_id)?;
        check_not_in_progress(&record.latest)?;
        apply_config(&mut record.latest, req.config)?;
        let cfg = &mut record.latest;
        cfg.last_modified = lambda_timestamp_now();
        cfg.revision_id = uuid_v4();
        cfg.last_update_status = "InProgress".into();
        cfg.last_update_status_reason = Some("The function is being updated.".into());
        cfg.last_update_status_reason_code = None;
        w.put(Table::Functions, &name, &record)?;
        Ok::<_, ApiError>(record.latest)
    })?;
    spawn_finish(&state, name);
    Ok(Json(response))
}

async fn delete_function(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
) -> Result<StatusCode, ApiError> {
    let fref = function_ref(&state, &raw)?;
    let qualifier = merge_qualifier(&fref, q.qualifier.as_deref())?;
    let name = fref.name;
    let partition = state.partition().clone();
    state.store().write(|w| {
        load_function(w, &partition, &name)?;
        match qualifier.as_deref() {
            None => {
                w.delete(Table::Functions, &name)?;
                w.delete_prefix(Table::Versions, &prefix(&name))?;
                w.delete_prefix(Table::Aliases, &prefix(&name))?;
                w.delete_prefix(Table::EventInvokeConfigs, &prefix(&name))?;
                w.delete(Table::Concurrency, &name)?;
                Ok(())
            }
            Some("$LATEST") => Err(ApiError::InvalidParameterValue(
                "$LATEST version cannot be deleted without deleting the function.".into(),
            )),
            Some(v) if is_version_number(v) => {
                let n: u64 = v.parse().map_err(|_| not_found(&partition.qualified_arn(&name, v)))?;
                let aliases: Vec<(String, crate::model::AliasConfiguration)> =
                    w.list(Table::Aliases, Some(&prefix(&name)))?;
                let users: Vec<String> = aliases
                    .into_iter()
                    .filter(|(_, a)| {
                        a.function_version == v
                            || a.routing_config.as_ref().is_some_and(|r| r.additional_version_weights.contains_key(v))
                    })
                    .map(|(_, a)| a.alias_arn)
                    .collect();
                if !users.is_empty() {
                    return Err(ApiError::ResourceConflict(format!(
                        "Unable to delete version because the following aliases reference it: {users:?}"
                    )));
                }
                if !w.delete(Table::Versions, &version_key(&name, n))? {
                    return Err(not_found(&partition.qualified_arn(&name, v)));
                }
                w.delete(Table::EventInvokeConfigs, &sub_key(&name, v))?;
                Ok(())
            }
            Some(_) => Err(ApiError::InvalidParameterValue(
                "Deletion of aliases is not supported through DeleteFunction; use DeleteAlias.".into(),
            )),
        }
    })?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_env() {
        assert!(is_valid_role("arn:aws:iam::123456789012:role/lambda-role"));
        assert!(is_valid_role(
            "arn:aws:iam::123456789012:role/service-role/x"
        ));
        assert!(!is_valid_role("arn:aws:iam::12345:role/x"));
        assert!(!is_valid_role("role"));
        let mut vars = BTreeMap::new();
        vars.insert("GOOD_1".to_string(), "v".to_string());
        assert!(check_environment(&vars).is_ok());
        vars.insert("AWS_REGION".to_string(), "v".to_string());
        assert!(matches!(
            check_environment(&vars),
            Err(ApiError::InvalidParameterValue(_))
        ));
        let mut big = BTreeMap::new();
        big.insert("BIG".to_string(), "x".repeat(4100));
        assert!(
            matches!(check_environment(&big), Err(ApiError::InvalidParameterValue(m)) if m.contains("4KB"))
        );
    }
}
