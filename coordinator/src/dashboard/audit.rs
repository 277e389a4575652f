//! The audit trail's endpoints: entries by filter, the signed tree head with the log's
//! public key, one entry's canonical bytes with its inclusion proof (so the page checks it
//! itself), and exports in the log's own formats.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use nanofleet_audit::export::{to_csv, to_jsonl, ExportedEntry};
use serde::Deserialize;
use serde_json::{json, Value};

use super::views::ViewError;
use super::{error, Dashboard};
use crate::audit_log::{AuditError, AuditFilter, IndexedEntry, MAX_PAGE};

/// Entries the table shows unless the page asks for fewer (at most [`MAX_PAGE`]).
const DEFAULT_PAGE: usize = 500;
/// Most entries one export holds; a larger one is refused with a hint to filter.
const MAX_EXPORT: usize = 200_000;

pub(super) fn routes() -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/audit", get(entries))
        .route("/audit/head", get(head))
        .route("/audit/proof", get(proof))
        .route("/audit/export", get(export_entries))
}

#[derive(Deserialize, Default)]
struct FilterQuery {
    text: Option<String>,
    action: Option<String>,
    node: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: Option<usize>,
    format: Option<String>,
}

impl FilterQuery {
    fn filter(&self, limit: usize) -> AuditFilter {
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
        AuditFilter {
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            node: nonempty(&self.node),
            action_prefix: nonempty(&self.action),
            text: nonempty(&self.text),
            limit: Some(limit),
        }
    }

    /// Whether any field narrows the listing (a partial export then carries proofs).
    fn narrows(&self) -> bool {
        let f = self.filter(0);
        f.since_ms.is_some()
            || f.until_ms.is_some()
            || f.node.is_some()
            || f.action_prefix.is_some()
            || f.text.is_some()
    }
}

fn entry_view(indexed: &IndexedEntry) -> Value {
    let e = &indexed.entry;
    json!({
        "index": indexed.index,
        "time_ms": e.time_ms(),
        "actor": e.actor().to_string(),
        "action": e.action(),
        "subject": e.subject(),
        "details": e.details(),
    })
}

async fn entries(
    State(dashboard): State<Arc<Dashboard>>,
    Query(query): Query<FilterQuery>,
) -> Result<Json<Value>, ViewError> {
    let filter = query.filter(query.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE));
    let audit = dashboard.audit.clone();
    // The newest entries first: page backwards from the end of the log.
    let (size, found) = tokio::task::spawn_blocking(move || {
        let size = audit.size();
        let found = newest(&audit, size, &filter)?;
        Ok::<_, AuditError>((size, found))
    })
    .await??;
    Ok(Json(json!({
        "size": size,
        "entries": found.iter().map(entry_view).collect::<Vec<_>>(),
    })))
}

/// The last `filter.limit` matching entries among the first `size`, newest first. Reads
/// backwards in windows, so a long log costs the entries near its end, not all of it.
fn newest(
    audit: &crate::audit_log::AuditLog,
    size: u64,
    filter: &AuditFilter,
) -> Result<Vec<IndexedEntry>, AuditError> {
    let limit = filter.limit.unwrap_or(DEFAULT_PAGE);
    let window = MAX_PAGE as u64;
    let mut found = Vec::new();
    let mut end = size;
    while end > 0 && found.len() < limit {
        let start = end.saturating_sub(window);
        let unlimited = AuditFilter {
            limit: Some(MAX_PAGE),
            ..filter.clone()
        };
        let mut page = audit.entries(start, end, &unlimited)?;
        page.reverse();
        found.extend(page.into_iter().take(limit - found.len()));
        end = start;
    }
    Ok(found)
}

async fn head(State(dashboard): State<Arc<Dashboard>>) -> Result<Json<Value>, ViewError> {
    let signed = dashboard.audit.signed_head()?;
    Ok(Json(json!({
        "size": signed.head.size,
        "root": hex::encode(signed.head.root),
        "time_ms": signed.head.time_ms,
        "signature": hex::encode(signed.signature.to_bytes()),
        "public_key": hex::encode(dashboard.audit.public_key().to_bytes()),
    })))
}

#[derive(Deserialize)]
struct ProofQuery {
    index: u64,
    size: u64,
}

async fn proof(
    State(dashboard): State<Arc<Dashboard>>,
    Query(query): Query<ProofQuery>,
) -> Response {
    if query.index >= query.size || query.size > dashboard.audit.size() {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "index {} is not inside a tree of size {} (the log has {})",
                query.index,
                query.size,
                dashboard.audit.size()
            ),
        );
    }
    let audit = dashboard.audit.clone();
    let result = tokio::task::spawn_blocking(move || {
        let entry = audit.entry(query.index)?;
        let proof = audit.inclusion_proof(query.index, query.size)?;
        Ok::<_, AuditError>((entry, proof))
    })
    .await;
    match result {
        Ok(Ok((entry, proof))) => Json(json!({
            "index": query.index,
            "size": query.size,
            "leaf": hex::encode(entry.canonical_bytes()),
            "proof": proof.iter().map(hex::encode).collect::<Vec<_>>(),
        }))
        .into_response(),
        Ok(Err(e)) => ViewError::from(e).into_response(),
        Err(e) => ViewError::from(e).into_response(),
    }
}

async fn export_entries(
    State(dashboard): State<Arc<Dashboard>>,
    Query(query): Query<FilterQuery>,
) -> Response {
    let (csv, extension, content_type) = match query.format.as_deref() {
        Some("csv") => (true, "csv", "text/csv; charset=utf-8"),
        Some("jsonl") | None => (false, "jsonl", "application/x-ndjson"),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("export format {other:?} is not jsonl or csv"),
            )
        }
    };
    // As `nanofleet audit export` does: a filtered export carries a proof per entry,
    // a complete one is checked by recomputing the root.
    let with_proofs = query.narrows();
    let filter = query.filter(MAX_PAGE);
    let audit = dashboard.audit.clone();
    let written = tokio::task::spawn_blocking(move || {
        let head = audit.signed_head()?;
        let size = head.head.size;
        let mut entries: Vec<ExportedEntry> = Vec::new();
        let mut start = 0;
        while start < size {
            let page = audit.export_page(size, start, &filter, with_proofs)?;
            let Some(last) = page.last() else { break };
            start = last.index + 1;
            entries.extend(page);
            if entries.len() > MAX_EXPORT {
                return Ok(None);
            }
        }
        Ok::<_, AuditError>(Some(if csv {
            to_csv(&entries)
        } else {
            to_jsonl(&head, &entries)
        }))
    })
    .await;
    match written {
        Ok(Ok(Some(text))) => {
            let mut response = text.into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            let disposition = format!("attachment; filename=\"nanofleet-audit.{extension}\"");
            headers.insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).expect("ASCII header"),
            );
            response
        }
        Ok(Ok(None)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("more than {MAX_EXPORT} entries match; narrow the export by time, node or action, or use `nanofleet audit export`"),
        ),
        Ok(Err(e)) => ViewError::from(e).into_response(),
        Err(e) => ViewError::from(e).into_response(),
    }
}
