//! Put/Get/Update/Delete/ListFunctionEventInvokeConfig: the async invoke settings, stored per
//! qualifier for the async queue.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::Value;

use super::{function_ref, load_function, page_response, prefix, resolve, sub_key, unqualified};
use crate::AppState;
use crate::body::{LambdaJson, LambdaPath, LambdaQuery};
use crate::error::{ApiError, check_range};
use crate::model::{
    DestinationConfig, EventInvokeConfigRequest, FunctionEventInvokeConfig, ListQuery,
    QualifierQuery,
};
use crate::names::merge_qualifier;
use crate::store::{Reader, Table};
use crate::util::epoch_seconds_now;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config",
            get(get_config)
                .put(put_config)
                .post(update_config)
                .delete(delete_config),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config/list",
            get(list_configs),
        )
}

fn check_destination(field: &str, d: &crate::model::Destination) -> Result<(), ApiError> {
    match &d.destination {
        None => Ok(()),
        Some(arn) => {
            let service = arn.split(':').nth(2).unwrap_or("");
            if arn.starts_with("arn:aws")
                && arn.len() <= 350
                && ["sqs", "sns", "lambda", "events", "s3"].contains(&service)
            {
                Ok(())
            } else {
                Err(ApiError::InvalidParameterValue(format!(
                    "The destination ARN {arn} at '{field}' is invalid: it must be an SQS queue, SNS topic, Lambda function, EventBridge event bus or S3 bucket ARN."
                )))
            }
        }
    }
}

fn check_request(req: &EventInvokeConfigRequest) -> Result<(), ApiError> {
    if let Some(n) = req.maximum_retry_attempts {
        check_range("maximumRetryAttempts", n, 0, 2)?;
    }
    if let Some(n) = req.maximum_event_age_in_seconds {
        check_range("maximumEventAgeInSeconds", n, 60, 21600)?;
    }
    if let Some(d) = &req.destination_config {
        check_destination("destinationConfig.onSuccess", &d.on_success)?;
        check_destination("destinationConfig.onFailure", &d.on_failure)?;
    }
    Ok(())
}

/// The qualifier the config belongs to (default `$LATEST`), checked to exist.
fn target(
    r: &impl Reader,
    state: &AppState,
    raw: &str,
    query: Option<&str>,
) -> Result<(String, String, String), ApiError> {
    let fref = function_ref(state, raw)?;
    let qualifier = merge_qualifier(&fref, query)?.unwrap_or_else(|| "$LATEST".to_string());
    resolve(r, state.partition(), &fref.name, Some(&qualifier))?;
    let arn = state.partition().qualified_arn(&fref.name, &qualifier);
    Ok((fref.name, qualifier, arn))
}

fn missing(arn: &str) -> ApiError {
    ApiError::ResourceNotFound(format!(
        "The function {arn} doesn't have an EventInvokeConfig"
    ))
}

async fn put_config(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
    LambdaJson(req): LambdaJson<EventInvokeConfigRequest>,
) -> Result<Json<FunctionEventInvokeConfig>, ApiError> {
    check_request(&req)?;
    let row = state.store().write(|w| {
        let (name, qualifier, arn) = target(w, &state, &raw, q.qualifier.as_deref())?;
        let row = FunctionEventInvokeConfig {
            last_modified: epoch_seconds_now(),
            function_arn: arn,
            maximum_retry_attempts: req.maximum_retry_attempts,
            maximum_event_age_in_seconds: req.maximum_event_age_in_seconds,
            destination_config: req.destination_config.clone().unwrap_or_default(),
        };
        w.put(Table::EventInvokeConfigs, &sub_key(&name, &qualifier), &row)?;
        Ok::<_, ApiError>(row)
    })?;
    Ok(Json(row))
}

async fn update_config(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
    LambdaJson(req): LambdaJson<EventInvokeConfigRequest>,
) -> Result<Json<FunctionEventInvokeConfig>, ApiError> {
    check_request(&req)?;
    let row = state.store().write(|w| {
        let (name, qualifier, arn) = target(w, &state, &raw, q.qualifier.as_deref())?;
        let key = sub_key(&name, &qualifier);
        let mut row: FunctionEventInvokeConfig = w
            .get(Table::EventInvokeConfigs, &key)?
            .ok_or_else(|| missing(&arn))?;
        if req.maximum_retry_attempts.is_some() {
            row.maximum_retry_attempts = req.maximum_retry_attempts;
        }
        if req.maximum_event_age_in_seconds.is_some() {
            row.maximum_event_age_in_seconds = req.maximum_event_age_in_seconds;
        }
        if let Some(d) = &req.destination_config {
            let DestinationConfig {
                on_success,
                on_failure,
            } = d.clone();
            if on_success.destination.is_some() {
                row.destination_config.on_success = on_success;
            }
            if on_failure.destination.is_some() {
                row.destination_config.on_failure = on_failure;
            }
        }
        row.last_modified = epoch_seconds_now();
        w.put(Table::EventInvokeConfigs, &key, &row)?;
        Ok::<_, ApiError>(row)
    })?;
    Ok(Json(row))
}

async fn get_config(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
) -> Result<Json<FunctionEventInvokeConfig>, ApiError> {
    let row = state.store().read(|r| {
        let (name, qualifier, arn) = target(r, &state, &raw, q.qualifier.as_deref())?;
        r.get::<FunctionEventInvokeConfig>(Table::EventInvokeConfigs, &sub_key(&name, &qualifier))?
            .ok_or_else(|| missing(&arn))
    })?;
    Ok(Json(row))
}

async fn delete_config(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<QualifierQuery>,
) -> Result<StatusCode, ApiError> {
    state.store().write(|w| {
        let (name, qualifier, arn) = target(w, &state, &raw, q.qualifier.as_deref())?;
        if !w.delete(Table::EventInvokeConfigs, &sub_key(&name, &qualifier))? {
            return Err(missing(&arn));
        }
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_configs(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let items = state.store().read(|r| {
        load_function(r, state.partition(), &fref.name)?;
        let rows: Vec<(String, FunctionEventInvokeConfig)> =
            r.list(Table::EventInvokeConfigs, Some(&prefix(&fref.name)))?;
        Ok::<_, ApiError>(rows)
    })?;
    page_response(
        "FunctionEventInvokeConfigs",
        items,
        q.marker.as_deref(),
        q.max_items.as_deref(),
        50,
    )
}
