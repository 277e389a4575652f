//! The trust policy that coordinator and agents hold (which keys may sign which
//! artifacts, and when), and [`verify`], the one way to turn a [`SignedManifest`] into a
//! [`VerifiedManifest`].
//!
//! Policy file: JSON, for example
//!
//! ```json
//! { "keys": [ {
//!     "key_id": "3f1c...",                       // key_id() of the public key
//!     "public_key": "-----BEGIN PUBLIC KEY-----\n...",  // SPKI PEM, as signing.pub
//!     "allowed_names": ["smollm2-*", "tinyllama"],
//!     "not_before_ms": 1760000000000,            // optional
//!     "not_after_ms": 1790000000000,             // optional
//!     "revoked": null                            // or {"at_ms": ..., "reason": "..."}
//! } ] }
//! ```
//!
//! Validity windows and revocation are judged at verification time (`now_ms`), never
//! by a time written in the manifest, which the signer controls. Rotation is two keys
//! whose windows overlap; a revoked key is refused whatever the time.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::KeyId;
use crate::manifest::{Manifest, ManifestError};
use crate::signing::{
    key_id, signed_message, verifying_key_from_pem, verifying_key_to_pem, SignedManifest,
};

/// More signatures than this are refused before any is checked: each costs a verify.
pub const MAX_SIGNATURES: usize = 16;

/// Which artifact names a key may sign: an exact name, or a prefix followed by `*`
/// (`*` alone matches every name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern(String);

impl NamePattern {
    pub fn new(pattern: &str) -> Result<Self, PolicyError> {
        let literal = pattern.strip_suffix('*').unwrap_or(pattern);
        let is_prefix = literal.len() < pattern.len();
        // The literal part uses the name alphabet, which has no '*': "a*b" and "**" fail.
        let valid = (is_prefix || !literal.is_empty())
            && literal.len() <= 128
            && literal
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if valid {
            Ok(Self(pattern.to_owned()))
        } else {
            Err(PolicyError::BadPattern(pattern.chars().take(160).collect()))
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.0 == name,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for NamePattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NamePattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::new(&text).map_err(serde::de::Error::custom)
    }
}

/// Why a key was withdrawn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub at_ms: u64,
    pub reason: String,
}

/// One key the policy trusts, and for what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    pub key_id: KeyId,
    #[serde(with = "spki_pem")]
    pub public_key: VerifyingKey,
    pub allowed_names: Vec<NamePattern>,
    /// Signatures are accepted from this time on (inclusive).
    pub not_before_ms: Option<u64>,
    /// Signatures are refused from this time on (exclusive end).
    pub not_after_ms: Option<u64>,
    pub revoked: Option<Revocation>,
}

impl TrustedKey {
    /// A key with no validity bounds that may sign names matching `allowed_names`.
    pub fn new(public_key: VerifyingKey, allowed_names: Vec<NamePattern>) -> Self {
        Self {
            key_id: key_id(&public_key),
            public_key,
            allowed_names,
            not_before_ms: None,
            not_after_ms: None,
            revoked: None,
        }
    }

    fn is_valid_at(&self, now_ms: u64) -> bool {
        self.not_before_ms.is_none_or(|t| now_ms >= t)
            && self.not_after_ms.is_none_or(|t| now_ms < t)
    }
}

mod spki_pem {
    use super::*;

    pub fn serialize<S: Serializer>(key: &VerifyingKey, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&verifying_key_to_pem(key))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<VerifyingKey, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        verifying_key_from_pem(&text).map_err(serde::de::Error::custom)
    }
}

/// A policy that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("trust policy JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "name pattern {0:?} is not valid: use an artifact name, or a prefix ending in a single '*'"
    )]
    BadPattern(String),
    #[error(
        "key {listed} is listed with a public key whose id is {actual}: fix key_id or public_key"
    )]
    KeyIdMismatch { listed: KeyId, actual: KeyId },
    #[error("key {0} is listed twice")]
    DuplicateKey(KeyId),
    #[error("key {key_id} has not_before_ms {not_before_ms} at or after not_after_ms {not_after_ms}: it could never be valid")]
    EmptyWindow {
        key_id: KeyId,
        not_before_ms: u64,
        not_after_ms: u64,
    },
}

/// The keys an installation trusts. Every value of this type is consistent: key ids
/// match their keys, appear once, and have non-empty validity windows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFile", into = "PolicyFile")]
pub struct TrustPolicy {
    keys: Vec<TrustedKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    keys: Vec<TrustedKey>,
}

impl TryFrom<PolicyFile> for TrustPolicy {
    type Error = PolicyError;

    fn try_from(file: PolicyFile) -> Result<Self, PolicyError> {
        Self::new(file.keys)
    }
}

impl From<TrustPolicy> for PolicyFile {
    fn from(policy: TrustPolicy) -> Self {
        Self { keys: policy.keys }
    }
}

impl TrustPolicy {
    pub fn new(keys: Vec<TrustedKey>) -> Result<Self, PolicyError> {
        let mut seen = std::collections::HashSet::new();
        for key in &keys {
            let actual = key_id(&key.public_key);
            if actual != key.key_id {
                return Err(PolicyError::KeyIdMismatch {
                    listed: key.key_id,
                    actual,
                });
            }
            if !seen.insert(key.key_id) {
                return Err(PolicyError::DuplicateKey(key.key_id));
            }
            if let (Some(not_before_ms), Some(not_after_ms)) = (key.not_before_ms, key.not_after_ms)
            {
                if not_before_ms >= not_after_ms {
                    return Err(PolicyError::EmptyWindow {
                        key_id: key.key_id,
                        not_before_ms,
                        not_after_ms,
                    });
                }
            }
        }
        Ok(Self { keys })
    }

    pub fn from_json(json: &[u8]) -> Result<Self, PolicyError> {
        Ok(serde_json::from_slice(json)?)
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a policy has only string keys and integers")
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    pub fn key(&self, key_id: &KeyId) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key_id == *key_id)
    }
}

/// Why a signed manifest was not accepted. When several signatures all fail, the error
/// is the one from the signature that got furthest through the checks (order: known,
/// not revoked, signature valid, inside its window, allowed for the name).
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("manifest is invalid: {0}")]
    InvalidManifest(#[from] ManifestError),
    #[error("manifest has no signature")]
    NoSignature,
    #[error("manifest has {0} signatures; at most {MAX_SIGNATURES} are checked")]
    TooManySignatures(usize),
    #[error("manifest is signed by key {0}, which the trust policy does not list")]
    UnknownKey(KeyId),
    #[error("manifest is signed by key {key_id}, revoked at {at_ms} ms: {reason}")]
    RevokedKey {
        key_id: KeyId,
        at_ms: u64,
        reason: String,
    },
    #[error("signature by key {0} does not match the manifest: it was altered after signing, or signed by another key")]
    BadSignature(KeyId),
    #[error("key {key_id} is not valid at {now_ms} ms (valid from {not_before_ms:?} until {not_after_ms:?})")]
    OutsideValidity {
        key_id: KeyId,
        now_ms: u64,
        not_before_ms: Option<u64>,
        not_after_ms: Option<u64>,
    },
    #[error("key {key_id} is not allowed to sign artifact {name:?}")]
    NameNotAllowed { key_id: KeyId, name: String },
}

impl TrustError {
    /// How far a signature got through the checks, to pick the most telling error.
    fn progress(&self) -> u8 {
        match self {
            Self::UnknownKey(_) => 1,
            Self::RevokedKey { .. } => 2,
            Self::BadSignature(_) => 3,
            Self::OutsideValidity { .. } => 4,
            Self::NameNotAllowed { .. } => 5,
            Self::InvalidManifest(_) | Self::NoSignature | Self::TooManySignatures(_) => 0,
        }
    }
}

/// A manifest that passed [`verify`]; only `verify` makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    signer: KeyId,
}

impl VerifiedManifest {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The key whose signature was accepted.
    pub fn signer(&self) -> KeyId {
        self.signer
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }
}

/// Accepts `signed` when its manifest is valid and at least one signature is by a key
/// the policy lists, not revoked, cryptographically valid, inside its validity window
/// at `now_ms`, and allowed to sign the manifest's name.
pub fn verify(
    signed: &SignedManifest,
    policy: &TrustPolicy,
    now_ms: u64,
) -> Result<VerifiedManifest, TrustError> {
    signed.manifest.validate()?;
    if signed.signatures.len() > MAX_SIGNATURES {
        return Err(TrustError::TooManySignatures(signed.signatures.len()));
    }
    let message = signed_message(&signed.manifest);
    let mut best_rejection: Option<TrustError> = None;
    for signature in &signed.signatures {
        match check_signature(signature, &signed.manifest.name, &message, policy, now_ms) {
            Ok(()) => {
                return Ok(VerifiedManifest {
                    manifest: signed.manifest.clone(),
                    signer: signature.key_id,
                })
            }
            Err(rejection) => {
                if best_rejection
                    .as_ref()
                    .is_none_or(|best| rejection.progress() > best.progress())
                {
                    best_rejection = Some(rejection);
                }
            }
        }
    }
    Err(best_rejection.unwrap_or(TrustError::NoSignature))
}

fn check_signature(
    signature: &crate::signing::ManifestSignature,
    name: &str,
    message: &[u8],
    policy: &TrustPolicy,
    now_ms: u64,
) -> Result<(), TrustError> {
    let key_id = signature.key_id;
    let key = policy.key(&key_id).ok_or(TrustError::UnknownKey(key_id))?;
    if let Some(revocation) = &key.revoked {
        return Err(TrustError::RevokedKey {
            key_id,
            at_ms: revocation.at_ms,
            reason: revocation.reason.clone(),
        });
    }
    // Strict verification refuses the malleable and small-order forms that plain
    // ed25519 verification lets through.
    if key
        .public_key
        .verify_strict(message, &signature.signature)
        .is_err()
    {
        return Err(TrustError::BadSignature(key_id));
    }
    if !key.is_valid_at(now_ms) {
        return Err(TrustError::OutsideValidity {
            key_id,
            now_ms,
            not_before_ms: key.not_before_ms,
            not_after_ms: key.not_after_ms,
        });
    }
    if !key
        .allowed_names
        .iter()
        .any(|pattern| pattern.matches(name))
    {
        return Err(TrustError::NameNotAllowed {
            key_id,
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample_manifest;
    use ed25519_dalek::SigningKey;

    const DAY_MS: u64 = 86_400_000;
    const NOW: u64 = 1_760_000_000_000;

    fn new_key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    fn patterns(list: &[&str]) -> Vec<NamePattern> {
        list.iter().map(|p| NamePattern::new(p).unwrap()).collect()
    }

    fn policy_of(keys: Vec<TrustedKey>) -> TrustPolicy {
        TrustPolicy::new(keys).unwrap()
    }

    fn signed_by(keys: &[&SigningKey]) -> SignedManifest {
        let mut signed =
            SignedManifest::sign(sample_manifest(b"adapter weights"), keys[0]).unwrap();
        for key in &keys[1..] {
            signed.add_signature(key);
        }
        signed
    }

    #[test]
    fn a_trusted_key_is_accepted_and_named_as_signer() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey::new(
            key.verifying_key(),
            patterns(&["smollm2-*"]),
        )]);
        let verified = verify(&signed_by(&[&key]), &policy, NOW).unwrap();
        assert_eq!(verified.signer(), key_id(&key.verifying_key()));
        assert_eq!(verified.manifest().name, "smollm2-support-adapter");
    }

    #[test]
    fn no_signature_and_unknown_key_are_refused() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey::new(key.verifying_key(), patterns(&["*"]))]);
        let mut unsigned = signed_by(&[&key]);
        unsigned.signatures.clear();
        assert!(matches!(
            verify(&unsigned, &policy, NOW),
            Err(TrustError::NoSignature)
        ));
        let stranger = new_key();
        assert!(matches!(
            verify(&signed_by(&[&stranger]), &policy, NOW),
            Err(TrustError::UnknownKey(id)) if id == key_id(&stranger.verifying_key())
        ));
    }

    #[test]
    fn an_edited_manifest_fails_the_signature_check() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey::new(key.verifying_key(), patterns(&["*"]))]);
        let json = signed_by(&[&key]).to_json_pretty();
        let edited = json.replace("\"contributors\": 9", "\"contributors\": 90");
        assert_ne!(edited, json);
        let edited = SignedManifest::from_json(edited.as_bytes()).unwrap();
        assert!(matches!(
            verify(&edited, &policy, NOW),
            Err(TrustError::BadSignature(_))
        ));
    }

    #[test]
    fn an_invalid_manifest_is_refused_even_when_signed() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey::new(key.verifying_key(), patterns(&["*"]))]);
        let mut signed = signed_by(&[&key]);
        signed.manifest.name = "Bad Name".into();
        signed.signatures.clear();
        signed.add_signature(&key);
        assert!(matches!(
            verify(&signed, &policy, NOW),
            Err(TrustError::InvalidManifest(
                ManifestError::InvalidIdentifier { .. }
            ))
        ));
    }

    #[test]
    fn keys_sign_only_the_names_they_are_allowed() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey::new(
            key.verifying_key(),
            patterns(&["tinyllama", "phi3-*"]),
        )]);
        assert!(matches!(
            verify(&signed_by(&[&key]), &policy, NOW),
            Err(TrustError::NameNotAllowed { name, .. }) if name == "smollm2-support-adapter"
        ));
        let exact = policy_of(vec![TrustedKey::new(
            key.verifying_key(),
            patterns(&["smollm2-support-adapter"]),
        )]);
        verify(&signed_by(&[&key]), &exact, NOW).unwrap();
    }

    #[test]
    fn rotation_accepts_both_keys_during_the_overlap_and_only_the_new_one_after() {
        let old = new_key();
        let new = new_key();
        let old_entry = TrustedKey {
            not_after_ms: Some(NOW + DAY_MS),
            ..TrustedKey::new(old.verifying_key(), patterns(&["*"]))
        };
        let new_entry = TrustedKey {
            not_before_ms: Some(NOW - DAY_MS),
            ..TrustedKey::new(new.verifying_key(), patterns(&["*"]))
        };
        let policy = policy_of(vec![old_entry, new_entry]);
        let by_old = signed_by(&[&old]);
        let by_new = signed_by(&[&new]);

        assert!(matches!(
            verify(&by_new, &policy, NOW - 2 * DAY_MS),
            Err(TrustError::OutsideValidity { .. })
        ));
        verify(&by_old, &policy, NOW - 2 * DAY_MS).unwrap();
        verify(&by_old, &policy, NOW).unwrap();
        verify(&by_new, &policy, NOW).unwrap();
        assert!(matches!(
            verify(&by_old, &policy, NOW + DAY_MS),
            Err(TrustError::OutsideValidity {
                not_after_ms: Some(_),
                ..
            })
        ));
        verify(&by_new, &policy, NOW + DAY_MS).unwrap();

        // A manifest signed by both keys keeps verifying across the switch.
        let by_both = signed_by(&[&old, &new]);
        assert_eq!(
            verify(&by_both, &policy, NOW + DAY_MS).unwrap().signer(),
            key_id(&new.verifying_key())
        );
    }

    #[test]
    fn a_revoked_key_is_refused_at_any_time_but_another_signature_can_still_vouch() {
        let revoked = new_key();
        let good = new_key();
        let policy = policy_of(vec![
            TrustedKey {
                revoked: Some(Revocation {
                    at_ms: NOW,
                    reason: "laptop lost".into(),
                }),
                ..TrustedKey::new(revoked.verifying_key(), patterns(&["*"]))
            },
            TrustedKey::new(good.verifying_key(), patterns(&["*"])),
        ]);
        let err = verify(&signed_by(&[&revoked]), &policy, NOW - DAY_MS).unwrap_err();
        assert!(
            matches!(&err, TrustError::RevokedKey { reason, .. } if reason == "laptop lost"),
            "{err}"
        );
        verify(&signed_by(&[&revoked, &good]), &policy, NOW).unwrap();
    }

    #[test]
    fn the_most_telling_rejection_is_reported() {
        let known = new_key();
        let policy = policy_of(vec![TrustedKey::new(
            known.verifying_key(),
            patterns(&["other"]),
        )]);
        let signed = signed_by(&[&new_key(), &known]);
        assert!(matches!(
            verify(&signed, &policy, NOW),
            Err(TrustError::NameNotAllowed { .. })
        ));
    }

    #[test]
    fn too_many_signatures_are_refused_before_checking() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey::new(key.verifying_key(), patterns(&["*"]))]);
        let mut signed = signed_by(&[&key]);
        let first = signed.signatures[0].clone();
        signed.signatures.resize(MAX_SIGNATURES + 1, first);
        assert!(matches!(
            verify(&signed, &policy, NOW),
            Err(TrustError::TooManySignatures(17))
        ));
    }

    #[test]
    fn the_policy_round_trips_through_json_and_inconsistent_policies_are_refused() {
        let key = new_key();
        let policy = policy_of(vec![TrustedKey {
            not_before_ms: Some(NOW),
            not_after_ms: Some(NOW + DAY_MS),
            ..TrustedKey::new(key.verifying_key(), patterns(&["smollm2-*", "tinyllama"]))
        }]);
        let json = policy.to_json_pretty();
        assert!(json.contains("BEGIN PUBLIC KEY"));
        assert_eq!(TrustPolicy::from_json(json.as_bytes()).unwrap(), policy);

        let other_id = key_id(&new_key().verifying_key());
        let wrong_id = json.replace(&policy.keys()[0].key_id.to_hex(), &other_id.to_hex());
        assert!(matches!(
            TrustPolicy::from_json(wrong_id.as_bytes()),
            Err(PolicyError::Json(err)) if err.to_string().contains("fix key_id")
        ));

        let entry = policy.keys()[0].clone();
        assert!(matches!(
            TrustPolicy::new(vec![entry.clone(), entry.clone()]),
            Err(PolicyError::DuplicateKey(_))
        ));
        assert!(matches!(
            TrustPolicy::new(vec![TrustedKey {
                not_after_ms: Some(NOW),
                ..entry
            }]),
            Err(PolicyError::EmptyWindow { .. })
        ));
    }

    #[test]
    fn name_patterns_are_exact_or_trailing_star() {
        let prefix = NamePattern::new("smollm2-*").unwrap();
        assert!(prefix.matches("smollm2-135m"));
        assert!(!prefix.matches("smollm3"));
        assert!(NamePattern::new("*").unwrap().matches("anything"));
        assert!(NamePattern::new("tiny").unwrap().matches("tiny"));
        assert!(!NamePattern::new("tiny").unwrap().matches("tinyllama"));
        for bad in ["", "a*b", "**", "*a", "Upper*", "a b"] {
            assert!(NamePattern::new(bad).is_err(), "{bad:?}");
        }
    }
}
