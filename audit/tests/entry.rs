//! Audit entries: limits, the canonical leaf bytes and their decoder, serde.

use nanofleet_audit::entry::{
    Actor, AuditEntry, EntryError, MAX_ACTION_LEN, MAX_DETAILS_LEN, MAX_NAME_LEN, MAX_SUBJECT_LEN,
};
use nanofleet_audit::merkle::leaf_hash;
use proptest::prelude::*;

fn entry() -> AuditEntry {
    AuditEntry::new(
        1_700_000_000_123,
        Actor::Operator("alice".into()),
        "node.revoke",
        "node-7",
        "lost device",
    )
    .unwrap()
}

#[test]
fn canonical_bytes_are_fixed() {
    // Pinned: these bytes are the leaf data of stored entries and must never change.
    let expected = [
        &[1u8][..],
        &1_700_000_000_123i64.to_be_bytes(),
        &[2, 0, 0, 0, 5],
        b"alice",
        &[0, 0, 0, 11],
        b"node.revoke",
        &[0, 0, 0, 6],
        b"node-7",
        &[0, 0, 0, 11],
        b"lost device",
    ]
    .concat();
    assert_eq!(entry().canonical_bytes(), expected);
    assert_eq!(entry().leaf_hash(), leaf_hash(&expected));
}

#[test]
fn decoder_round_trips_and_refuses_noise() {
    let bytes = entry().canonical_bytes();
    assert_eq!(AuditEntry::from_canonical_bytes(&bytes).unwrap(), entry());
    for cut in 0..bytes.len() {
        assert!(
            AuditEntry::from_canonical_bytes(&bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        AuditEntry::from_canonical_bytes(&long),
        Err(EntryError::TrailingBytes(1))
    );
    let mut version = bytes.clone();
    version[0] = 2;
    assert_eq!(
        AuditEntry::from_canonical_bytes(&version),
        Err(EntryError::UnknownVersion(2))
    );
    let mut actor = bytes;
    actor[9] = 3;
    assert_eq!(
        AuditEntry::from_canonical_bytes(&actor),
        Err(EntryError::UnknownActor(3))
    );
}

#[test]
fn decoder_checks_lengths_before_reading() {
    let mut bytes = vec![1u8];
    bytes.extend_from_slice(&0i64.to_be_bytes());
    bytes.push(1);
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        AuditEntry::from_canonical_bytes(&bytes),
        Err(EntryError::TooLong {
            field: "node id",
            ..
        })
    ));
}

#[test]
fn limits() {
    let ok = |actor: Actor, action: &str, subject: &str, details: &str| {
        AuditEntry::new(0, actor, action, subject, details)
    };
    let long = |n: usize| "a".repeat(n);
    assert!(ok(Actor::Node(long(MAX_NAME_LEN)), "a", "", "").is_ok());
    assert!(ok(Actor::Node(long(MAX_NAME_LEN + 1)), "a", "", "").is_err());
    assert!(ok(Actor::Operator(String::new()), "a", "", "").is_err());
    assert!(ok(Actor::Node(String::new()), "a", "", "").is_err());
    assert!(ok(Actor::Coordinator, &long(MAX_ACTION_LEN), "", "").is_ok());
    assert!(ok(Actor::Coordinator, &long(MAX_ACTION_LEN + 1), "", "").is_err());
    assert_eq!(
        ok(Actor::Coordinator, "", "", ""),
        Err(EntryError::Empty { field: "action" })
    );
    for bad in ["Node.revoke", "node revoke", "nöde", "a/b"] {
        assert!(matches!(
            ok(Actor::Coordinator, bad, "", ""),
            Err(EntryError::ActionCharacters(_))
        ));
    }
    assert!(ok(Actor::Coordinator, "a", &long(MAX_SUBJECT_LEN), "").is_ok());
    assert!(ok(Actor::Coordinator, "a", &long(MAX_SUBJECT_LEN + 1), "").is_err());
    assert!(ok(Actor::Coordinator, "a", "", &long(MAX_DETAILS_LEN)).is_ok());
    assert!(ok(Actor::Coordinator, "a", "", &long(MAX_DETAILS_LEN + 1)).is_err());
}

#[test]
fn serde_shape_and_checks() {
    let json = serde_json::to_value(entry()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "time_ms": 1_700_000_000_123i64,
            "actor": {"kind": "operator", "id": "alice"},
            "action": "node.revoke",
            "subject": "node-7",
            "details": "lost device",
        })
    );
    assert_eq!(serde_json::from_value::<AuditEntry>(json).unwrap(), entry());
    let coordinator = AuditEntry::new(0, Actor::Coordinator, "rollout.halt", "r1", "").unwrap();
    let json = serde_json::to_string(&coordinator).unwrap();
    assert!(json.contains(r#""actor":{"kind":"coordinator"}"#), "{json}");
    assert_eq!(
        serde_json::from_str::<AuditEntry>(&json).unwrap(),
        coordinator
    );
    let bad =
        r#"{"time_ms":0,"actor":{"kind":"coordinator"},"action":"BAD","subject":"","details":""}"#;
    assert!(serde_json::from_str::<AuditEntry>(bad).is_err());
}

fn actor() -> impl Strategy<Value = Actor> {
    prop_oneof![
        Just(Actor::Coordinator),
        "\\PC{1,40}".prop_map(Actor::Node),
        "\\PC{1,40}".prop_map(Actor::Operator),
    ]
}

proptest! {
    #[test]
    fn canonical_bytes_round_trip(
        time_ms in any::<i64>(), actor in actor(), action in "[a-z0-9._-]{1,64}",
        subject in "\\PC{0,100}", details in "\\PC{0,300}",
    ) {
        let entry = AuditEntry::new(time_ms, actor, action, subject, details).unwrap();
        let bytes = entry.canonical_bytes();
        prop_assert_eq!(AuditEntry::from_canonical_bytes(&bytes).unwrap(), entry);
    }

    /// Distinct entries have distinct leaf data: the length prefixes leave no ambiguity
    /// about where one field ends.
    #[test]
    fn distinct_entries_distinct_bytes(
        a in ("[a-c]{1,3}", "[a-c]{0,3}", "[a-c]{0,3}"), b in ("[a-c]{1,3}", "[a-c]{0,3}", "[a-c]{0,3}"),
    ) {
        let x = AuditEntry::new(0, Actor::Coordinator, a.0, a.1, a.2).unwrap();
        let y = AuditEntry::new(0, Actor::Coordinator, b.0, b.1, b.2).unwrap();
        prop_assert_eq!(x == y, x.canonical_bytes() == y.canonical_bytes());
    }
}
