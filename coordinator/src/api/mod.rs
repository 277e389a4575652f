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
    deliver_built(sessions, assignments, |desired| {
        assignment_command(artifacts, desired)
    });
}

/// [`deliver`] with the command built by `build`. A wave gives many nodes the same
/// desired state, so each distinct one is built once (reading and encoding the signed
/// manifest), not once per node.
fn deliver_built(
    sessions: &crate::sessions::SessionHub,
    assignments: Vec<crate::rollouts::Assignment>,
    mut build: impl FnMut(
        &crate::rollouts::Desired,
    ) -> Result<nanofleet_proto::v1::Command, crate::artifacts::ArtifactError>,
) {
    let mut built: Vec<(crate::rollouts::Desired, nanofleet_proto::v1::Command)> = Vec::new();
    for assignment in assignments {
        let command = match built
            .iter()
            .find(|(desired, _)| *desired == assignment.desired)
        {
            Some((_, command)) => command.clone(),
            None => match build(&assignment.desired) {
                Ok(command) => {
                    built.push((assignment.desired, command.clone()));
                    command
                }
                Err(error) => {
                    tracing::error!(%error, node = %assignment.node_id, "cannot build an assignment");
                    continue;
                }
            },
        };
        sessions.send(&assignment.node_id, command);
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

/// Maps a telemetry error to the status a node or operator sees.
pub fn status_of_telemetry(error: crate::fleet_telemetry::TelemetryError) -> Status {
    use crate::fleet_telemetry::TelemetryError as E;
    match error {
        E::Invalid(_) => Status::invalid_argument(error.to_string()),
        E::Store(e) => status_of(e.into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollouts::{Assignment, Desired};
    use crate::sessions::SessionHub;
    use nanofleet_proto::v1::{command, AssignArtifact, Command};

    #[tokio::test]
    async fn a_wave_builds_each_distinct_assignment_once() {
        let sessions = SessionHub::default();
        let mut streams = Vec::new();
        for node in ["n1", "n2", "n3"] {
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            sessions.register(node, sender);
            streams.push(receiver);
        }
        let desired = |version: &str| Desired {
            name: "model".into(),
            version: version.into(),
            rollout_id: "r1".into(),
            pinned: false,
        };
        let assignments = [("n1", "2"), ("n2", "2"), ("n3", "1")]
            .map(|(node, version)| Assignment {
                node_id: node.into(),
                desired: desired(version),
            })
            .to_vec();
        let mut builds = 0;
        deliver_built(&sessions, assignments, |desired| {
            builds += 1;
            Ok(Command {
                body: Some(command::Body::Assign(AssignArtifact {
                    rollout_id: desired.rollout_id.clone(),
                    signed_manifest: desired.version.clone().into_bytes(),
                    name: desired.name.clone(),
                })),
            })
        });
        assert_eq!(builds, 2);
        for (stream, version) in streams.iter_mut().zip(["2", "2", "1"]) {
            let Some(command::Body::Assign(assign)) = stream.recv().await.unwrap().unwrap().body
            else {
                panic!("not an assignment");
            };
            assert_eq!(assign.signed_manifest, version.as_bytes());
        }
    }
}
