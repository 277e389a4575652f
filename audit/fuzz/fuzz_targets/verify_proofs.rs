//! Proofs and tree heads come from the coordinator to clients that do not trust it:
//! inclusion and consistency verification over arbitrary sizes, hashes and proof lengths
//! must never panic, and the compact range restored from arbitrary parts neither.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanofleet_audit::merkle::{verify_consistency, verify_inclusion, CompactRange, Hash};

fn hash(bytes: &[u8]) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(bytes);
    out
}

fuzz_target!(|data: &[u8]| {
    // 8 + 8 bytes of sizes, two 32-byte hashes, then the proof as 32-byte chunks.
    if data.len() < 80 {
        return;
    }
    let a = u64::from_be_bytes(data[..8].try_into().unwrap());
    let b = u64::from_be_bytes(data[8..16].try_into().unwrap());
    let (first, second) = (hash(&data[16..48]), hash(&data[48..80]));
    let proof: Vec<Hash> = data[80..].chunks_exact(32).map(hash).collect();
    let _ = verify_inclusion(&first, a, b, &proof, &second);
    let _ = verify_consistency(a, b, &first, &second, &proof);
    if let Ok(range) = CompactRange::from_parts(a, proof) {
        let _ = range.root();
    }
});
