//! Untrusted input from enrolled nodes: heartbeats and their device facts, round updates
//! and the adapter deltas they carry, telemetry batches.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_coordinator::{
    api::convert::{facts_from_proto, submission_from_proto},
    registry,
};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = nanofleet_proto::v1::HeartbeatRequest::decode(data) {
        let _ = registry::validate_facts(&facts_from_proto(request.facts));
    }
    if let Ok(update) = nanofleet_proto::v1::RoundUpdate::decode(data) {
        let submission = submission_from_proto(update);
        let _ = nanofleet_federated::AdapterTensors::from_safetensors(&submission.delta);
    }
    if let Ok(batch) = nanofleet_proto::v1::TelemetryBatch::decode(data) {
        use nanofleet_coordinator::fleet_telemetry::{validate, NodeTelemetry};
        if validate(&batch).is_ok() {
            let mut telemetry = NodeTelemetry::default();
            telemetry.apply_batch(&batch);
            let once = telemetry.clone();
            telemetry.apply_batch(&batch);
            assert_eq!(telemetry, once, "a batch applied twice counts once");
            let _ = telemetry.totals();
        }
    }
    let _ = nanofleet_proto::v1::SubscribeRequest::decode(data);
});
