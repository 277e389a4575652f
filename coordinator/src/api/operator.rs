//! `nanofleet.v1.OperatorService`: fleet administration, for operator certificates only.

use std::sync::Arc;

use nanofleet_proto::v1::{
    operator_service_server::OperatorService, CreateTokenRequest, CreateTokenResponse,
    GetNodeRequest, ListNodesRequest, ListNodesResponse, Node, RevokeNodeRequest,
};
use tonic::{Request, Response, Status};

use super::{authorized_operator, convert::node_to_proto, status_of};
use crate::now_unix_ms;
use crate::pki::Pki;
use crate::registry::Registry;
use crate::sessions::SessionHub;

pub struct OperatorApi {
    pub registry: Registry,
    pub pki: Arc<Pki>,
    pub sessions: Arc<SessionHub>,
    pub heartbeat_interval_secs: u32,
    pub max_token_ttl_secs: u64,
}

impl OperatorApi {
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
}
