//! The dashboard's read-only JSON endpoints, built from the domain types. Rollout waves
//! come from the same conversion the operator API uses, so the page and `nanofleet rollout
//! status` judge waves alike.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

use super::auth::Session;
use super::{error, Dashboard};
use crate::federations::{FederationRecord, RoundRecord};
use crate::now_unix_ms;
use crate::registry::{NodeRecord, NodeStatus};

pub(super) fn routes() -> Router<Arc<Dashboard>> {
    Router::new()
        .route("/me", get(me))
        .route("/nodes", get(nodes))
        .route("/rollouts", get(rollouts))
        .route("/federations", get(federations))
        .route("/artifacts", get(artifacts))
}

/// A failure to read the coordinator's state, shown to the operator with its reason.
pub(super) struct ViewError(String);

impl<E: std::fmt::Display> From<E> for ViewError {
    fn from(e: E) -> Self {
        ViewError(e.to_string())
    }
}

impl IntoResponse for ViewError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self.0, "dashboard view failed");
        error(StatusCode::INTERNAL_SERVER_ERROR, self.0)
    }
}

type View = Result<Json<Value>, ViewError>;

async fn me(Extension(session): Extension<Session>) -> Json<Value> {
    Json(json!({ "user": session.user }))
}

fn node_view(dashboard: &Dashboard, node: &NodeRecord, now: i64) -> Result<Value, ViewError> {
    let status = match node.status {
        NodeStatus::Revoked => "revoked",
        _ if node.is_online(now, dashboard.heartbeat_interval_secs) => "online",
        _ => "offline",
    };
    let deployments = dashboard.rollouts.deployments();
    let mut artifacts = Vec::new();
    for desired in deployments.desired_of(&node.id)? {
        let report = deployments.report(&node.id, &desired.name)?;
        artifacts.push(json!({
            "name": desired.name,
            "desired": desired.version,
            "pinned": desired.pinned,
            "reported": report.as_ref().map(|r| r.version.clone()),
            "state": report.as_ref().map(|r| r.state.clone()),
            "reason": report.as_ref().map(|r| r.reason.clone()),
        }));
    }
    let f = &node.facts;
    Ok(json!({
        "id": node.id,
        "status": status,
        "hostname": f.hostname,
        "labels": node.labels(),
        "enrolled_at_ms": node.enrolled_at_ms,
        "last_seen_ms": node.last_seen_ms,
        "revoked_reason": node.revoked_reason,
        "agent_version": f.agent_version,
        "os": format!("{} {}", f.os, f.os_version).trim().to_owned(),
        "arch": f.arch,
        "cpu_cores": f.cpu_cores,
        "memory_total_bytes": f.memory_total_bytes,
        "memory_available_bytes": f.memory_available_bytes,
        "accelerators": f.accelerators,
        "inference_device": f.inference_device,
        "power_source": f.power_source,
        "battery_percent": f.battery_percent,
        "charging": f.charging,
        "training_examples": f.training_examples,
        "artifacts": artifacts,
    }))
}

async fn nodes(State(dashboard): State<Arc<Dashboard>>) -> View {
    let now = now_unix_ms();
    let mut nodes = dashboard.registry.nodes()?;
    nodes.sort_by(|a, b| (&a.facts.hostname, &a.id).cmp(&(&b.facts.hostname, &b.id)));
    let views = nodes
        .iter()
        .map(|node| node_view(&dashboard, node, now))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "now_ms": now, "nodes": views })))
}

async fn rollouts(State(dashboard): State<Arc<Dashboard>>) -> View {
    let mut views = Vec::new();
    for rollout in dashboard.rollouts.list()?.iter().rev() {
        let proto = crate::api::convert::rollout_to_proto(rollout, &dashboard.rollouts)?;
        let waves: Vec<Value> = proto
            .waves
            .iter()
            .enumerate()
            .map(|(index, wave)| {
                json!({
                    "number": index + 1,
                    "percent": wave.percent,
                    "state": wave.state,
                    "nodes": wave.nodes.iter().map(|n| json!({
                        "node_id": n.node_id,
                        "state": n.state,
                        "reason": n.reason,
                        "bytes_fetched": n.bytes_fetched,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let gate = &rollout.gate;
        views.push(json!({
            "id": rollout.id,
            "artifact": rollout.artifact(),
            "selector": rollout.selector_text,
            "state": rollout.state.as_str(),
            "reason": rollout.reason,
            "current_wave": rollout.current_wave,
            "created_at_ms": rollout.created_at_ms,
            "created_by": rollout.created_by,
            "gate": {
                "require_smoke": gate.require_smoke,
                "max_error_rate": gate.max_error_rate,
                "max_p95_latency_ms": gate.max_p95_latency_ms,
                "wave_timeout_secs": gate.wave_timeout_secs,
            },
            "rolled_back": rollout.rolled_back,
            "waves": waves,
        }));
    }
    Ok(Json(json!({ "rollouts": views })))
}

fn round_view(round: &RoundRecord) -> Value {
    let (eval_loss, eval_exact_match) = round.eval.means();
    json!({
        "number": round.number,
        "evaluation": round.evaluation,
        "state": round.state,
        "selected": round.selected.len(),
        "reported": round.reported.len(),
        "contributors": round.contributors.len(),
        "declined": round.declined,
        "eligible": round.eligible,
        "secure": round.secure.is_some(),
        "started_ms": round.started_ms,
        "finished_ms": round.finished_ms,
        "reason": round.reason,
        // Held-out metrics of the global adapter this round started from.
        "eval_examples": round.eval.examples,
        "eval_loss": (round.eval.examples > 0).then_some(eval_loss),
        "eval_exact_match": (round.eval.examples > 0).then_some(eval_exact_match),
        "train_loss_first": round.train_first.means().0,
        "train_loss_last": round.train_last.means().0,
        "epsilon": round.epsilon,
        "epsilon_total": round.epsilon_total,
    })
}

fn federation_view(fed: &FederationRecord) -> Value {
    json!({
        "name": fed.name,
        "base": format!("{}@{}", fed.base_name, fed.base_version),
        "state": fed.state.as_str(),
        "reason": fed.reason,
        "rounds": fed.rounds,
        "global_round": fed.global_round,
        "mode": fed.adapter.mode,
        "rank": fed.adapter.rank,
        "secure": fed.secure.is_some(),
        "min_clients": fed.selection.min_clients,
        "max_clients": fed.selection.max_clients,
        "noise_multiplier": fed.privacy.noise_multiplier,
        "distributed_noise": fed.privacy.distributed,
        "epsilon_budget": fed.privacy.epsilon_budget,
        "delta": fed.privacy.delta,
        "epsilon_spent": fed.ledger.as_ref().map_or(0.0, |l| l.spent().epsilon),
        "created_at_ms": fed.created_at_ms,
        "created_by": fed.created_by,
        "history": fed.history.iter().map(round_view).collect::<Vec<_>>(),
    })
}

async fn federations(State(dashboard): State<Arc<Dashboard>>) -> View {
    let feds = dashboard.federations.list()?;
    Ok(Json(json!({
        "federations": feds.iter().rev().map(federation_view).collect::<Vec<_>>()
    })))
}

async fn artifacts(State(dashboard): State<Arc<Dashboard>>) -> View {
    let records = dashboard.artifacts.list()?;
    let views: Vec<Value> = records
        .iter()
        .map(|record| {
            let m = record.manifest();
            json!({
                "name": m.name,
                "version": m.version,
                "kind": m.kind,
                "architecture": m.architecture,
                "quantization": m.quantization,
                "size": m.size,
                "sha256": m.sha256.to_string(),
                "signer_key_ids": record.signer_key_ids,
                "published_at_ms": record.published_at_ms,
                "published_by": record.published_by,
            })
        })
        .collect();
    Ok(Json(json!({ "artifacts": views })))
}
