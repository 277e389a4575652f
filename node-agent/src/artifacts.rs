//! Artifacts on the device: an assignment's signed manifest is checked against the
//! agent's own trust policy before anything is fetched; missing chunks are fetched
//! (resuming after the last verified one) and each is verified as it completes; the
//! whole file and its GGUF header are checked; then the active version switches
//! atomically and the previous one stays on disk for instant rollback. Anything that
//! fails a check is deleted, never activated, and reported with the reason.
//!
//! Layout under `<data_dir>/artifacts/<name>/`: `state.json` (active and previous
//! version), and one directory per kept version holding `model.gguf` (complete and
//! verified) or `model.gguf.partial` (being fetched).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nanofleet_artifact::gguf::{GgufHeader, Limits};
use nanofleet_artifact::ids::Sha256Digest;
use nanofleet_artifact::manifest::Manifest;
use nanofleet_artifact::signing::SignedManifest;
use nanofleet_artifact::trust::{self, TrustPolicy};
use nanofleet_proto::v1::{
    node_service_client::NodeServiceClient, ArtifactReport, ArtifactState, AssignArtifact,
    FetchChunksRequest, ModelHealth,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

const MODEL_FILE: &str = "model.gguf";
const PARTIAL_FILE: &str = "model.gguf.partial";
const STATE_FILE: &str = "state.json";

/// Why applying an assignment stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The artifact is refused: reported, never activated.
    #[error("{0}")]
    Refused(String),
    /// The connection broke; the assignment comes again when the session reconnects,
    /// and the download resumes from the last verified chunk.
    #[error("download interrupted: {0}")]
    Interrupted(String),
    #[error("local artifact storage failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Which versions of one artifact name the device holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    pub active: Option<String>,
    pub previous: Option<String>,
}

pub struct ArtifactManager {
    dir: PathBuf,
    trust: Option<TrustPolicy>,
    max_bytes_per_sec: u64,
}

fn sha256_of_file_range(file: &mut File, offset: u64, len: u64) -> std::io::Result<Sha256Digest> {
    file.seek(SeekFrom::Start(offset))?;
    let mut hasher = Sha256::new();
    let mut reader = file.take(len);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Sha256Digest::from_bytes(hasher.finalize().into()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ArtifactManager {
    pub fn new(data_dir: &Path, trust: Option<TrustPolicy>, max_bytes_per_sec: u64) -> Self {
        Self {
            dir: data_dir.join("artifacts"),
            trust,
            max_bytes_per_sec,
        }
    }

    fn slot_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn state(&self, name: &str) -> SlotState {
        std::fs::read(self.slot_dir(name).join(STATE_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn write_state(&self, name: &str, state: &SlotState) -> std::io::Result<()> {
        let dir = self.slot_dir(name);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("state.json.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(state).expect("state serializes"))?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
    }

    /// Checks the signed manifest against this device's trust policy.
    fn verify_signature(&self, signed_json: &[u8]) -> Result<Manifest, ApplyError> {
        let trust = self.trust.as_ref().ok_or_else(|| {
            ApplyError::Refused("this agent has no trust policy (trust_policy in its configuration); it activates nothing".to_owned())
        })?;
        let signed = SignedManifest::from_json(signed_json)
            .map_err(|e| ApplyError::Refused(format!("manifest refused: {e}")))?;
        let verified = trust::verify(&signed, trust, now_ms())
            .map_err(|e| ApplyError::Refused(format!("signature refused: {e}")))?;
        Ok(verified.into_manifest())
    }

    /// Applies one assignment; returns the report for the coordinator, or `None` when
    /// the assignment only deactivated a name.
    pub async fn apply(
        &self,
        client: &mut NodeServiceClient<Channel>,
        assign: &AssignArtifact,
    ) -> Result<Option<ArtifactReport>, ApplyError> {
        if assign.signed_manifest.is_empty() {
            let mut state = self.state(&assign.name);
            if let Some(active) = state.active.take() {
                state.previous = Some(active);
                self.write_state(&assign.name, &state)?;
                tracing::info!(name = %assign.name, "artifact deactivated");
            }
            return Ok(None);
        }
        let manifest = self.verify_signature(&assign.signed_manifest)?;
        let version_dir = self.slot_dir(&manifest.name).join(&manifest.version);
        let model = version_dir.join(MODEL_FILE);
        let mut bytes_fetched = 0;
        if !model.exists() {
            std::fs::create_dir_all(&version_dir)?;
            bytes_fetched = self.download(client, &manifest, &version_dir).await?;
        }
        let check = {
            let manifest = manifest.clone();
            let model = model.clone();
            tokio::task::spawn_blocking(move || check_model(&manifest, &model))
                .await
                .map_err(|e| ApplyError::Io(std::io::Error::other(e)))?
        };
        if let Err(reason) = check {
            let _ = std::fs::remove_dir_all(&version_dir);
            return Err(ApplyError::Refused(reason));
        }
        let mut state = self.state(&manifest.name);
        if state.active.as_deref() != Some(manifest.version.as_str()) {
            state.previous = state.active.take();
            state.active = Some(manifest.version.clone());
            self.write_state(&manifest.name, &state)?;
            self.prune(&manifest.name, &state)?;
            tracing::info!(name = %manifest.name, version = %manifest.version, previous = ?state.previous, "artifact activated");
        }
        Ok(Some(ArtifactReport {
            rollout_id: assign.rollout_id.clone(),
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            state: ArtifactState::Active as i32,
            reason: String::new(),
            health: Some(ModelHealth {
                loaded: true,
                ..Default::default()
            }),
            bytes_fetched,
            previous_version: state.previous.clone().unwrap_or_default(),
        }))
    }

    /// Keeps the active and previous versions; removes the others.
    fn prune(&self, name: &str, state: &SlotState) -> std::io::Result<()> {
        for entry in std::fs::read_dir(self.slot_dir(name))?.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let kept = Some(&file_name) == state.active.as_ref()
                || Some(&file_name) == state.previous.as_ref();
            if entry.path().is_dir() && !kept {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }

    /// Fetches what is missing into the partial file, verifying each chunk; returns
    /// the bytes fetched. The partial file becomes `model.gguf` once complete.
    async fn download(
        &self,
        client: &mut NodeServiceClient<Channel>,
        manifest: &Manifest,
        version_dir: &Path,
    ) -> Result<u64, ApplyError> {
        let partial_path = version_dir.join(PARTIAL_FILE);
        let mut partial = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial_path)?;
        // Resume after the last chunk that is on disk and verifies.
        let on_disk = partial.metadata()?.len();
        let mut first = 0;
        for chunk in &manifest.chunks {
            if chunk.offset + chunk.size > on_disk
                || sha256_of_file_range(&mut partial, chunk.offset, chunk.size)? != chunk.sha256
            {
                break;
            }
            first += 1;
        }
        let resume_at = manifest
            .chunks
            .get(first)
            .map_or(manifest.size, |c| c.offset);
        partial.set_len(resume_at)?;
        partial.seek(SeekFrom::Start(resume_at))?;
        if first > 0 {
            tracing::info!(name = %manifest.name, first_chunk = first, "resuming download");
        }

        let mut fetched = 0u64;
        if first < manifest.chunks.len() {
            let mut stream = client
                .fetch_chunks(FetchChunksRequest {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    first_chunk: first as u32,
                    max_bytes_per_sec: self.max_bytes_per_sec,
                })
                .await
                .map_err(|s| ApplyError::Interrupted(s.message().to_owned()))?
                .into_inner();
            let mut index = first;
            let mut written = 0u64;
            let mut hasher = Sha256::new();
            while index < manifest.chunks.len() {
                let frame = stream
                    .message()
                    .await
                    .map_err(|s| ApplyError::Interrupted(s.message().to_owned()))?
                    .ok_or_else(|| {
                        ApplyError::Interrupted("the coordinator ended the stream early".to_owned())
                    })?;
                let chunk = &manifest.chunks[index];
                if frame.chunk_index as usize > index && written < chunk.size {
                    partial.set_len(chunk.offset)?;
                    return Err(ApplyError::Refused(format!(
                        "chunk {index} ended after {written} of the signed manifest's {} bytes",
                        chunk.size
                    )));
                }
                if frame.chunk_index as usize != index
                    || frame.offset != written
                    || written + frame.data.len() as u64 > chunk.size
                {
                    return Err(ApplyError::Interrupted(format!(
                        "unexpected frame (chunk {} offset {}) while expecting chunk {index} offset {written}",
                        frame.chunk_index, frame.offset
                    )));
                }
                partial.write_all(&frame.data)?;
                hasher.update(&frame.data);
                written += frame.data.len() as u64;
                fetched += frame.data.len() as u64;
                if written == chunk.size {
                    let digest =
                        Sha256Digest::from_bytes(std::mem::take(&mut hasher).finalize().into());
                    if digest != chunk.sha256 {
                        partial.set_len(chunk.offset)?;
                        return Err(ApplyError::Refused(format!(
                            "chunk {index} does not match the signed manifest (sha256 {digest}, expected {})",
                            chunk.sha256
                        )));
                    }
                    partial.sync_data()?;
                    index += 1;
                    written = 0;
                }
            }
        }
        partial.sync_all()?;
        drop(partial);
        std::fs::rename(&partial_path, version_dir.join(MODEL_FILE))?;
        Ok(fetched)
    }
}

/// The whole-file checks before activation: size, whole digest, GGUF header.
fn check_model(manifest: &Manifest, model: &Path) -> Result<(), String> {
    let mut file = File::open(model).map_err(|e| format!("cannot open the model: {e}"))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size != manifest.size {
        return Err(format!(
            "the file is {size} bytes; the signed manifest says {}",
            manifest.size
        ));
    }
    let digest = sha256_of_file_range(&mut file, 0, size).map_err(|e| e.to_string())?;
    if digest != manifest.sha256 {
        return Err(format!(
            "the file's sha256 {digest} does not match the signed manifest's {}",
            manifest.sha256
        ));
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let header = GgufHeader::read_from(std::io::BufReader::new(file), &Limits::default())
        .map_err(|e| format!("not a valid GGUF model: {e}"))?;
    header
        .validate_against_size(size)
        .map_err(|e| format!("not a valid GGUF model: {e}"))?;
    let summary = header.summary();
    if summary.architecture.as_deref() != Some(manifest.architecture.as_str()) {
        return Err(format!(
            "the GGUF header says architecture {:?}; the signed manifest says {:?}",
            summary.architecture, manifest.architecture
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanofleet_artifact::gguf::{GgmlType, GgufWriter, MetadataValue};
    use nanofleet_artifact::manifest::{ArtifactFormat, ArtifactKind, Chunker, Provenance};
    use nanofleet_artifact::trust::{NamePattern, TrustedKey};

    fn model_bytes() -> Vec<u8> {
        GgufWriter::new()
            .metadata(
                "general.architecture",
                MetadataValue::String("llama".into()),
            )
            .tensor("w", GgmlType::Q8_0, &[32, 4], vec![0; 4 * 34])
            .to_bytes()
            .unwrap()
    }

    fn manifest_for(bytes: &[u8]) -> Manifest {
        let content = Chunker::digest_reader(64, bytes).unwrap();
        Manifest {
            name: "tiny".into(),
            version: "1.0.0".into(),
            kind: ArtifactKind::Model,
            format: ArtifactFormat::Gguf,
            architecture: "llama".into(),
            quantization: "Q8_0".into(),
            size: content.size,
            sha256: content.sha256,
            chunk_size: content.chunk_size,
            chunks: content.chunks,
            base_model: None,
            license: "apache-2.0".into(),
            provenance: Provenance::default(),
            created_at_ms: 1,
        }
    }

    fn manager(dir: &Path, key: &ed25519_dalek::SigningKey) -> ArtifactManager {
        let trusted = TrustedKey::new(key.verifying_key(), vec![NamePattern::new("tiny").unwrap()]);
        ArtifactManager::new(dir, Some(TrustPolicy::new(vec![trusted]).unwrap()), 0)
    }

    #[test]
    fn signatures_are_checked_against_the_agents_own_policy() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let manifest = manifest_for(&model_bytes());
        let signed = SignedManifest::sign(manifest.clone(), &key).unwrap();
        let manager = manager(dir.path(), &key);
        assert_eq!(
            manager
                .verify_signature(signed.to_json_pretty().as_bytes())
                .unwrap(),
            manifest
        );

        let edited = signed.to_json_pretty().replace("apache-2.0", "mit");
        let err = manager.verify_signature(edited.as_bytes()).unwrap_err();
        assert!(err.to_string().starts_with("signature refused"), "{err}");

        let untrusted = SignedManifest::sign(manifest.clone(), &other).unwrap();
        let err = manager
            .verify_signature(untrusted.to_json_pretty().as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("signature refused"), "{err}");

        let no_policy = ArtifactManager::new(dir.path(), None, 0);
        let err = no_policy
            .verify_signature(signed.to_json_pretty().as_bytes())
            .unwrap_err();
        assert!(err.to_string().contains("no trust policy"), "{err}");
    }

    #[test]
    fn whole_file_checks_catch_size_digest_and_header() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = model_bytes();
        let manifest = manifest_for(&bytes);
        let file = dir.path().join(MODEL_FILE);
        std::fs::write(&file, &bytes).unwrap();
        check_model(&manifest, &file).unwrap();

        std::fs::write(&file, &bytes[..bytes.len() - 1]).unwrap();
        assert!(check_model(&manifest, &file).unwrap_err().contains("bytes"));

        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        assert!(check_model(&manifest, &file)
            .unwrap_err()
            .contains("sha256"));

        std::fs::write(&file, &bytes).unwrap();
        let lying = Manifest {
            architecture: "qwen2".into(),
            ..manifest
        };
        assert!(check_model(&lying, &file)
            .unwrap_err()
            .contains("architecture"));
    }

    #[test]
    fn slot_state_switches_and_keeps_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let manager = manager(dir.path(), &key);
        assert_eq!(manager.state("tiny"), SlotState::default());
        let state = SlotState {
            active: Some("2".into()),
            previous: Some("1".into()),
        };
        manager.write_state("tiny", &state).unwrap();
        assert_eq!(manager.state("tiny"), state);
    }
}
