//! Secure-aggregation messages from nodes (and, on the node, from the coordinator): the
//! bounded decoders of every stage. What decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_secagg::codec::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode_client_message(data) {
        let again = decode_client_message(&encode_client_message(&message))
            .expect("what decodes re-encodes");
        assert_eq!(again, message);
    }
    let _ = decode_keys(data);
    let _ = decode_shares(data);
    if let Ok(request) = decode_unmask_request(data) {
        assert_eq!(encode_unmask_request(&request), data);
    }
});
