//! Put/Get/DeleteFunctionConcurrency (their paths carry their own API dates), and the account's
//! concurrency pool they draw from.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde_json::{Value, json};

use super::{function_ref, load_function, unqualified};
use crate::AppState;
use crate::body::{LambdaJson, LambdaPath};
use crate::error::{ApiError, check_range};
use crate::model::PutFunctionConcurrencyRequest;
use crate::store::{Reader, Table};

/// The account's concurrency limit.
pub const ACCOUNT_CONCURRENCY: u32 = 1000;
/// What must stay unreserved.
pub const MIN_UNRESERVED: u32 = 100;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(put_concurrency).delete(delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(get_concurrency),
        )
}

/// The sum of all reservations, except `except`'s.
pub fn reserved_total(r: &impl Reader, except: Option<&str>) -> Result<u64, ApiError> {
    let rows: Vec<(String, u32)> = r.list(Table::Concurrency, None)?;
    Ok(rows
        .iter()
        .filter(|(name, _)| Some(name.as_str()) != except)
        .map(|(_, n)| u64::from(*n))
        .sum())
}

async fn put_concurrency(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaJson(req): LambdaJson<PutFunctionConcurrencyRequest>,
) -> Result<Json<Value>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let Some(n) = req.reserved_concurrent_executions else {
        return Err(ApiError::InvalidParameterValue(
            "ReservedConcurrentExecutions must be provided.".into(),
        ));
    };
    check_range(
        "reservedConcurrentExecutions",
        n,
        0,
        i64::from(ACCOUNT_CONCURRENCY),
    )?;
    let n = n as u32;
    state.store().write(|w| {
        load_function(w, state.partition(), &fref.name)?;
        let others = reserved_total(w, Some(&fref.name))?;
        if others + u64::from(n) > u64::from(ACCOUNT_CONCURRENCY - MIN_UNRESERVED) {
            return Err(ApiError::InvalidParameterValue(format!(
                "Specified ReservedConcurrentExecutions for function decreases account's UnreservedConcurrentExecution below its minimum value of [{MIN_UNRESERVED}]."
            )));
        }
        w.put(Table::Concurrency, &fref.name, &n)?;
        Ok::<_, ApiError>(())
    })?;
    Ok(Json(json!({ "ReservedConcurrentExecutions": n })))
}

async fn get_concurrency(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
) -> Result<Json<Value>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let n = state.store().read(|r| {
        load_function(r, state.partition(), &fref.name)?;
        Ok::<_, ApiError>(r.get::<u32>(Table::Concurrency, &fref.name)?)
    })?;
    Ok(Json(match n {
        Some(n) => json!({ "ReservedConcurrentExecutions": n }),
        None => json!({}),
    }))
}

async fn delete_concurrency(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
) -> Result<StatusCode, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    state.store().write(|w| {
        load_function(w, state.partition(), &fref.name)?;
        w.delete(Table::Concurrency, &fref.name)?;
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}
