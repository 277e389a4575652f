//! Artifacts on the device: an assignment's signed manifest is checked against the
//! agent's own trust policy before anything is fetched; missing chunks are fetched
//! (resuming after the last verified one) and each is verified as it completes; the
//! whole file and its GGUF header are checked; then the active version switches
//! atomically and the previous one stays on disk for instant rollback. On a serving node a
//! model must also load and answer the smoke prompt (`models::ModelHost`) before it is
//! activated. Anything that fails a check is deleted, never activated, and reported with
//! the reason.
//!
//! A download is a pipeline: the async side receives frames and checks that they line
//! up with the manifest's chunks; a blocking thread writes them to the partial file
//! (with `O_DIRECT` where the filesystem allows, see `Appender`) and feeds each byte
//! once to both the chunk digest and the whole-file digest (`digests`), so the whole
//! file is never read back. On resume the verified prefix is hashed once from disk. The
//! file is made durable with one `fsync` before it is renamed into place; a crash
//! before that loses nothing that resume cannot re-verify.
//!
//! Layout under `<data_dir>/artifacts/<name>/`: `state.json` (active and previous
//! version), and one directory per kept version holding `model.gguf` (complete and
//! verified) with `manifest.signed.json`, or `model.gguf.partial` (being fetched).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanofleet_artifact::digests::Digests;
use nanofleet_artifact::gguf::{GgufHeader, Limits};
use nanofleet_artifact::ids::Sha256Digest;
use nanofleet_artifact::manifest::{ArtifactFormat, ArtifactKind, Chunk, Manifest};
use nanofleet_artifact::signing::SignedManifest;
use nanofleet_artifact::trust::{self, TrustPolicy};
use nanofleet_proto::v1::{
    node_service_client::NodeServiceClient, ArtifactReport, ArtifactState, AssignArtifact,
    ChunkData, FetchChunksRequest, ModelHealth,
};
use prost::bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::models::{ModelHost, ServedModel};
use nanofleet_inference::LoraSource;

const MODEL_FILE: &str = "model.gguf";
const PARTIAL_FILE: &str = "model.gguf.partial";
const STATE_FILE: &str = "state.json";
/// The signed manifest a version was activated with.
const MANIFEST_FILE: &str = "manifest.signed.json";
/// Frames received but not yet written: lets the network run ahead of the disk and
/// the hashing by a few MiB, no more.
const WRITE_QUEUE_FRAMES: usize = 16;
/// Read size when hashing files already on disk.
const READ_BLOCK: usize = 1 << 20;

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
    /// Where activated models are proven and served; `None` on a store-only node.
    host: Option<Arc<ModelHost>>,
}

/// Reads `len` bytes of `file` from `offset` (fewer at the end of the file) through
/// `buf`, handing each piece to `feed`.
fn read_file_range(
    file: &mut File,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    mut feed: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = file.take(len);
    loop {
        let n = reader.read(buf)?;
        if n == 0 {
            return Ok(());
        }
        feed(&buf[..n]);
    }
}

fn digest_of(hasher: Sha256) -> Sha256Digest {
    Sha256Digest::from_bytes(hasher.finalize().into())
}

/// Health of a model that loaded and answered the smoke prompt (or of an adapter, which is
/// proven with its base model).
fn proven_health() -> ModelHealth {
    ModelHealth {
        loaded: true,
        smoke_ok: true,
        ..Default::default()
    }
}

impl ArtifactManager {
    pub fn new(data_dir: &Path, trust: Option<TrustPolicy>, max_bytes_per_sec: u64) -> Self {
        Self {
            dir: data_dir.join("artifacts"),
            trust,
            max_bytes_per_sec,
            host: None,
        }
    }

    /// Serves activated models through `host`: a model is activated only once it loads and
    /// answers the smoke prompt.
    pub fn serving(mut self, host: Arc<ModelHost>) -> Self {
        self.host = Some(host);
        self
    }

    /// Serves the models active on disk, as at the last run, without waiting for the
    /// coordinator. Each is checked again first: signature against today's trust policy,
    /// digest, header, smoke prompt. One that fails is not served (and is reported when its
    /// assignment comes again).
    pub async fn serve_active(&self) {
        let Some(host) = &self.host else { return };
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = self.state(&name).active else {
                continue;
            };
            let version_dir = self.slot_dir(&name).join(&version);
            let result = async {
                let signed = std::fs::read(version_dir.join(MANIFEST_FILE))?;
                let manifest = self.verify_signature(&signed)?;
                self.check_and_prove(host, &manifest, &version_dir).await
            }
            .await;
            match result {
                Ok(Some(model)) => {
                    host.activate(model);
                    tracing::info!(%name, %version, "serving the model active at the last run");
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(%name, %version, %error, "the model active at the last run cannot serve")
                }
            }
        }
    }

    /// The whole-file checks from disk, then, for a model on a serving node, load and smoke
    /// prompt; `None` when there is nothing to serve (store-only node, or an adapter).
    async fn check_and_prove(
        &self,
        host: &Arc<ModelHost>,
        manifest: &Manifest,
        version_dir: &Path,
    ) -> Result<Option<ServedModel>, ApplyError> {
        let model = version_dir.join(MODEL_FILE);
        let (checked, file) = (manifest.clone(), model.clone());
        blocking(move || check_model(&checked, &file))
            .await?
            .map_err(ApplyError::Refused)?;
        self.prove(host, manifest, &model).await
    }

    /// Loads a model (or an adapter on its base model) and runs the smoke prompt on a
    /// blocking thread.
    async fn prove(
        &self,
        host: &Arc<ModelHost>,
        manifest: &Manifest,
        file: &Path,
    ) -> Result<Option<ServedModel>, ApplyError> {
        let (model, lora) = match manifest.kind {
            ArtifactKind::Model => (file.to_path_buf(), None),
            ArtifactKind::LoraAdapter => {
                let base = manifest.base_model.clone().unwrap_or_default();
                let model = self.held_base(&base).ok_or_else(|| {
                    ApplyError::Refused(format!(
                        "its base model {base} is not on this device (roll it out first)"
                    ))
                })?;
                (model, Some(LoraSource::Safetensors(file.to_path_buf())))
            }
        };
        let (host, name, version) = (
            host.clone(),
            manifest.name.clone(),
            manifest.version.clone(),
        );
        blocking(move || host.prove(&name, &version, &model, lora))
            .await?
            .map(Some)
            .map_err(|e| ApplyError::Refused(e.to_string()))
    }

    /// The file of the model `name@version` an adapter names, when the device holds that
    /// version and its kept manifest still verifies against the trust policy.
    fn held_base(&self, reference: &str) -> Option<PathBuf> {
        let (name, version) = reference.split_once('@')?;
        let signed = std::fs::read(self.slot_dir(name).join(version).join(MANIFEST_FILE)).ok()?;
        let manifest = self.verify_signature(&signed).ok()?;
        self.stored_model(name, version, &manifest.sha256.to_string())
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

    /// The verified file of `name@version` when the device holds it (active or kept for
    /// rollback) and its digest is `sha256`; what federated training runs on.
    pub fn stored_model(&self, name: &str, version: &str, sha256: &str) -> Option<PathBuf> {
        let state = self.state(name);
        let held = [state.active.as_deref(), state.previous.as_deref()].contains(&Some(version));
        let dir = self.slot_dir(name).join(version);
        let signed = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
        let manifest = SignedManifest::from_json(&signed).ok()?.manifest;
        let file = dir.join(MODEL_FILE);
        (held && manifest.sha256.to_string() == sha256 && file.is_file()).then_some(file)
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
        let verified = trust::verify(&signed, trust, crate::now_unix_ms().max(0) as u64)
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
            if let Some(host) = &self.host {
                host.deactivate(&assign.name);
            }
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
        let already_served = self.host.as_ref().is_some_and(|host| {
            host.served_version(&manifest.name).as_ref() == Some(&manifest.version)
        });
        let (bytes_fetched, check) = if already_served && model.exists() {
            // Served from this file, which was checked when it was loaded; a re-sent
            // assignment (every reconnect brings one) does not hash it again.
            (0, Ok(()))
        } else if model.exists() {
            // Left by an earlier run: everything is checked again from disk.
            let (manifest, model) = (manifest.clone(), model.clone());
            (0, blocking(move || check_model(&manifest, &model)).await?)
        } else {
            std::fs::create_dir_all(&version_dir)?;
            let fetched = self.download(client, &manifest, &version_dir).await?;
            let (manifest, model) = (manifest.clone(), model.clone());
            let check = blocking(move || check_downloaded(&manifest, &model, fetched.sha256));
            (fetched.bytes, check.await?)
        };
        if let Err(reason) = check {
            let _ = std::fs::remove_dir_all(&version_dir);
            return Err(ApplyError::Refused(reason));
        }
        // Kept beside the file so that a restart can check it again before serving it.
        std::fs::write(version_dir.join(MANIFEST_FILE), &assign.signed_manifest)?;
        let health = match &self.host {
            None => ModelHealth {
                store_only: true,
                ..Default::default()
            },
            Some(_) if already_served => proven_health(),
            Some(host) => match self.prove(host, &manifest, &model).await {
                Ok(served) => {
                    if let Some(served) = served {
                        host.activate(served);
                    }
                    proven_health()
                }
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&version_dir);
                    return Err(error);
                }
            },
        };
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
            health: Some(health),
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

    /// Fetches what is missing into the partial file, verifying each chunk, and moves
    /// the complete file to `model.gguf`.
    async fn download(
        &self,
        client: &mut NodeServiceClient<Channel>,
        manifest: &Manifest,
        version_dir: &Path,
    ) -> Result<Fetched, ApplyError> {
        let mut partial = {
            let (path, manifest) = (version_dir.join(PARTIAL_FILE), manifest.clone());
            blocking(move || PartialFile::resume(path, &manifest)).await??
        };
        let first = partial.verified;
        if first > 0 {
            tracing::info!(name = %manifest.name, first_chunk = first, "resuming download");
        }
        let mut bytes = 0;
        if first < manifest.chunks.len() {
            let stream = client
                .fetch_chunks(FetchChunksRequest {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    first_chunk: first as u32,
                    max_bytes_per_sec: self.max_bytes_per_sec,
                })
                .await
                .map_err(interrupted)?
                .into_inner();
            let (frames, queue) = mpsc::channel(WRITE_QUEUE_FRAMES);
            let writer = tokio::task::spawn_blocking(move || {
                let written = partial.write_queue(queue);
                (partial, written)
            });
            let received = receive(stream, &manifest.chunks, first, frames).await;
            let (returned, written) = writer.await.map_err(joined)?;
            partial = returned;
            // A refused chunk stops the writer first and the receiver after it.
            written?;
            bytes = received?;
        }
        let model = version_dir.join(MODEL_FILE);
        let sha256 = blocking(move || partial.finish(&model)).await??;
        Ok(Fetched { bytes, sha256 })
    }
}

/// What a download produced.
struct Fetched {
    /// Bytes received from the coordinator (not counting a resumed prefix).
    bytes: u64,
    /// SHA-256 of the whole file, computed while it was written and resumed.
    sha256: Sha256Digest,
}

fn interrupted(status: tonic::Status) -> ApplyError {
    ApplyError::Interrupted(status.message().to_owned())
}

fn joined(error: tokio::task::JoinError) -> ApplyError {
    ApplyError::Io(std::io::Error::other(error))
}

/// Runs file work on the blocking pool, off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApplyError> {
    tokio::task::spawn_blocking(work).await.map_err(joined)
}

/// Receives the frames of chunks `first..` in order, checks that they line up with the
/// signed manifest's chunks, and queues their bytes for the writer; returns the bytes
/// received.
async fn receive(
    mut stream: tonic::Streaming<ChunkData>,
    chunks: &[Chunk],
    first: usize,
    frames: mpsc::Sender<Bytes>,
) -> Result<u64, ApplyError> {
    let mut received = 0u64;
    let mut index = first;
    let mut written = 0u64;
    while index < chunks.len() {
        let frame = stream
            .message()
            .await
            .map_err(interrupted)?
            .ok_or_else(|| {
                ApplyError::Interrupted("the coordinator ended the stream early".to_owned())
            })?;
        let chunk = &chunks[index];
        if frame.chunk_index as usize > index && written < chunk.size {
            return Err(ApplyError::Refused(format!(
                "chunk {index} ended after {written} of the signed manifest's {} bytes",
                chunk.size
            )));
        }
        let len = frame.data.len() as u64;
        if frame.chunk_index as usize != index
            || frame.offset != written
            || written + len > chunk.size
        {
            return Err(ApplyError::Interrupted(format!(
                "unexpected frame (chunk {} offset {}) while expecting chunk {index} offset {written}",
                frame.chunk_index, frame.offset
            )));
        }
        written += len;
        received += len;
        if written == chunk.size {
            index += 1;
            written = 0;
        }
        if frames.send(frame.data).await.is_err() {
            // The writer stopped; its error is the one reported.
            return Err(ApplyError::Interrupted(
                "writing the download stopped".to_owned(),
            ));
        }
    }
    Ok(received)
}

/// The partial file of a download and the digests of what it holds; lives on a
/// blocking thread while bytes arrive.
struct PartialFile {
    path: PathBuf,
    file: Appender,
    chunks: Vec<Chunk>,
    /// Chunks `..verified` are on disk and match the signed manifest.
    verified: usize,
    /// Bytes of chunk `verified` written so far.
    pending: u64,
    /// Digests of chunk `verified` and of the whole file so far.
    digests: Digests,
}

impl PartialFile {
    /// Opens the partial file (or starts one) and keeps its longest prefix of chunks
    /// that verify, dropping the rest; that prefix is read once, hashed into both its
    /// chunks' digests and the whole-file digest.
    fn resume(path: PathBuf, manifest: &Manifest) -> std::io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let on_disk = file.metadata()?.len();
        let mut digests = Digests::default();
        let mut verified = 0;
        let mut buf = vec![0u8; READ_BLOCK];
        for chunk in &manifest.chunks {
            if chunk.offset + chunk.size > on_disk {
                break;
            }
            let mut extended = digests.clone();
            read_file_range(&mut file, chunk.offset, chunk.size, &mut buf, |bytes| {
                extended.update(bytes)
            })?;
            if extended.finish_chunk() != chunk.sha256 {
                break;
            }
            digests = extended;
            verified += 1;
        }
        let resume_at = manifest
            .chunks
            .get(verified)
            .map_or(manifest.size, |c| c.offset);
        file.set_len(resume_at)?;
        Ok(Self {
            path: path.clone(),
            file: Appender::new(file, &path, resume_at)?,
            chunks: manifest.chunks.clone(),
            verified,
            pending: 0,
            digests,
        })
    }

    /// Writes what the receiver queues until it closes the queue or a chunk is
    /// refused; then drops any bytes past the last verified chunk from the file. A
    /// download that stopped short is not continued: the next attempt resumes from disk.
    fn write_queue(&mut self, mut queue: mpsc::Receiver<Bytes>) -> Result<(), ApplyError> {
        let mut written = Ok(());
        while let Some(data) = queue.blocking_recv() {
            written = self.write(&data);
            if written.is_err() {
                break;
            }
        }
        self.file.flush()?;
        if self.pending > 0 {
            self.file.set_len(self.chunks[self.verified].offset)?;
        }
        written
    }

    /// Appends bytes, verifying each chunk as its last byte arrives.
    fn write(&mut self, mut data: &[u8]) -> Result<(), ApplyError> {
        while !data.is_empty() {
            let chunk = self.chunks.get(self.verified).ok_or_else(|| {
                ApplyError::Interrupted("more bytes than the signed manifest's chunks".to_owned())
            })?;
            let take = ((chunk.size - self.pending) as usize).min(data.len());
            let (piece, rest) = data.split_at(take);
            self.file.append(piece)?;
            self.digests.update(piece);
            self.pending += take as u64;
            data = rest;
            if self.pending == chunk.size {
                self.verify_chunk()?;
            }
        }
        Ok(())
    }

    fn verify_chunk(&mut self) -> Result<(), ApplyError> {
        let index = self.verified;
        let chunk = &self.chunks[index];
        let digest = self.digests.finish_chunk();
        if digest != chunk.sha256 {
            return Err(ApplyError::Refused(format!(
                "chunk {index} does not match the signed manifest (sha256 {digest}, expected {})",
                chunk.sha256
            )));
        }
        self.verified += 1;
        self.pending = 0;
        Ok(())
    }

    /// Makes the complete file durable, moves it into place, and returns its digest.
    fn finish(self, model: &Path) -> Result<Sha256Digest, ApplyError> {
        if self.verified < self.chunks.len() {
            return Err(ApplyError::Interrupted(format!(
                "the download stopped after {} of {} chunks",
                self.verified,
                self.chunks.len()
            )));
        }
        self.file.finish()?;
        std::fs::rename(&self.path, model)?;
        Ok(self.digests.finish_whole())
    }
}

/// Appends to the partial file through one reused buffer of [`DIRECT_BUFFER`] bytes,
/// written with `O_DIRECT` where the filesystem allows it: the file has to reach the
/// disk before activation anyway, and going there straight from this buffer saves
/// copying every byte into newly allocated page-cache pages (in the loopback benchmark
/// the agent's largest cost after hashing). The price: the model is not in the page
/// cache afterwards, so its first load reads the disk. Direct writes must start and end
/// on [`DIRECT_ALIGN`] boundaries, so the block that a resume starts in is read back
/// first, and an unaligned tail goes through the page cache. Without `O_DIRECT` the
/// same buffer is written through the page cache, and its writeback starts at once.
struct Appender {
    /// Read and write through the page cache: the head, the tail, truncation, fsync.
    file: File,
    /// The same file opened with `O_DIRECT`, while direct writes work.
    direct: Option<File>,
    /// Backing store of the buffer; the buffer is the aligned window from `window`.
    storage: Vec<u8>,
    window: usize,
    /// Bytes in the buffer, and the file offset of its first byte.
    len: usize,
    at: u64,
}

/// Alignment of `O_DIRECT` offsets, lengths and memory; a multiple of every common
/// logical block size.
const DIRECT_ALIGN: usize = 4096;
/// Bytes per write of the partial file.
const DIRECT_BUFFER: usize = 1 << 20;

impl Appender {
    /// Appends at `end`, the file's length.
    fn new(file: File, path: &Path, end: u64) -> std::io::Result<Self> {
        let direct = open_direct(path);
        let at = if direct.is_some() {
            end - end % DIRECT_ALIGN as u64
        } else {
            end
        };
        let storage = vec![0u8; DIRECT_BUFFER + DIRECT_ALIGN];
        let window = storage.as_ptr().align_offset(DIRECT_ALIGN);
        let mut appender = Self {
            file,
            direct,
            storage,
            window,
            len: (end - at) as usize,
            at,
        };
        // The start of the block being appended to, rewritten with the first write.
        let head = appender.len;
        std::os::unix::fs::FileExt::read_exact_at(
            &appender.file,
            &mut appender.storage[window..window + head],
            at,
        )?;
        Ok(appender)
    }

    fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let take = (DIRECT_BUFFER - self.len).min(data.len());
            let start = self.window + self.len;
            self.storage[start..start + take].copy_from_slice(&data[..take]);
            self.len += take;
            data = &data[take..];
            if self.len == DIRECT_BUFFER {
                self.write_aligned(DIRECT_BUFFER)?;
            }
        }
        Ok(())
    }

    /// Writes the buffer's first `len` bytes, a multiple of [`DIRECT_ALIGN`], and keeps
    /// the rest at its start.
    fn write_aligned(&mut self, len: usize) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let bytes = &self.storage[self.window..self.window + len];
        let direct = self
            .direct
            .as_ref()
            .map(|direct| direct.write_all_at(bytes, self.at));
        match direct {
            Some(Ok(())) => {}
            Some(Err(error)) if error.raw_os_error() == Some(libc::EINVAL) => {
                // The filesystem refuses this direct write after all: buffered from now on.
                self.direct = None;
                self.file.write_all_at(bytes, self.at)?;
            }
            Some(Err(error)) => return Err(error),
            None => {
                self.file.write_all_at(bytes, self.at)?;
                start_writeback(&self.file, self.at, len as u64);
            }
        }
        self.storage
            .copy_within(self.window + len..self.window + self.len, self.window);
        self.len -= len;
        self.at += len as u64;
        Ok(())
    }

    /// Writes out everything appended so far.
    fn flush(&mut self) -> std::io::Result<()> {
        let aligned = self.len - self.len % DIRECT_ALIGN;
        if aligned > 0 {
            self.write_aligned(aligned)?;
        }
        if self.len > 0 {
            let tail = &self.storage[self.window..self.window + self.len];
            std::os::unix::fs::FileExt::write_all_at(&self.file, tail, self.at)?;
            // The tail stays in the buffer: the next write starts with its block.
        }
        Ok(())
    }

    /// Cuts the file at `len`, which must not be past what was flushed.
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        let at = if self.direct.is_some() {
            len - len % DIRECT_ALIGN as u64
        } else {
            len
        };
        self.len = (len - at) as usize;
        self.at = at;
        std::os::unix::fs::FileExt::read_exact_at(
            &self.file,
            &mut self.storage[self.window..self.window + self.len],
            at,
        )
    }

    /// Flushes and makes the file durable.
    fn finish(mut self) -> std::io::Result<()> {
        self.flush()?;
        self.file.sync_all()
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Starts writing a range to disk without waiting for it, so that the `fsync` before
/// activation finds little left to do. Best effort: a failure shows up in that `fsync`.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range touches no memory of this process; a bad range is an error.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

/// The whole-file checks for a file downloaded just now, whose digest was computed
/// while it was written: size, whole digest, GGUF header.
fn check_downloaded(manifest: &Manifest, model: &Path, sha256: Sha256Digest) -> Result<(), String> {
    let file = File::open(model).map_err(|e| format!("cannot open the model: {e}"))?;
    let size = check_size(manifest, &file)?;
    check_digest(manifest, sha256)?;
    check_header(manifest, file, size)
}

/// The whole-file checks before activating a file already on disk: size, whole
/// digest (read back from disk), GGUF header.
fn check_model(manifest: &Manifest, model: &Path) -> Result<(), String> {
    let mut file = File::open(model).map_err(|e| format!("cannot open the model: {e}"))?;
    let size = check_size(manifest, &file)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_BLOCK];
    read_file_range(&mut file, 0, size, &mut buf, |bytes| hasher.update(bytes))
        .map_err(|e| e.to_string())?;
    check_digest(manifest, digest_of(hasher))?;
    check_header(manifest, file, size)
}

fn check_size(manifest: &Manifest, file: &File) -> Result<u64, String> {
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    if size != manifest.size {
        return Err(format!(
            "the file is {size} bytes; the signed manifest says {}",
            manifest.size
        ));
    }
    Ok(size)
}

fn check_digest(manifest: &Manifest, digest: Sha256Digest) -> Result<(), String> {
    if digest != manifest.sha256 {
        return Err(format!(
            "the file's sha256 {digest} does not match the signed manifest's {}",
            manifest.sha256
        ));
    }
    Ok(())
}

/// Most bytes an adapter may have: it is parsed whole.
const MAX_ADAPTER_BYTES: u64 = 256 * 1024 * 1024;

fn check_header(manifest: &Manifest, mut file: File, size: u64) -> Result<(), String> {
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    match (manifest.kind, manifest.format) {
        (ArtifactKind::Model, ArtifactFormat::Gguf) => {}
        (ArtifactKind::LoraAdapter, ArtifactFormat::Safetensors) => {
            if size > MAX_ADAPTER_BYTES {
                return Err(format!(
                    "an adapter of {size} bytes is larger than {MAX_ADAPTER_BYTES}"
                ));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
            let tensors = nanofleet_federated::AdapterTensors::from_safetensors(&bytes)
                .map_err(|e| format!("not a valid LoRA adapter: {e}"))?;
            if tensors.is_empty() {
                return Err("not a valid LoRA adapter: it holds no matrices".into());
            }
            return Ok(());
        }
        (kind, format) => {
            return Err(format!(
                "a {kind:?} in {format:?} format: models are GGUF, LoRA adapters safetensors"
            ))
        }
    }
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
    use nanofleet_artifact::manifest::{Chunker, Provenance};
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

    fn content(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    }

    fn chunked(bytes: &[u8], chunk_size: u64) -> Manifest {
        let content = Chunker::digest_reader(chunk_size, bytes).unwrap();
        Manifest {
            size: content.size,
            sha256: content.sha256,
            chunk_size: content.chunk_size,
            chunks: content.chunks,
            ..manifest_for(&model_bytes())
        }
    }

    #[test]
    fn the_appender_writes_exactly_the_bytes_from_any_resume_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PARTIAL_FILE);
        let bytes = content(2 * DIRECT_BUFFER + 10_000);
        for direct in [true, false] {
            for resume_at in [0, 1000, DIRECT_ALIGN, DIRECT_BUFFER + 5, bytes.len()] {
                std::fs::write(&path, &bytes[..resume_at]).unwrap();
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap();
                let mut appender = Appender::new(file, &path, resume_at as u64).unwrap();
                if !direct {
                    appender.direct = None;
                }
                for piece in bytes[resume_at..].chunks(300_007) {
                    appender.append(piece).unwrap();
                }
                appender.finish().unwrap();
                assert!(
                    std::fs::read(&path).unwrap() == bytes,
                    "{direct} {resume_at}"
                );
            }
        }
    }

    #[test]
    fn cutting_the_appender_back_continues_from_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PARTIAL_FILE);
        let bytes = content(DIRECT_BUFFER + 50_000);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut appender = Appender::new(file, &path, 0).unwrap();
        appender.append(&bytes).unwrap();
        appender.append(&[0xee; 777]).unwrap();
        appender.flush().unwrap();
        appender.set_len(12_345).unwrap();
        appender.append(&bytes[12_345..]).unwrap();
        appender.finish().unwrap();
        assert!(std::fs::read(&path).unwrap() == bytes);
    }

    #[test]
    fn a_resumed_download_keeps_the_verified_chunks_and_gets_the_whole_digest_right() {
        let dir = tempfile::tempdir().unwrap();
        let (path, model) = (dir.path().join(PARTIAL_FILE), dir.path().join(MODEL_FILE));
        let bytes = content(10_000);
        // 64-byte chunks hash both digests in one pass; 100-byte chunks do not.
        for chunk_size in [64, 100] {
            let manifest = chunked(&bytes, chunk_size);
            let mut on_disk = bytes[..(5 * chunk_size + 10) as usize].to_vec();
            on_disk[(3 * chunk_size + 1) as usize] ^= 1; // chunk 3 is damaged
            std::fs::write(&path, &on_disk).unwrap();
            let mut partial = PartialFile::resume(path.clone(), &manifest).unwrap();
            assert_eq!(partial.verified, 3);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * chunk_size);
            partial.write(&bytes[(3 * chunk_size) as usize..]).unwrap();
            assert_eq!(partial.finish(&model).unwrap(), manifest.sha256);
            assert!(std::fs::read(&model).unwrap() == bytes);
        }
    }

    #[test]
    fn a_chunk_that_does_not_match_is_refused_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PARTIAL_FILE);
        let bytes = content(10_000);
        let manifest = chunked(&bytes, 1024);
        let mut sent = bytes.clone();
        sent[2 * 1024 + 5] ^= 1;
        let (frames, queue) = mpsc::channel(64);
        for frame in sent.chunks(700) {
            frames.blocking_send(Bytes::copy_from_slice(frame)).unwrap();
        }
        drop(frames);
        let mut partial = PartialFile::resume(path.clone(), &manifest).unwrap();
        let err = partial.write_queue(queue).unwrap_err();
        assert!(
            matches!(&err, ApplyError::Refused(reason) if reason.contains("chunk 2 does not match")),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes[..2 * 1024]);
        let err = partial.finish(&dir.path().join(MODEL_FILE)).unwrap_err();
        assert!(matches!(err, ApplyError::Interrupted(_)), "{err}");
    }
}
