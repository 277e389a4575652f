//! The tamper-evident audit log end to end: a real coordinator records enrollment, token
//! use and revocation; `nanofleet audit export|proof|verify|consistency` check it offline
//! against the coordinator's audit key; an entry changed, removed or reordered in the
//! coordinator's store is reported by `audit verify`.

use std::path::{Path, PathBuf};

use nanofleet_coordinator::store::{Keyspace, KvStore, SledStore};
use nanofleet_e2e::fleet::{publish, trusted_key};
use nanofleet_e2e::{ok, path, tiny_gguf, Agent, Coordinator};

fn audit_key(coordinator: &Coordinator) -> String {
    path(&coordinator.dir.join("audit-signing.pub"))
}

/// Exports the whole log and runs `audit verify` on it; returns (success, output).
fn export_and_verify(coordinator: &Coordinator, dir: &Path, name: &str) -> (bool, String) {
    let file = dir.join(name);
    ok(&coordinator.cli(&["audit", "export", "--out", &path(&file)]));
    let output = coordinator.cli(&[
        "audit",
        "verify",
        &path(&file),
        "--key",
        &audit_key(coordinator),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Edits the stored leaves with the coordinator stopped, then starts it again.
fn with_stored_leaves(coordinator: &mut Coordinator, edit: impl FnOnce(&SledStore)) {
    coordinator.kill9();
    {
        let store = SledStore::open(&coordinator.dir.join("state")).unwrap();
        edit(&store);
        store.flush().unwrap();
    }
    coordinator.restart();
}

fn leaf(store: &SledStore, index: u64) -> Vec<u8> {
    store
        .get(Keyspace::AuditLeaves, &index.to_be_bytes())
        .unwrap()
        .unwrap()
}

fn swap_leaves(store: &SledStore, a: u64, b: u64) {
    let (first, second) = (leaf(store, a), leaf(store, b));
    store
        .put(Keyspace::AuditLeaves, &a.to_be_bytes(), &second)
        .unwrap();
    store
        .put(Keyspace::AuditLeaves, &b.to_be_bytes(), &first)
        .unwrap();
}

#[test]
fn the_audit_log_records_the_fleet_and_detects_tampering() {
    let root = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::start(root.path());
    let token = coordinator.create_token("1h", "site=plant-a");
    let agent = Agent::start(root.path(), "a", &coordinator, &token);
    let node = agent.wait_enrolled();
    ok(&coordinator.cli(&["nodes", "revoke", &node, "--reason", "device lost"]));
    // A trust policy edited on the host while the coordinator runs is recorded when the
    // next publish reads it.
    let (key, _) = trusted_key(&coordinator, root.path(), "publisher", "tiny*");
    let model = root.path().join("tiny.gguf");
    std::fs::write(&model, tiny_gguf(1)).unwrap();
    publish(&coordinator, &model, "tiny", "1.0.0", &key, "65536");
    let work: PathBuf = root.path().join("audit");
    std::fs::create_dir_all(&work).unwrap();

    // Token creation, its use, the enrollment and the revocation are all in the log.
    let all = work.join("all.jsonl");
    ok(&coordinator.cli(&["audit", "export", "--out", &path(&all)]));
    let text = std::fs::read_to_string(&all).unwrap();
    for action in [
        "coordinator.start",
        "token.create",
        "node.enroll",
        "node.revoke",
    ] {
        assert!(
            text.contains(&format!("\"action\":\"{action}\"")),
            "{action} missing:\n{text}"
        );
    }
    assert!(
        !text.contains(&token),
        "the token itself must never be in the log"
    );
    let verified = ok(&coordinator.cli(&[
        "audit",
        "verify",
        &path(&all),
        "--key",
        &audit_key(&coordinator),
    ]));
    assert!(
        verified.contains("its root matches the signed head"),
        "{verified}"
    );

    // A filtered export carries proofs and verifies entry by entry; so does one proof.
    let by_node = work.join("node.jsonl");
    ok(&coordinator.cli(&["audit", "export", "--node", &node, "--out", &path(&by_node)]));
    let verified = ok(&coordinator.cli(&[
        "audit",
        "verify",
        &path(&by_node),
        "--key",
        &audit_key(&coordinator),
    ]));
    assert!(verified.contains("verified: 2 entries"), "{verified}");
    let proof = work.join("proof.jsonl");
    ok(&coordinator.cli(&["audit", "proof", "1", "--out", &path(&proof)]));
    ok(&coordinator.cli(&[
        "audit",
        "verify",
        &path(&proof),
        "--key",
        &audit_key(&coordinator),
    ]));
    let csv = ok(&coordinator.cli(&["audit", "export", "--format", "csv", "--action", "node."]));
    assert!(
        csv.starts_with("index,time,time_ms,actor,action,subject,details,leaf_hash"),
        "{csv}"
    );
    assert!(csv.contains(",operator:admin,node.revoke,"), "{csv}");

    // A verifier holding the wrong key refuses the export.
    let other_key = root.path().join("other.pub");
    std::fs::copy(coordinator.dir.join("adapter-signing.pub"), &other_key).unwrap();
    let refused = coordinator.cli(&["audit", "verify", &path(&all), "--key", &path(&other_key)]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("signature"));

    // A head kept now is extended consistently by later entries.
    let kept = work.join("head.json");
    ok(&coordinator.cli(&["audit", "head", "--out", &path(&kept)]));
    coordinator.create_token("1h", "site=plant-b");
    let consistent = coordinator.cli(&[
        "audit",
        "consistency",
        "--old",
        &path(&kept),
        "--key",
        &audit_key(&coordinator),
    ]);
    assert!(consistent.status.success(), "{consistent:?}");

    // Changing one stored entry (here: the revocation's reason).
    let revoke_index = std::fs::read_to_string(&all)
        .unwrap()
        .lines()
        .find(|line| line.contains("\"action\":\"node.revoke\""))
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["index"]
                .as_u64()
                .unwrap()
        })
        .unwrap();
    let original = std::cell::RefCell::new(Vec::new());
    with_stored_leaves(&mut coordinator, |store| {
        let bytes = leaf(store, revoke_index);
        let entry = nanofleet_audit::AuditEntry::from_canonical_bytes(&bytes).unwrap();
        assert_eq!(entry.action(), "node.revoke");
        let forged = nanofleet_audit::AuditEntry::new(
            entry.time_ms(),
            entry.actor().clone(),
            entry.action(),
            entry.subject(),
            "routine maintenance",
        )
        .unwrap();
        store
            .put(
                Keyspace::AuditLeaves,
                &revoke_index.to_be_bytes(),
                &forged.canonical_bytes(),
            )
            .unwrap();
        *original.borrow_mut() = bytes;
    });
    let (verified, output) = export_and_verify(&coordinator, &work, "changed.jsonl");
    assert!(!verified, "a changed entry verified: {output}");
    assert!(
        output.contains("do not hash to the signed root"),
        "{output}"
    );

    // Put the changed one back: the log verifies again.
    with_stored_leaves(&mut coordinator, |store| {
        store
            .put(
                Keyspace::AuditLeaves,
                &revoke_index.to_be_bytes(),
                &original.borrow(),
            )
            .unwrap();
    });
    let (verified, output) = export_and_verify(&coordinator, &work, "restored.jsonl");
    assert!(verified, "the restored log must verify again: {output}");

    // Reordering two entries.
    with_stored_leaves(&mut coordinator, |store| swap_leaves(store, 1, 2));
    let (verified, output) = export_and_verify(&coordinator, &work, "reordered.jsonl");
    assert!(!verified, "reordered entries verified: {output}");
    assert!(
        output.contains("do not hash to the signed root"),
        "{output}"
    );
    with_stored_leaves(&mut coordinator, |store| swap_leaves(store, 1, 2));
    let (verified, output) = export_and_verify(&coordinator, &work, "swapped-back.jsonl");
    assert!(verified, "{output}");

    // Removing one: the entries after it move up a place, as someone cleaning the record
    // would leave them.
    with_stored_leaves(&mut coordinator, |store| {
        let kept: Vec<Vec<u8>> = (0..)
            .map_while(|i: u64| store.get(Keyspace::AuditLeaves, &i.to_be_bytes()).unwrap())
            .enumerate()
            .filter(|(i, _)| *i as u64 != revoke_index)
            .map(|(_, v)| v)
            .collect();
        for (i, bytes) in kept.iter().enumerate() {
            store
                .put(Keyspace::AuditLeaves, &(i as u64).to_be_bytes(), bytes)
                .unwrap();
        }
        let last = kept.len() as u64;
        assert!(store
            .compare_and_swap(
                Keyspace::AuditLeaves,
                &last.to_be_bytes(),
                Some(&leaf(store, last)),
                None
            )
            .unwrap());
    });
    let (verified, output) = export_and_verify(&coordinator, &work, "removed.jsonl");
    assert!(!verified, "a removed entry verified: {output}");
}
