//! `nanofleet.v1.NodeService`: heartbeats and the command stream, for enrolled nodes.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nanofleet_proto::v1::{
    command, node_service_server::NodeService, ArtifactReportAck, ArtifactState, AssignArtifact,
    ChunkData, Command, FetchChunksRequest, HeartbeatRequest, HeartbeatResponse, RoundUpdate,
    RoundUpdateAck, SecAggMessage, SubscribeRequest, Welcome,
};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::convert::{facts_from_proto, outbound_to_command, submission_from_proto};
use super::{
    authorized_node, status_of, status_of_artifact, status_of_audit, status_of_federation,
};
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::audit_log::AuditLog;
use crate::federations::Federations;
use crate::registry::Registry;
use crate::rollouts::{ArtifactReport, Deployments, Desired, Rollouts};
use crate::sessions::SessionHub;
use crate::telemetry::Metrics;

pub struct NodeApi {
    pub registry: Registry,
    pub sessions: Arc<SessionHub>,
    pub artifacts: ArtifactStore,
    pub rollouts: Rollouts,
    pub events: AuditLog,
    pub heartbeat_interval_secs: u32,
    /// Per-stream download limit in bytes per second; 0 = none.
    pub download_bytes_per_sec: u64,
    pub metrics: Metrics,
    /// Wakes the rollout engine: a node's final report may decide its wave now rather
    /// than at the engine's next tick.
    pub rollout_engine: Arc<Notify>,
    pub federations: Federations,
    /// Wakes the federation engine: the last update of a round closes it now.
    pub federation_engine: Arc<Notify>,
    pub telemetry: crate::fleet_telemetry::FleetTelemetry,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

/// Bytes per `ChunkData` frame: small enough to stay far below message limits and to
/// keep memory per download stream at a few frames.
const FRAME_BYTES: usize = 256 * 1024;
/// Frames read from disk per trip to the blocking pool.
const READ_FRAMES: usize = 2;
/// Frames waiting for the transport per download stream.
const QUEUED_FRAMES: usize = 4;
const MAX_REPORT_TEXT: usize = 1024;

/// The command that tells a node its desired state for one artifact name.
pub fn assignment_command(
    artifacts: &ArtifactStore,
    desired: &Desired,
) -> Result<Command, ArtifactError> {
    let signed_manifest = if desired.version.is_empty() {
        Vec::new()
    } else {
        artifacts
            .get(&desired.name, &desired.version)?
            .signed
            .to_json_pretty()
            .into_bytes()
    };
    Ok(Command {
        body: Some(command::Body::Assign(AssignArtifact {
            rollout_id: desired.rollout_id.clone(),
            signed_manifest,
            name: desired.name.clone(),
        })),
    })
}

/// Sleeps as long as needed to keep `sent` bytes since `started` under `limit` per second.
async fn throttle(started: tokio::time::Instant, sent: u64, limit: u64) {
    if limit == 0 {
        return;
    }
    let due = std::time::Duration::from_secs_f64(sent as f64 / limit as f64);
    tokio::time::sleep_until(started + due).await;
}

/// Streams the chunk files at `paths` as frames, in order, until the agent goes away
/// (it resumes from its last verified chunk). The files are read on the blocking pool
/// a few frames at a time, so that one trip there serves several frames.
async fn send_chunks(
    paths: Vec<(u32, PathBuf)>,
    limit: u64,
    sender: mpsc::Sender<Result<ChunkData, Status>>,
) {
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    for (chunk_index, path) in paths {
        let mut reader = ChunkReader::open(path).await;
        loop {
            let frames = match reader.next_frames().await {
                Ok(frames) if frames.is_empty() => break,
                Ok(frames) => frames,
                Err(status) => {
                    let _ = sender.send(Err(status)).await;
                    return;
                }
            };
            for (offset, data) in frames {
                let len = data.len() as u64;
                throttle(started, sent, limit).await;
                let frame = ChunkData {
                    chunk_index,
                    offset,
                    data: data.into(),
                };
                if sender.send(Ok(frame)).await.is_err() {
                    return; // the agent went away; it resumes from its last verified chunk
                }
                sent += len;
            }
        }
    }
}

/// Reads one chunk file frame by frame, off the async runtime.
struct ChunkReader {
    path: PathBuf,
    /// The open file until it ends; the error if it could not be opened.
    file: Option<std::io::Result<File>>,
    offset: u64,
}

impl ChunkReader {
    async fn open(path: PathBuf) -> Self {
        let opening = path.clone();
        let file = blocking(move || File::open(opening)).await;
        Self {
            path,
            file: Some(file.and_then(|opened| opened)),
            offset: 0,
        }
    }

    /// The next frames (offset in the chunk, bytes), at most [`READ_FRAMES`] of them;
    /// none once the file has ended.
    async fn next_frames(&mut self) -> Result<Vec<(u64, Vec<u8>)>, Status> {
        let mut file = match self.file.take() {
            None => return Ok(Vec::new()),
            Some(Ok(file)) => file,
            Some(Err(error)) => {
                tracing::error!(%error, path = %self.path.display(), "chunk missing from the store");
                return Err(Status::internal(
                    "a chunk of this artifact is missing on the coordinator",
                ));
            }
        };
        let offset = self.offset;
        // Allocated here rather than on the blocking thread: each thread that allocates
        // frames grows its own malloc arena, and the blocking pool has many threads.
        let buffers = (0..READ_FRAMES)
            .map(|_| Vec::with_capacity(FRAME_BYTES))
            .collect();
        let (file, frames) = blocking(move || {
            let frames = read_frames(&mut file, offset, buffers);
            (file, frames)
        })
        .await
        .and_then(|(file, frames)| Ok((file, frames?)))
        .map_err(|error| {
            tracing::error!(%error, path = %self.path.display(), "reading a chunk failed");
            Status::internal("reading the artifact failed")
        })?;
        let read: usize = frames.iter().map(|(_, data)| data.len()).sum();
        self.offset += read as u64;
        if read == READ_FRAMES * FRAME_BYTES {
            self.file = Some(Ok(file)); // more may follow
        }
        Ok(frames)
    }
}

/// Runs file work on the blocking pool; a panic there becomes an I/O error.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)
}

/// Reads frames from `file` into `buffers` (empty, with room for a frame each), the
/// first at `offset` bytes into the chunk; stops early at the end of the file.
fn read_frames(
    file: &mut File,
    mut offset: u64,
    buffers: Vec<Vec<u8>>,
) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
    let mut frames = Vec::with_capacity(buffers.len());
    for mut data in buffers {
        // `read_to_end` fills the spare capacity without zeroing it first.
        (&mut *file)
            .take(FRAME_BYTES as u64)
            .read_to_end(&mut data)?;
        if data.is_empty() {
            break;
        }
        let len = data.len();
        frames.push((offset, data));
        offset += len as u64;
        if len < FRAME_BYTES {
            break;
        }
    }
    Ok(frames)
}

/// Stores a node's report on artifact `name`, and records in the audit log that the node
/// activated a version or failed to, once per change rather than per repeated report.
fn store_report(
    deployments: &Deployments,
    events: &AuditLog,
    node_id: &str,
    name: &str,
    report: &ArtifactReport,
) -> Result<(), Status> {
    let before = deployments
        .report(node_id, name)
        .map_err(|e| status_of(e.into()))?;
    deployments
        .record_report(node_id, name, report)
        .map_err(|e| status_of(e.into()))?;
    let changed = before.is_none_or(|b| b.state != report.state || b.version != report.version);
    if changed && report.state != "downloading" {
        let action = if report.state == "active" {
            "artifact.activated"
        } else {
            "artifact.failed"
        };
        events
            .append(
                &format!("node:{node_id}"),
                action,
                &format!("{name}@{}", report.version),
                &report.reason,
            )
            .map_err(status_of_audit)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let facts = facts_from_proto(request.into_inner().facts);
        self.registry
            .record_heartbeat(node, facts)
            .map_err(status_of)?;
        self.metrics.heartbeat();
        Ok(Response::new(HeartbeatResponse {
            heartbeat_interval_secs: self.heartbeat_interval_secs,
            server_time_unix_ms: crate::now_unix_ms(),
        }))
    }

    type SubscribeStream = CommandStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let (sender, receiver) = mpsc::channel(16);
        sender
            .send(Ok(Command {
                body: Some(command::Body::Welcome(Welcome {
                    node_id: node.id.clone(),
                    heartbeat_interval_secs: self.heartbeat_interval_secs,
                })),
            }))
            .await
            .map_err(|_| Status::internal("command stream closed"))?;
        // The node's desired state, so that a node that was offline converges now.
        let desired = self
            .rollouts
            .deployments()
            .desired_of(&node.id)
            .map_err(|e| status_of(e.into()))?;
        for desired in desired {
            let command = assignment_command(&self.artifacts, &desired)
                .map_err(|e| status_of_artifact(&e))?;
            sender
                .send(Ok(command))
                .await
                .map_err(|_| Status::internal("command stream closed"))?;
        }
        // Round work the node still owes, e.g. after a drop in the middle of a round.
        let federations = self.federations.clone();
        let node_id = node.id.clone();
        let pending = blocking(move || federations.pending_for(&node_id))
            .await
            .map_err(|_| Status::internal("the coordinator failed to read round state"))?
            .map_err(status_of_federation)?;
        for dispatch in &pending {
            sender
                .send(Ok(outbound_to_command(dispatch)))
                .await
                .map_err(|_| Status::internal("command stream closed"))?;
        }
        self.sessions.register(&node.id, sender);
        tracing::info!(node = %node.id, "command stream opened");
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type FetchChunksStream = ChunkStream;

    async fn fetch_chunks(
        &self,
        request: Request<FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let request = request.into_inner();
        let assigned = self
            .rollouts
            .deployments()
            .desired(&node.id, &request.name)
            .map_err(|e| status_of(e.into()))?
            .is_some_and(|d| d.version == request.version);
        if !assigned {
            return Err(Status::permission_denied(format!(
                "{}@{} is not assigned to this node",
                request.name, request.version
            )));
        }
        let record = self
            .artifacts
            .get(&request.name, &request.version)
            .map_err(|e| status_of_artifact(&e))?;
        let chunks = record.manifest().chunks.clone();
        let first = request.first_chunk as usize;
        if first > chunks.len() {
            return Err(Status::out_of_range(format!(
                "chunk {first} is past the last chunk ({})",
                chunks.len()
            )));
        }
        let limit = match (self.download_bytes_per_sec, request.max_bytes_per_sec) {
            (0, asked) => asked,
            (own, 0) => own,
            (own, asked) => own.min(asked),
        };
        let paths: Vec<_> = chunks[first..]
            .iter()
            .map(|c| {
                (
                    c.index as u32,
                    self.artifacts.chunk_path(&c.sha256.to_string()),
                )
            })
            .collect();
        let (sender, receiver) = mpsc::channel(QUEUED_FRAMES);
        tokio::spawn(
            send_chunks(paths, limit, sender)
                .instrument(tracing::info_span!("fetch_chunks", node = %node.id)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn report_artifact(
        &self,
        request: Request<nanofleet_proto::v1::ArtifactReport>,
    ) -> Result<Response<ArtifactReportAck>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let r = request.into_inner();
        let texts = [&r.rollout_id, &r.name, &r.version, &r.previous_version];
        if texts.iter().any(|t| t.len() > 128) || r.reason.len() > MAX_REPORT_TEXT {
            return Err(Status::invalid_argument("report fields are too long"));
        }
        let state = match ArtifactState::try_from(r.state) {
            Ok(ArtifactState::Downloading) => "downloading",
            Ok(ArtifactState::Active) => "active",
            Ok(ArtifactState::Failed) => "failed",
            _ => {
                return Err(Status::invalid_argument(
                    "report state must be downloading, active or failed",
                ))
            }
        };
        let health = r.health.unwrap_or_default();
        let report = ArtifactReport {
            rollout_id: r.rollout_id,
            version: r.version,
            state: state.to_owned(),
            reason: r.reason,
            loaded: health.loaded,
            smoke_ok: health.smoke_ok,
            store_only: health.store_only,
            error_rate: health.error_rate,
            p95_latency_ms: health.p95_latency_ms,
            bytes_fetched: r.bytes_fetched,
            previous_version: r.previous_version,
            at_ms: crate::now_unix_ms(),
        };
        // The audit record waits for the disk: off the reactor, where it would hold up
        // every other node's calls (a rollout brings a report from each of its nodes).
        let (deployments, events) = (self.rollouts.deployments().clone(), self.events.clone());
        let (node_id, name) = (node.id.clone(), r.name);
        blocking(move || store_report(&deployments, &events, &node_id, &name, &report))
            .await
            .map_err(|_| Status::internal("the coordinator failed to store the report"))??;
        if state != "downloading" {
            self.rollout_engine.notify_one();
        }
        Ok(Response::new(ArtifactReportAck {}))
    }

    async fn submit_update(
        &self,
        request: Request<RoundUpdate>,
    ) -> Result<Response<RoundUpdateAck>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let update = request.into_inner();
        if update.round_id.len() > 64 || update.declined_reason.len() > MAX_REPORT_TEXT {
            return Err(Status::invalid_argument("update fields are too long"));
        }
        let submission = submission_from_proto(update);
        let federations = self.federations.clone();
        let node_id = node.id.clone();
        blocking(move || federations.submit(&node_id, submission))
            .await
            .map_err(|_| Status::internal("the coordinator failed to store the update"))?
            .map_err(|e| {
                tracing::warn!(node = %node.id, error = %e, "round update refused");
                status_of_federation(e)
            })?;
        self.federation_engine.notify_one();
        Ok(Response::new(RoundUpdateAck {}))
    }

    async fn submit_sec_agg(
        &self,
        request: Request<SecAggMessage>,
    ) -> Result<Response<RoundUpdateAck>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let message = request.into_inner();
        if message.round_id.len() > 64 {
            return Err(Status::invalid_argument("round_id is too long"));
        }
        let federations = self.federations.clone();
        let node_id = node.id.clone();
        blocking(move || federations.submit_secagg(&node_id, &message.round_id, &message.payload))
            .await
            .map_err(|_| Status::internal("the coordinator failed to take the message"))?
            .map_err(|e| {
                tracing::warn!(node = %node.id, error = %e, "secure-aggregation message refused");
                status_of_federation(e)
            })?;
        self.federation_engine.notify_one();
        Ok(Response::new(RoundUpdateAck {}))
    }

    async fn report_telemetry(
        &self,
        request: Request<nanofleet_proto::v1::TelemetryBatch>,
    ) -> Result<Response<nanofleet_proto::v1::TelemetryAck>, Status> {
        let node = authorized_node(&self.registry, &request)?;
        let batch = request.into_inner();
        let span = tracing::info_span!("telemetry", node = %node.id, records = batch.records.len());
        let telemetry = self.telemetry.clone();
        let node_id = node.id.clone();
        let applied = blocking(move || span.in_scope(|| telemetry.apply(&node_id, &batch)))
            .await
            .map_err(|_| Status::internal("the coordinator failed to store the telemetry"))?
            .map_err(|e| {
                tracing::warn!(node = %node.id, error = %e, "telemetry refused");
                super::status_of_telemetry(e)
            })?;
        Ok(Response::new(nanofleet_proto::v1::TelemetryAck {
            applied_sequence: applied,
        }))
    }
}
