//! nanofleet-audit: the pure logic of the coordinator's tamper-evident audit log. No I/O:
//! the coordinator stores leaves and tree heads (sled) and calls into this crate.
//!
//! - [`entry`]: one audit entry (time, actor, action, subject, details), its limits, and
//!   its canonical bytes, which are the Merkle leaf data.
//! - [`merkle`]: RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs
//!   (generated from any [`LeafHashes`] store, verified from hashes alone), and the
//!   [`CompactRange`] that yields the root of an append-only log in O(log n) memory.
//! - [`export`]: the JSONL export (signed head, entries, proofs for partial exports), its
//!   CSV rendering, and the offline check `nanofleet audit verify` runs.
//! - [`head`]: the tree head (size, root, time), its canonical bytes, and the ed25519
//!   signature the coordinator puts on it.

pub mod entry;
pub mod export;
pub mod head;
mod hex_bytes;
pub mod merkle;

pub use entry::{Actor, AuditEntry, EntryError};
pub use head::{HeadError, SignedTreeHead, TreeHead, TREE_HEAD_DOMAIN};
pub use merkle::{
    consistency_proof, empty_root, inclusion_proof, leaf_hash, node_hash, tree_root,
    verify_consistency, verify_inclusion, CompactRange, CompactRangeError, Hash, LeafHashes,
    PerfectSubtree, ProofError, VerifyError,
};
