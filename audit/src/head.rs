//! Tree heads: the (size, root, time) the coordinator commits to, their canonical bytes,
//! and the ed25519 signature over them that lets anyone holding the coordinator's public
//! key check a root and then every proof against it.
//!
//! The signed message is [`TREE_HEAD_DOMAIN`] followed by the big-endian size, the root
//! and the big-endian time. The domain prefix keeps a tree head signature from being
//! valid for anything else the same key signs (manifests use their own prefix).

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::hex_bytes;
use crate::merkle::Hash;

/// Prefix of every signed tree head message.
pub const TREE_HEAD_DOMAIN: &[u8] = b"nanofleet-audit-tree-head-v1\0";

/// The state of the log at one moment: its first `size` leaves hash to `root`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeHead {
    pub size: u64,
    /// The Merkle Tree Hash, lowercase hex in JSON.
    #[serde(with = "hex_bytes")]
    pub root: Hash,
    /// Milliseconds since the Unix epoch when the coordinator produced this head.
    pub time_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the tree head signature does not verify with this key")]
    BadSignature,
}

impl TreeHead {
    /// The bytes a tree head signature covers.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        [
            TREE_HEAD_DOMAIN,
            &self.size.to_be_bytes(),
            &self.root,
            &self.time_ms.to_be_bytes(),
        ]
        .concat()
    }

    /// Signs this head with the coordinator's key.
    pub fn sign(self, key: &SigningKey) -> SignedTreeHead {
        SignedTreeHead {
            signature: key.sign(&self.canonical_bytes()),
            head: self,
        }
    }
}

/// A tree head with the coordinator's signature: what is published and what clients keep
/// to check later heads for consistency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedTreeHead {
    pub head: TreeHead,
    /// The 64-byte ed25519 signature, lowercase hex in JSON.
    #[serde(with = "hex_signature")]
    pub signature: Signature,
}

impl SignedTreeHead {
    /// Checks the signature against `key`. Strict verification refuses weak keys and
    /// non-canonical signatures, so one head has exactly one accepted signature per key.
    pub fn verify(&self, key: &VerifyingKey) -> Result<&TreeHead, HeadError> {
        key.verify_strict(&self.head.canonical_bytes(), &self.signature)
            .map_err(|_| HeadError::BadSignature)?;
        Ok(&self.head)
    }
}

/// Signatures as hex through the fixed-size byte form.
mod hex_signature {
    use ed25519_dalek::Signature;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &Signature, s: S) -> Result<S::Ok, S::Error> {
        crate::hex_bytes::serialize(&sig.to_bytes(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signature, D::Error> {
        crate::hex_bytes::deserialize::<D, 64>(d).map(|b| Signature::from_bytes(&b))
    }
}
