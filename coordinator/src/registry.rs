//! The fleet registry: bootstrap tokens, enrollment, node records, heartbeats and
//! revocation. Domain logic only; it works on its own types and a [`KvStore`].

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::now_unix_ms;
use crate::pki::{sha256_hex, Pki, PkiError};
use crate::store::{decode, encode, Keyspace, KvStore, StoreError};

pub type Labels = BTreeMap<String, String>;

const TOKEN_PREFIX: &str = "nft_";
pub const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 253;
const MAX_TEXT: usize = 256;
const MAX_ACCELERATORS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PowerSource {
    #[default]
    Unknown,
    Mains,
    Battery,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Accelerator {
    pub kind: String,
    pub name: String,
    pub memory_bytes: u64,
}

/// What a device says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DeviceFacts {
    pub arch: String,
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub accelerators: Vec<Accelerator>,
    pub power_source: PowerSource,
    pub battery_percent: Option<f32>,
    pub charging: bool,
    pub os: String,
    pub os_version: String,
    pub agent_version: String,
    pub hostname: String,
    pub labels: Labels,
    /// Examples in the node's local training data; the data never leaves the device.
    #[serde(default)]
    pub training_examples: u64,
    /// Where the agent runs its models ("cpu", "cuda:0 (<GPU>)"); empty: it serves none.
    #[serde(default)]
    pub inference_device: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Active,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub status: NodeStatus,
    /// Labels of the token the node enrolled with; the operator's word on the node.
    pub token_labels: Labels,
    pub facts: DeviceFacts,
    pub enrolled_at_ms: i64,
    pub last_seen_ms: i64,
    pub cert_sha256: String,
    pub revoked_at_ms: i64,
    pub revoked_reason: String,
}

impl NodeRecord {
    /// Device labels overlaid by token labels: the operator's labels win.
    pub fn labels(&self) -> Labels {
        let mut labels = self.facts.labels.clone();
        labels.extend(self.token_labels.clone());
        labels
    }

    pub fn is_online(&self, now_ms: i64, heartbeat_interval_secs: u32) -> bool {
        self.status == NodeStatus::Active
            && self.last_seen_ms > 0
            && now_ms - self.last_seen_ms <= 3 * i64::from(heartbeat_interval_secs) * 1000
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TokenRecord {
    created_at_ms: i64,
    expires_at_ms: i64,
    labels: Labels,
    used_at_ms: Option<i64>,
    used_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreatedToken {
    /// The secret; shown once, only its hash is stored.
    pub token: String,
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub node_id: String,
    pub certificate_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bootstrap token is not known to this coordinator")]
    UnknownToken,
    #[error("bootstrap token expired; create a new one with `nanofleet token create`")]
    TokenExpired,
    #[error("bootstrap token was already used; tokens are one-time, create a new one with `nanofleet token create`")]
    TokenUsed,
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("no node with id {0}")]
    NodeNotFound(String),
    #[error("node {id} was revoked ({reason}); enroll it again with a new token")]
    NodeRevoked { id: String, reason: String },
    #[error("certificate of node {0} was replaced; this one is no longer valid")]
    StaleCertificate(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks labels against the limits every label must meet (Kubernetes-like).
pub fn validate_labels(field: &str, labels: &Labels) -> Result<(), RegistryError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(field, format!("more than {MAX_LABELS} labels")));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !key_ok {
            return Err(invalid(
                field,
                format!(
                    "label key {key:?} must be 1-{MAX_LABEL_KEY} characters of [A-Za-z0-9._/-]"
                ),
            ));
        }
        if value.len() > MAX_LABEL_VALUE || value.chars().any(char::is_control) {
            return Err(invalid(
                field,
                format!("label {key:?} has a value longer than {MAX_LABEL_VALUE} bytes or with control characters"),
            ));
        }
    }
    Ok(())
}

/// Checks device facts against the limits every report must meet.
pub fn validate_facts(facts: &DeviceFacts) -> Result<(), RegistryError> {
    let texts = [
        ("facts.arch", &facts.arch),
        ("facts.os", &facts.os),
        ("facts.os_version", &facts.os_version),
        ("facts.agent_version", &facts.agent_version),
        ("facts.hostname", &facts.hostname),
        ("facts.inference_device", &facts.inference_device),
    ];
    for (field, text) in texts {
        if text.len() > MAX_TEXT {
            return Err(invalid(field, format!("longer than {MAX_TEXT} bytes")));
        }
    }
    if facts.accelerators.len() > MAX_ACCELERATORS {
        return Err(invalid(
            "facts.accelerators",
            format!("more than {MAX_ACCELERATORS}"),
        ));
    }
    for accelerator in &facts.accelerators {
        if accelerator.kind.len() > MAX_TEXT || accelerator.name.len() > MAX_TEXT {
            return Err(invalid("facts.accelerators", "name or kind too long"));
        }
    }
    if let Some(percent) = facts.battery_percent {
        if !(0.0..=100.0).contains(&percent) {
            return Err(invalid("facts.battery_percent", "must be within 0..=100"));
        }
    }
    validate_labels("facts.labels", &facts.labels)
}

fn token_key(token: &str) -> Result<Vec<u8>, RegistryError> {
    let secret = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(RegistryError::UnknownToken)?;
    if secret.len() != 43 {
        return Err(RegistryError::UnknownToken);
    }
    Ok(sha256_hex(token.as_bytes()).into_bytes())
}

/// How the audit log names a token: a prefix of the hash it is stored under, which
/// identifies the token record without revealing the token.
pub fn token_reference(token: &str) -> String {
    format!("token:{}", &sha256_hex(token.as_bytes())[..16])
}

/// The registry over a store; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn KvStore>,
}

impl Registry {
    pub fn new(store: Arc<dyn KvStore>) -> Self {
        Self { store }
    }

    pub fn create_token(
        &self,
        ttl_secs: u64,
        labels: Labels,
    ) -> Result<CreatedToken, RegistryError> {
        validate_labels("labels", &labels)?;
        if ttl_secs == 0 {
            return Err(invalid("ttl", "must be at least one second"));
        }
        let secret: [u8; 32] = rand::random();
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let now = now_unix_ms();
        let record = TokenRecord {
            created_at_ms: now,
            expires_at_ms: now.saturating_add((ttl_secs as i64).saturating_mul(1000)),
            labels,
            used_at_ms: None,
            used_by: None,
        };
        self.store
            .put(Keyspace::Tokens, &token_key(&token)?, &encode(&record))?;
        self.store.flush()?;
        Ok(CreatedToken {
            token,
            expires_at_ms: record.expires_at_ms,
        })
    }

    /// Redeems a one-time token for a node certificate. The CSR is checked before the
    /// token is spent, so a malformed request does not burn it; the token is spent by
    /// compare-and-swap, so two racing enrollments cannot both use it.
    pub fn enroll(
        &self,
        pki: &Pki,
        token: &str,
        csr_pem: &str,
        facts: DeviceFacts,
    ) -> Result<Enrolled, RegistryError> {
        validate_facts(&facts)?;
        let key = token_key(token)?;
        let current = self
            .store
            .get(Keyspace::Tokens, &key)?
            .ok_or(RegistryError::UnknownToken)?;
        let record: TokenRecord = decode(Keyspace::Tokens, &key, &current)?;
        let now = now_unix_ms();
        if record.used_at_ms.is_some() {
            return Err(RegistryError::TokenUsed);
        }
        if now >= record.expires_at_ms {
            return Err(RegistryError::TokenExpired);
        }
        let node_id = uuid::Uuid::new_v4().to_string();
        let issued = pki.issue_node_cert(&node_id, csr_pem)?;

        let spent = TokenRecord {
            used_at_ms: Some(now),
            used_by: Some(node_id.clone()),
            ..record.clone()
        };
        if !self.store.compare_and_swap(
            Keyspace::Tokens,
            &key,
            Some(&current),
            Some(&encode(&spent)),
        )? {
            return Err(RegistryError::TokenUsed);
        }
        let node = NodeRecord {
            id: node_id.clone(),
            status: NodeStatus::Active,
            token_labels: record.labels,
            facts,
            enrolled_at_ms: now,
            last_seen_ms: 0,
            cert_sha256: issued.sha256,
            revoked_at_ms: 0,
            revoked_reason: String::new(),
        };
        self.put_node(&node)?;
        self.store.flush()?;
        Ok(Enrolled {
            node_id,
            certificate_pem: issued.pem,
        })
    }

    pub fn node(&self, id: &str) -> Result<NodeRecord, RegistryError> {
        let bytes = self
            .store
            .get(Keyspace::Nodes, id.as_bytes())?
            .ok_or_else(|| RegistryError::NodeNotFound(id.to_owned()))?;
        Ok(decode(Keyspace::Nodes, id.as_bytes(), &bytes)?)
    }

    fn put_node(&self, node: &NodeRecord) -> Result<(), RegistryError> {
        self.store
            .put(Keyspace::Nodes, node.id.as_bytes(), &encode(node))?;
        Ok(())
    }

    /// The node behind a verified client certificate, if it may still call: known,
    /// not revoked, and presenting the certificate it was last issued.
    pub fn authenticate_node(
        &self,
        id: &str,
        cert_sha256: &str,
    ) -> Result<NodeRecord, RegistryError> {
        let node = self.node(id)?;
        if node.status == NodeStatus::Revoked {
            return Err(RegistryError::NodeRevoked {
                id: node.id,
                reason: node.revoked_reason,
            });
        }
        if node.cert_sha256 != cert_sha256 {
            return Err(RegistryError::StaleCertificate(node.id));
        }
        Ok(node)
    }

    pub fn record_heartbeat(
        &self,
        mut node: NodeRecord,
        facts: DeviceFacts,
    ) -> Result<(), RegistryError> {
        validate_facts(&facts)?;
        node.facts = facts;
        node.last_seen_ms = now_unix_ms();
        self.put_node(&node)
    }

    pub fn revoke(&self, id: &str, reason: &str) -> Result<NodeRecord, RegistryError> {
        if reason.len() > MAX_TEXT {
            return Err(invalid("reason", format!("longer than {MAX_TEXT} bytes")));
        }
        let mut node = self.node(id)?;
        if node.status != NodeStatus::Revoked {
            node.status = NodeStatus::Revoked;
            node.revoked_at_ms = now_unix_ms();
            node.revoked_reason = if reason.is_empty() {
                "revoked by operator".to_owned()
            } else {
                reason.to_owned()
            };
            self.put_node(&node)?;
            self.store.flush()?;
        }
        Ok(node)
    }

    pub fn nodes(&self) -> Result<Vec<NodeRecord>, RegistryError> {
        self.store
            .scan(Keyspace::Nodes)?
            .into_iter()
            .map(|(k, v)| Ok(decode(Keyspace::Nodes, &k, &v)?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn setup() -> (tempfile::TempDir, Registry, Pki) {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(&dir.path().join("pki"), &["localhost".to_owned()], None).unwrap();
        let pki = Pki::load(&dir.path().join("pki")).unwrap();
        let store = SledStore::open(&dir.path().join("db")).unwrap();
        (dir, Registry::new(Arc::new(store)), pki)
    }

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn token_is_one_time_and_bad_csr_does_not_burn_it() {
        let (_dir, registry, pki) = setup();
        let labels = Labels::from([("site".to_owned(), "plant-3".to_owned())]);
        let token = registry.create_token(3600, labels.clone()).unwrap();
        assert!(matches!(
            registry.enroll(&pki, &token.token, "garbage", DeviceFacts::default()),
            Err(RegistryError::Pki(PkiError::BadCsr(_)))
        ));
        let enrolled = registry
            .enroll(&pki, &token.token, &csr(), DeviceFacts::default())
            .unwrap();
        assert!(matches!(
            registry.enroll(&pki, &token.token, &csr(), DeviceFacts::default()),
            Err(RegistryError::TokenUsed)
        ));
        let node = registry.node(&enrolled.node_id).unwrap();
        assert_eq!(node.labels(), labels);
        assert!(matches!(
            registry.enroll(&pki, "nft_nope", &csr(), DeviceFacts::default()),
            Err(RegistryError::UnknownToken)
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let (_dir, registry, pki) = setup();
        let token = registry.create_token(1, Labels::new()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(matches!(
            registry.enroll(&pki, &token.token, &csr(), DeviceFacts::default()),
            Err(RegistryError::TokenExpired)
        ));
    }

    #[test]
    fn revoked_or_stale_certificates_cannot_authenticate() {
        let (_dir, registry, pki) = setup();
        let token = registry.create_token(60, Labels::new()).unwrap();
        let enrolled = registry
            .enroll(&pki, &token.token, &csr(), DeviceFacts::default())
            .unwrap();
        let node = registry.node(&enrolled.node_id).unwrap();
        assert!(registry
            .authenticate_node(&node.id, &node.cert_sha256)
            .is_ok());
        assert!(matches!(
            registry.authenticate_node(&node.id, "00"),
            Err(RegistryError::StaleCertificate(_))
        ));
        registry.revoke(&node.id, "lost device").unwrap();
        assert!(matches!(
            registry.authenticate_node(&node.id, &node.cert_sha256),
            Err(RegistryError::NodeRevoked { .. })
        ));
    }

    #[test]
    fn labels_and_facts_are_bounded() {
        let mut labels = Labels::new();
        labels.insert("bad key!".into(), "v".into());
        assert!(validate_labels("labels", &labels).is_err());
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(validate_labels("labels", &many).is_err());
        let facts = DeviceFacts {
            battery_percent: Some(140.0),
            ..Default::default()
        };
        assert!(validate_facts(&facts).is_err());
    }
}
