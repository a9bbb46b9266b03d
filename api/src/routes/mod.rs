//! The route groups, one module each, merged into one router; and the lookups they share.

pub mod account;
pub mod aliases;
pub mod concurrency;
pub mod event_invoke;
pub mod functions;
pub mod invoke;
pub mod versions;

use axum::Router;
use base64::Engine as _;

use crate::AppState;
use crate::error::{ApiError, check_range};
use crate::model::{AliasConfiguration, FunctionConfiguration, FunctionRecord, VersionRecord};
use crate::names::{FunctionRef, Partition, is_version_number, parse_function_ref};
use crate::store::{Reader, StoreError, Table};

/// Every route of the API.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(functions::routes())
        .merge(versions::routes())
        .merge(aliases::routes())
        .merge(concurrency::routes())
        .merge(event_invoke::routes())
        .merge(account::routes())
        .merge(invoke::routes())
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::internal("the metadata store failed", &err)
    }
}

/// The key of a row that belongs to a function.
pub fn sub_key(name: &str, sub: &str) -> String {
    format!("{name}/{sub}")
}

/// The key of a published version (zero-padded, so keys sort as numbers).
pub fn version_key(name: &str, version: u64) -> String {
    format!("{name}/{version:010}")
}

/// The prefix of all of a function's rows.
pub fn prefix(name: &str) -> String {
    format!("{name}/")
}

pub fn not_found(arn: &str) -> ApiError {
    ApiError::ResourceNotFound(format!("Function not found: {arn}"))
}

/// Parses a path's function name.
pub fn function_ref(state: &AppState, raw: &str) -> Result<FunctionRef, ApiError> {
    parse_function_ref(raw, state.partition())
}

/// A function's row, or Lambda's 404.
pub fn load_function(
    r: &impl Reader,
    partition: &Partition,
    name: &str,
) -> Result<FunctionRecord, ApiError> {
    r.get(Table::Functions, name)?
        .ok_or_else(|| not_found(&partition.function_arn(name)))
}

/// What a qualifier resolved to.
#[derive(Debug)]
pub struct Resolved {
    pub record: FunctionRecord,
    /// The configuration of the version the qualifier names (an alias's primary version).
    pub config: FunctionConfiguration,
    pub code_hex: String,
    pub alias: Option<AliasConfiguration>,
}

/// The configuration of `$LATEST`, a version, or an alias's version.
pub fn resolve(
    r: &impl Reader,
    partition: &Partition,
    name: &str,
    qualifier: Option<&str>,
) -> Result<Resolved, ApiError> {
    let record = load_function(r, partition, name)?;
    match qualifier {
        None | Some("$LATEST") => {
            let config = record.latest.clone();
            let code_hex = record.code_hex.clone();
            Ok(Resolved {
                record,
                config,
                code_hex,
                alias: None,
            })
        }
        Some(q) if is_version_number(q) => {
            let (config, code_hex) = load_version(r, partition, name, q)?;
            Ok(Resolved {
                record,
                config,
                code_hex,
                alias: None,
            })
        }
        Some(q) => {
            let alias: AliasConfiguration = r
                .get(Table::Aliases, &sub_key(name, q))?
                .ok_or_else(|| not_found(&partition.qualified_arn(name, q)))?;
            let (config, code_hex) = if alias.function_version == "$LATEST" {
                (record.latest.clone(), record.code_hex.clone())
            } else {
                load_version(r, partition, name, &alias.function_version)?
            };
            Ok(Resolved {
                record,
                config,
                code_hex,
                alias: Some(alias),
            })
        }
    }
}

/// A published version's configuration and code, or Lambda's 404.
pub fn load_version(
    r: &impl Reader,
    partition: &Partition,
    name: &str,
    version: &str,
) -> Result<(FunctionConfiguration, String), ApiError> {
    let missing = || not_found(&partition.qualified_arn(name, version));
    let n: u64 = version.parse().map_err(|_| missing())?;
    let row: VersionRecord = r
        .get(Table::Versions, &version_key(name, n))?
        .ok_or_else(missing)?;
    Ok((row.config, row.code_hex))
}

/// Rejects a qualifier where the operation only takes the unqualified function.
pub fn unqualified(fref: &FunctionRef) -> Result<(), ApiError> {
    match &fref.qualifier {
        Some(_) => Err(ApiError::InvalidParameterValue(
            "This operation does not support a qualified function name or ARN.".into(),
        )),
        None => Ok(()),
    }
}

/// A `RevisionId` check: 412 when the caller's revision is stale.
pub fn check_revision(given: Option<&str>, current: &str) -> Result<(), ApiError> {
    match given {
        Some(rev) if rev != current => Err(ApiError::PreconditionFailed(
            "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id".into(),
        )),
        _ => Ok(()),
    }
}

/// A List response: one page of `items` (at most `max_items`, 50 by default, `limit_max` at
/// most) under `key`, and `NextMarker` when more follow.
pub fn page_response<T: serde::Serialize>(
    key: &str,
    items: Vec<(String, T)>,
    marker: Option<&str>,
    max_items: Option<&str>,
    limit_max: i64,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let (page, next) = paginate(items, marker, max_items, 50, limit_max)?;
    let page = serde_json::to_value(page).map_err(|e| ApiError::internal("list page", &e))?;
    let mut body = serde_json::Map::new();
    body.insert(key.to_owned(), page);
    if let Some(next) = next {
        body.insert("NextMarker".to_owned(), next.into());
    }
    Ok(axum::Json(serde_json::Value::Object(body)))
}

/// One page of a sorted list: items from `marker` on, at most `max_items`, and the marker of the
/// next page. Markers are opaque (base64 of the next item's key).
pub fn paginate<T>(
    mut items: Vec<(String, T)>,
    marker: Option<&str>,
    max_items: Option<&str>,
    default_max: i64,
    limit_max: i64,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let max = match max_items {
        None => default_max,
        Some(s) => {
            let n: i64 = s.parse().map_err(|_| {
                ApiError::Validation(format!(
                    "1 validation error detected: Value '{s}' at 'maxItems' failed to satisfy constraint: Member must be an integer"
                ))
            })?;
            check_range("maxItems", n, 1, limit_max)?;
            n
        }
    };
    let start_key = match marker {
        None => None,
        Some(m) => {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(m.as_bytes())
                .map_err(|_| ApiError::InvalidParameterValue("Invalid Marker".into()))?;
            Some(
                String::from_utf8(bytes)
                    .map_err(|_| ApiError::InvalidParameterValue("Invalid Marker".into()))?,
            )
        }
    };
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut page = Vec::new();
    let mut next = None;
    for (key, item) in items {
        if start_key.as_deref().is_some_and(|s| key.as_str() < s) {
            continue;
        }
        if page.len() as i64 >= max {
            next = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes()));
            break;
        }
        page.push(item);
    }
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_everything_once() {
        let items: Vec<(String, u32)> = (0..7).map(|i| (format!("k{i}"), i)).collect();
        let mut marker: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) =
                paginate(items.clone(), marker.as_deref(), Some("3"), 50, 10000).unwrap();
            assert!(page.len() <= 3);
            seen.extend(page);
            match next {
                Some(m) => marker = Some(m),
                None => break,
            }
        }
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert!(paginate(items.clone(), None, Some("0"), 50, 10000).is_err());
        assert!(paginate(items, Some("%%%"), None, 50, 10000).is_err());
    }
}
