//! `nanofleet.v1.OperatorService`: fleet administration, for operator certificates only.

use std::sync::Arc;

use nanofleet_proto::v1::{
    operator_service_server::OperatorService, publish_artifact_request::Part, Artifact,
    CreateRolloutRequest, CreateTokenRequest, CreateTokenResponse, GetArtifactRequest,
    GetNodeRequest, ListArtifactsRequest, ListArtifactsResponse, ListEventsRequest,
    ListEventsResponse, ListNodesRequest, ListNodesResponse, ListRolloutsRequest,
    ListRolloutsResponse, Node, PinArtifactRequest, PinArtifactResponse, PublishArtifactRequest,
    RevokeNodeRequest, Rollout, RolloutRef, UnpinArtifactRequest,
};
use tonic::{Request, Response, Status, Streaming};

use super::convert::rollout_to_proto;
use super::convert::{artifact_to_proto, event_to_proto, node_to_proto};
use super::{authorized_operator, status_of, status_of_artifact};
use super::{deliver, status_of_rollout};
use crate::artifacts::{ArtifactError, ArtifactRecord, ArtifactStore};
use crate::events::EventLog;
use crate::now_unix_ms;
use crate::pki::Pki;
use crate::registry::Registry;
use crate::rollouts::{Control, Gate, Rollouts};
use crate::sessions::SessionHub;

pub struct OperatorApi {
    pub registry: Registry,
    pub pki: Arc<Pki>,
    pub sessions: Arc<SessionHub>,
    pub artifacts: ArtifactStore,
    pub events: EventLog,
    pub rollouts: Rollouts,
    pub heartbeat_interval_secs: u32,
    pub max_token_ttl_secs: u64,
}

impl OperatorApi {
    /// Receives one upload; every check runs as the bytes arrive.
    async fn receive_artifact(
        &self,
        operator: &str,
        mut stream: Streaming<PublishArtifactRequest>,
        subject: &mut String,
    ) -> Result<ArtifactRecord, ArtifactError> {
        let first = stream.message().await.map_err(|status| {
            ArtifactError::Io(std::io::Error::other(status.message().to_owned()))
        })?;
        let Some(PublishArtifactRequest {
            part: Some(Part::SignedManifest(signed)),
        }) = first
        else {
            return Err(ArtifactError::NoManifest);
        };
        if let Some(name) = crate::artifacts::subject_of(&signed) {
            *subject = name;
        }
        let mut upload = tokio::task::block_in_place(|| self.artifacts.begin(&signed, operator))?;
        while let Some(message) = stream.message().await.map_err(|status| {
            ArtifactError::Io(std::io::Error::other(format!(
                "upload stream broke: {}",
                status.message()
            )))
        })? {
            match message.part {
                Some(Part::Data(data)) => tokio::task::block_in_place(|| upload.write(&data))?,
                _ => return Err(ArtifactError::NoManifest),
            }
        }
        tokio::task::block_in_place(|| self.artifacts.finish(upload))
    }

    fn rollout_message(&self, rollout: &crate::rollouts::Rollout) -> Result<Rollout, Status> {
        rollout_to_proto(rollout, &self.rollouts).map_err(status_of_rollout)
    }

    async fn control(
        &self,
        request: Request<RolloutRef>,
        action: Control,
    ) -> Result<Response<Rollout>, Status> {
        let operator = authorized_operator(&request)?;
        let id = request.into_inner().id;
        let rollouts = self.rollouts.clone();
        let (rollout, assignments) =
            tokio::task::block_in_place(|| rollouts.control(&id, action, &operator))
                .map_err(status_of_rollout)?;
        deliver(&self.artifacts, &self.sessions, assignments);
        Ok(Response::new(self.rollout_message(&rollout)?))
    }

    /// Sends pin changes to the nodes and names them.
    fn delivered(&self, assignments: Vec<crate::rollouts::Assignment>) -> PinArtifactResponse {
        let node_ids = assignments.iter().map(|a| a.node_id.clone()).collect();
        deliver(&self.artifacts, &self.sessions, assignments);
        PinArtifactResponse { node_ids }
    }

    fn node_message(&self, node: &crate::registry::NodeRecord) -> Node {
        node_to_proto(node, now_unix_ms(), self.heartbeat_interval_secs)
    }
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        authorized_operator(&request)?;
        let nodes = self.registry.nodes().map_err(status_of)?;
        Ok(Response::new(ListNodesResponse {
            nodes: nodes.iter().map(|n| self.node_message(n)).collect(),
        }))
    }

    async fn get_node(&self, request: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        authorized_operator(&request)?;
        let node = self
            .registry
            .node(&request.into_inner().id)
            .map_err(status_of)?;
        Ok(Response::new(self.node_message(&node)))
    }

    async fn revoke_node(
        &self,
        request: Request<RevokeNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let operator = authorized_operator(&request)?;
        let request = request.into_inner();
        let node = self
            .registry
            .revoke(&request.id, &request.reason)
            .map_err(status_of)?;
        self.sessions.close(
            &node.id,
            Status::permission_denied(format!(
                "node {} was revoked ({}); enroll it again with a new token",
                node.id, node.revoked_reason
            )),
        );
        tracing::warn!(node = %node.id, %operator, reason = %node.revoked_reason, "node revoked");
        Ok(Response::new(self.node_message(&node)))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let operator = authorized_operator(&request)?;
        let request = request.into_inner();
        if request.ttl_secs > self.max_token_ttl_secs {
            return Err(Status::invalid_argument(format!(
                "token lifetime {}s exceeds the coordinator's limit of {}s (max_token_ttl_secs)",
                request.ttl_secs, self.max_token_ttl_secs
            )));
        }
        let created = self
            .registry
            .create_token(request.ttl_secs, request.labels.into_iter().collect())
            .map_err(status_of)?;
        // The token itself is a secret: never logged.
        tracing::info!(%operator, expires_at_ms = created.expires_at_ms, "bootstrap token created");
        Ok(Response::new(CreateTokenResponse {
            token: created.token,
            expires_at_unix_ms: created.expires_at_ms,
            ca_sha256: self.pki.ca_sha256().to_owned(),
        }))
    }

    async fn publish_artifact(
        &self,
        request: Request<Streaming<PublishArtifactRequest>>,
    ) -> Result<Response<Artifact>, Status> {
        let operator = authorized_operator(&request)?;
        let actor = format!("operator:{operator}");
        let mut subject = String::from("(unknown)");
        let result = self
            .receive_artifact(&operator, request.into_inner(), &mut subject)
            .await;
        let (action, reason) = match &result {
            Ok(_) => ("artifact.publish", String::new()),
            Err(error) => ("artifact.refused", error.to_string()),
        };
        self.events
            .append(&actor, action, &subject, &reason)
            .map_err(|e| status_of(e.into()))?;
        match result {
            Ok(record) => {
                tracing::info!(%operator, artifact = %subject, "artifact published");
                Ok(Response::new(artifact_to_proto(&record)))
            }
            Err(error) => {
                tracing::warn!(%operator, artifact = %subject, %error, "artifact refused");
                Err(status_of_artifact(&error))
            }
        }
    }

    async fn list_artifacts(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        authorized_operator(&request)?;
        let records = self.artifacts.list().map_err(|e| status_of_artifact(&e))?;
        Ok(Response::new(ListArtifactsResponse {
            artifacts: records.iter().map(artifact_to_proto).collect(),
        }))
    }

    async fn get_artifact(
        &self,
        request: Request<GetArtifactRequest>,
    ) -> Result<Response<Artifact>, Status> {
        authorized_operator(&request)?;
        let request = request.into_inner();
        let record = self
            .artifacts
            .get(&request.name, &request.version)
            .map_err(|e| status_of_artifact(&e))?;
        Ok(Response::new(artifact_to_proto(&record)))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        authorized_operator(&request)?;
        let events = self
            .events
            .list(&request.into_inner().action_prefix)
            .map_err(|e| status_of(e.into()))?;
        Ok(Response::new(ListEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
        }))
    }

    async fn create_rollout(
        &self,
        request: Request<CreateRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        let operator = authorized_operator(&request)?;
        let request = request.into_inner();
        let gate = request.gate.unwrap_or_default();
        let gate = Gate {
            require_smoke: gate.require_smoke,
            max_error_rate: gate.max_error_rate,
            max_p95_latency_ms: gate.max_p95_latency_ms,
            wave_timeout_secs: gate.wave_timeout_secs,
        };
        let (rollout, assignments) = tokio::task::block_in_place(|| {
            self.rollouts.create(
                &request.artifact,
                &request.selector,
                &request.waves,
                gate,
                &operator,
            )
        })
        .map_err(status_of_rollout)?;
        tracing::info!(%operator, rollout = %rollout.id, artifact = %rollout.artifact(), "rollout created");
        deliver(&self.artifacts, &self.sessions, assignments);
        Ok(Response::new(self.rollout_message(&rollout)?))
    }

    async fn get_rollout(&self, request: Request<RolloutRef>) -> Result<Response<Rollout>, Status> {
        authorized_operator(&request)?;
        let rollout = self
            .rollouts
            .get(&request.into_inner().id)
            .map_err(status_of_rollout)?;
        Ok(Response::new(self.rollout_message(&rollout)?))
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        authorized_operator(&request)?;
        let rollouts = self.rollouts.list().map_err(status_of_rollout)?;
        Ok(Response::new(ListRolloutsResponse {
            rollouts: rollouts
                .iter()
                .map(|r| self.rollout_message(r))
                .collect::<Result<_, _>>()?,
        }))
    }

    async fn pause_rollout(
        &self,
        request: Request<RolloutRef>,
    ) -> Result<Response<Rollout>, Status> {
        self.control(request, Control::Pause).await
    }

    async fn resume_rollout(
        &self,
        request: Request<RolloutRef>,
    ) -> Result<Response<Rollout>, Status> {
        self.control(request, Control::Resume).await
    }

    async fn abort_rollout(
        &self,
        request: Request<RolloutRef>,
    ) -> Result<Response<Rollout>, Status> {
        self.control(request, Control::Abort).await
    }

    async fn pin_artifact(
        &self,
        request: Request<PinArtifactRequest>,
    ) -> Result<Response<PinArtifactResponse>, Status> {
        let operator = authorized_operator(&request)?;
        let request = request.into_inner();
        let (name, version) = request
            .artifact
            .split_once('@')
            .ok_or_else(|| Status::invalid_argument("give the artifact as name@version"))?;
        let assignments = tokio::task::block_in_place(|| {
            self.rollouts
                .pin(&request.selector, name, Some(version), &operator)
        })
        .map_err(status_of_rollout)?;
        Ok(Response::new(self.delivered(assignments)))
    }

    async fn unpin_artifact(
        &self,
        request: Request<UnpinArtifactRequest>,
    ) -> Result<Response<PinArtifactResponse>, Status> {
        let operator = authorized_operator(&request)?;
        let request = request.into_inner();
        let assignments = tokio::task::block_in_place(|| {
            self.rollouts
                .pin(&request.selector, &request.name, None, &operator)
        })
        .map_err(status_of_rollout)?;
        Ok(Response::new(self.delivered(assignments)))
    }
}
