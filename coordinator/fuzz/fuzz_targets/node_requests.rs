//! Untrusted input from enrolled nodes: heartbeats and their device facts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_coordinator::{api::convert::facts_from_proto, registry};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = nanofleet_proto::v1::HeartbeatRequest::decode(data) {
        let _ = registry::validate_facts(&facts_from_proto(request.facts));
    }
    let _ = nanofleet_proto::v1::SubscribeRequest::decode(data);
});
