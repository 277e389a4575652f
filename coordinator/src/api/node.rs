//! `nanofleet.v1.NodeService`: heartbeats and the command stream, for enrolled nodes.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use nanofleet_proto::v1::{
    command, node_service_server::NodeService, Command, HeartbeatRequest, HeartbeatResponse,
    SubscribeRequest, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{authorized_node, convert::facts_from_proto, status_of};
use crate::registry::Registry;
use crate::sessions::SessionHub;
use crate::telemetry::Metrics;

pub struct NodeApi {
    pub registry: Registry,
    pub sessions: Arc<SessionHub>,
    pub heartbeat_interval_secs: u32,
    pub metrics: Metrics,
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;

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
        self.sessions.register(&node.id, sender);
        tracing::info!(node = %node.id, "command stream opened");
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
