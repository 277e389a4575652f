//! Verification of OpenSSF model-signing bundles made with a key pair
//! (`model_signing sign key`, PyPI package `model-signing` 1.x), so that a model signed
//! upstream can be checked against the digests of the files nanofleet received.
//!
//! What such a bundle is (checked against model-signing 1.1.1):
//! - a Sigstore bundle, media type `application/vnd.dev.sigstore.bundle.v0.3+json`,
//!   whose `verificationMaterial.publicKey.hint` is the hex SHA-256 of the signer's
//!   public key as SPKI PEM text, and which has no transparency-log entries;
//! - a DSSE envelope with payload type `application/vnd.in-toto+json`, signed with ECDSA
//!   (P-256 and SHA-256 here; DER signature, base64) over the DSSE pre-authentication
//!   encoding `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`;
//! - a payload that is an in-toto v1 statement with predicate type
//!   `https://model_signing/signature/v1.0`, one subject whose sha256 is the SHA-256 of
//!   the concatenated raw digests of the `predicate.resources` in listed order, and one
//!   resource `{name, algorithm, digest}` per file (names relative to the signed
//!   directory; a single signed file is named `.`).
//!
//! Not supported, and refused with a message saying so: P-384/P-521 keys, certificate
//! and Sigstore (keyless) bundles, the `shards` serialization, non-SHA-256 hashes, and
//! the pre-1.0 predicate.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ids::Sha256Digest;

const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";
/// Envelopes with more signatures are refused before any is checked.
const MAX_DSSE_SIGNATURES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum OpenSsfError {
    #[error("not a Sigstore bundle: {0}")]
    Json(#[source] serde_json::Error),
    #[error("bundle media type {0:?} is not supported: expected {BUNDLE_MEDIA_TYPE} (model-signing 1.x)")]
    MediaType(String),
    #[error("public key is not an ECDSA P-256 key in SPKI PEM (model_signing also accepts P-384 and P-521, which nanofleet does not): {0}")]
    PublicKey(String),
    #[error("bundle was signed by the key with hint {bundle}, but the given public key has hint {given}: use the signer's public key")]
    KeyHintMismatch { bundle: String, given: String },
    #[error("bundle has no DSSE envelope: only bundles written by `model_signing sign key` are supported")]
    NoEnvelope,
    #[error("DSSE payload type {0:?} is not supported: expected {IN_TOTO_PAYLOAD_TYPE}")]
    PayloadType(String),
    #[error("DSSE envelope has {0} signatures: expected 1 to {MAX_DSSE_SIGNATURES}")]
    SignatureCount(usize),
    #[error("DSSE {0} is not standard base64")]
    Base64(&'static str),
    #[error("no DSSE signature verifies with the given key: the bundle was altered, or another key signed it")]
    BadSignature,
    #[error("signed statement is not a model_signing v1.0 statement: {0}")]
    Statement(String),
    #[error("model was signed with serialization method {method:?} and hash {hash_type:?}: only method \"files\" with sha256 is supported (sign whole files, with sha256)")]
    UnsupportedSerialization { method: String, hash_type: String },
    #[error("signed statement is inconsistent: its subject digest does not match its resources")]
    RootDigestMismatch,
    #[error("signed statement lists {0:?} twice")]
    DuplicateFile(String),
    #[error("file {0:?} is expected but the signature does not cover it")]
    MissingFile(String),
    #[error("the signature covers file {0:?}, which was not expected: the model has a file nanofleet did not receive")]
    UnexpectedFile(String),
    #[error("file {name:?} has sha256 {expected}, but the signature covers {signed}")]
    FileDigestMismatch {
        name: String,
        expected: Sha256Digest,
        signed: Sha256Digest,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    verification_material: VerificationMaterial,
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerificationMaterial {
    public_key: Option<PublicKeyIdentifier>,
}

#[derive(Deserialize)]
struct PublicKeyIdentifier {
    hint: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    statement_type: String,
    subject: Vec<Subject>,
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Deserialize)]
struct Subject {
    name: String,
    digest: SubjectDigest,
}

#[derive(Deserialize)]
struct SubjectDigest {
    sha256: Sha256Digest,
}

#[derive(Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<Resource>,
}

#[derive(Deserialize)]
struct Serialization {
    method: String,
    hash_type: String,
}

#[derive(Deserialize)]
struct Resource {
    name: String,
    algorithm: String,
    digest: String,
}

/// What a verified bundle vouches for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedModelSignature {
    /// The statement's subject name (the signed directory's or file's name).
    pub model_name: String,
    /// Every signed file and its digest, in the statement's order.
    pub files: Vec<(String, Sha256Digest)>,
}

/// DSSE pre-authentication encoding.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The key hint model_signing writes: hex SHA-256 of the SPKI PEM text (LF endings).
fn key_hint(key: &VerifyingKey) -> String {
    let pem = key
        .to_public_key_pem(LineEnding::LF)
        .expect("a P-256 public key always encodes as SPKI");
    hex::encode(Sha256::digest(pem.as_bytes()))
}

/// Verifies a `model_signing sign key` bundle made with `public_key_pem` (SPKI PEM,
/// ECDSA P-256) and checks that it covers exactly `expected_files` (name relative to
/// the signed directory, or `.` for a single signed file; SHA-256 of its content).
pub fn verify_bundle(
    bundle_json: &[u8],
    public_key_pem: &str,
    expected_files: &[(&str, Sha256Digest)],
) -> Result<VerifiedModelSignature, OpenSsfError> {
    let key = VerifyingKey::from_public_key_pem(public_key_pem)
        .map_err(|err| OpenSsfError::PublicKey(err.to_string()))?;
    let bundle: Bundle = serde_json::from_slice(bundle_json).map_err(OpenSsfError::Json)?;
    if bundle.media_type != BUNDLE_MEDIA_TYPE {
        return Err(OpenSsfError::MediaType(bundle.media_type));
    }
    // Bundles from model-signing before 1.1 have no hint; the signature check below
    // is what proves the key either way.
    let bundle_hint = bundle
        .verification_material
        .public_key
        .and_then(|k| k.hint)
        .filter(|hint| !hint.is_empty());
    if let Some(bundle) = bundle_hint {
        let given = key_hint(&key);
        if !bundle.eq_ignore_ascii_case(&given) {
            return Err(OpenSsfError::KeyHintMismatch { bundle, given });
        }
    }
    let envelope = bundle.dsse_envelope.ok_or(OpenSsfError::NoEnvelope)?;
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(OpenSsfError::PayloadType(envelope.payload_type));
    }
    if !(1..=MAX_DSSE_SIGNATURES).contains(&envelope.signatures.len()) {
        return Err(OpenSsfError::SignatureCount(envelope.signatures.len()));
    }
    let payload = BASE64
        .decode(&envelope.payload)
        .map_err(|_| OpenSsfError::Base64("payload"))?;
    let message = pae(&envelope.payload_type, &payload);
    let mut verified = false;
    for signature in &envelope.signatures {
        let der = BASE64
            .decode(&signature.sig)
            .map_err(|_| OpenSsfError::Base64("signature"))?;
        if let Ok(signature) = Signature::from_der(&der) {
            verified |= key.verify(&message, &signature).is_ok();
        }
    }
    if !verified {
        return Err(OpenSsfError::BadSignature);
    }
    // Only now is the payload authentic; from here on it is interpreted.
    let statement: Statement =
        serde_json::from_slice(&payload).map_err(|err| OpenSsfError::Statement(err.to_string()))?;
    let signed_files = signed_files(statement)?;
    check_files(&signed_files.files, expected_files)?;
    Ok(signed_files)
}

/// The files a v1.0 statement lists, after checking its shape and root digest.
fn signed_files(statement: Statement) -> Result<VerifiedModelSignature, OpenSsfError> {
    if statement.statement_type != STATEMENT_TYPE {
        return Err(OpenSsfError::Statement(format!(
            "_type is {:?}, expected {STATEMENT_TYPE}",
            statement.statement_type
        )));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(OpenSsfError::Statement(format!(
            "predicateType is {:?}, expected {PREDICATE_TYPE} (re-sign with model-signing 1.x)",
            statement.predicate_type
        )));
    }
    let [subject] = <[Subject; 1]>::try_from(statement.subject).map_err(|subjects| {
        OpenSsfError::Statement(format!("{} subjects, expected 1", subjects.len()))
    })?;
    let serialization = statement.predicate.serialization;
    if serialization.method != "files" || serialization.hash_type != "sha256" {
        return Err(OpenSsfError::UnsupportedSerialization {
            method: serialization.method,
            hash_type: serialization.hash_type,
        });
    }
    let mut root = Sha256::new();
    let mut files = Vec::with_capacity(statement.predicate.resources.len());
    for resource in statement.predicate.resources {
        if resource.algorithm != "sha256" {
            return Err(OpenSsfError::UnsupportedSerialization {
                method: serialization.method,
                hash_type: resource.algorithm,
            });
        }
        let digest: Sha256Digest = resource.digest.parse().map_err(|err| {
            OpenSsfError::Statement(format!("resource {:?}: {err}", resource.name))
        })?;
        root.update(digest.as_bytes());
        files.push((resource.name, digest));
    }
    if Sha256Digest::from_bytes(root.finalize().into()) != subject.digest.sha256 {
        return Err(OpenSsfError::RootDigestMismatch);
    }
    Ok(VerifiedModelSignature {
        model_name: subject.name,
        files,
    })
}

/// The signed files must be exactly the expected ones, with the same digests.
fn check_files(
    signed: &[(String, Sha256Digest)],
    expected: &[(&str, Sha256Digest)],
) -> Result<(), OpenSsfError> {
    let mut signed_by_name = std::collections::HashMap::with_capacity(signed.len());
    for (name, digest) in signed {
        if signed_by_name.insert(name.as_str(), *digest).is_some() {
            return Err(OpenSsfError::DuplicateFile(name.clone()));
        }
    }
    for (name, expected_digest) in expected {
        match signed_by_name.remove(name) {
            None => return Err(OpenSsfError::MissingFile((*name).to_owned())),
            Some(signed_digest) if signed_digest != *expected_digest => {
                return Err(OpenSsfError::FileDigestMismatch {
                    name: (*name).to_owned(),
                    expected: *expected_digest,
                    signed: signed_digest,
                })
            }
            Some(_) => {}
        }
    }
    // Report the first leftover in statement order, so the message is deterministic.
    match signed
        .iter()
        .find(|(name, _)| signed_by_name.contains_key(name.as_str()))
    {
        Some((name, _)) => Err(OpenSsfError::UnexpectedFile(name.clone())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;

    const BUNDLE: &[u8] = include_bytes!("../testdata/openssf/model.sig");
    const SINGLE_FILE_BUNDLE: &[u8] = include_bytes!("../testdata/openssf/weights.bin.sig");
    const PUBLIC_KEY: &str = include_str!("../testdata/openssf/signing_key.pub");
    const CONFIG: &[u8] = include_bytes!("../testdata/openssf/model/config.json");
    const WEIGHTS: &[u8] = include_bytes!("../testdata/openssf/model/weights.bin");

    fn model_files() -> Vec<(&'static str, Sha256Digest)> {
        vec![
            ("weights.bin", Sha256Digest::of(WEIGHTS)),
            ("config.json", Sha256Digest::of(CONFIG)),
        ]
    }

    fn bundle_json() -> serde_json::Value {
        serde_json::from_slice(BUNDLE).unwrap()
    }

    fn to_bytes(value: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }

    #[test]
    fn a_bundle_written_by_model_signing_verifies() {
        let verified = verify_bundle(BUNDLE, PUBLIC_KEY, &model_files()).unwrap();
        assert_eq!(verified.model_name, "model");
        assert_eq!(
            verified.files,
            vec![
                ("config.json".to_owned(), Sha256Digest::of(CONFIG)),
                ("weights.bin".to_owned(), Sha256Digest::of(WEIGHTS)),
            ]
        );
    }

    #[test]
    fn a_single_file_bundle_names_its_file_dot() {
        let verified = verify_bundle(
            SINGLE_FILE_BUNDLE,
            PUBLIC_KEY,
            &[(".", Sha256Digest::of(WEIGHTS))],
        )
        .unwrap();
        assert_eq!(verified.model_name, "weights.bin");
    }

    #[test]
    fn the_hint_matches_the_key_as_model_signing_computes_it() {
        let key = VerifyingKey::from_public_key_pem(PUBLIC_KEY).unwrap();
        assert_eq!(
            key_hint(&key),
            hex::encode(Sha256::digest(PUBLIC_KEY.as_bytes()))
        );
    }

    #[test]
    fn files_must_match_exactly() {
        let mut files = model_files();
        files[0].1 = Sha256Digest::of(b"tampered weights");
        assert!(matches!(
            verify_bundle(BUNDLE, PUBLIC_KEY, &files),
            Err(OpenSsfError::FileDigestMismatch { name, .. }) if name == "weights.bin"
        ));
        assert!(matches!(
            verify_bundle(BUNDLE, PUBLIC_KEY, &model_files()[..1]),
            Err(OpenSsfError::UnexpectedFile(name)) if name == "config.json"
        ));
        let mut files = model_files();
        files.push(("tokenizer.json", Sha256Digest::of(b"{}")));
        assert!(matches!(
            verify_bundle(BUNDLE, PUBLIC_KEY, &files),
            Err(OpenSsfError::MissingFile(name)) if name == "tokenizer.json"
        ));
    }

    #[test]
    fn another_key_is_refused() {
        let other = SigningKey::random(&mut rand::rngs::OsRng);
        let other_pem = other
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        assert!(matches!(
            verify_bundle(BUNDLE, &other_pem, &model_files()),
            Err(OpenSsfError::KeyHintMismatch { .. })
        ));
        // Without the hint, the signature check itself refuses the other key.
        let mut bundle = bundle_json();
        bundle["verificationMaterial"]["publicKey"]["hint"] = "".into();
        assert!(matches!(
            verify_bundle(&to_bytes(&bundle), &other_pem, &model_files()),
            Err(OpenSsfError::BadSignature)
        ));
        verify_bundle(&to_bytes(&bundle), PUBLIC_KEY, &model_files()).unwrap();
    }

    #[test]
    fn an_altered_payload_is_refused() {
        let mut bundle = bundle_json();
        let payload = BASE64
            .decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        let altered = String::from_utf8(payload).unwrap().replace(
            &Sha256Digest::of(WEIGHTS).to_hex(),
            &Sha256Digest::of(b"evil").to_hex(),
        );
        bundle["dsseEnvelope"]["payload"] = BASE64.encode(altered).into();
        assert!(matches!(
            verify_bundle(&to_bytes(&bundle), PUBLIC_KEY, &model_files()),
            Err(OpenSsfError::BadSignature)
        ));
    }

    /// Signs `statement` the way model_signing does, with a fresh key.
    fn sign_statement(statement: &serde_json::Value) -> (Vec<u8>, String) {
        use p256::ecdsa::signature::Signer as _;
        let key = SigningKey::random(&mut rand::rngs::OsRng);
        let payload = serde_json::to_vec(statement).unwrap();
        let signature: Signature = key.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &payload));
        let bundle = serde_json::json!({
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": { "publicKey": { "hint": key_hint(key.verifying_key()) }, "tlogEntries": [] },
            "dsseEnvelope": {
                "payload": BASE64.encode(payload),
                "payloadType": IN_TOTO_PAYLOAD_TYPE,
                "signatures": [ { "sig": BASE64.encode(signature.to_der().as_bytes()), "keyid": "" } ],
            },
        });
        (
            to_bytes(&bundle),
            key.verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        )
    }

    fn signed_statement() -> serde_json::Value {
        let payload = BASE64
            .decode(bundle_json()["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        serde_json::from_slice(&payload).unwrap()
    }

    #[test]
    fn validly_signed_but_unsupported_or_inconsistent_statements_are_refused() {
        let (bundle, key) = sign_statement(&signed_statement());
        verify_bundle(&bundle, &key, &model_files()).unwrap();

        let mut statement = signed_statement();
        statement["predicate"]["serialization"]["method"] = "shards".into();
        let (bundle, key) = sign_statement(&statement);
        assert!(matches!(
            verify_bundle(&bundle, &key, &model_files()),
            Err(OpenSsfError::UnsupportedSerialization { .. })
        ));

        let mut statement = signed_statement();
        statement["subject"][0]["digest"]["sha256"] = Sha256Digest::of(b"x").to_hex().into();
        let (bundle, key) = sign_statement(&statement);
        assert!(matches!(
            verify_bundle(&bundle, &key, &model_files()),
            Err(OpenSsfError::RootDigestMismatch)
        ));

        let mut statement = signed_statement();
        statement["predicateType"] = "https://model_signing/Digests/v0.1".into();
        let (bundle, key) = sign_statement(&statement);
        assert!(matches!(
            verify_bundle(&bundle, &key, &model_files()),
            Err(OpenSsfError::Statement(_))
        ));
    }

    #[test]
    fn malformed_bundles_and_keys_are_refused() {
        assert!(matches!(
            verify_bundle(b"{}", PUBLIC_KEY, &[]),
            Err(OpenSsfError::Json(_))
        ));
        let mut bundle = bundle_json();
        bundle["mediaType"] = "application/vnd.dev.sigstore.bundle+json;version=0.1".into();
        assert!(matches!(
            verify_bundle(&to_bytes(&bundle), PUBLIC_KEY, &model_files()),
            Err(OpenSsfError::MediaType(_))
        ));
        let ed25519_pem = crate::signing::verifying_key_to_pem(
            &ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng).verifying_key(),
        );
        assert!(matches!(
            verify_bundle(BUNDLE, &ed25519_pem, &model_files()),
            Err(OpenSsfError::PublicKey(_))
        ));
    }
}
