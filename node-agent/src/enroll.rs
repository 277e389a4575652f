//! Enrollment: generate the device key here, send only a CSR and the bootstrap token,
//! and store the certificate the coordinator returns.

use nanofleet_proto::v1::{enrollment_client::EnrollmentClient, DeviceFacts, EnrollRequest};
use nanofleet_transport::{error_chain, ClientTls};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("key generation failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error("{0}")]
    Transport(String),
    #[error("the coordinator refused enrollment: {0}")]
    Refused(String),
}

/// Enrolls with `coordinator`, trusting `ca_pem` for its server certificate.
pub async fn enroll(
    coordinator: &str,
    ca_pem: Vec<u8>,
    token: &str,
    facts: DeviceFacts,
) -> Result<Identity, EnrollError> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let tls = ClientTls {
        ca_pem,
        identity: None,
    };
    let channel = nanofleet_transport::connect(coordinator, &tls)
        .await
        .map_err(|e| EnrollError::Transport(error_chain(&e)))?;
    let response = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            token: token.to_owned(),
            csr_pem: csr,
            facts: Some(facts),
        })
        .await
        .map_err(|status| EnrollError::Refused(status.message().to_owned()))?
        .into_inner();
    Ok(Identity::new(
        response.node_id,
        coordinator.to_owned(),
        response.certificate_pem,
        key.serialize_pem(),
        response.ca_certificate_pem,
    ))
}
