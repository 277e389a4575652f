//! `nanofleet.v1.Enrollment`: the one service a client without a certificate may call.

use std::sync::Arc;

use nanofleet_proto::v1::{enrollment_server::Enrollment, EnrollRequest, EnrollResponse};
use tonic::{Request, Response, Status};

use super::{convert::facts_from_proto, status_of, status_of_audit};
use crate::audit_log::AuditLog;
use crate::pki::Pki;
use crate::registry::{token_reference, Registry, RegistryError};
use crate::telemetry::Metrics;

pub struct EnrollmentApi {
    pub registry: Registry,
    pub pki: Arc<Pki>,
    pub heartbeat_interval_secs: u32,
    pub metrics: Metrics,
    pub events: AuditLog,
}

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let request = request.into_inner();
        let token = token_reference(&request.token);
        let registry = self.registry.clone();
        let pki = self.pki.clone();
        // Certificate signing and the durable write block; keep them off the reactor.
        let result = tokio::task::spawn_blocking(move || {
            registry.enroll(
                &pki,
                &request.token,
                &request.csr_pem,
                facts_from_proto(request.facts),
            )
        })
        .await
        .map_err(|_| Status::internal("enrollment task failed"))?;
        self.metrics.enrollment(result.is_ok());
        let enrolled = match result {
            Ok(enrolled) => enrolled,
            Err(error) => {
                tracing::warn!(%error, "enrollment refused");
                // Refusals with a token this coordinator issued are recorded; guesses at
                // unknown tokens are not, so anonymous callers cannot grow the log.
                if !matches!(error, RegistryError::UnknownToken) {
                    self.events
                        .append(
                            "coordinator",
                            "node.enroll_refused",
                            &token,
                            &error.to_string(),
                        )
                        .map_err(status_of_audit)?;
                }
                return Err(status_of(error));
            }
        };
        self.events
            .append(
                &format!("node:{}", enrolled.node_id),
                "node.enroll",
                &enrolled.node_id,
                &format!("{token} spent"),
            )
            .map_err(status_of_audit)?;
        tracing::info!(node = %enrolled.node_id, "node enrolled");
        Ok(Response::new(EnrollResponse {
            node_id: enrolled.node_id,
            certificate_pem: enrolled.certificate_pem,
            ca_certificate_pem: self.pki.ca_pem().to_owned(),
            heartbeat_interval_secs: self.heartbeat_interval_secs,
        }))
    }
}
