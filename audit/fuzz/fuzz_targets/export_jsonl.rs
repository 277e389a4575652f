//! `nanofleet audit verify` reads exports from anywhere: parsing arbitrary text as a JSONL
//! export and checking whatever parses against a fixed key must never panic.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use nanofleet_audit::export::{parse_jsonl, verify_export};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((head, entries)) = parse_jsonl(text) {
        let key = SigningKey::from_bytes(&[3; 32]).verifying_key();
        let _ = verify_export(&head, &key, &entries);
    }
});
