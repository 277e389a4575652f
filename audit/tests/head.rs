//! Signed tree heads: signing, verification, tamper and key checks, JSON shape.

use ed25519_dalek::{Signature, SigningKey};
use nanofleet_audit::head::{HeadError, SignedTreeHead, TreeHead, TREE_HEAD_DOMAIN};
use nanofleet_audit::merkle::{leaf_hash, CompactRange};
use proptest::prelude::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn head() -> TreeHead {
    let mut range = CompactRange::new();
    for i in 0..5u8 {
        range.append(leaf_hash(&[i]));
    }
    TreeHead {
        size: range.size(),
        root: range.root(),
        time_ms: 1_700_000_000_000,
    }
}

#[test]
fn canonical_bytes_layout() {
    let h = head();
    let bytes = h.canonical_bytes();
    assert_eq!(bytes.len(), TREE_HEAD_DOMAIN.len() + 8 + 32 + 8);
    assert!(bytes.starts_with(TREE_HEAD_DOMAIN));
    let rest = &bytes[TREE_HEAD_DOMAIN.len()..];
    assert_eq!(rest[..8], 5u64.to_be_bytes());
    assert_eq!(rest[8..40], h.root);
    assert_eq!(rest[40..], 1_700_000_000_000i64.to_be_bytes());
}

#[test]
fn signs_and_verifies() {
    let signed = head().sign(&key(1));
    assert_eq!(signed.verify(&key(1).verifying_key()), Ok(&head()));
    assert_eq!(
        signed.verify(&key(2).verifying_key()),
        Err(HeadError::BadSignature)
    );
}

#[test]
fn json_shape_round_trips() {
    let signed = head().sign(&key(1));
    let json = serde_json::to_value(&signed).unwrap();
    assert_eq!(json["head"]["size"], 5);
    assert_eq!(json["head"]["root"], hex::encode(head().root));
    assert_eq!(json["signature"], hex::encode(signed.signature.to_bytes()));
    let back: SignedTreeHead = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, signed);
    let mut short = json.clone();
    short["head"]["root"] = "abcd".into();
    assert!(serde_json::from_value::<SignedTreeHead>(short).is_err());
    let mut extra = json;
    extra["head"]["extra"] = 1.into();
    assert!(serde_json::from_value::<SignedTreeHead>(extra).is_err());
}

proptest! {
    /// Any single-bit change of size, root, time or signature fails verification.
    #[test]
    fn any_bit_flip_fails(bit in 0usize..(64 + 256 + 64 + 512)) {
        let mut signed = head().sign(&key(1));
        match bit {
            b if b < 64 => signed.head.size ^= 1 << b,
            b if b < 320 => signed.head.root[(b - 64) / 8] ^= 1 << ((b - 64) % 8),
            b if b < 384 => signed.head.time_ms ^= 1 << (b - 320),
            b => {
                let mut sig = signed.signature.to_bytes();
                sig[(b - 384) / 8] ^= 1 << ((b - 384) % 8);
                signed.signature = Signature::from_bytes(&sig);
            }
        }
        prop_assert!(signed.verify(&key(1).verifying_key()).is_err());
    }

    #[test]
    fn another_key_fails(seed in any::<[u8; 32]>()) {
        prop_assume!(seed != [1; 32]);
        let signed = head().sign(&key(1));
        prop_assert!(signed.verify(&SigningKey::from_bytes(&seed).verifying_key()).is_err());
    }
}
