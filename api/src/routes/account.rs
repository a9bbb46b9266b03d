//! GetAccountSettings.

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};

use super::concurrency::{ACCOUNT_CONCURRENCY, reserved_total};
use crate::AppState;
use crate::code::{MAX_UNZIPPED, MAX_ZIPPED};
use crate::error::ApiError;
use crate::model::{FunctionRecord, VersionRecord};
use crate::store::{Reader, Table};

/// Lambda's default code storage per account (75 GB).
const TOTAL_CODE_SIZE: u64 = 80_530_636_800;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/2016-08-19/account-settings", get(get_account_settings))
        .route("/2016-08-19/account-settings/", get(get_account_settings))
}

async fn get_account_settings(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (count, code, reserved) = state.store().read(|r| {
        let functions: Vec<(String, FunctionRecord)> = r.list(Table::Functions, None)?;
        let versions: Vec<(String, VersionRecord)> = r.list(Table::Versions, None)?;
        let code: u64 = functions
            .iter()
            .map(|(_, f)| f.latest.code_size)
            .sum::<u64>()
            + versions
                .iter()
                .map(|(_, v)| v.config.code_size)
                .sum::<u64>();
        Ok::<_, ApiError>((functions.len(), code, reserved_total(r, None)?))
    })?;
    Ok(Json(json!({
        "AccountLimit": {
            "TotalCodeSize": TOTAL_CODE_SIZE,
            "CodeSizeUnzipped": MAX_UNZIPPED,
            "CodeSizeZipped": MAX_ZIPPED,
            "ConcurrentExecutions": ACCOUNT_CONCURRENCY,
            "UnreservedConcurrentExecutions": u64::from(ACCOUNT_CONCURRENCY).saturating_sub(reserved),
        },
        "AccountUsage": { "TotalCodeSize": code, "FunctionCount": count },
    })))
}
