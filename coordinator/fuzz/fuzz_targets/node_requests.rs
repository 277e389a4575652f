//! Untrusted input from enrolled nodes: heartbeats and their device facts, round updates
//! and the adapter deltas they carry.
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
    let _ = nanofleet_proto::v1::SubscribeRequest::decode(data);
});
