//! Client side of nanofleet's mutual-TLS gRPC transport and the credential files behind
//! it: the one place that turns PEM material and a coordinator URL into a tonic
//! [`Channel`], used by the node agent and the operator CLI alike.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest gRPC message either side accepts by default (the coordinator enforces its own
/// configured limit; this keeps clients from buffering more than that).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest command an agent accepts on its stream: a round's work carries the global
/// adapter inline (about 10 MB for SmolLM2-135M at rank 8 on every linear layer), bounded
/// like the adapter artifacts the agent accepts.
pub const MAX_COMMAND_BYTES: usize = 256 * 1024 * 1024;

/// Largest HTTP/2 frame this client accepts. One frame then carries a whole artifact
/// download message (256 KiB) instead of sixteen frames of the default 16 KiB; in the
/// loopback benchmark that took about a sixth of the coordinator's CPU time per
/// download and a few percent of the agent's. Messages stay bounded by their own limit.
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// PEM material a client presents and trusts.
#[derive(Clone)]
pub struct ClientTls {
    /// The fleet CA that must have signed the coordinator's server certificate.
    pub ca_pem: Vec<u8>,
    /// Client certificate and private key (PEM). `None` only for enrollment.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    // The private key never goes to logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("has_identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("coordinator URL {url:?} is not valid: {source}")]
    InvalidUrl {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("coordinator URL {0:?} must start with https://")]
    NotHttps(String),
    #[error("TLS configuration for {url:?} was refused: {source}")]
    Tls {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to the coordinator at {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
}

/// An endpoint for `url` with TLS configured and sensible timeouts; connects lazily.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, TransportError> {
    if !url.starts_with("https://") {
        return Err(TransportError::NotHttps(url.to_owned()));
    }
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url.to_owned())
        .map_err(|source| TransportError::InvalidUrl {
            url: url.to_owned(),
            source,
        })?
        .tls_config(config)
        .map_err(|source| TransportError::Tls {
            url: url.to_owned(),
            source,
        })
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .max_frame_size(MAX_FRAME_BYTES)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
}

/// Connects now, so that an unreachable coordinator or a refused handshake shows up here.
pub async fn connect(url: &str, tls: &ClientTls) -> Result<Channel, TransportError> {
    endpoint(url, tls)?
        .connect()
        .await
        .map_err(|source| TransportError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// Renders an error with its whole source chain, for messages that a person reads:
/// tonic hides the TLS reason (unknown CA, bad certificate) several sources deep.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Writes a file that holds a secret (a private key, a CA key) readable by its owner
/// alone (mode 0600), replacing any earlier file atomically through a rename.
pub fn write_private_file(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Raises the soft limit on open files to the hard limit: every agent connection is a
/// file descriptor, and the usual soft limit of 1024 caps a coordinator (or a fleet
/// simulator) far below the fleets it serves.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
