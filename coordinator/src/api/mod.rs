//! The gRPC edge: protocol types in, domain calls, `Status` out. Authentication and
//! the mapping from domain errors to messages a user can act on live here.

pub mod convert;
mod enrollment;
mod node;
mod operator;

pub use enrollment::EnrollmentApi;
pub use node::{assignment_command, NodeApi};
pub use operator::OperatorApi;

use tonic::{Request, Status};

use crate::identity::{principal, Principal};
use crate::registry::{NodeRecord, Registry, RegistryError};

/// Maps a domain error to the gRPC status a caller sees; internal details are logged,
/// not sent.
pub fn status_of(error: RegistryError) -> Status {
    use crate::pki::PkiError;
    match &error {
        RegistryError::UnknownToken | RegistryError::TokenExpired | RegistryError::TokenUsed => {
            Status::unauthenticated(error.to_string())
        }
        RegistryError::Invalid { .. } => Status::invalid_argument(error.to_string()),
        RegistryError::NodeNotFound(_) => Status::not_found(error.to_string()),
        RegistryError::NodeRevoked { .. } | RegistryError::StaleCertificate(_) => {
            Status::permission_denied(error.to_string())
        }
        RegistryError::Pki(PkiError::BadCsr(_) | PkiError::CsrTooLarge(_)) => {
            Status::invalid_argument(error.to_string())
        }
        RegistryError::Pki(_) | RegistryError::Store(_) => {
            tracing::error!(%error, "internal error");
            Status::internal("the coordinator failed to complete the call; see its log")
        }
    }
}

/// Sends each assignment to its node's open streams (an offline node gets its desired
/// state when it reconnects).
pub fn deliver(
    artifacts: &crate::artifacts::ArtifactStore,
    sessions: &crate::sessions::SessionHub,
    assignments: Vec<crate::rollouts::Assignment>,
) {
    for assignment in assignments {
        match assignment_command(artifacts, &assignment.desired) {
            Ok(command) => {
                sessions.send(&assignment.node_id, command);
            }
            Err(error) => {
                tracing::error!(%error, node = %assignment.node_id, "cannot build an assignment")
            }
        }
    }
}

/// Maps a rollout error to the status an operator sees.
pub fn status_of_rollout(error: crate::rollouts::RolloutError) -> Status {
    use crate::rollouts::RolloutError as E;
    match error {
        E::BadSelector(_) | E::BadWaves(_) | E::BadArtifact(_) => {
            Status::invalid_argument(error.to_string())
        }
        E::NoNodes => Status::failed_precondition(error.to_string()),
        E::NotFound(_) => Status::not_found(error.to_string()),
        E::WrongState { .. } => Status::failed_precondition(error.to_string()),
        E::Artifact(e) => status_of_artifact(&e),
        E::Registry(e) => status_of(e),
        E::Store(e) => status_of(e.into()),
        E::Audit(e) => status_of_audit(e),
    }
}

/// Maps a federation error to the status an operator or node sees.
pub fn status_of_federation(error: crate::federations::FederationError) -> Status {
    use crate::federations::FederationError as E;
    match error {
        E::BadName(_) | E::Spec(_) | E::BadSchedule(_) | E::BadUpdate(_) | E::TooLarge { .. } => {
            Status::invalid_argument(error.to_string())
        }
        E::Exists(_) | E::AlreadyReported(_) => Status::already_exists(error.to_string()),
        E::NotFound(_) | E::UnknownRound(_) | E::NoAdapter { .. } => {
            Status::not_found(error.to_string())
        }
        E::WrongState { .. } | E::RoundClosed(_) => Status::failed_precondition(error.to_string()),
        E::NotSelected(_) => Status::permission_denied(error.to_string()),
        E::Artifact(e) => status_of_artifact(&e),
        E::Registry(e) => status_of(e),
        E::Store(e) => status_of(e.into()),
        E::Audit(e) => status_of_audit(e),
        E::Io(_) => {
            tracing::error!(%error, "federation storage error");
            Status::internal("the coordinator failed to store round data; see its log")
        }
    }
}

/// Maps an adapter publishing error to the status an operator sees.
pub fn status_of_adapter(error: crate::adapters::AdapterError) -> Status {
    use crate::adapters::AdapterError as E;
    match error {
        E::Federation(e) => status_of_federation(e),
        E::Artifact(e) => status_of_artifact(&e),
        E::Manifest(_) => Status::invalid_argument(error.to_string()),
        E::NotAggregated { .. } | E::Gate(_) => Status::failed_precondition(error.to_string()),
        E::Key(_) => {
            tracing::error!(%error, "adapter key error");
            Status::internal("the coordinator cannot use its adapter signing key; see its log")
        }
        E::Audit(e) => status_of_audit(e),
    }
}

/// Maps an audit log error to the status a caller sees; storage faults stay in the log.
pub fn status_of_audit(error: crate::audit_log::AuditError) -> Status {
    use crate::audit_log::AuditError as E;
    match error {
        E::Proof(_) => Status::out_of_range(error.to_string()),
        E::Entry(_) | E::Store(_) | E::Key(_) | E::Damaged(_) => {
            tracing::error!(%error, "audit log error");
            Status::internal("the coordinator failed to use its audit log; see its log")
        }
    }
}

/// Sends each node its round work (a node that dropped gets it when it reconnects).
pub fn dispatch_rounds(
    sessions: &crate::sessions::SessionHub,
    outbound: Vec<crate::federations::Outbound>,
) {
    for o in outbound {
        sessions.send(convert::outbound_node(&o), convert::outbound_to_command(&o));
    }
}

/// Maps an artifact error to the status a publisher sees.
pub fn status_of_artifact(error: &crate::artifacts::ArtifactError) -> Status {
    use crate::artifacts::ArtifactError as E;
    let message = error.to_string();
    match error {
        E::BadManifest(_)
        | E::TooLong { .. }
        | E::Truncated { .. }
        | E::Mismatch(_)
        | E::Gguf(_)
        | E::GgufDisagrees { .. }
        | E::Adapter(_)
        | E::NoManifest => Status::invalid_argument(message),
        E::Untrusted(_) => Status::permission_denied(message),
        E::AlreadyPublished(_) => Status::already_exists(message),
        E::NotFound(_) => Status::not_found(message),
        E::NoTrustPolicy(_) | E::BadTrustPolicy(_) => Status::failed_precondition(message),
        E::Io(_) | E::Store(_) => {
            tracing::error!(%error, "artifact storage error");
            Status::internal("the coordinator failed to store the artifact; see its log")
        }
    }
}

/// The calling node, authenticated against the registry on every call, so that a
/// revocation takes effect on the node's next call.
fn authorized_node<T>(registry: &Registry, request: &Request<T>) -> Result<NodeRecord, Status> {
    match principal(request)? {
        Principal::Node { id, cert_sha256 } => {
            tracing::Span::current().record("principal", id.as_str());
            registry
                .authenticate_node(&id, &cert_sha256)
                .map_err(status_of)
        }
        Principal::Operator { .. } => Err(Status::permission_denied(
            "operator credentials cannot call the node API",
        )),
    }
}

/// The calling operator's name; node certificates are refused.
fn authorized_operator<T>(request: &Request<T>) -> Result<String, Status> {
    match principal(request)? {
        Principal::Operator { name } => {
            tracing::Span::current().record("principal", name.as_str());
            Ok(name)
        }
        Principal::Node { id, .. } => Err(Status::permission_denied(format!(
            "node certificates cannot call the operator API (caller is node {id})"
        ))),
    }
}
