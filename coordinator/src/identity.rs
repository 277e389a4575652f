//! Who is calling: the principal read from the TLS client certificate of a request.
//! The certificate was already verified against the fleet CA by rustls; this module
//! only reads the role the CA encoded in its URI SAN.

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::pki::sha256_hex;

pub const NODE_URI_PREFIX: &str = "urn:nanofleet:node:";
pub const OPERATOR_URI_PREFIX: &str = "urn:nanofleet:operator:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A device; `cert_sha256` must match the certificate the registry issued to it.
    Node {
        id: String,
        cert_sha256: String,
    },
    Operator {
        name: String,
    },
}

/// Reads the principal from a DER certificate issued by this fleet's CA.
pub fn principal_of_der(der: &[u8]) -> Result<Principal, Status> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Status::unauthenticated("client certificate cannot be parsed"))?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| Status::unauthenticated("client certificate carries no nanofleet role"))?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
                return Ok(Principal::Node {
                    id: id.to_owned(),
                    cert_sha256: sha256_hex(der),
                });
            }
            if let Some(name) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                return Ok(Principal::Operator {
                    name: name.to_owned(),
                });
            }
        }
    }
    Err(Status::unauthenticated(
        "client certificate carries no nanofleet role",
    ))
}

/// The principal of a request, or UNAUTHENTICATED when no client certificate was sent.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "this call needs a client certificate: enroll the device with \
             `nanofleet-agent enroll`, or use operator credentials",
        )
    })?;
    let leaf = certs.first().ok_or_else(|| {
        Status::unauthenticated("this call needs a client certificate; none was presented")
    })?;
    principal_of_der(leaf)
}
