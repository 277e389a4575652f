//! The coordinator's tamper-evident audit log: every security-relevant fact (enrollment,
//! revocation, token use, publishes and refusals, activations, rollout steps, rounds,
//! privacy spent, logins) appended as a `nanofleet_audit` entry, a leaf of an RFC 6962
//! Merkle tree kept in sled, with tree heads signed by the coordinator's audit key
//! (`<data_dir>/audit-signing.key`) and inclusion and consistency proofs served from it.
//!
//! Stored: the leaves (canonical entry bytes by index), the hash of every completed perfect
//! subtree (so a proof at a million entries reads O(log n) records), and the compact range
//! with its size. The leaves are the truth; subtrees and range are derived, written after
//! the leaf and rebuilt from the leaves on open if a crash cut an append short. The range
//! is the committed root: an entry edited in the store afterwards no longer hashes to it,
//! which `nanofleet audit verify` reports.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ed25519_dalek::{SigningKey, VerifyingKey};
use nanofleet_audit::export::ExportedEntry;
use nanofleet_audit::{
    consistency_proof, inclusion_proof, Actor, AuditEntry, CompactRange, EntryError, Hash,
    LeafHashes, ProofError, SignedTreeHead, TreeHead,
};
use serde::{Deserialize, Serialize};

use crate::now_unix_ms;
use crate::signing_keys::KeyError;
use crate::store::{decode, encode, Keyspace, KvStore, StoreError};

/// `<data_dir>/audit-signing.key` and `.pub`: the key that signs tree heads.
pub const AUDIT_KEY_NAME: &str = "audit-signing";
/// Most entries one listing returns; callers page with `start`.
pub const MAX_PAGE: usize = 10_000;

const RANGE_KEY: &[u8] = b"range";
const HEAD_KEY: &[u8] = b"head";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log storage: {0}")]
    Store(#[from] StoreError),
    #[error("audit entry refused: {0}")]
    Entry(#[from] EntryError),
    #[error("{0}")]
    Proof(#[from] ProofError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("the audit log is damaged: {0}")]
    Damaged(String),
}

/// Which entries a listing returns; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only entries at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Only entries before this time.
    pub until_ms: Option<i64>,
    /// Entries a node made or that are about it (subject `<id>` or `<id>/...`).
    pub node: Option<String>,
    pub action_prefix: Option<String>,
    /// Case-insensitive text anywhere in actor, action, subject or details.
    pub text: Option<String>,
    pub limit: Option<usize>,
}

impl AuditFilter {
    fn matches(&self, entry: &AuditEntry) -> bool {
        let time = entry.time_ms();
        if self.since_ms.is_some_and(|t| time < t) || self.until_ms.is_some_and(|t| time >= t) {
            return false;
        }
        if let Some(node) = &self.node {
            let by_node = matches!(entry.actor(), Actor::Node(id) if id == node);
            let about_node = entry.subject() == node
                || entry
                    .subject()
                    .strip_prefix(node.as_str())
                    .is_some_and(|rest| rest.starts_with('/'));
            if !by_node && !about_node {
                return false;
            }
        }
        if let Some(prefix) = &self.action_prefix {
            if !entry.action().starts_with(prefix.as_str()) {
                return false;
            }
        }
        if let Some(text) = &self.text {
            let needle = text.to_lowercase();
            let haystacks = [
                entry.actor().to_string(),
                entry.action().to_owned(),
                entry.subject().to_owned(),
                entry.details().to_owned(),
            ];
            if !haystacks.iter().any(|h| h.to_lowercase().contains(&needle)) {
                return false;
            }
        }
        true
    }
}

/// An entry with its leaf index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedEntry {
    pub index: u64,
    pub entry: AuditEntry,
}

/// The stored compact range.
#[derive(Serialize, Deserialize)]
struct StoredRange {
    size: u64,
    hashes: Vec<String>,
}

struct State {
    range: CompactRange,
    /// The last signed head; re-signed only when the log has grown.
    head: Option<SignedTreeHead>,
}

/// Append-only audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn KvStore>,
    /// The lock also orders concurrent appends.
    state: Arc<Mutex<State>>,
    key: Arc<SigningKey>,
}

fn leaf_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn subtree_key(level: u32, index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = level as u8;
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

impl AuditLog {
    /// Opens the log, creating the audit key on first start and finishing an append that a
    /// crash cut short.
    pub fn open(store: Arc<dyn KvStore>, data_dir: &Path) -> Result<Self, AuditError> {
        let key = crate::signing_keys::load_or_create(data_dir, AUDIT_KEY_NAME, "audit tree head")?;
        Self::open_with_key(store, key)
    }

    /// Opens the log with a given head-signing key (tests, benchmarks).
    pub fn open_with_key(store: Arc<dyn KvStore>, key: SigningKey) -> Result<Self, AuditError> {
        let mut range = match store.get(Keyspace::AuditState, RANGE_KEY)? {
            None => CompactRange::new(),
            Some(bytes) => {
                let stored: StoredRange = decode(Keyspace::AuditState, RANGE_KEY, &bytes)?;
                let hashes = stored
                    .hashes
                    .iter()
                    .map(|h| {
                        let mut out = [0u8; 32];
                        hex::decode_to_slice(h, &mut out).map(|_| out)
                    })
                    .collect::<Result<Vec<Hash>, _>>()
                    .map_err(|e| AuditError::Damaged(format!("stored range: {e}")))?;
                CompactRange::from_parts(stored.size, hashes)
                    .map_err(|e| AuditError::Damaged(e.to_string()))?
            }
        };
        let stored_leaves = match store.last(Keyspace::AuditLeaves)? {
            None => 0,
            Some((key, _)) => {
                let bytes: [u8; 8] = key
                    .as_slice()
                    .try_into()
                    .map_err(|_| AuditError::Damaged("a leaf key is not 8 bytes".into()))?;
                u64::from_be_bytes(bytes) + 1
            }
        };
        if stored_leaves > range.size() {
            // Leaves written by an append that did not get to commit its range: replay them.
            for index in range.size()..stored_leaves {
                let bytes = store
                    .get(Keyspace::AuditLeaves, &leaf_key(index))?
                    .ok_or_else(|| AuditError::Damaged(format!("leaf {index} is missing")))?;
                for subtree in range.append(nanofleet_audit::leaf_hash(&bytes)) {
                    store.put(
                        Keyspace::AuditNodes,
                        &subtree_key(subtree.level, subtree.index),
                        &subtree.hash,
                    )?;
                }
            }
            store.put(Keyspace::AuditState, RANGE_KEY, &encode_range(&range))?;
            store.flush()?;
            tracing::warn!(
                size = range.size(),
                "finished audit appends a crash had cut short"
            );
        } else if stored_leaves < range.size() {
            // Entries were removed behind the coordinator's back. The committed root stays;
            // exports of this log will fail `audit verify`, which is the point.
            tracing::error!(
                committed = range.size(),
                stored = stored_leaves,
                "the audit log store holds fewer entries than its committed size: entries were removed"
            );
        }
        let head = store
            .get(Keyspace::AuditState, HEAD_KEY)?
            .map(|bytes| decode::<SignedTreeHead>(Keyspace::AuditState, HEAD_KEY, &bytes))
            .transpose()?;
        Ok(Self {
            store,
            state: Arc::new(Mutex::new(State { range, head })),
            key: Arc::new(key),
        })
    }

    /// Appends one entry and returns its index once it is on disk. `actor` is
    /// `coordinator`, `node:<id>` or `operator:<name>`; details longer than the entry limit
    /// are cut (reasons are for people; payloads never go here).
    pub fn append(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        details: &str,
    ) -> Result<u64, AuditError> {
        self.append_batch(&[(actor, action, subject, details)])
    }

    /// Appends entries in order with one flush; returns the first one's index.
    pub fn append_batch(&self, entries: &[(&str, &str, &str, &str)]) -> Result<u64, AuditError> {
        let time_ms = now_unix_ms();
        let built = entries
            .iter()
            .map(|(actor, action, subject, details)| {
                AuditEntry::new(
                    time_ms,
                    actor.parse()?,
                    *action,
                    *subject,
                    cut(details, nanofleet_audit::entry::MAX_DETAILS_LEN),
                )
            })
            .collect::<Result<Vec<_>, EntryError>>()?;
        let mut state = self.state.lock().expect("audit lock");
        let first = state.range.size();
        let mut range = state.range.clone();
        for entry in &built {
            let index = range.size();
            let bytes = entry.canonical_bytes();
            self.store
                .put(Keyspace::AuditLeaves, &leaf_key(index), &bytes)?;
            for subtree in range.append(nanofleet_audit::leaf_hash(&bytes)) {
                self.store.put(
                    Keyspace::AuditNodes,
                    &subtree_key(subtree.level, subtree.index),
                    &subtree.hash,
                )?;
            }
        }
        self.store
            .put(Keyspace::AuditState, RANGE_KEY, &encode_range(&range))?;
        self.store.flush()?;
        state.range = range;
        Ok(first)
    }

    /// Records `content` (a configuration file's text) as an entry when it differs from
    /// what was last recorded under `subject`; true when it did. Files edited on the host
    /// while the coordinator runs (the trust policy) are noticed where they are read.
    pub fn record_if_changed(
        &self,
        action: &str,
        subject: &str,
        content: &str,
    ) -> Result<bool, AuditError> {
        let key = format!("recorded:{subject}").into_bytes();
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content.as_bytes()));
        if self.store.get(Keyspace::AuditState, &key)?.as_deref() == Some(digest.as_bytes()) {
            return Ok(false);
        }
        let details = format!("sha256 {digest}: {content}");
        self.append("coordinator", action, subject, &details)?;
        self.store
            .put(Keyspace::AuditState, &key, digest.as_bytes())?;
        self.store.flush()?;
        Ok(true)
    }

    /// How many entries the log has committed.
    pub fn size(&self) -> u64 {
        self.state.lock().expect("audit lock").range.size()
    }

    /// The public half of the key that signs tree heads.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// A signed head of the log as it is now; the same head while the log has not grown.
    pub fn signed_head(&self) -> Result<SignedTreeHead, AuditError> {
        let mut state = self.state.lock().expect("audit lock");
        if let Some(head) = state
            .head
            .as_ref()
            .filter(|h| h.head.size == state.range.size())
        {
            return Ok(head.clone());
        }
        let head = TreeHead {
            size: state.range.size(),
            root: state.range.root(),
            time_ms: now_unix_ms(),
        }
        .sign(&self.key);
        self.store
            .put(Keyspace::AuditState, HEAD_KEY, &encode(&head))?;
        state.head = Some(head.clone());
        Ok(head)
    }

    /// The entry at `index`.
    pub fn entry(&self, index: u64) -> Result<AuditEntry, AuditError> {
        let bytes = self
            .store
            .get(Keyspace::AuditLeaves, &leaf_key(index))?
            .ok_or_else(|| AuditError::Damaged(format!("entry {index} is not in the store")))?;
        Ok(AuditEntry::from_canonical_bytes(&bytes)?)
    }

    /// Entries with index in `start..size` that match `filter`, oldest first, at most
    /// `filter.limit` (and [`MAX_PAGE`]). The last one's index + 1 is where the next page
    /// starts.
    pub fn entries(
        &self,
        start: u64,
        size: u64,
        filter: &AuditFilter,
    ) -> Result<Vec<IndexedEntry>, AuditError> {
        let limit = filter.limit.unwrap_or(MAX_PAGE).min(MAX_PAGE);
        let mut found = Vec::new();
        let mut next = start;
        while next < size && found.len() < limit {
            let page = self
                .store
                .scan_from(Keyspace::AuditLeaves, &leaf_key(next), 1024)?;
            if page.is_empty() {
                break;
            }
            for (key, bytes) in page {
                let index = u64::from_be_bytes(
                    key.as_slice()
                        .try_into()
                        .map_err(|_| AuditError::Damaged("a leaf key is not 8 bytes".into()))?,
                );
                next = index + 1;
                if index >= size {
                    next = size;
                    break;
                }
                let entry = AuditEntry::from_canonical_bytes(&bytes)?;
                if filter.matches(&entry) {
                    found.push(IndexedEntry { index, entry });
                    if found.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(found)
    }

    /// Entries matching `filter` among the first `size` (a signed head's size), with their
    /// inclusion proofs against that size when `with_proofs`: a page of an export.
    pub fn export_page(
        &self,
        size: u64,
        start: u64,
        filter: &AuditFilter,
        with_proofs: bool,
    ) -> Result<Vec<ExportedEntry>, AuditError> {
        self.entries(start, size, filter)?
            .into_iter()
            .map(|IndexedEntry { index, entry }| {
                let inclusion_proof = match with_proofs {
                    true => Some(self.inclusion_proof(index, size)?),
                    false => None,
                };
                Ok(ExportedEntry {
                    index,
                    entry,
                    inclusion_proof,
                })
            })
            .collect()
    }

    /// The audit path of entry `index` in the tree of the first `size` entries.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        self.with_leaves(size, |leaves| inclusion_proof(leaves, index, size))
    }

    /// The proof that the tree of `new_size` entries extends the one of `old_size`.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, AuditError> {
        self.with_leaves(new_size, |leaves| {
            consistency_proof(leaves, old_size, new_size)
        })
    }

    fn with_leaves<T>(
        &self,
        size: u64,
        prove: impl FnOnce(&StoredLeaves) -> Result<T, ProofError>,
    ) -> Result<T, AuditError> {
        let committed = self.size();
        if size > committed {
            return Err(ProofError::SizeBeyondLog {
                size,
                available: committed,
            }
            .into());
        }
        let leaves = StoredLeaves {
            store: self.store.as_ref(),
            len: committed,
            error: Default::default(),
        };
        let proof = prove(&leaves);
        if let Some(error) = leaves.error.into_inner() {
            return Err(error);
        }
        Ok(proof?)
    }
}

/// The log's leaves and perfect subtrees as the proof generator reads them. The trait's
/// reads cannot fail, so the first store error is kept here and the proof discarded.
struct StoredLeaves<'a> {
    store: &'a dyn KvStore,
    len: u64,
    error: std::cell::RefCell<Option<AuditError>>,
}

impl StoredLeaves<'_> {
    fn fail(&self, error: AuditError) -> Hash {
        self.error.borrow_mut().get_or_insert(error);
        [0; 32]
    }
}

impl LeafHashes for StoredLeaves<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn leaf(&self, i: u64) -> Hash {
        match self.store.get(Keyspace::AuditLeaves, &leaf_key(i)) {
            Ok(Some(bytes)) => nanofleet_audit::leaf_hash(&bytes),
            Ok(None) => self.fail(AuditError::Damaged(format!(
                "entry {i} is not in the store"
            ))),
            Err(error) => self.fail(error.into()),
        }
    }

    fn perfect_subtree(&self, level: u32, index: u64) -> Option<Hash> {
        match self
            .store
            .get(Keyspace::AuditNodes, &subtree_key(level, index))
        {
            Ok(Some(bytes)) => bytes.as_slice().try_into().ok(),
            // Not stored (an older log): the generator rehashes the leaves.
            Ok(None) => None,
            Err(error) => Some(self.fail(error.into())),
        }
    }
}

fn encode_range(range: &CompactRange) -> Vec<u8> {
    encode(&StoredRange {
        size: range.size(),
        hashes: range.hashes().iter().map(hex::encode).collect(),
    })
}

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use nanofleet_audit::export::verify_export;
    use nanofleet_audit::{tree_root, verify_consistency, verify_inclusion};

    use super::*;
    use crate::store::SledStore;

    fn open(dir: &Path) -> AuditLog {
        let store = Arc::new(SledStore::open(&dir.join("state")).unwrap());
        AuditLog::open(store, dir).unwrap()
    }

    fn fill(log: &AuditLog, n: u64) {
        for i in 0..n {
            let actor = format!("node:n{}", i % 4);
            log.append(&actor, "artifact.activated", &format!("m@{i}"), "")
                .unwrap();
        }
    }

    #[test]
    fn appends_continue_after_reopen_and_heads_verify() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            fill(&log, 5);
            assert_eq!(log.size(), 5);
        }
        let log = open(dir.path());
        assert_eq!(
            log.append("operator:admin", "node.revoke", "n1", "lost")
                .unwrap(),
            5
        );
        let head = log.signed_head().unwrap();
        assert_eq!(head.head.size, 6);
        head.verify(&log.public_key()).unwrap();
        // Same size, same head.
        assert_eq!(log.signed_head().unwrap(), head);
        let leaves: Vec<Hash> = (0..6).map(|i| log.entry(i).unwrap().leaf_hash()).collect();
        assert_eq!(tree_root(&leaves, 6).unwrap(), head.head.root);
        assert!(matches!(
            log.append("somebody", "x", "y", ""),
            Err(AuditError::Entry(_))
        ));
        assert_eq!(log.size(), 6);
    }

    #[test]
    fn proofs_from_the_store_verify() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        fill(&log, 37);
        let head = log.signed_head().unwrap().head;
        for index in [0, 1, 16, 31, 32, 36] {
            let proof = log.inclusion_proof(index, 37).unwrap();
            let leaf = log.entry(index).unwrap().leaf_hash();
            verify_inclusion(&leaf, index, 37, &proof, &head.root).unwrap();
        }
        let old = TreeHead {
            size: 20,
            root: {
                let leaves: Vec<Hash> =
                    (0..20).map(|i| log.entry(i).unwrap().leaf_hash()).collect();
                tree_root(&leaves, 20).unwrap()
            },
            time_ms: 0,
        };
        let proof = log.consistency_proof(20, 37).unwrap();
        verify_consistency(20, 37, &old.root, &head.root, &proof).unwrap();
        assert!(matches!(
            log.inclusion_proof(3, 38),
            Err(AuditError::Proof(ProofError::SizeBeyondLog { .. }))
        ));
    }

    #[test]
    fn filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        fill(&log, 10);
        log.append("operator:admin", "node.revoke", "n1", "stolen device")
            .unwrap();
        let size = log.size();
        let by_node = AuditFilter {
            node: Some("n1".into()),
            ..Default::default()
        };
        let found = log.entries(0, size, &by_node).unwrap();
        // Three activations by n1 (1, 5, 9) and the revocation about it.
        assert_eq!(
            found.iter().map(|e| e.index).collect::<Vec<_>>(),
            [1, 5, 9, 10]
        );
        let text = AuditFilter {
            text: Some("STOLEN".into()),
            ..Default::default()
        };
        assert_eq!(log.entries(0, size, &text).unwrap().len(), 1);
        let page = AuditFilter {
            limit: Some(3),
            ..Default::default()
        };
        let first = log.entries(0, size, &page).unwrap();
        let second = log.entries(first[2].index + 1, size, &page).unwrap();
        assert_eq!(second[0].index, 3);
        // Entries beyond a head's size are not listed against it.
        assert_eq!(log.entries(0, 4, &AuditFilter::default()).unwrap().len(), 4);
    }

    #[test]
    fn a_crash_between_leaf_and_range_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let root_before;
        {
            let log = open(dir.path());
            fill(&log, 6);
            root_before = log.signed_head().unwrap().head.root;
            // What a crash after the leaf write and before the range write leaves behind.
            let entry =
                AuditEntry::new(1, Actor::Coordinator, "rollout.halt", "r1", "gate").unwrap();
            log.store
                .put(
                    Keyspace::AuditLeaves,
                    &leaf_key(6),
                    &entry.canonical_bytes(),
                )
                .unwrap();
            log.store.flush().unwrap();
        }
        let log = open(dir.path());
        assert_eq!(log.size(), 7);
        let head = log.signed_head().unwrap().head;
        assert_ne!(head.root, root_before);
        let proof = log.inclusion_proof(6, 7).unwrap();
        verify_inclusion(&log.entry(6).unwrap().leaf_hash(), 6, 7, &proof, &head.root).unwrap();
    }

    #[test]
    fn an_entry_edited_in_the_store_fails_the_export_check() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        fill(&log, 8);
        let forged =
            AuditEntry::new(1, Actor::Coordinator, "artifact.activated", "m@3", "").unwrap();
        log.store
            .put(
                Keyspace::AuditLeaves,
                &leaf_key(3),
                &forged.canonical_bytes(),
            )
            .unwrap();
        let head = log.signed_head().unwrap();
        let all = log
            .export_page(head.head.size, 0, &AuditFilter::default(), false)
            .unwrap();
        assert!(verify_export(&head, &log.public_key(), &all).is_err());
        // Entries other than the edited one still prove their inclusion.
        let others = AuditFilter {
            node: Some("n1".into()),
            ..Default::default()
        };
        let partial = log.export_page(head.head.size, 0, &others, true).unwrap();
        verify_export(&head, &log.public_key(), &partial).unwrap();
    }

    #[test]
    fn configuration_is_recorded_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            assert!(log
                .record_if_changed("trust.policy", "trust.json", "{}")
                .unwrap());
            assert!(!log
                .record_if_changed("trust.policy", "trust.json", "{}")
                .unwrap());
        }
        let log = open(dir.path());
        assert!(!log
            .record_if_changed("trust.policy", "trust.json", "{}")
            .unwrap());
        assert!(log
            .record_if_changed("trust.policy", "trust.json", "{\"k\":1}")
            .unwrap());
        let recorded = log.entries(0, log.size(), &AuditFilter::default()).unwrap();
        assert_eq!(recorded.len(), 2);
        assert!(recorded[1].entry.details().ends_with("{\"k\":1}"));
    }

    #[test]
    fn long_details_are_cut_at_a_character_boundary() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let long = "é".repeat(nanofleet_audit::entry::MAX_DETAILS_LEN);
        let index = log.append("coordinator", "x.y", "s", &long).unwrap();
        assert!(
            log.entry(index).unwrap().details().len() <= nanofleet_audit::entry::MAX_DETAILS_LEN
        );
    }
}
