//! `/api/v1/suppressions` (routed in `admin::api`): the suppression list,
//! for operators. Listed a
//! page at a time in address order; added to as JSON or imported as text
//! (one address per line); taken off one address at a time.

use actix_web::{web, HttpRequest};
use serde::{Deserialize, Serialize};

use super::{authorize, cut, media_type, read_limited, who, Access, AdminEnv, ApiError};
use crate::suppression::{parse_address, Entry, Scope, Source, Suppressions, MAX_PAGE};

/// Entries per page unless `limit` says otherwise.
const DEFAULT_PAGE: usize = 100;
/// The largest body an import takes: about a million addresses.
const MAX_IMPORT: usize = 64 * 1024 * 1024;
/// Addresses written per call to the list during an import.
const IMPORT_BATCH: usize = 1000;

fn list_of(env: &AdminEnv) -> Result<std::sync::Arc<dyn Suppressions>, ApiError> {
    env.send
        .as_ref()
        .map(|send| send.suppressions.clone())
        .ok_or(ApiError::QueueGone)
}

fn unavailable(error: String) -> ApiError {
    ApiError::Spool(format!("the suppression list cannot be reached: {error}"))
}

/// Whose list a request is about: `account` (an application key or SMTP
/// user), or the global list.
#[derive(Debug, Deserialize)]
pub(super) struct ScopeQuery {
    account: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    reason: Option<String>,
}

/// A page of the list.
#[derive(Debug, Serialize, Deserialize)]
pub struct Page {
    /// `null`: the global list.
    pub account: Option<String>,
    pub entries: Vec<Entry>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

pub(super) async fn list(
    request: HttpRequest,
    query: web::Query<ScopeQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Page>, ApiError> {
    authorize(&env, &request, Access::Read).await?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadQuery(format!(
            "limit={limit}: expected 1 to {MAX_PAGE}"
        )));
    }
    let scope = Scope::of(query.account.as_deref());
    let (entries, more) = list_of(&env)?
        .list(
            &scope,
            query.cursor.as_deref().filter(|c| !c.is_empty()),
            limit,
        )
        .await
        .map_err(unavailable)?;
    let next_cursor = more
        .then(|| entries.last().map(|e| e.address.clone()))
        .flatten();
    Ok(web::Json(Page {
        account: scope.account().map(str::to_string),
        entries,
        next_cursor,
    }))
}

/// The JSON form of an addition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Addition {
    addresses: Vec<String>,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// An address that was not added, and why.
#[derive(Debug, Serialize, Deserialize)]
pub struct Refused {
    pub address: String,
    pub error: String,
}

/// What an addition did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Added {
    /// Addresses that were not on the list before.
    pub added: usize,
    /// Addresses on the list now from this request (new or replaced).
    pub listed: usize,
    pub invalid: Vec<Refused>,
}

/// The addresses of an import: one per line, the first comma-separated
/// column of a CSV line; blank lines and `#` comments skipped, a header
/// line (`email`, `address`) too.
fn import_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split(',').next().unwrap_or("").trim())
        .filter(|a| !a.is_empty() && !a.starts_with('#'))
        .filter(|a| !["email", "address"].contains(&a.to_ascii_lowercase().as_str()))
}

/// `application/json` (`{"addresses": [...], "account", "reason"}`) or
/// `text/plain`, `text/csv` (an import; `account` and `reason` in the
/// query).
pub(super) async fn add(
    request: HttpRequest,
    query: web::Query<ScopeQuery>,
    mut payload: web::Payload,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Added>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let list = list_of(&env)?;
    let Some(body) = read_limited(&mut payload, MAX_IMPORT).await? else {
        return Err(ApiError::BadQuery(format!(
            "more than {MAX_IMPORT} octets: import in parts"
        )));
    };
    let media_type = media_type(&request);
    let text;
    let (addresses, account, reason): (Vec<&str>, Option<String>, Option<String>) =
        match media_type.as_str() {
            "application/json" => {
                let addition: Addition = serde_json::from_slice(&body)
                    .map_err(|e| ApiError::BadQuery(format!("not an addition: {e}")))?;
                text = addition.addresses;
                (
                    text.iter().map(String::as_str).collect(),
                    addition.account,
                    addition.reason,
                )
            }
            "text/plain" | "text/csv" => {
                let lines = std::str::from_utf8(&body)
                    .map_err(|e| ApiError::BadQuery(format!("an import is UTF-8 text: {e}")))?;
                (
                    import_lines(lines).collect(),
                    query.account.clone(),
                    query.reason.clone(),
                )
            }
            other => {
                return Err(ApiError::BadQuery(format!(
                    "Content-Type {:?}: send application/json, text/plain or text/csv",
                    cut(other)
                )))
            }
        };
    let scope = Scope::of(account.as_deref());
    let reason = reason.unwrap_or_else(|| "added by an operator".into());
    let at_ms = crate::now_ms();
    let mut entries = Vec::new();
    let mut invalid = Vec::new();
    for address in addresses {
        match parse_address(address) {
            Ok(address) => entries.push(Entry {
                address,
                reason: reason.clone(),
                source: Source::Api,
                at_ms,
            }),
            Err(error) => invalid.push(Refused {
                address: cut(address),
                error,
            }),
        }
    }
    let listed = entries.len();
    let mut added = 0;
    let mut batches = entries.into_iter().peekable();
    while batches.peek().is_some() {
        let batch: Vec<Entry> = batches.by_ref().take(IMPORT_BATCH).collect();
        added += list.add(&scope, batch).await.map_err(unavailable)?;
    }
    crate::metrics::suppressions_added("api", added);
    tracing::info!(
        operator = who(&operator),
        account = scope.account().unwrap_or("-"),
        added,
        listed,
        invalid = invalid.len(),
        "admin API: addresses added to the suppression list"
    );
    Ok(web::Json(Added {
        added,
        listed,
        invalid,
    }))
}

/// What a removal did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Removed {
    pub address: String,
    pub account: Option<String>,
    pub removed: bool,
}

pub(super) async fn remove(
    request: HttpRequest,
    address: web::Path<String>,
    query: web::Query<ScopeQuery>,
    env: web::Data<AdminEnv>,
) -> Result<web::Json<Removed>, ApiError> {
    let operator = authorize(&env, &request, Access::Write).await?;
    let address = parse_address(&address).map_err(ApiError::BadQuery)?;
    let scope = Scope::of(query.account.as_deref());
    let removed = list_of(&env)?
        .remove(&scope, &address)
        .await
        .map_err(unavailable)?;
    if !removed {
        return Err(ApiError::NotSuppressed(address));
    }
    tracing::info!(
        operator = who(&operator),
        account = scope.account().unwrap_or("-"),
        %address,
        "admin API: address taken off the suppression list"
    );
    Ok(web::Json(Removed {
        address,
        account: scope.account().map(str::to_string),
        removed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_takes_one_address_per_line_or_the_first_csv_column() {
        let text = "email,name\n# bounced in March\na@x.example, Ann\n\n  b@x.example  \nADDRESS\n";
        assert_eq!(
            import_lines(text).collect::<Vec<_>>(),
            ["a@x.example", "b@x.example"]
        );
    }
}
