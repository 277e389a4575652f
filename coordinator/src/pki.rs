//! The fleet's certificate authority: creates or imports the CA, issues the server
//! certificate, node certificates (from device CSRs) and operator certificates.
//!
//! Roles are encoded by the coordinator, never taken from a CSR: every certificate it
//! issues carries exactly one URI SAN, `urn:nanofleet:node:<id>` or
//! `urn:nanofleet:operator:<name>` (see [`crate::identity`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::identity::{NODE_URI_PREFIX, OPERATOR_URI_PREFIX};

/// Largest CSR accepted, before any parsing.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.crt";
const SERVER_KEY: &str = "server.key";
const SIGNING_KEY: &str = "signing.key";
const SIGNING_PUB: &str = "signing.pub";
/// Operator credentials written by `init`, for the `nanofleet` CLI on this machine.
pub const OPERATOR_DIR: &str = "operator";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "data directory {0} is not initialized: run `nanofleet-coordinator init --data-dir {0}`"
    )]
    NotInitialized(String),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate signing request is too large ({0} bytes; the limit is {MAX_CSR_BYTES})")]
    CsrTooLarge(usize),
    #[error("certificate signing request is not valid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CA material is not usable: {0}")]
    BadCa(rcgen::Error),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("signing key generation failed: {0}")]
    SigningKey(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A certificate issued to a client, with the fingerprint the registry stores.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    /// SHA-256 of the certificate's DER, hex.
    pub sha256: String,
}

/// The loaded CA and server identity of one coordinator.
pub struct Pki {
    ca_pem: String,
    ca_sha256: String,
    issuer: Issuer<'static, KeyPair>,
    server_chain_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

/// What `init` did, for the operator to read.
#[derive(Debug)]
pub struct InitReport {
    pub created: bool,
    pub ca_sha256: String,
    pub operator_dir: PathBuf,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

fn leaf_params(common_name: &str, sans: Vec<SanType>, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "nanofleet");
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params
}

fn uri_san(uri: String) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(uri.try_into()?))
}

fn pem_of_der(der: &[u8]) -> String {
    pem_encode("CERTIFICATE", der)
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn ca_der_of_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| PkiError::BadCa(rcgen::Error::PemError(e.to_string())))
}

impl Pki {
    /// Creates the CA (or imports `ca` = (cert PEM, key PEM)), the server certificate for
    /// `server_names`, the coordinator's ed25519 signing key and one operator credential.
    /// Leaves an initialized directory untouched.
    pub fn init(
        dir: &Path,
        server_names: &[String],
        ca: Option<(String, String)>,
    ) -> Result<InitReport, PkiError> {
        let operator_dir = dir.join(OPERATOR_DIR);
        if dir.join(CA_CERT).exists() {
            let pki = Self::load(dir)?;
            return Ok(InitReport {
                created: false,
                ca_sha256: pki.ca_sha256,
                operator_dir,
            });
        }
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        set_mode(dir, 0o700)?;

        let (ca_pem, ca_key) = match ca {
            Some((cert_pem, key_pem)) => {
                let key = KeyPair::from_pem(&key_pem).map_err(PkiError::BadCa)?;
                Issuer::from_ca_cert_pem(&cert_pem, &key).map_err(PkiError::BadCa)?;
                (cert_pem, key)
            }
            None => {
                let key = KeyPair::generate()?;
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, "nanofleet fleet CA");
                dn.push(DnType::OrganizationName, "nanofleet");
                params.distinguished_name = dn;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                    KeyUsagePurpose::DigitalSignature,
                ];
                params.not_before = OffsetDateTime::now_utc() - Duration::minutes(5);
                params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
                params.serial_number = Some(random_serial());
                (params.self_signed(&key)?.pem(), key)
            }
        };
        write_public(&dir.join(CA_CERT), ca_pem.as_bytes())?;
        write_secret(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes())?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(PkiError::BadCa)?;

        // Server certificate for every name and address agents may dial.
        let sans = server_names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(name.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let mut params = leaf_params("nanofleet coordinator", sans, 825);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = params.signed_by(&server_key, &issuer)?;
        let chain = format!("{}{}", server_cert.pem(), ca_pem);
        write_public(&dir.join(SERVER_CERT), chain.as_bytes())?;
        write_secret(&dir.join(SERVER_KEY), server_key.serialize_pem().as_bytes())?;

        // The coordinator's own ed25519 key: signs tree heads and federated adapters.
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        {
            use ed25519_dalek::pkcs8::{
                spki::der::pem::LineEnding, EncodePrivateKey, EncodePublicKey,
            };
            let private = signing
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| PkiError::SigningKey(e.to_string()))?;
            let public = signing
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| PkiError::SigningKey(e.to_string()))?;
            write_secret(&dir.join(SIGNING_KEY), private.as_bytes())?;
            write_public(&dir.join(SIGNING_PUB), public.as_bytes())?;
        }

        let pki = Self::load(dir)?;
        pki.write_operator_credentials(&operator_dir, "admin")?;
        Ok(InitReport {
            created: true,
            ca_sha256: pki.ca_sha256,
            operator_dir,
        })
    }

    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        if !dir.join(CA_CERT).exists() {
            return Err(PkiError::NotInitialized(dir.display().to_string()));
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io_error(&path))
        };
        let ca_pem = read(CA_CERT)?;
        let ca_key = KeyPair::from_pem(&read(CA_KEY)?).map_err(PkiError::BadCa)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(PkiError::BadCa)?;
        Ok(Self {
            ca_sha256: sha256_hex(&ca_der_of_pem(&ca_pem)?),
            ca_pem,
            issuer,
            server_chain_pem: read(SERVER_CERT)?,
            server_key_pem: read(SERVER_KEY)?,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// SHA-256 of the CA certificate (DER), hex: what agents may pin.
    pub fn ca_sha256(&self) -> &str {
        &self.ca_sha256
    }

    /// Server certificate chain and key, PEM.
    pub fn server_identity(&self) -> (&str, &str) {
        (&self.server_chain_pem, &self.server_key_pem)
    }

    /// Signs a node certificate for the public key in `csr_pem`. The CSR proves
    /// possession of the key (its signature is checked); its subject and extensions are
    /// ignored.
    pub fn issue_node_cert(&self, node_id: &str, csr_pem: &str) -> Result<IssuedCert, PkiError> {
        let csr = parse_csr(csr_pem)?;
        let mut params = leaf_params(
            node_id,
            vec![uri_san(format!("{NODE_URI_PREFIX}{node_id}"))?],
            365,
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCert {
            sha256: sha256_hex(cert.der()),
            pem: pem_of_der(cert.der()),
        })
    }

    /// Issues an operator certificate and a fresh key; returns (cert PEM, key PEM).
    pub fn issue_operator_cert(&self, name: &str) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(
            &format!("operator {name}"),
            vec![uri_san(format!("{OPERATOR_URI_PREFIX}{name}"))?],
            365,
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `ca.crt`, `operator.crt` and `operator.key` (0600) into `dir`.
    pub fn write_operator_credentials(&self, dir: &Path, name: &str) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        set_mode(dir, 0o700)?;
        let (cert, key) = self.issue_operator_cert(name)?;
        write_public(&dir.join("ca.crt"), self.ca_pem.as_bytes())?;
        write_public(&dir.join("operator.crt"), cert.as_bytes())?;
        write_secret(&dir.join("operator.key"), key.as_bytes())
    }
}

/// Parses a PEM CSR from an untrusted client and checks its self-signature.
pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(PkiError::CsrTooLarge(csr_pem.len()));
    }
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error(path))
}

fn write_secret(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    nanofleet_transport::write_private_file(path, contents).map_err(io_error(path))
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_creates_private_keys_0600_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let first = Pki::init(dir.path(), &names, None).unwrap();
        assert!(first.created);
        for key in [CA_KEY, SERVER_KEY, SIGNING_KEY, "operator/operator.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let second = Pki::init(dir.path(), &names, None).unwrap();
        assert!(!second.created);
        assert_eq!(first.ca_sha256, second.ca_sha256);
    }

    #[test]
    fn node_cert_ignores_csr_subject_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(dir.path(), &["localhost".to_owned()], None).unwrap();
        let pki = Pki::load(dir.path()).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec![format!("{OPERATOR_URI_PREFIX}evil")]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "operator admin");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = pki.issue_node_cert("n1", &csr).unwrap();
        let der = ca_der_of_pem(&issued.pem).unwrap();
        let identity = crate::identity::principal_of_der(&der).unwrap();
        assert_eq!(
            identity,
            crate::identity::Principal::Node {
                id: "n1".into(),
                cert_sha256: issued.sha256.clone()
            }
        );

        assert!(matches!(
            pki.issue_node_cert("n2", "not a csr"),
            Err(PkiError::BadCsr(_))
        ));
        assert!(matches!(
            pki.issue_node_cert("n2", &"x".repeat(MAX_CSR_BYTES + 1)),
            Err(PkiError::CsrTooLarge(_))
        ));
    }

    #[test]
    fn imported_ca_is_used() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let report = Pki::init(
            dir.path(),
            &["localhost".to_owned()],
            Some((cert.pem(), key.serialize_pem())),
        )
        .unwrap();
        assert_eq!(report.ca_sha256, sha256_hex(cert.der()));
    }
}
