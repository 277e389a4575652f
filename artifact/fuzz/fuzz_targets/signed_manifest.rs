//! Arbitrary bytes as a signed manifest envelope, decoded and verified against a fixed
//! policy: nothing may panic, and nothing but a genuine signature may be accepted.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use nanofleet_artifact::signing::SignedManifest;
use nanofleet_artifact::trust::{verify, NamePattern, TrustPolicy, TrustedKey};

/// A fixed key, so that inputs found by the fuzzer can be replayed.
fn policy() -> TrustPolicy {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let trusted = TrustedKey::new(key.verifying_key(), vec![NamePattern::new("*").unwrap()]);
    TrustPolicy::new(vec![trusted]).unwrap()
}

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = SignedManifest::from_json(data) {
        if let Ok(verified) = verify(&signed, &policy(), 1_760_000_000_000) {
            // The fuzzer does not hold the private key; an acceptance would be a forgery.
            panic!("accepted a manifest it could not have signed: {verified:?}");
        }
    }
});
