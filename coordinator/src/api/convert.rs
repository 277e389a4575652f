//! Conversions between protocol messages and registry types.

use nanofleet_proto::v1 as pb;

use crate::artifacts::ArtifactRecord;
use crate::events::Event;
use crate::registry::{Accelerator, DeviceFacts, NodeRecord, NodeStatus, PowerSource};
use crate::rollouts::{NodeVerdict, Rollout, RolloutError, RolloutState, Rollouts};

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
                .map(|(node_id, verdict, report)| {
                    let bytes_fetched = report
                        .filter(|r| r.version == rollout.version)
                        .map_or(0, |r| r.bytes_fetched);
                    let (state, reason) = if rollout.rolled_back.contains(&node_id) {
                        ("rolled_back", String::new())
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
    })
}

pub fn event_to_proto(event: &Event) -> pb::Event {
    pb::Event {
        time_unix_ms: event.time_ms,
        actor: event.actor.clone(),
        action: event.action.clone(),
        subject: event.subject.clone(),
        reason: event.reason.clone(),
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
        };
        assert_eq!(facts_from_proto(Some(facts_to_proto(&facts))), facts);
    }
}
