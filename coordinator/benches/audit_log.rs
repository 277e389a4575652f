//! Audit log benchmark: append rate (durable one by one, and in batches) and, at
//! 1,000,000 entries in sled on disk, the time to sign a head and to generate inclusion
//! and consistency proofs. Prints a table; run with
//! `cargo bench -p nanofleet-coordinator --bench audit_log` (set AUDIT_BENCH_ENTRIES to
//! change the size).

use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use nanofleet_audit::{verify_consistency, verify_inclusion};
use nanofleet_coordinator::audit_log::AuditLog;
use nanofleet_coordinator::store::SledStore;

fn main() {
    let target: u64 = std::env::var("AUDIT_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SledStore::open(&dir.path().join("state")).expect("sled"));
    let log = AuditLog::open_with_key(store, SigningKey::from_bytes(&[9; 32])).expect("log");
    let details = "wave 2 of rollout r-42 passed: 50 of 50 nodes active, 0 failed";
    let mut rows: Vec<(String, String)> = Vec::new();

    // Durable appends, one flush (fsync) each: the rate of acknowledged events.
    let n = 2_000;
    let start = Instant::now();
    for i in 0..n {
        log.append(
            "node:7f3c",
            "artifact.activated",
            &format!("m@{i}"),
            details,
        )
        .expect("append");
    }
    let secs = start.elapsed().as_secs_f64();
    rows.push((
        "append, durable, one at a time".into(),
        format!(
            "{:.0} entries/s ({:.2} ms each)",
            n as f64 / secs,
            secs * 1e3 / n as f64
        ),
    ));

    // Batches of 1000 with one flush: how the log fills up to the target size.
    let start = Instant::now();
    let batch: Vec<String> = (0..1000).map(|i| format!("m@{i}")).collect();
    let mut appended = 0u64;
    while log.size() < target {
        let take = (target - log.size()).min(1000) as usize;
        let entries: Vec<(&str, &str, &str, &str)> = batch[..take]
            .iter()
            .map(|s| ("node:7f3c", "artifact.activated", s.as_str(), details))
            .collect();
        log.append_batch(&entries).expect("append batch");
        appended += take as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    rows.push((
        "append, batches of 1000, one flush each".into(),
        format!("{:.0} entries/s", appended as f64 / secs),
    ));
    let size = log.size();
    rows.push(("log size".into(), size.to_string()));

    let start = Instant::now();
    let head = log.signed_head().expect("head");
    rows.push((
        "sign a new tree head".into(),
        format!("{:.3} ms", start.elapsed().as_secs_f64() * 1e3),
    ));

    // Inclusion proofs for indices spread over the log, each verified (outside the timing).
    let probes = 1_000u64;
    let indices: Vec<u64> = (0..probes).map(|i| (i * 999_983) % size).collect();
    let start = Instant::now();
    let proofs: Vec<_> = indices
        .iter()
        .map(|&i| log.inclusion_proof(i, size).expect("inclusion proof"))
        .collect();
    let secs = start.elapsed().as_secs_f64();
    for (&i, proof) in indices.iter().zip(&proofs) {
        let leaf = log.entry(i).expect("entry").leaf_hash();
        verify_inclusion(&leaf, i, size, proof, &head.head.root).expect("proof verifies");
    }
    rows.push((
        format!("inclusion proof at {size} entries"),
        format!(
            "{:.1} µs each ({} hashes), all {probes} verified",
            secs * 1e6 / probes as f64,
            proofs[1].len()
        ),
    ));

    let old = size / 3 + 7;
    let old_root = {
        // The old root from a head signed then: recompute through a consistency proof's
        // own generator is circular, so take it from the compact range of the first `old`.
        let mut range = nanofleet_audit::CompactRange::new();
        for i in 0..old {
            range.append(log.entry(i).expect("entry").leaf_hash());
        }
        range.root()
    };
    let start = Instant::now();
    let rounds = 100;
    let mut proof = Vec::new();
    for _ in 0..rounds {
        proof = log.consistency_proof(old, size).expect("consistency proof");
    }
    let secs = start.elapsed().as_secs_f64();
    verify_consistency(old, size, &old_root, &head.head.root, &proof).expect("verifies");
    rows.push((
        format!("consistency proof {old} → {size}"),
        format!(
            "{:.1} µs each ({} hashes), verified",
            secs * 1e6 / rounds as f64,
            proof.len()
        ),
    ));

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("\naudit log (sled on disk, {})", dir.path().display());
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
}
