//! Durable state behind a narrow key-value trait, so that a distributed backend can
//! replace the embedded sled database without touching the services above it.
//!
//! Values are small records (JSON); large blobs (model chunks) never go in here.

mod sled_store;

pub use sled_store::SledStore;

/// A named collection of records; each maps to one sled tree (or one key prefix in a
/// distributed store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyspace {
    /// Node id → node record.
    Nodes,
    /// SHA-256 of a bootstrap token → token record.
    Tokens,
    /// `name@version` → published artifact record (manifest, signer, time).
    Artifacts,
    /// Big-endian leaf index → the audit entry's canonical bytes (the Merkle leaf data).
    AuditLeaves,
    /// Level byte and big-endian index → hash of that perfect subtree of the audit log.
    AuditNodes,
    /// The audit log's compact range and last signed tree head.
    AuditState,
    /// Rollout id → rollout record.
    Rollouts,
    /// `<node id>/<artifact name>` → the version the node should run.
    Desired,
    /// `<node id>/<artifact name>` → the node's last report about it.
    NodeArtifacts,
    /// Federation name → federation record with its round history.
    Federations,
}

impl Keyspace {
    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Nodes => "nodes",
            Keyspace::Tokens => "tokens",
            Keyspace::Artifacts => "artifacts",
            Keyspace::AuditLeaves => "audit_leaves",
            Keyspace::AuditNodes => "audit_nodes",
            Keyspace::AuditState => "audit_state",
            Keyspace::Rollouts => "rollouts",
            Keyspace::Desired => "desired",
            Keyspace::NodeArtifacts => "node_artifacts",
            Keyspace::Federations => "federations",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend failed: {0}")]
    Backend(String),
    #[error("stored record {key} in {space} is corrupt: {reason}")]
    Corrupt {
        space: &'static str,
        key: String,
        reason: String,
    },
}

/// Decodes a stored record. Records are JSON: readable when debugging a data
/// directory, and tolerant of fields added later.
pub fn decode<T: serde::de::DeserializeOwned>(
    space: Keyspace,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        space: space.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

/// Reads and decodes one record; `None` when the key is absent.
pub fn get_record<T: serde::de::DeserializeOwned>(
    store: &dyn KvStore,
    space: Keyspace,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    store
        .get(space, key)?
        .map(|bytes| decode(space, key, &bytes))
        .transpose()
}

/// Every record of a keyspace, decoded, in key order.
pub fn scan_records<T: serde::de::DeserializeOwned>(
    store: &dyn KvStore,
    space: Keyspace,
) -> Result<Vec<T>, StoreError> {
    store
        .scan(space)?
        .into_iter()
        .map(|(k, v)| decode(space, &k, &v))
        .collect()
}

/// Encodes and writes one record, and returns once it is on disk.
pub fn put_record_durably<T: serde::Serialize>(
    store: &dyn KvStore,
    space: Keyspace,
    key: &[u8],
    value: &T,
) -> Result<(), StoreError> {
    store.put(space, key, &encode(value))?;
    store.flush()
}

/// Encodes a record for storage.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize: string keys, no non-finite floats")
}

/// One stored record: key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// The operations the coordinator needs from durable storage.
pub trait KvStore: Send + Sync + 'static {
    fn get(&self, space: Keyspace, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, space: Keyspace, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    /// Atomically replaces `expected` by `new` (`None` = absent); false when the current
    /// value is not `expected`. One-time tokens rely on this.
    fn compare_and_swap(
        &self,
        space: Keyspace,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError>;
    /// Every record of a keyspace, in key order.
    fn scan(&self, space: Keyspace) -> Result<Vec<Record>, StoreError>;
    /// Up to `limit` records from `start` on, in key order: a page of a large keyspace.
    fn scan_from(
        &self,
        space: Keyspace,
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Record>, StoreError>;
    /// The record with the greatest key.
    fn last(&self, space: Keyspace) -> Result<Option<Record>, StoreError>;
    /// Returns once everything written before is on disk.
    fn flush(&self) -> Result<(), StoreError>;
}
