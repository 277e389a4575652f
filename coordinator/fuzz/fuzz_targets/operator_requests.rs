//! Operator requests: token creation labels, node ids and revocation reasons.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_coordinator::registry;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = nanofleet_proto::v1::CreateTokenRequest::decode(data) {
        let _ = registry::validate_labels("labels", &request.labels.into_iter().collect());
    }
    let _ = nanofleet_proto::v1::RevokeNodeRequest::decode(data);
    let _ = nanofleet_proto::v1::GetNodeRequest::decode(data);
    let _ = nanofleet_proto::v1::ListNodesRequest::decode(data);
});
