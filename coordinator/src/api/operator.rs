//! `nanofleet.v1.OperatorService`: fleet administration, for operator certificates only.

use std::sync::Arc;

use nanofleet_audit::export::ExportedEntry;
use nanofleet_proto::v1::{
    operator_service_server::OperatorService, publish_artifact_request::Part, AdapterBlob,
    Artifact, AuditLeaf, AuditTreeHead, ConsistencyProof, ConsistencyProofRequest,
    CreateFederationRequest, CreateRolloutRequest, CreateTokenRequest, CreateTokenResponse,
    Federation, FederationRef, GetAdapterRequest, GetArtifactRequest, GetAuditHeadRequest,
    GetNodeRequest, InclusionProofRequest, ListArtifactsRequest, ListArtifactsResponse,
    ListAuditEntriesRequest, ListAuditEntriesResponse, ListEventsRequest, ListEventsResponse,
    ListFederationsRequest, ListFederationsResponse, ListNodesRequest, ListNodesResponse,
    ListRolloutsRequest, ListRolloutsResponse, Node, PinArtifactRequest, PinArtifactResponse,
    PublishAdapterRequest, PublishArtifactRequest, RevokeNodeRequest, Rollout, RolloutRef,
    UnpinArtifactRequest,
};
use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    adapter_spec_from_proto, federation_to_proto, plan_from_proto, rollout_to_proto,
};
use super::convert::{artifact_to_proto, event_to_proto, node_to_proto};
use super::convert::{audit_filter_from_proto, audit_leaf_to_proto, tree_head_to_proto};
use super::{authorized_operator, status_of, status_of_artifact, status_of_audit};
use super::{deliver, status_of_adapter, status_of_federation, status_of_rollout};
use crate::adapters::{self, AdapterRelease};
use crate::artifacts::{ArtifactError, ArtifactRecord, ArtifactStore, TRUST_POLICY_FILE};
use crate::audit_log::{self, AuditFilter, AuditLog};
use crate::federations::secure::SecureOptions;
use crate::federations::{
    Federations, NewFederation, PrivacyOptions, Selection, DEFAULT_WEIGHT_CAP,
};
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
    pub events: AuditLog,
    pub rollouts: Rollouts,
    pub federations: Federations,
    /// Signs the federations' adapters that operators publish.
    pub adapter_key: Arc<ed25519_dalek::SigningKey>,
    /// Wakes the federation engine so a started federation opens its round at once.
    pub federation_engine: std::sync::Arc<tokio::sync::Notify>,
    pub heartbeat_interval_secs: u32,
    pub max_token_ttl_secs: u64,
    pub telemetry: crate::fleet_telemetry::FleetTelemetry,
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
        self.events
            .append(
                &format!("operator:{operator}"),
                "node.revoke",
                &node.id,
                &node.revoked_reason,
            )
            .map_err(status_of_audit)?;
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
        let labels: crate::registry::Labels = request.labels.into_iter().collect();
        let created = self
            .registry
            .create_token(request.ttl_secs, labels.clone())
            .map_err(status_of)?;
        self.events
            .append(
                &format!("operator:{operator}"),
                "token.create",
                &crate::registry::token_reference(&created.token),
                &format!(
                    "expires {}, labels {}",
                    created.expires_at_ms,
                    serde_json::to_string(&labels).unwrap_or_default()
                ),
            )
            .map_err(status_of_audit)?;
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
        self.record_trust_policy()?;
        let result = self
            .receive_artifact(&operator, request.into_inner(), &mut subject)
            .await;
        let (action, reason) = match &result {
            Ok(_) => ("artifact.publish", String::new()),
            Err(error) => ("artifact.refused", error.to_string()),
        };
        self.events
            .append(&actor, action, &subject, &reason)
            .map_err(status_of_audit)?;
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
        let filter = AuditFilter {
            action_prefix: Some(request.into_inner().action_prefix),
            ..Default::default()
        };
        let events = self
            .events
            .entries(0, self.events.size(), &filter)
            .map_err(status_of_audit)?;
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
                request.max_per_second,
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

    async fn create_federation(
        &self,
        request: Request<CreateFederationRequest>,
    ) -> Result<Response<Federation>, Status> {
        let operator = authorized_operator(&request)?;
        let r = request.into_inner();
        let selection = r.selection.unwrap_or_default();
        let new = NewFederation {
            name: r.name,
            base_name: r.base_name,
            base_version: r.base_version,
            adapter: adapter_spec_from_proto(r.adapter)
                .map_err(|e| status_of_federation(e.into()))?,
            selection: Selection {
                min_clients: selection.min_clients,
                max_clients: selection.max_clients,
                min_free_memory_bytes: selection.min_free_memory_bytes,
                min_battery_percent: selection.min_battery_percent,
            },
            plan: plan_from_proto(r.plan),
            rounds: r.rounds,
            round_timeout_secs: r.round_timeout_secs,
            max_failed_rounds: r.max_failed_rounds,
            secure: (!r.plaintext).then(|| {
                let o = r.secagg.unwrap_or_default();
                SecureOptions {
                    group_size: o.group_size,
                    stage_timeout_secs: if o.stage_timeout_secs == 0 {
                        60
                    } else {
                        o.stage_timeout_secs
                    },
                    weight_cap: if o.weight_cap == 0 {
                        DEFAULT_WEIGHT_CAP
                    } else {
                        o.weight_cap
                    },
                }
            }),
            privacy: {
                let p = r.privacy.unwrap_or_default();
                PrivacyOptions {
                    noise_multiplier: p.noise_multiplier,
                    distributed: p.distributed,
                    epsilon_budget: p.epsilon_budget,
                    delta: p.delta,
                }
            },
        };
        let fed = tokio::task::block_in_place(|| self.federations.create(new, &operator))
            .map_err(status_of_federation)?;
        tracing::info!(%operator, federation = %fed.name, "federation created");
        Ok(Response::new(federation_to_proto(&fed)))
    }

    async fn list_federations(
        &self,
        request: Request<ListFederationsRequest>,
    ) -> Result<Response<ListFederationsResponse>, Status> {
        authorized_operator(&request)?;
        let feds = tokio::task::block_in_place(|| self.federations.list())
            .map_err(status_of_federation)?;
        Ok(Response::new(ListFederationsResponse {
            federations: feds.iter().map(federation_to_proto).collect(),
        }))
    }

    async fn get_federation(
        &self,
        request: Request<FederationRef>,
    ) -> Result<Response<Federation>, Status> {
        authorized_operator(&request)?;
        let fed = tokio::task::block_in_place(|| self.federations.get(&request.get_ref().name))
            .map_err(status_of_federation)?;
        Ok(Response::new(federation_to_proto(&fed)))
    }

    async fn start_round(
        &self,
        request: Request<FederationRef>,
    ) -> Result<Response<Federation>, Status> {
        let operator = authorized_operator(&request)?;
        let fed = tokio::task::block_in_place(|| {
            self.federations.start(&request.get_ref().name, &operator)
        })
        .map_err(status_of_federation)?;
        self.federation_engine.notify_one();
        Ok(Response::new(federation_to_proto(&fed)))
    }

    async fn get_adapter(
        &self,
        request: Request<GetAdapterRequest>,
    ) -> Result<Response<AdapterBlob>, Status> {
        authorized_operator(&request)?;
        let r = request.into_inner();
        let (fed, (round, bytes)) = tokio::task::block_in_place(|| {
            let fed = self.federations.get(&r.federation)?;
            let adapter = self.federations.adapter(&r.federation, r.round)?;
            Ok((fed, adapter))
        })
        .map_err(status_of_federation)?;
        Ok(Response::new(AdapterBlob {
            round,
            safetensors: bytes,
            peft_config_json: fed.adapter.peft_config(&fed.base_name).to_string(),
        }))
    }

    async fn publish_adapter(
        &self,
        request: Request<PublishAdapterRequest>,
    ) -> Result<Response<Artifact>, Status> {
        let operator = authorized_operator(&request)?;
        let r = request.into_inner();
        let release = AdapterRelease {
            federation: r.federation,
            round: r.round,
            name: r.name,
            version: r.version,
            license: if r.license.is_empty() {
                "apache-2.0".to_owned()
            } else {
                r.license
            },
            max_eval_loss: r.max_eval_loss,
            min_exact_match: r.min_exact_match,
        };
        let subject = format!("{}@{}", release.name, release.version);
        self.record_trust_policy()?;
        let result = tokio::task::block_in_place(|| {
            adapters::publish(
                &self.federations,
                &self.artifacts,
                &self.events,
                &self.adapter_key,
                &release,
                &operator,
            )
        });
        match result {
            Ok(record) => {
                tracing::info!(%operator, adapter = %subject, "adapter published");
                Ok(Response::new(artifact_to_proto(&record)))
            }
            Err(error) => {
                let _ = self.events.append(
                    &format!("operator:{operator}"),
                    "adapter.refused",
                    &subject,
                    &error.to_string(),
                );
                Err(status_of_adapter(error))
            }
        }
    }

    async fn get_node_telemetry(
        &self,
        request: Request<nanofleet_proto::v1::GetNodeTelemetryRequest>,
    ) -> Result<Response<nanofleet_proto::v1::NodeTelemetry>, Status> {
        authorized_operator(&request)?;
        let id = request.into_inner().id;
        let registry = self.registry.clone();
        let telemetry = self.telemetry.clone();
        let found = tokio::task::block_in_place(|| {
            registry.node(&id).map_err(status_of)?;
            telemetry.get(&id).map_err(super::status_of_telemetry)
        })?;
        Ok(Response::new(crate::fleet_telemetry::to_proto(&found)))
    }

    async fn get_audit_head(
        &self,
        request: Request<GetAuditHeadRequest>,
    ) -> Result<Response<AuditTreeHead>, Status> {
        authorized_operator(&request)?;
        let head =
            tokio::task::block_in_place(|| self.events.signed_head()).map_err(status_of_audit)?;
        Ok(Response::new(tree_head_to_proto(&head)))
    }

    async fn list_audit_entries(
        &self,
        request: Request<ListAuditEntriesRequest>,
    ) -> Result<Response<ListAuditEntriesResponse>, Status> {
        authorized_operator(&request)?;
        let request = request.into_inner();
        let tree_size = self.audit_size(request.tree_size)?;
        let limit = match request.limit {
            0 => 1000,
            n => (n as usize).min(audit_log::MAX_PAGE),
        };
        let filter = AuditFilter {
            limit: Some(limit),
            ..audit_filter_from_proto(request.filter.unwrap_or_default())
        };
        let entries = tokio::task::block_in_place(|| {
            self.events
                .export_page(tree_size, request.start_index, &filter, request.with_proofs)
        })
        .map_err(status_of_audit)?;
        let next_index = match entries.last() {
            Some(last) if entries.len() == limit => last.index + 1,
            _ => tree_size,
        };
        Ok(Response::new(ListAuditEntriesResponse {
            tree_size,
            entries: entries.iter().map(audit_leaf_to_proto).collect(),
            next_index,
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<InclusionProofRequest>,
    ) -> Result<Response<AuditLeaf>, Status> {
        authorized_operator(&request)?;
        let request = request.into_inner();
        let tree_size = self.audit_size(request.tree_size)?;
        let leaf = tokio::task::block_in_place(|| {
            let proof = self.events.inclusion_proof(request.index, tree_size)?;
            let entry = self.events.entry(request.index)?;
            Ok(ExportedEntry {
                index: request.index,
                entry,
                inclusion_proof: Some(proof),
            })
        })
        .map_err(status_of_audit)?;
        Ok(Response::new(audit_leaf_to_proto(&leaf)))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<ConsistencyProofRequest>,
    ) -> Result<Response<ConsistencyProof>, Status> {
        authorized_operator(&request)?;
        let request = request.into_inner();
        let new_size = self.audit_size(request.new_size)?;
        let hashes = tokio::task::block_in_place(|| {
            self.events.consistency_proof(request.old_size, new_size)
        })
        .map_err(status_of_audit)?;
        Ok(Response::new(ConsistencyProof {
            old_size: request.old_size,
            new_size,
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        }))
    }
}

impl OperatorApi {
    /// Records the trust policy the next publish is checked against, when it changed.
    fn record_trust_policy(&self) -> Result<(), Status> {
        if let Some(text) = self.artifacts.trust_policy_text() {
            tokio::task::block_in_place(|| {
                self.events
                    .record_if_changed("trust.policy", TRUST_POLICY_FILE, &text)
            })
            .map_err(status_of_audit)?;
        }
        Ok(())
    }

    /// A requested tree size: 0 means the log's current size; more than it is refused.
    fn audit_size(&self, requested: u64) -> Result<u64, Status> {
        let size = self.events.size();
        match requested {
            0 => Ok(size),
            n if n <= size => Ok(n),
            n => Err(Status::out_of_range(format!(
                "tree size {n} is beyond the audit log's {size} entries"
            ))),
        }
    }
}
