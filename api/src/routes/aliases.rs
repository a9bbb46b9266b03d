//! CreateAlias, GetAlias, ListAliases, UpdateAlias, DeleteAlias, with weighted routing.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use super::{
    check_revision, function_ref, load_function, load_version, page_response, prefix, sub_key,
    unqualified,
};
use crate::AppState;
use crate::body::{LambdaJson, LambdaPath, LambdaQuery};
use crate::error::{ApiError, pattern_error};
use crate::model::{
    AliasConfiguration, AliasRoutingConfiguration, CreateAliasRequest, ListQuery,
    UpdateAliasRequest,
};
use crate::names::{Partition, is_valid_alias_name, is_version_number};
use crate::store::{Reader, Table};
use crate::util::uuid_v4;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route(
            "/2015-03-31/functions/{name}/aliases",
            get(list_aliases).post(create_alias),
        )
        .route(
            "/2015-03-31/functions/{name}/aliases/{alias}",
            get(get_alias).put(update_alias).delete(delete_alias),
        )
}

const ALIAS_PATTERN: &str = "(?!^[0-9]+$)([a-zA-Z0-9-_]+)";

fn check_alias_name(alias: &str) -> Result<(), ApiError> {
    if is_valid_alias_name(alias) {
        Ok(())
    } else {
        Err(pattern_error("name", alias, ALIAS_PATTERN))
    }
}

/// The primary version must exist; a weighted second version must be a different published
/// version with a weight in [0, 1], and the primary cannot be `$LATEST` then.
fn check_target(
    r: &impl Reader,
    partition: &Partition,
    name: &str,
    version: &str,
    routing: Option<&AliasRoutingConfiguration>,
) -> Result<(), ApiError> {
    if version != "$LATEST" {
        if !is_version_number(version) {
            return Err(pattern_error(
                "functionVersion",
                version,
                "(\\$LATEST|[0-9]+)",
            ));
        }
        load_version(r, partition, name, version)?;
    }
    let Some(routing) = routing else {
        return Ok(());
    };
    if routing.additional_version_weights.len() > 1 {
        return Err(ApiError::InvalidParameterValue(
            "Number of items in AdditionalVersionWeights cannot be greater than 1".into(),
        ));
    }
    for (extra, weight) in &routing.additional_version_weights {
        if !weight.is_finite() || !(0.0..=1.0).contains(weight) {
            return Err(ApiError::Validation(format!(
                "1 validation error detected: Value '{weight}' at 'routingConfig.additionalVersionWeights' failed to satisfy constraint: Map value must satisfy constraint: [Member must have value less than or equal to 1.0, Member must have value greater than or equal to 0.0]"
            )));
        }
        if version == "$LATEST" {
            return Err(ApiError::InvalidParameterValue(
                "$LATEST is not supported for an alias pointing to more than 1 version".into(),
            ));
        }
        if extra == version {
            return Err(ApiError::InvalidParameterValue(format!(
                "Invalid function version {extra}. Function version {extra} is already included in routing configuration."
            )));
        }
        if !is_version_number(extra) {
            return Err(ApiError::InvalidParameterValue(format!(
                "Invalid function version {extra}: only published versions can receive additional weight."
            )));
        }
        load_version(r, partition, name, extra)?;
    }
    Ok(())
}

fn alias_not_found(partition: &Partition, name: &str, alias: &str) -> ApiError {
    ApiError::ResourceNotFound(format!(
        "Alias not found: {}",
        partition.qualified_arn(name, alias)
    ))
}

/// An empty routing map is no routing at all.
fn normalize(routing: Option<AliasRoutingConfiguration>) -> Option<AliasRoutingConfiguration> {
    routing.filter(|r| !r.additional_version_weights.is_empty())
}

async fn create_alias(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaJson(req): LambdaJson<CreateAliasRequest>,
) -> Result<Response, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let name = fref.name;
    check_alias_name(&req.name)?;
    let partition = state.partition().clone();
    let alias = state.store().write(|w| {
        load_function(w, &partition, &name)?;
        let key = sub_key(&name, &req.name);
        let arn = partition.qualified_arn(&name, &req.name);
        if w.get::<Value>(Table::Aliases, &key)?.is_some() {
            return Err(ApiError::ResourceConflict(format!(
                "Alias already exists: {arn}"
            )));
        }
        let routing = normalize(req.routing_config);
        check_target(
            w,
            &partition,
            &name,
            &req.function_version,
            routing.as_ref(),
        )?;
        let alias = AliasConfiguration {
            alias_arn: arn,
            name: req.name.clone(),
            function_version: req.function_version.clone(),
            description: req.description.unwrap_or_default(),
            routing_config: routing,
            revision_id: uuid_v4(),
        };
        w.put(Table::Aliases, &key, &alias)?;
        Ok::<_, ApiError>(alias)
    })?;
    Ok((StatusCode::CREATED, Json(alias)).into_response())
}

async fn get_alias(
    State(state): State<AppState>,
    LambdaPath((raw, alias)): LambdaPath<(String, String)>,
) -> Result<Json<AliasConfiguration>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    check_alias_name(&alias)?;
    let partition = state.partition();
    let row = state.store().read(|r| {
        load_function(r, partition, &fref.name)?;
        r.get::<AliasConfiguration>(Table::Aliases, &sub_key(&fref.name, &alias))?
            .ok_or_else(|| alias_not_found(partition, &fref.name, &alias))
    })?;
    Ok(Json(row))
}

async fn list_aliases(
    State(state): State<AppState>,
    LambdaPath(raw): LambdaPath<String>,
    LambdaQuery(q): LambdaQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    let partition = state.partition();
    let items = state.store().read(|r| {
        load_function(r, partition, &fref.name)?;
        let rows: Vec<(String, AliasConfiguration)> =
            r.list(Table::Aliases, Some(&prefix(&fref.name)))?;
        Ok::<_, ApiError>(rows)
    })?;
    let items = match q.function_version.as_deref() {
        Some(v) => items
            .into_iter()
            .filter(|(_, a)| a.function_version == v)
            .collect(),
        None => items,
    };
    page_response(
        "Aliases",
        items,
        q.marker.as_deref(),
        q.max_items.as_deref(),
        10000,
    )
}

async fn update_alias(
    State(state): State<AppState>,
    LambdaPath((raw, alias)): LambdaPath<(String, String)>,
    LambdaJson(req): LambdaJson<UpdateAliasRequest>,
) -> Result<Json<AliasConfiguration>, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    check_alias_name(&alias)?;
    let name = fref.name;
    let partition = state.partition().clone();
    let updated = state.store().write(|w| {
        load_function(w, &partition, &name)?;
        let key = sub_key(&name, &alias);
        let mut row: AliasConfiguration = w
            .get(Table::Aliases, &key)?
            .ok_or_else(|| alias_not_found(&partition, &name, &alias))?;
        check_revision(req.revision_id.as_deref(), &row.revision_id)?;
        if let Some(v) = req.function_version {
            row.function_version = v;
        }
        if let Some(d) = req.description {
            row.description = d;
        }
        if let Some(routing) = req.routing_config {
            row.routing_config = normalize(Some(routing));
        }
        check_target(
            w,
            &partition,
            &name,
            &row.function_version,
            row.routing_config.as_ref(),
        )?;
        row.revision_id = uuid_v4();
        w.put(Table::Aliases, &key, &row)?;
        Ok::<_, ApiError>(row)
    })?;
    Ok(Json(updated))
}

async fn delete_alias(
    State(state): State<AppState>,
    LambdaPath((raw, alias)): LambdaPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let fref = function_ref(&state, &raw)?;
    unqualified(&fref)?;
    check_alias_name(&alias)?;
    let partition = state.partition().clone();
    state.store().write(|w| {
        load_function(w, &partition, &fref.name)?;
        if !w.delete(Table::Aliases, &sub_key(&fref.name, &alias))? {
            return Err(alias_not_found(&partition, &fref.name, &alias));
        }
        w.delete(Table::EventInvokeConfigs, &sub_key(&fref.name, &alias))?;
        Ok::<_, ApiError>(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}
