//! Untrusted input from clients without a certificate: the enrollment request, its CSR
//! and its device facts, decoded and checked the way the Enrollment service does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_coordinator::{api::convert::facts_from_proto, pki, registry};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = nanofleet_proto::v1::EnrollRequest::decode(data) {
        let _ = registry::validate_facts(&facts_from_proto(request.facts));
        let _ = pki::parse_csr(&request.csr_pem);
    }
    // The CSR parser also sees raw PEM text.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pki::parse_csr(text);
    }
});
