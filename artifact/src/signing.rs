//! ed25519 signatures over manifests: the domain-separated message, the signed JSON
//! envelope ([`SignedManifest`]), key ids, and PEM key files (PKCS#8 private keys, SPKI
//! public keys: the format the coordinator writes as `signing.key` / `signing.pub`).
//!
//! The signed message is [`SIGNATURE_DOMAIN`] followed by
//! [`Manifest::canonical_bytes`]; the domain prefix keeps a manifest signature from
//! being valid for any other message the same key signs (tree heads, for example).
//! Checking a signature against a trust policy is [`crate::trust::verify`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::KeyId;
use crate::manifest::{Manifest, ManifestError};

/// Prefix of every signed manifest message.
pub const SIGNATURE_DOMAIN: &[u8] = b"nanofleet-manifest-v1\0";

/// The bytes a manifest signature covers.
pub fn signed_message(manifest: &Manifest) -> Vec<u8> {
    [SIGNATURE_DOMAIN, &manifest.canonical_bytes()].concat()
}

/// The id of an ed25519 public key: first 16 bytes of SHA-256 over its 32 raw bytes.
pub fn key_id(key: &VerifyingKey) -> KeyId {
    KeyId::of_public_key(key.as_bytes())
}

/// One signature in the envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    pub key_id: KeyId,
    /// The 64-byte ed25519 signature, standard base64 in JSON.
    #[serde(with = "base64_signature")]
    pub signature: Signature,
}

/// A manifest with its signatures: the JSON document that is published and shipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    pub manifest: Manifest,
    pub signatures: Vec<ManifestSignature>,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("refusing to sign an invalid manifest: {0}")]
    InvalidManifest(#[from] ManifestError),
    #[error("signed manifest JSON is malformed: {0}")]
    Json(#[source] serde_json::Error),
}

impl SignedManifest {
    /// Validates `manifest` and signs it with `key`.
    pub fn sign(manifest: Manifest, key: &SigningKey) -> Result<Self, SigningError> {
        manifest.validate()?;
        let mut signed = Self {
            manifest,
            signatures: Vec::new(),
        };
        signed.add_signature(key);
        Ok(signed)
    }

    /// Adds a signature by another key, e.g. the new key during a rotation.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let signature = key.sign(&signed_message(&self.manifest));
        self.signatures.push(ManifestSignature {
            key_id: key_id(&key.verifying_key()),
            signature,
        });
    }

    /// Decodes the envelope. This checks only the JSON shape: nothing decoded is
    /// trusted until [`crate::trust::verify`] accepts it.
    pub fn from_json(json: &[u8]) -> Result<Self, SigningError> {
        serde_json::from_slice(json).map_err(SigningError::Json)
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self)
            .expect("a signed manifest has only string keys and integers")
    }
}

mod base64_signature {
    use super::*;

    pub fn serialize<S: Serializer>(
        signature: &Signature,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(signature.to_bytes()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Signature, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let bytes = BASE64
            .decode(text.as_bytes())
            .map_err(|_| serde::de::Error::custom("signature is not standard base64"))?;
        Signature::from_slice(&bytes)
            .map_err(|_| serde::de::Error::custom("signature must be 64 bytes (ed25519)"))
    }
}

/// A PEM key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("not an ed25519 private key in PKCS#8 PEM (\"-----BEGIN PRIVATE KEY-----\"): {0}")]
    PrivateKey(String),
    #[error("not an ed25519 public key in SPKI PEM (\"-----BEGIN PUBLIC KEY-----\"): {0}")]
    PublicKey(String),
}

/// Parses a PKCS#8 PEM private key (v1 or v2, as `signing.key`).
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, KeyFileError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|err| KeyFileError::PrivateKey(err.to_string()))
}

/// Encodes a private key as PKCS#8 PEM; the buffer is wiped when dropped.
pub fn signing_key_to_pem(key: &SigningKey) -> Zeroizing<String> {
    key.to_pkcs8_pem(LineEnding::LF)
        .expect("an ed25519 key always encodes as PKCS#8")
}

/// Parses an SPKI PEM public key (as `signing.pub`).
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey, KeyFileError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|err| KeyFileError::PublicKey(err.to_string()))
}

/// Encodes a public key as SPKI PEM.
pub fn verifying_key_to_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("an ed25519 public key always encodes as SPKI")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample_manifest;
    use ed25519_dalek::Verifier as _;

    fn new_key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    #[test]
    fn the_envelope_round_trips_and_the_signature_covers_the_domain_and_manifest() {
        let key = new_key();
        let signed = SignedManifest::sign(sample_manifest(b"weights"), &key).unwrap();
        let decoded = SignedManifest::from_json(signed.to_json_pretty().as_bytes()).unwrap();
        assert_eq!(decoded, signed);
        let signature = &decoded.signatures[0];
        assert_eq!(signature.key_id, key_id(&key.verifying_key()));
        let message = signed_message(&decoded.manifest);
        assert!(message.starts_with(b"nanofleet-manifest-v1\0"));
        key.verifying_key()
            .verify(&message, &signature.signature)
            .unwrap();
        // Without the domain prefix the signature is worthless.
        assert!(key
            .verifying_key()
            .verify(&decoded.manifest.canonical_bytes(), &signature.signature)
            .is_err());
    }

    #[test]
    fn signing_an_invalid_manifest_is_refused() {
        let mut manifest = sample_manifest(b"weights");
        manifest.size += 1;
        assert!(matches!(
            SignedManifest::sign(manifest, &new_key()),
            Err(SigningError::InvalidManifest(
                ManifestError::ChunksDoNotCoverSize { .. }
            ))
        ));
    }

    #[test]
    fn malformed_signatures_are_refused_at_decode() {
        let signed = SignedManifest::sign(sample_manifest(b"w"), &new_key()).unwrap();
        let json = signed.to_json_pretty();
        let encoded = BASE64.encode(signed.signatures[0].signature.to_bytes());
        for bad in ["!!!", "AAAA"] {
            let broken = json.replace(&encoded, bad);
            assert!(matches!(
                SignedManifest::from_json(broken.as_bytes()),
                Err(SigningError::Json(_))
            ));
        }
    }

    #[test]
    fn pem_keys_round_trip_in_the_coordinator_format() {
        let key = new_key();
        let private_pem = signing_key_to_pem(&key);
        assert!(private_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let parsed = signing_key_from_pem(&private_pem).unwrap();
        assert_eq!(parsed.to_bytes(), key.to_bytes());

        let public_pem = verifying_key_to_pem(&key.verifying_key());
        assert!(public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(
            verifying_key_from_pem(&public_pem).unwrap(),
            key.verifying_key()
        );
    }

    #[test]
    fn keys_written_by_openssl_are_read() {
        // `openssl genpkey -algorithm ed25519` writes PKCS#8 v1 (no public key inside).
        let key = signing_key_from_pem(include_str!("../testdata/ed25519/openssl.key")).unwrap();
        let public =
            verifying_key_from_pem(include_str!("../testdata/ed25519/openssl.pub")).unwrap();
        assert_eq!(key.verifying_key(), public);
    }

    #[test]
    fn wrong_key_files_are_refused_with_the_expected_format() {
        let public_pem = verifying_key_to_pem(&new_key().verifying_key());
        let err = signing_key_from_pem(&public_pem).unwrap_err();
        assert!(err.to_string().contains("PKCS#8"), "{err}");
        let p256_public = include_str!("../testdata/openssf/signing_key.pub");
        assert!(matches!(
            verifying_key_from_pem(p256_public),
            Err(KeyFileError::PublicKey(_))
        ));
    }
}
