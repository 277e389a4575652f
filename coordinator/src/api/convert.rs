//! Conversions between protocol messages and registry types.

use nanofleet_proto::v1 as pb;

use crate::artifacts::ArtifactRecord;
use crate::audit_log::{AuditFilter, IndexedEntry};
use crate::federations::{
    Dispatch, FederationRecord, FederationState, MetricSums, Outbound, RoundRecord, RoundState,
    Submission,
};
use crate::registry::{Accelerator, DeviceFacts, NodeRecord, NodeStatus, PowerSource};
use crate::rollouts::{NodeVerdict, Rollout, RolloutError, RolloutState, Rollouts};
use nanofleet_audit::export::ExportedEntry;
use nanofleet_federated::{AdapterSpec, AggregationMode, SpecError, Target, TrainingPlan};

pub fn facts_from_proto(facts: Option<pb::DeviceFacts>) -> DeviceFacts {
    let Some(f) = facts else {
        return DeviceFacts::default();
    };
    let power_source = match pb::PowerSource::try_from(f.power_source) {
        Ok(pb::PowerSource::Mains) => PowerSource::Mains,
        Ok(pb::PowerSource::Battery) => PowerSource::Battery,
        _ => PowerSource::Unknown,
    };
    DeviceFacts {
        arch: f.arch,
        cpu_cores: f.cpu_cores,
        memory_total_bytes: f.memory_total_bytes,
        memory_available_bytes: f.memory_available_bytes,
        accelerators: f
            .accelerators
            .into_iter()
            .map(|a| Accelerator {
                kind: a.kind,
                name: a.name,
                memory_bytes: a.memory_bytes,
            })
            .collect(),
        power_source,
        battery_percent: f.battery_percent,
        charging: f.charging,
        os: f.os,
        os_version: f.os_version,
        agent_version: f.agent_version,
        hostname: f.hostname,
        labels: f.labels.into_iter().collect(),
        training_examples: f.training_examples,
        inference_device: f.inference_device,
    }
}

pub fn facts_to_proto(f: &DeviceFacts) -> pb::DeviceFacts {
    pb::DeviceFacts {
        arch: f.arch.clone(),
        cpu_cores: f.cpu_cores,
        memory_total_bytes: f.memory_total_bytes,
        memory_available_bytes: f.memory_available_bytes,
        accelerators: f
            .accelerators
            .iter()
            .map(|a| pb::Accelerator {
                kind: a.kind.clone(),
                name: a.name.clone(),
                memory_bytes: a.memory_bytes,
            })
            .collect(),
        power_source: match f.power_source {
            PowerSource::Unknown => pb::PowerSource::Unspecified,
            PowerSource::Mains => pb::PowerSource::Mains,
            PowerSource::Battery => pb::PowerSource::Battery,
        } as i32,
        battery_percent: f.battery_percent,
        charging: f.charging,
        os: f.os.clone(),
        os_version: f.os_version.clone(),
        agent_version: f.agent_version.clone(),
        hostname: f.hostname.clone(),
        labels: f.labels.clone().into_iter().collect(),
        training_examples: f.training_examples,
        inference_device: f.inference_device.clone(),
    }
}

pub fn node_to_proto(node: &NodeRecord, now_ms: i64, heartbeat_interval_secs: u32) -> pb::Node {
    pb::Node {
        id: node.id.clone(),
        status: match node.status {
            NodeStatus::Active => pb::NodeStatus::Active,
            NodeStatus::Revoked => pb::NodeStatus::Revoked,
        } as i32,
        labels: node.labels().into_iter().collect(),
        facts: Some(facts_to_proto(&node.facts)),
        enrolled_at_unix_ms: node.enrolled_at_ms,
        last_seen_unix_ms: node.last_seen_ms,
        online: node.is_online(now_ms, heartbeat_interval_secs),
        certificate_sha256: node.cert_sha256.clone(),
        revoked_at_unix_ms: node.revoked_at_ms,
        revoked_reason: node.revoked_reason.clone(),
    }
}

/// A unit enum's serde name ("lora_adapter"), so that the wire says what the manifest says.
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub fn artifact_to_proto(record: &ArtifactRecord) -> pb::Artifact {
    let m = record.manifest();
    pb::Artifact {
        name: m.name.clone(),
        version: m.version.clone(),
        kind: serde_name(&m.kind),
        format: serde_name(&m.format),
        architecture: m.architecture.clone(),
        quantization: m.quantization.clone(),
        size: m.size,
        sha256: m.sha256.to_string(),
        chunk_count: m.chunks.len() as u32,
        license: m.license.clone(),
        signer_key_ids: record.signer_key_ids.clone(),
        published_at_unix_ms: record.published_at_ms,
        published_by: record.published_by.clone(),
        signed_manifest: record.signed.to_json_pretty().into_bytes(),
    }
}

/// A rollout with each wave's nodes and how they stand against the gate.
pub fn rollout_to_proto(
    rollout: &Rollout,
    rollouts: &Rollouts,
) -> Result<pb::Rollout, RolloutError> {
    let mut waves = Vec::with_capacity(rollout.ends.len());
    for (index, percent) in rollout.percents.iter().enumerate() {
        let state = match rollout.current_wave.cmp(&index) {
            std::cmp::Ordering::Greater => "passed",
            std::cmp::Ordering::Less => "waiting",
            std::cmp::Ordering::Equal => match rollout.state {
                RolloutState::Halted => "failed",
                RolloutState::Completed => "passed",
                _ => "running",
            },
        };
        let nodes = if index <= rollout.current_wave.min(rollout.ends.len() - 1) {
            rollouts
                .wave_status(rollout, index)?
                .into_iter()
                .enumerate()
                .map(|(position, (node_id, verdict, report))| {
                    let bytes_fetched = report
                        .filter(|r| r.version == rollout.version)
                        .map_or(0, |r| r.bytes_fetched);
                    // Not yet assigned: the pace has not reached it.
                    let unassigned = index == rollout.current_wave
                        && position >= rollout.wave_assigned
                        && matches!(rollout.state, RolloutState::Running | RolloutState::Paused);
                    let (state, reason) = if rollout.rolled_back.contains(&node_id) {
                        ("rolled_back", String::new())
                    } else if unassigned {
                        ("waiting", String::new())
                    } else {
                        match verdict {
                            NodeVerdict::Pending(what) => (what, String::new()),
                            NodeVerdict::Healthy => ("healthy", String::new()),
                            NodeVerdict::Failed(reason) => ("failed", reason),
                        }
                    };
                    pb::RolloutNode {
                        node_id,
                        state: state.to_owned(),
                        reason,
                        bytes_fetched,
                    }
                })
                .collect()
        } else {
            rollout
                .wave_nodes(index)
                .iter()
                .map(|node_id| pb::RolloutNode {
                    node_id: node_id.clone(),
                    state: "waiting".to_owned(),
                    reason: String::new(),
                    bytes_fetched: 0,
                })
                .collect()
        };
        waves.push(pb::Wave {
            percent: *percent,
            state: state.to_owned(),
            nodes,
        });
    }
    Ok(pb::Rollout {
        id: rollout.id.clone(),
        artifact: rollout.artifact(),
        selector: rollout.selector_text.clone(),
        state: rollout.state.as_str().to_owned(),
        reason: rollout.reason.clone(),
        current_wave: rollout.current_wave as u32,
        waves,
        gate: Some(pb::Gate {
            require_smoke: rollout.gate.require_smoke,
            max_error_rate: rollout.gate.max_error_rate,
            max_p95_latency_ms: rollout.gate.max_p95_latency_ms,
            wave_timeout_secs: rollout.gate.wave_timeout_secs,
        }),
        created_at_unix_ms: rollout.created_at_ms,
        created_by: rollout.created_by.clone(),
        max_per_second: rollout.max_per_second,
    })
}

pub fn event_to_proto(indexed: &IndexedEntry) -> pb::Event {
    let entry = &indexed.entry;
    pb::Event {
        time_unix_ms: entry.time_ms(),
        actor: entry.actor().to_string(),
        action: entry.action().to_owned(),
        subject: entry.subject().to_owned(),
        reason: entry.details().to_owned(),
        index: indexed.index,
    }
}

pub fn tree_head_to_proto(signed: &nanofleet_audit::SignedTreeHead) -> pb::AuditTreeHead {
    pb::AuditTreeHead {
        size: signed.head.size,
        root: signed.head.root.to_vec(),
        time_unix_ms: signed.head.time_ms,
        signature: signed.signature.to_bytes().to_vec(),
    }
}

pub fn audit_leaf_to_proto(exported: &ExportedEntry) -> pb::AuditLeaf {
    pb::AuditLeaf {
        index: exported.index,
        canonical_entry: exported.entry.canonical_bytes(),
        inclusion_proof: exported
            .inclusion_proof
            .iter()
            .flatten()
            .map(|h| h.to_vec())
            .collect(),
    }
}

pub fn audit_filter_from_proto(filter: pb::AuditEntryFilter) -> AuditFilter {
    let text = |s: String| Some(s).filter(|s| !s.is_empty());
    let time = |t: i64| Some(t).filter(|t| *t != 0);
    AuditFilter {
        since_ms: time(filter.since_unix_ms),
        until_ms: time(filter.until_unix_ms),
        node: text(filter.node),
        action_prefix: text(filter.action_prefix),
        text: text(filter.text),
        limit: None,
    }
}

pub fn adapter_spec_from_proto(spec: Option<pb::AdapterSpec>) -> Result<AdapterSpec, SpecError> {
    let spec = spec.unwrap_or_default();
    let mode = match pb::AggregationMode::try_from(spec.mode) {
        Ok(pb::AggregationMode::Exact) => AggregationMode::Exact,
        // FedAvg unless exact is asked for, as in Flower.
        _ => AggregationMode::FedAvg,
    };
    Ok(AdapterSpec {
        rank: spec.rank,
        alpha: spec.alpha,
        dropout: spec.dropout,
        targets: spec
            .targets
            .iter()
            .map(|t| Target::parse(t))
            .collect::<Result<_, _>>()?,
        mode,
        init_seed: spec.init_seed,
    })
}

pub fn adapter_spec_to_proto(spec: &AdapterSpec) -> pb::AdapterSpec {
    pb::AdapterSpec {
        rank: spec.rank,
        alpha: spec.alpha,
        dropout: spec.dropout,
        targets: spec
            .targets
            .iter()
            .map(|t| t.short_name().to_owned())
            .collect(),
        mode: match spec.mode {
            AggregationMode::FedAvg => pb::AggregationMode::Fedavg,
            AggregationMode::Exact => pb::AggregationMode::Exact,
        } as i32,
        init_seed: spec.init_seed,
    }
}

pub fn plan_from_proto(plan: Option<pb::TrainingPlan>) -> TrainingPlan {
    let plan = plan.unwrap_or_default();
    TrainingPlan {
        steps: plan.steps,
        learning_rate: plan.learning_rate,
        batch_size: plan.batch_size,
        max_seq_len: plan.max_seq_len,
        clip_norm: plan.clip_norm,
    }
}

pub fn plan_to_proto(plan: &TrainingPlan) -> pb::TrainingPlan {
    pb::TrainingPlan {
        steps: plan.steps,
        learning_rate: plan.learning_rate,
        batch_size: plan.batch_size,
        max_seq_len: plan.max_seq_len,
        clip_norm: plan.clip_norm,
    }
}

fn metrics_to_proto(sums: &MetricSums) -> pb::EvalMetrics {
    let (loss, exact_match) = sums.means();
    pb::EvalMetrics {
        examples: sums.examples,
        loss,
        exact_match,
    }
}

fn round_to_proto(round: &RoundRecord) -> pb::Round {
    pb::Round {
        evaluation: round.evaluation,
        number: round.number,
        round_id: round.id.clone(),
        state: match round.state {
            RoundState::Collecting => pb::RoundState::Collecting,
            RoundState::Aggregated => pb::RoundState::Aggregated,
            RoundState::Evaluated => pb::RoundState::Evaluated,
            RoundState::Failed => pb::RoundState::Failed,
        } as i32,
        selected: round.selected.len() as u32,
        reported: round.reported.len() as u32,
        contributors: round.contributors.len() as u32,
        declined: round.declined,
        examples: round.examples,
        started_unix_ms: round.started_ms,
        deadline_unix_ms: round.deadline_ms,
        finished_unix_ms: round.finished_ms,
        reason: round.reason.clone(),
        eval: Some(metrics_to_proto(&round.eval)),
        train_loss_first: round.train_first.means().0,
        train_loss_last: round.train_last.means().0,
        secure: round.secure.is_some(),
        epsilon: round.epsilon,
        epsilon_total: round.epsilon_total,
    }
}

pub fn federation_to_proto(fed: &FederationRecord) -> pb::Federation {
    pb::Federation {
        name: fed.name.clone(),
        base_name: fed.base_name.clone(),
        base_version: fed.base_version.clone(),
        adapter: Some(adapter_spec_to_proto(&fed.adapter)),
        selection: Some(pb::SelectionPolicy {
            min_clients: fed.selection.min_clients,
            max_clients: fed.selection.max_clients,
            min_free_memory_bytes: fed.selection.min_free_memory_bytes,
            min_battery_percent: fed.selection.min_battery_percent,
        }),
        plan: Some(plan_to_proto(&fed.plan)),
        rounds: fed.rounds,
        round_timeout_secs: fed.round_timeout_secs,
        max_failed_rounds: fed.max_failed_rounds,
        state: match fed.state {
            FederationState::Idle => pb::FederationState::Idle,
            FederationState::Running => pb::FederationState::Running,
            FederationState::Finished => pb::FederationState::Finished,
            FederationState::Failed => pb::FederationState::Failed,
        } as i32,
        history: fed.history.iter().map(round_to_proto).collect(),
        global_round: fed.global_round,
        reason: fed.reason.clone(),
        plaintext: fed.secure.is_none(),
        secagg: fed.secure.as_ref().map(|s| pb::SecAggOptions {
            group_size: s.group_size,
            stage_timeout_secs: s.stage_timeout_secs,
            weight_cap: s.weight_cap,
        }),
        privacy: Some(pb::PrivacyOptions {
            noise_multiplier: fed.privacy.noise_multiplier,
            distributed: fed.privacy.distributed,
            epsilon_budget: fed.privacy.epsilon_budget,
            delta: fed.privacy.delta,
        }),
        epsilon_spent: fed.ledger.as_ref().map_or(0.0, |l| l.spent().epsilon),
    }
}

/// The `TrainRound` command for one node's share of a round.
fn dispatch_to_command(d: &Dispatch) -> pb::Command {
    pb::Command {
        body: Some(pb::command::Body::Train(pb::TrainRound {
            round_id: d.round_id.clone(),
            federation: d.federation.clone(),
            round: d.round,
            base_name: d.base_name.clone(),
            base_version: d.base_version.clone(),
            base_sha256: d.base_sha256.clone(),
            adapter: Some(adapter_spec_to_proto(&d.adapter)),
            global_adapter: d.global_adapter.as_ref().clone(),
            plan: Some(plan_to_proto(&d.plan)),
            deadline_unix_ms: d.deadline_ms,
            secagg: d.secagg.as_ref().map(|s| pb::SecAggParams {
                client_id: s.client_id,
                num_clients: s.num_clients,
                group_size: s.group_size,
                threshold: s.threshold,
                graph_seed: s.graph_seed.to_vec(),
                round_tag: s.round_tag,
                clipping_range: s.clipping_range,
                quantization_range: s.quantization_range,
                modulus_bits: s.modulus_bits,
                weight_cap: s.weight_cap,
                noise_stddev: s.noise_stddev,
            }),
        })),
    }
}

/// The command for one piece of round work.
pub fn outbound_to_command(outbound: &Outbound) -> pb::Command {
    match outbound {
        Outbound::Train(dispatch) => dispatch_to_command(dispatch),
        Outbound::SecAgg {
            round_id,
            payload,
            deadline_ms,
            ..
        } => pb::Command {
            body: Some(pb::command::Body::Secagg(pb::SecAggStep {
                round_id: round_id.clone(),
                payload: payload.clone(),
                stage_deadline_unix_ms: *deadline_ms,
            })),
        },
    }
}

/// The node an outbound message goes to.
pub fn outbound_node(outbound: &Outbound) -> &str {
    match outbound {
        Outbound::Train(d) => &d.node_id,
        Outbound::SecAgg { node_id, .. } => node_id,
    }
}

/// A node's answer to a round, checked for sizes; the update bytes are checked later.
pub fn submission_from_proto(u: pb::RoundUpdate) -> Submission {
    let eval = u.eval.unwrap_or_default();
    Submission {
        round_id: u.round_id,
        delta: u.delta,
        layout: u
            .layout
            .into_iter()
            .map(|m| (m.name, (m.rows as usize, m.cols as usize)))
            .collect(),
        examples: u.examples,
        declined_reason: u.declined_reason,
        eval_examples: eval.examples,
        eval_loss: eval.loss,
        eval_exact_match: eval.exact_match,
        train_loss_first: u.train_loss_first,
        train_loss_last: u.train_loss_last,
        secagg_advertise: u.secagg_advertise,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_round_trip() {
        let facts = DeviceFacts {
            arch: "aarch64".into(),
            cpu_cores: 4,
            memory_total_bytes: 1 << 30,
            memory_available_bytes: 1 << 29,
            accelerators: vec![Accelerator {
                kind: "cuda".into(),
                name: "H100".into(),
                memory_bytes: 80 << 30,
            }],
            power_source: PowerSource::Battery,
            battery_percent: Some(55.0),
            charging: true,
            os: "linux".into(),
            os_version: "6.1".into(),
            agent_version: "0.1.0".into(),
            hostname: "dev-1".into(),
            labels: [("site".to_owned(), "a".to_owned())].into(),
            training_examples: 120,
            inference_device: "cuda:0 (H100)".into(),
        };
        assert_eq!(facts_from_proto(Some(facts_to_proto(&facts))), facts);
    }
}
