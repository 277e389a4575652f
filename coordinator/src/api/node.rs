//! `nanofleet.v1.NodeService`: heartbeats and the command stream, for enrolled nodes.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nanofleet_proto::v1::{
    command, node_service_server::NodeService, ArtifactReportAck, ArtifactState, AssignArtifact,
    ChunkData, Command, FetchChunksRequest, HeartbeatRequest, HeartbeatResponse, SubscribeRequest,
    Welcome,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{authorized_node, convert::facts_from_proto, status_of, status_of_artifact};
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::events::EventLog;
use crate::registry::Registry;
use crate::rollouts::{ArtifactReport, Desired, Rollouts};
use crate::sessions::SessionHub;
use crate::telemetry::Metrics;

pub struct NodeApi {
    pub registry: Registry,
    pub sessions: Arc<SessionHub>,
    pub artifacts: ArtifactStore,
    pub rollouts: Rollouts,
    pub events: EventLog,
    pub heartbeat_interval_secs: u32,
    /// Per-stream download limit in bytes per second; 0 = none.
    pub download_bytes_per_sec: u64,
    pub metrics: Metrics,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

/// Bytes per `ChunkData` frame: small enough to stay far below message limits and to
/// keep memory per download stream at a few frames.
const FRAME_BYTES: usize = 256 * 1024;
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
        let (sender, receiver) = mpsc::channel(4);
        let node_id = node.id.clone();
        tokio::spawn(
            async move {
                let started = tokio::time::Instant::now();
                let mut sent = 0u64;
                for (chunk_index, path) in paths {
                    let mut file = match tokio::fs::File::open(&path).await {
                        Ok(file) => file,
                        Err(error) => {
                            tracing::error!(%error, path = %path.display(), "chunk missing from the store");
                            let _ = sender.send(Err(Status::internal("a chunk of this artifact is missing on the coordinator"))).await;
                            return;
                        }
                    };
                    let mut offset = 0u64;
                    loop {
                        let mut frame = vec![0u8; FRAME_BYTES];
                        let n = match file.read(&mut frame).await {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(error) => {
                                tracing::error!(%error, "reading a chunk failed");
                                let _ = sender.send(Err(Status::internal("reading the artifact failed"))).await;
                                return;
                            }
                        };
                        frame.truncate(n);
                        throttle(started, sent, limit).await;
                        let data = ChunkData { chunk_index, offset, data: frame };
                        if sender.send(Ok(data)).await.is_err() {
                            return; // the agent went away; it resumes from its last verified chunk
                        }
                        offset += n as u64;
                        sent += n as u64;
                    }
                }
            }
            .instrument(tracing::info_span!("fetch_chunks", node = %node_id)),
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
            version: r.version.clone(),
            state: state.to_owned(),
            reason: r.reason.clone(),
            loaded: health.loaded,
            smoke_ok: health.smoke_ok,
            error_rate: health.error_rate,
            p95_latency_ms: health.p95_latency_ms,
            bytes_fetched: r.bytes_fetched,
            previous_version: r.previous_version,
            at_ms: crate::now_unix_ms(),
        };
        let deployments = self.rollouts.deployments();
        let before = deployments
            .report(&node.id, &r.name)
            .map_err(|e| status_of(e.into()))?;
        deployments
            .record_report(&node.id, &r.name, &report)
            .map_err(|e| status_of(e.into()))?;
        let changed = before.is_none_or(|b| b.state != report.state || b.version != report.version);
        if changed && state != "downloading" {
            let action = if state == "active" {
                "artifact.activated"
            } else {
                "artifact.failed"
            };
            self.events
                .append(
                    &format!("node:{}", node.id),
                    action,
                    &format!("{}@{}", r.name, r.version),
                    &r.reason,
                )
                .map_err(|e| status_of(e.into()))?;
        }
        Ok(Response::new(ArtifactReportAck {}))
    }
}
