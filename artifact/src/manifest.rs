//! The artifact manifest (what a model or adapter is, where it came from, and the
//! digests of its bytes), its validation, the streaming [`Chunker`] that computes those
//! digests, and the canonical bytes that signatures cover.
//!
//! # Canonical encoding
//!
//! [`Manifest::canonical_bytes`] is compact JSON (no whitespace) of the [`Manifest`]
//! struct with its fields in declaration order (`name`, `version`, `kind`, `format`,
//! `architecture`, `quantization`, `size`, `sha256`, `chunk_size`, `chunks`,
//! `base_model`, `license`, `provenance`, `created_at_ms`), nested structs likewise in
//! declaration order, absent options as `null`, digests as lower-case hex, and
//! integers only (no floats, whose text forms vary). Decoding refuses unknown and
//! duplicate fields, so two JSON documents that decode to the same manifest have the
//! same canonical bytes whatever their key order or spacing, and every field that can
//! be decoded is covered by the signature.
//!
//! The signer is not part of the manifest: it is named by the signature.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::digests::Digests;
use crate::ids::Sha256Digest;

/// Largest chunk an agent is asked to hold in memory while verifying it.
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// Longest free-form text field (license, architecture, descriptions, URIs).
const MAX_TEXT_BYTES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Model,
    LoraAdapter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactFormat {
    Gguf,
    Safetensors,
}

/// One contiguous piece of the artifact, verified on its own during download.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    pub index: u64,
    pub offset: u64,
    pub size: u64,
    pub sha256: Sha256Digest,
}

/// An input that went into the artifact (base weights, a data set, a training run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvenanceSource {
    pub uri: String,
    pub sha256: Option<Sha256Digest>,
    pub description: String,
}

/// The federated round that produced an adapter: counts only, never node identities.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedRecord {
    pub federation: String,
    pub round: u64,
    pub contributors: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub sources: Vec<ProvenanceSource>,
    pub federated: Option<FederatedRecord>,
}

/// What is signed about an artifact. Field order is the canonical order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: ArtifactKind,
    pub format: ArtifactFormat,
    pub architecture: String,
    pub quantization: String,
    /// Bytes in the whole artifact.
    pub size: u64,
    /// SHA-256 of the whole artifact.
    pub sha256: Sha256Digest,
    pub chunk_size: u64,
    pub chunks: Vec<Chunk>,
    /// `name@version` of the model an adapter applies to; required for adapters.
    pub base_model: Option<String>,
    /// SPDX identifier or license name.
    pub license: String,
    pub provenance: Provenance,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// A manifest that cannot be accepted, or content that does not match it.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{field} {value:?} is not valid: use 1 to 128 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    InvalidIdentifier { field: &'static str, value: String },
    #[error("base_model {0:?} is not valid: write it as name@version")]
    InvalidBaseModel(String),
    #[error("a lora_adapter manifest must name its base_model as name@version")]
    MissingBaseModel,
    #[error("{field} must not be empty")]
    EmptyField { field: &'static str },
    #[error("{field} is {len} bytes long, above the limit of {limit}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("chunk_size {0} is not valid: it must be between 1 and {MAX_CHUNK_SIZE} bytes")]
    InvalidChunkSize(u64),
    #[error("chunk at position {position} has index {index}: chunks must be numbered 0, 1, 2, ... in order")]
    ChunkIndex { position: usize, index: u64 },
    #[error("chunk {index} starts at byte {offset} but the previous chunk ends at byte {expected}: chunks must be contiguous")]
    ChunkGap {
        index: u64,
        offset: u64,
        expected: u64,
    },
    #[error("chunk {index} is {size} bytes: chunks must be 1 to chunk_size ({chunk_size}) bytes")]
    ChunkSize {
        index: u64,
        size: u64,
        chunk_size: u64,
    },
    #[error("chunks cover {covered} bytes but size is {size}")]
    ChunksDoNotCoverSize { covered: u64, size: u64 },
    #[error("chunk {0} is not in the manifest")]
    NoSuchChunk(u64),
    #[error("chunk {index} does not match the manifest (expected {expected_size} bytes with sha256 {expected}, got {actual_size} bytes with sha256 {actual}): download it again")]
    ChunkMismatch {
        index: u64,
        expected: Sha256Digest,
        expected_size: u64,
        actual: Sha256Digest,
        actual_size: u64,
    },
    #[error("content does not match the manifest (expected {expected_size} bytes with sha256 {expected}, got {actual_size} bytes with sha256 {actual})")]
    ContentMismatch {
        expected: Sha256Digest,
        expected_size: u64,
        actual: Sha256Digest,
        actual_size: u64,
    },
}

/// `[a-z0-9][a-z0-9._-]{0,127}`
fn is_identifier(s: &str) -> bool {
    let bytes = s.as_bytes();
    (1..=128).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

fn check_identifier(field: &'static str, value: &str) -> Result<(), ManifestError> {
    if is_identifier(value) {
        Ok(())
    } else {
        Err(ManifestError::InvalidIdentifier {
            field,
            value: value.chars().take(160).collect(),
        })
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), ManifestError> {
    if value.trim().is_empty() {
        return Err(ManifestError::EmptyField { field });
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(ManifestError::FieldTooLong {
            field,
            len: value.len(),
            limit: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

/// Whether `name@version` is a valid reference to another artifact.
pub fn is_artifact_reference(reference: &str) -> bool {
    reference
        .split_once('@')
        .is_some_and(|(name, version)| is_identifier(name) && is_identifier(version))
}

fn check_chunk_size(chunk_size: u64) -> Result<(), ManifestError> {
    if (1..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(ManifestError::InvalidChunkSize(chunk_size))
    }
}

impl Manifest {
    /// Decodes and validates a manifest.
    pub fn from_json(json: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Self = serde_json::from_slice(json)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Pretty JSON for people; signatures cover [`Self::canonical_bytes`] instead.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest has only string keys and integers")
    }

    /// The deterministic encoding described in the module docs.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest has only string keys and integers")
    }

    /// Checks names, text fields, the base model reference and that the chunks tile
    /// `0..size` exactly.
    pub fn validate(&self) -> Result<(), ManifestError> {
        check_identifier("name", &self.name)?;
        check_identifier("version", &self.version)?;
        check_text("architecture", &self.architecture)?;
        check_text("quantization", &self.quantization)?;
        check_text("license", &self.license)?;
        match (&self.base_model, self.kind) {
            (Some(base), _) if !is_artifact_reference(base) => {
                return Err(ManifestError::InvalidBaseModel(
                    base.chars().take(300).collect(),
                ))
            }
            (None, ArtifactKind::LoraAdapter) => return Err(ManifestError::MissingBaseModel),
            _ => {}
        }
        for source in &self.provenance.sources {
            check_text("provenance source uri", &source.uri)?;
            if source.description.len() > MAX_TEXT_BYTES {
                return Err(ManifestError::FieldTooLong {
                    field: "provenance source description",
                    len: source.description.len(),
                    limit: MAX_TEXT_BYTES,
                });
            }
        }
        if let Some(federated) = &self.provenance.federated {
            check_text("provenance federation", &federated.federation)?;
        }
        self.validate_chunks()
    }

    fn validate_chunks(&self) -> Result<(), ManifestError> {
        check_chunk_size(self.chunk_size)?;
        let mut expected_offset = 0u64;
        for (position, chunk) in self.chunks.iter().enumerate() {
            if chunk.index != position as u64 {
                return Err(ManifestError::ChunkIndex {
                    position,
                    index: chunk.index,
                });
            }
            if chunk.offset != expected_offset {
                return Err(ManifestError::ChunkGap {
                    index: chunk.index,
                    offset: chunk.offset,
                    expected: expected_offset,
                });
            }
            if chunk.size == 0 || chunk.size > self.chunk_size {
                return Err(ManifestError::ChunkSize {
                    index: chunk.index,
                    size: chunk.size,
                    chunk_size: self.chunk_size,
                });
            }
            // Saturating, not checked: reaching 2^64 takes 2^34 maximal chunks, more
            // entries than any decoded manifest can hold in memory.
            expected_offset = chunk.offset.saturating_add(chunk.size);
        }
        if expected_offset != self.size {
            return Err(ManifestError::ChunksDoNotCoverSize {
                covered: expected_offset,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Checks one downloaded chunk against its entry.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> Result<(), ManifestError> {
        let chunk = usize::try_from(index)
            .ok()
            .and_then(|i| self.chunks.get(i))
            .ok_or(ManifestError::NoSuchChunk(index))?;
        let actual = Sha256Digest::of(data);
        if actual != chunk.sha256 || data.len() as u64 != chunk.size {
            return Err(ManifestError::ChunkMismatch {
                index,
                expected: chunk.sha256,
                expected_size: chunk.size,
                actual,
                actual_size: data.len() as u64,
            });
        }
        Ok(())
    }

    /// Checks the digests of a whole artifact (from a [`Chunker`]) against the manifest.
    pub fn verify_content(&self, content: &ChunkedContent) -> Result<(), ManifestError> {
        let matches = content.size == self.size
            && content.sha256 == self.sha256
            && content.chunk_size == self.chunk_size
            && content.chunks == self.chunks;
        if matches {
            Ok(())
        } else {
            Err(ManifestError::ContentMismatch {
                expected: self.sha256,
                expected_size: self.size,
                actual: content.sha256,
                actual_size: content.size,
            })
        }
    }
}

/// The digests of an artifact's bytes, ready to go into a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedContent {
    pub size: u64,
    pub sha256: Sha256Digest,
    pub chunk_size: u64,
    pub chunks: Vec<Chunk>,
}

/// Splits a byte stream into `chunk_size` chunks (the last may be shorter) and hashes
/// each chunk and the whole, holding only the two hash states in memory.
#[derive(Clone, Debug)]
pub struct Chunker {
    chunk_size: u64,
    digests: Digests,
    current_len: u64,
    size: u64,
    chunks: Vec<Chunk>,
}

impl Chunker {
    pub fn new(chunk_size: u64) -> Result<Self, ManifestError> {
        check_chunk_size(chunk_size)?;
        Ok(Self {
            chunk_size,
            digests: Digests::default(),
            current_len: 0,
            size: 0,
            chunks: Vec::new(),
        })
    }

    /// Feeds the next bytes of the stream; any split of the stream gives the same result.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.chunk_size - self.current_len;
            let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            self.digests.update(&bytes[..take]);
            self.current_len += take as u64;
            bytes = &bytes[take..];
            if self.current_len == self.chunk_size {
                self.close_chunk();
            }
        }
    }

    fn close_chunk(&mut self) {
        self.chunks.push(Chunk {
            index: self.chunks.len() as u64,
            offset: self.size,
            size: self.current_len,
            sha256: self.digests.finish_chunk(),
        });
        self.size += self.current_len;
        self.current_len = 0;
    }

    pub fn finish(mut self) -> ChunkedContent {
        if self.current_len > 0 {
            self.close_chunk();
        }
        ChunkedContent {
            size: self.size,
            sha256: self.digests.finish_whole(),
            chunk_size: self.chunk_size,
            chunks: self.chunks,
        }
    }

    /// Reads `reader` to its end through a fixed 64 KiB buffer.
    pub fn digest_reader(
        chunk_size: u64,
        mut reader: impl Read,
    ) -> std::io::Result<ChunkedContent> {
        let mut chunker = Self::new(chunk_size)
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(chunker.finish()),
                Ok(n) => chunker.update(&buf[..n]),
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid adapter manifest over `content`, for tests in this crate.
    pub(crate) fn sample_manifest(content: &[u8]) -> Manifest {
        let mut chunker = Chunker::new(4).unwrap();
        chunker.update(content);
        let digests = chunker.finish();
        Manifest {
            name: "smollm2-support-adapter".into(),
            version: "1.0.0".into(),
            kind: ArtifactKind::LoraAdapter,
            format: ArtifactFormat::Gguf,
            architecture: "llama".into(),
            quantization: "F16".into(),
            size: digests.size,
            sha256: digests.sha256,
            chunk_size: digests.chunk_size,
            chunks: digests.chunks,
            base_model: Some("smollm2-135m-instruct@q4_1".into()),
            license: "Apache-2.0".into(),
            provenance: Provenance {
                sources: vec![ProvenanceSource {
                    uri: "dataset://plant-7/maintenance-qa".into(),
                    sha256: Some(Sha256Digest::of(b"dataset")),
                    description: "maintenance questions and answers".into(),
                }],
                federated: Some(FederatedRecord {
                    federation: "plants-eu".into(),
                    round: 12,
                    contributors: 9,
                }),
            },
            created_at_ms: 1_760_000_000_000,
        }
    }

    #[test]
    fn chunker_output_does_not_depend_on_how_the_stream_is_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut whole = Chunker::new(64).unwrap();
        whole.update(&data);
        let whole = whole.finish();
        let mut pieces = Chunker::new(64).unwrap();
        for piece in data.chunks(13) {
            pieces.update(piece);
        }
        assert_eq!(pieces.finish(), whole);
        assert_eq!(Chunker::digest_reader(64, &data[..]).unwrap(), whole);

        assert_eq!(whole.size, 1000);
        assert_eq!(whole.sha256, Sha256Digest::of(&data));
        assert_eq!(whole.chunks.len(), 16);
        assert_eq!(whole.chunks[15].offset, 960);
        assert_eq!(whole.chunks[15].size, 40);
        assert_eq!(whole.chunks[3].sha256, Sha256Digest::of(&data[192..256]));
    }

    #[test]
    fn empty_content_has_no_chunks_and_validates() {
        let manifest = sample_manifest(b"");
        assert!(manifest.chunks.is_empty());
        manifest.validate().unwrap();
    }

    #[test]
    fn chunk_size_must_be_positive_and_bounded() {
        assert!(matches!(
            Chunker::new(0),
            Err(ManifestError::InvalidChunkSize(0))
        ));
        assert!(Chunker::new(MAX_CHUNK_SIZE + 1).is_err());
    }

    #[test]
    fn field_order_in_the_input_does_not_change_the_canonical_bytes() {
        let manifest = sample_manifest(b"hello, fleet");
        let canonical = manifest.canonical_bytes();
        let value: serde_json::Value = serde_json::from_slice(&canonical).unwrap();
        let object = value.as_object().unwrap();
        // Rebuild the JSON text with the top-level keys reversed, pretty-printed.
        let reversed: Vec<String> = object
            .iter()
            .rev()
            .map(|(k, v)| {
                format!(
                    "  {}: {}",
                    serde_json::to_string(k).unwrap(),
                    serde_json::to_string_pretty(v).unwrap()
                )
            })
            .collect();
        let reordered = format!("{{\n{}\n}}", reversed.join(",\n"));
        assert_ne!(reordered.as_bytes(), canonical.as_slice());
        let decoded = Manifest::from_json(reordered.as_bytes()).unwrap();
        assert_eq!(decoded.canonical_bytes(), canonical);
    }

    #[test]
    fn any_edited_field_changes_the_canonical_bytes() {
        let original = sample_manifest(b"hello, fleet");
        let canonical = original.canonical_bytes();
        let edits: Vec<fn(&mut Manifest)> = vec![
            |m| m.name.push('x'),
            |m| m.version = "1.0.1".into(),
            |m| m.kind = ArtifactKind::Model,
            |m| m.format = ArtifactFormat::Safetensors,
            |m| m.architecture = "phi3".into(),
            |m| m.quantization = "Q8_0".into(),
            |m| m.size += 1,
            |m| m.sha256 = Sha256Digest::of(b"other"),
            |m| m.chunk_size += 1,
            |m| m.chunks[0].sha256 = Sha256Digest::of(b"other"),
            |m| m.base_model = None,
            |m| m.license = "MIT".into(),
            |m| m.provenance.sources[0].uri.push('x'),
            |m| m.provenance.federated.as_mut().unwrap().contributors += 1,
            |m| m.created_at_ms += 1,
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let mut edited = original.clone();
            edit(&mut edited);
            assert_ne!(edited.canonical_bytes(), canonical, "edit {i}");
        }
    }

    #[test]
    fn unknown_and_duplicate_fields_are_refused() {
        let canonical = String::from_utf8(sample_manifest(b"x").canonical_bytes()).unwrap();
        let extra = canonical.replacen('{', "{\"signer\":\"me\",", 1);
        assert!(matches!(
            Manifest::from_json(extra.as_bytes()),
            Err(ManifestError::Json(_))
        ));
        let duplicate = canonical.replacen('{', "{\"name\":\"other\",", 1);
        assert!(matches!(
            Manifest::from_json(duplicate.as_bytes()),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn names_versions_and_base_models_follow_the_syntax() {
        for bad in [
            "",
            "Upper",
            "-dash-first",
            "has space",
            "a/b",
            &"a".repeat(129),
        ] {
            let mut manifest = sample_manifest(b"x");
            manifest.name = bad.to_string();
            assert!(
                matches!(
                    manifest.validate(),
                    Err(ManifestError::InvalidIdentifier { field: "name", .. })
                ),
                "{bad:?}"
            );
        }
        let mut manifest = sample_manifest(b"x");
        manifest.name = "0.a_b-c".into();
        manifest.validate().unwrap();
        manifest.version = "v1".into();
        manifest.validate().unwrap();
        manifest.version = "1.0+build".into();
        assert!(manifest.validate().is_err());

        let mut manifest = sample_manifest(b"x");
        manifest.base_model = Some("smollm2".into());
        assert!(matches!(
            manifest.validate(),
            Err(ManifestError::InvalidBaseModel(_))
        ));
        manifest.base_model = None;
        assert!(matches!(
            manifest.validate(),
            Err(ManifestError::MissingBaseModel)
        ));
        manifest.kind = ArtifactKind::Model;
        manifest.validate().unwrap();
    }

    #[test]
    fn chunks_must_be_numbered_contiguous_bounded_and_cover_the_size() {
        let good = sample_manifest(b"0123456789");
        good.validate().unwrap();

        let mut m = good.clone();
        m.chunks.swap(0, 1);
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkIndex {
                position: 0,
                index: 1
            })
        ));

        let mut m = good.clone();
        m.chunks[1].offset += 1;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkGap { index: 1, .. })
        ));

        let mut m = good.clone();
        m.chunks[0].size = 5;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunkSize {
                index: 0,
                size: 5,
                ..
            })
        ));

        let mut m = good.clone();
        m.size += 1;
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunksDoNotCoverSize {
                covered: 10,
                size: 11
            })
        ));

        let mut m = good;
        m.chunks.pop();
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ChunksDoNotCoverSize { .. })
        ));
    }

    #[test]
    fn digests_must_be_64_hex_characters() {
        let canonical = String::from_utf8(sample_manifest(b"x").canonical_bytes()).unwrap();
        let digest = sample_manifest(b"x").sha256.to_hex();
        let short = canonical.replace(&digest, &digest[..63]);
        let err = Manifest::from_json(short.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("64 hex characters"), "{err}");
    }

    #[test]
    fn chunks_and_content_are_checked_against_the_manifest() {
        let content = b"0123456789";
        let manifest = sample_manifest(content);
        manifest.verify_chunk(1, b"4567").unwrap();
        assert!(matches!(
            manifest.verify_chunk(1, b"4568"),
            Err(ManifestError::ChunkMismatch { index: 1, .. })
        ));
        assert!(matches!(
            manifest.verify_chunk(3, b""),
            Err(ManifestError::NoSuchChunk(3))
        ));
        manifest
            .verify_content(&Chunker::digest_reader(4, &content[..]).unwrap())
            .unwrap();
        assert!(matches!(
            manifest.verify_content(&Chunker::digest_reader(4, &b"0123456788"[..]).unwrap()),
            Err(ManifestError::ContentMismatch { .. })
        ));
    }
}
