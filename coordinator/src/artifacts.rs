//! The artifact store: signed manifests in the key-value store, bytes as
//! content-addressed chunk files under `<data_dir>/artifacts/chunks/<sha256>`.
//!
//! An upload is checked while it streams, with memory bounded by one frame plus the
//! GGUF header: the signature against the trust policy first, then each chunk's digest
//! as it completes, the GGUF header against the manifest, and the whole-file digest at
//! the end. Verified chunks wait in a staging directory; only when every check passed
//! are they moved into place and the record written, so a refused upload leaves no
//! trace but its event.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanofleet_artifact::digests::Digests;
use nanofleet_artifact::gguf::{GgufError, GgufHeader, Limits, ParseOutcome};
use nanofleet_artifact::manifest::{ArtifactFormat, ArtifactKind, Manifest, ManifestError};
use nanofleet_artifact::signing::{SignedManifest, SigningError};
use nanofleet_artifact::trust::{self, PolicyError, TrustError, TrustPolicy};
use serde::{Deserialize, Serialize};

use crate::now_unix_ms;
use crate::store::{decode, encode, Keyspace, KvStore, StoreError};

/// Name of the trust policy file in the data directory.
pub const TRUST_POLICY_FILE: &str = "trust.json";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("the signed manifest is not valid: {0}")]
    BadManifest(#[from] SigningError),
    #[error("the signature is not accepted: {0}")]
    Untrusted(#[from] TrustError),
    #[error("{0} is already published; publish a new version instead")]
    AlreadyPublished(String),
    #[error("the upload is longer than the manifest's {expected} bytes")]
    TooLong { expected: u64 },
    #[error("the upload ended after {received} of the manifest's {expected} bytes")]
    Truncated { received: u64, expected: u64 },
    #[error("the upload does not match the manifest: {0}")]
    Mismatch(#[from] ManifestError),
    #[error("the file is not a valid GGUF model: {0}")]
    Gguf(#[from] GgufError),
    #[error("the GGUF header says {field} is {in_file:?} but the manifest says {in_manifest:?}")]
    GgufDisagrees {
        field: &'static str,
        in_file: String,
        in_manifest: String,
    },
    #[error("the upload sent data before its signed manifest")]
    NoManifest,
    #[error("the file is not a valid LoRA adapter: {0}")]
    Adapter(String),
    #[error("no artifact {0}")]
    NotFound(String),
    #[error(
        "no trust policy: add a publisher key with `nanofleet-coordinator trust add-key` ({0})"
    )]
    NoTrustPolicy(String),
    #[error("the trust policy file is not valid: {0}")]
    BadTrustPolicy(#[from] PolicyError),
    #[error("artifact storage failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the store keeps about a published artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub signed: SignedManifest,
    /// Key ids the trust policy accepted at publish time.
    pub signer_key_ids: Vec<String>,
    pub published_at_ms: i64,
    pub published_by: String,
}

impl ArtifactRecord {
    pub fn manifest(&self) -> &Manifest {
        &self.signed.manifest
    }
}

pub fn reference(manifest: &Manifest) -> String {
    format!("{}@{}", manifest.name, manifest.version)
}

/// `name@version` of a signed manifest that parses, for naming what a refusal was about
/// even when its signature is not accepted.
pub fn subject_of(signed_json: &[u8]) -> Option<String> {
    SignedManifest::from_json(signed_json)
        .ok()
        .map(|signed| reference(&signed.manifest))
}

/// Published artifacts and their bytes; cheap to clone.
#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn KvStore>,
    dir: PathBuf,
    trust_path: PathBuf,
}

impl ArtifactStore {
    /// `data_dir` is the coordinator's data directory.
    pub fn open(store: Arc<dyn KvStore>, data_dir: &Path) -> Result<Self, ArtifactError> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(dir.join("chunks"))?;
        std::fs::create_dir_all(dir.join("staging"))?;
        Ok(Self {
            store,
            dir,
            trust_path: data_dir.join(TRUST_POLICY_FILE),
        })
    }

    /// The trust policy file's text as it is on disk now, if there is one (for the audit
    /// log, which records each version the coordinator uses).
    pub fn trust_policy_text(&self) -> Option<String> {
        std::fs::read_to_string(&self.trust_path).ok()
    }

    /// The trust policy as it is on disk now, so that edits apply to the next publish.
    pub fn trust_policy(&self) -> Result<TrustPolicy, ArtifactError> {
        let bytes = std::fs::read(&self.trust_path).map_err(|e| {
            ArtifactError::NoTrustPolicy(format!("{}: {e}", self.trust_path.display()))
        })?;
        Ok(TrustPolicy::from_json(&bytes)?)
    }

    /// Starts an upload: parses the signed manifest and checks it against the trust
    /// policy before a single byte of content is accepted.
    pub fn begin(&self, signed_json: &[u8], publisher: &str) -> Result<Upload, ArtifactError> {
        let signed = SignedManifest::from_json(signed_json)?;
        let verified = trust::verify(&signed, &self.trust_policy()?, now_unix_ms().max(0) as u64)?;
        let manifest = verified.manifest().clone();
        match (manifest.kind, manifest.format) {
            (ArtifactKind::Model, ArtifactFormat::Gguf) => {}
            (ArtifactKind::LoraAdapter, ArtifactFormat::Safetensors) => {
                if manifest.size > MAX_ADAPTER_BYTES {
                    return Err(ArtifactError::Adapter(format!(
                        "{} bytes; adapters may have at most {MAX_ADAPTER_BYTES}",
                        manifest.size
                    )));
                }
                let base = manifest.base_model.clone().unwrap_or_default();
                if self
                    .store
                    .get(Keyspace::Artifacts, base.as_bytes())?
                    .is_none()
                {
                    return Err(ArtifactError::Adapter(format!(
                        "its base model {base} is not published here"
                    )));
                }
            }
            (kind, format) => {
                return Err(ArtifactError::Adapter(format!(
                    "a {kind:?} in {format:?} format: models are GGUF, LoRA adapters safetensors"
                )))
            }
        }
        let subject = reference(&manifest);
        if self
            .store
            .get(Keyspace::Artifacts, subject.as_bytes())?
            .is_some()
        {
            return Err(ArtifactError::AlreadyPublished(subject));
        }
        let staging = self
            .dir
            .join("staging")
            .join(format!("{subject}.{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&staging)?;
        Ok(Upload {
            signer_key_ids: vec![verified.signer().to_string()],
            signed,
            publisher: publisher.to_owned(),
            chunk: ChunkWriter::new(&staging, 0)?,
            staging,
            digests: Digests::default(),
            received: 0,
            header: HeaderCheck::default(),
        })
    }

    /// Checks the end of an upload and makes it visible.
    pub fn finish(&self, mut upload: Upload) -> Result<ArtifactRecord, ArtifactError> {
        let manifest = &upload.signed.manifest;
        if upload.received != manifest.size {
            return Err(ArtifactError::Truncated {
                received: upload.received,
                expected: manifest.size,
            });
        }
        if manifest.format == ArtifactFormat::Gguf && !upload.header.done {
            // A header longer than the file itself: the file is cut short.
            upload.header.check(manifest, true)?;
        }
        let whole = std::mem::take(&mut upload.digests).finish_whole();
        if whole != manifest.sha256 {
            return Err(ArtifactError::Mismatch(ManifestError::ContentMismatch {
                expected: manifest.sha256,
                expected_size: manifest.size,
                actual: whole,
                actual_size: upload.received,
            }));
        }
        if manifest.kind == ArtifactKind::LoraAdapter {
            check_adapter(&upload.staging, manifest)?;
        }
        // Every chunk verified: move them into place, durable before the record.
        for chunk in &manifest.chunks {
            let digest = chunk.sha256.to_string();
            let target = self.dir.join("chunks").join(&digest);
            let staged = upload.staging.join(chunk.index.to_string());
            if target.exists() {
                std::fs::remove_file(&staged)?;
            } else {
                std::fs::rename(&staged, &target)?;
            }
        }
        let record = ArtifactRecord {
            signed: upload.signed.clone(),
            signer_key_ids: upload.signer_key_ids.clone(),
            published_at_ms: now_unix_ms(),
            published_by: upload.publisher.clone(),
        };
        let key = reference(manifest);
        let value = encode(&record);
        if !self
            .store
            .compare_and_swap(Keyspace::Artifacts, key.as_bytes(), None, Some(&value))?
        {
            return Err(ArtifactError::AlreadyPublished(key));
        }
        self.store.flush()?;
        Ok(record)
    }

    pub fn get(&self, name: &str, version: &str) -> Result<ArtifactRecord, ArtifactError> {
        let key = format!("{name}@{version}");
        let bytes = self
            .store
            .get(Keyspace::Artifacts, key.as_bytes())?
            .ok_or(ArtifactError::NotFound(key.clone()))?;
        Ok(decode(Keyspace::Artifacts, key.as_bytes(), &bytes)?)
    }

    pub fn list(&self) -> Result<Vec<ArtifactRecord>, ArtifactError> {
        self.store
            .scan(Keyspace::Artifacts)?
            .into_iter()
            .map(|(key, value)| Ok(decode(Keyspace::Artifacts, &key, &value)?))
            .collect()
    }

    /// Path of a stored chunk's bytes.
    pub fn chunk_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("chunks").join(sha256)
    }
}

/// Most bytes a LoRA adapter artifact may have (it is parsed whole).
pub const MAX_ADAPTER_BYTES: u64 = 256 * 1024 * 1024;

/// Reads a staged adapter (bounded by [`MAX_ADAPTER_BYTES`]) and parses it: F32 LoRA
/// matrices with PEFT names, finite values.
fn check_adapter(staging: &Path, manifest: &Manifest) -> Result<(), ArtifactError> {
    let mut bytes = Vec::with_capacity(manifest.size as usize);
    for chunk in &manifest.chunks {
        bytes.extend_from_slice(&std::fs::read(staging.join(chunk.index.to_string()))?);
    }
    let tensors = nanofleet_federated::AdapterTensors::from_safetensors(&bytes)
        .map_err(|e| ArtifactError::Adapter(e.to_string()))?;
    if tensors.is_empty() {
        return Err(ArtifactError::Adapter("it holds no LoRA matrices".into()));
    }
    Ok(())
}

/// The chunk being received: written to `<staging>/<index>`.
struct ChunkWriter {
    index: u64,
    file: File,
    written: u64,
}

impl ChunkWriter {
    fn new(staging: &Path, index: u64) -> std::io::Result<Self> {
        Ok(Self {
            index,
            file: File::create(staging.join(index.to_string()))?,
            written: 0,
        })
    }
}

/// Reads the GGUF header from the first bytes and compares it with the manifest.
#[derive(Default)]
struct HeaderCheck {
    prefix: Vec<u8>,
    done: bool,
}

impl HeaderCheck {
    fn feed(&mut self, bytes: &[u8], manifest: &Manifest) -> Result<(), ArtifactError> {
        if self.done || manifest.format != ArtifactFormat::Gguf {
            return Ok(());
        }
        let limits = Limits::default();
        let room = (limits.max_header_bytes as usize).saturating_sub(self.prefix.len());
        self.prefix
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.check(manifest, false)
    }

    /// Parses what has arrived; `at_end` means no more bytes will come.
    fn check(&mut self, manifest: &Manifest, at_end: bool) -> Result<(), ArtifactError> {
        let header = match GgufHeader::parse_prefix(&self.prefix, &Limits::default())? {
            ParseOutcome::Complete(header) => header,
            ParseOutcome::NeedMore { at_least } if at_end => {
                return Err(ArtifactError::Truncated {
                    received: self.prefix.len() as u64,
                    expected: at_least,
                });
            }
            ParseOutcome::NeedMore { .. } => return Ok(()),
        };
        header.validate_against_size(manifest.size)?;
        let summary = header.summary();
        let agree = |field: &'static str, in_file: Option<String>, in_manifest: &str| {
            let in_file = in_file.unwrap_or_default();
            if in_file == in_manifest {
                Ok(())
            } else {
                Err(ArtifactError::GgufDisagrees {
                    field,
                    in_file,
                    in_manifest: in_manifest.to_owned(),
                })
            }
        };
        agree("architecture", summary.architecture, &manifest.architecture)?;
        agree("quantization", summary.quantization, &manifest.quantization)?;
        self.done = true;
        self.prefix = Vec::new();
        Ok(())
    }
}

/// An upload in progress. Dropping it (a refused or broken upload) removes its
/// staging directory.
pub struct Upload {
    signed: SignedManifest,
    signer_key_ids: Vec<String>,
    publisher: String,
    staging: PathBuf,
    chunk: ChunkWriter,
    /// Of the chunk being received and of everything received.
    digests: Digests,
    received: u64,
    header: HeaderCheck,
}

impl Upload {
    /// Takes the next bytes of the artifact.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), ArtifactError> {
        let manifest = &self.signed.manifest;
        if self.received + data.len() as u64 > manifest.size {
            return Err(ArtifactError::TooLong {
                expected: manifest.size,
            });
        }
        self.header.feed(data, manifest)?;
        self.received += data.len() as u64;
        while !data.is_empty() {
            let chunk = &manifest.chunks[self.chunk.index as usize];
            let take = ((chunk.size - self.chunk.written) as usize).min(data.len());
            let (piece, rest) = data.split_at(take);
            self.chunk.file.write_all(piece)?;
            self.digests.update(piece);
            self.chunk.written += take as u64;
            data = rest;
            if self.chunk.written == chunk.size {
                let digest = self.digests.finish_chunk();
                if digest != chunk.sha256 {
                    return Err(ArtifactError::Mismatch(ManifestError::ChunkMismatch {
                        index: chunk.index,
                        expected: chunk.sha256,
                        expected_size: chunk.size,
                        actual: digest,
                        actual_size: chunk.size,
                    }));
                }
                self.chunk.file.sync_all()?;
                let next = self.chunk.index + 1;
                if (next as usize) < manifest.chunks.len() {
                    self.chunk = ChunkWriter::new(&self.staging, next)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}
