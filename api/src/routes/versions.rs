//! PublishVersion and ListVersionsByFunction.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use super::functions::{check_not_in_progress, publish_in};
use super::{
    check_revision, function_ref, load_function, page_response, prefix, unqualified, version_key,
};
use crate::AppState;
use crate::body::{LambdaJson, LambdaPath, LambdaQuery};
use crate::error::ApiError;
use crate::model::{ListQuery, PublishVersionRequest, VersionRecord};
use crate::store::{Reader, Table};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route(
        "/2015-03-31/functions/{name}/versions",
        get(list_versions).post(publish_version),
    )
}

async fn publish_version(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaJson(req): LambdaJson<PublishVersionRequest>,
) -> Result<Response, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let name = fref.name;
    let published = state.store().write(|w| {
        let mut record = load_function(w, state.partition(), &name)?;
        check_revision(req.revision_id.as_deref(), &record.latest.revision_id)?;
        check_not_in_progress(&record.latest)?;
        if let Some(sha) = &req.code_sha256
            && sha != &record.latest.code_sha256
        {
            return Err(ApiError::InvalidParameterValue(format!(
                "CodeSHA256 ({sha}) is different from current CodeSHA256 in $LATEST ({}). Please try again with the CodeSHA256 in $LATEST.",
                record.latest.code_sha256
            )));
        }
        // Nothing changed since the last version: Lambda returns that version.
        if record.last_version > 0
            && let Some(last) = w.get::<VersionRecord>(Table::Versions, &version_key(&name, record.last_version))?
            && last.source_revision == record.latest.revision_id
        {
            return Ok::<_, ApiError>((StatusCode::CREATED, last.config));
        }
        let cfg = publish_in(w, &state, &mut record, req.description.clone())?;
        Ok((StatusCode::CREATED, cfg))
    })?;
    Ok((published.0, Json(published.1)).into_response())
}

async fn list_versions(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let name = fref.name;
    let items = state.store().read(|r| {
        let record = load_function(r, state.partition(), &name)?;
        let versions: Vec<(String, VersionRecord)> =
            r.list(Table::Versions, Some(&prefix(&name)))?;
        // `$` sorts before digits, so `$LATEST` comes first as Lambda lists it.
        let mut items = vec![(format!("{name}/$LATEST"), record.latest)];
        items.extend(versions.into_iter().map(|(k, v)| (k, v.config)));
        Ok::<_, ApiError>(items)
    })?;
    page_response(
        "Versions",
        items,
        q.marker.as_deref(),
        q.max_items.as_deref(),
        10000,
    )
}
