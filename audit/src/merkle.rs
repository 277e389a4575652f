//! RFC 6962 Merkle tree hashing for the audit log: leaf and node hashes, the Merkle Tree
//! Hash over any [`LeafHashes`] store, inclusion and consistency proof generation
//! (RFC 6962 section 2.1.1, 2.1.2), their verification exactly as RFC 9162 sections
//! 2.1.3.2 and 2.1.4.2 describe, and the [`CompactRange`] an append-only log keeps to know
//! its root without reading its leaves.
//!
//! The tree is never padded: a tree of `n` leaves splits at the largest power of two
//! below `n`, so every size has exactly one root and proofs are the ones CT clients check.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, an interior node hash or a root.
pub type Hash = [u8; 32];

/// Domain separation of RFC 6962: a leaf can never be read as an interior node.
const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The hash of a leaf: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([LEAF_PREFIX])
        .chain_update(data)
        .finalize()
        .into()
}

/// The hash of an interior node: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new()
        .chain_update([NODE_PREFIX])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// The root of the empty tree: SHA-256 of no bytes (RFC 6962 MTH({})).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Where the leaf hashes of a log live: a slice in tests, the coordinator's store. Proof
/// generation reads leaves through it, and asks for the hashes of perfect subtrees first,
/// so a store that keeps them (as [`CompactRange::append`] reports them) answers a proof
/// in O(log n) reads instead of rehashing the leaves.
pub trait LeafHashes {
    /// How many leaves the store holds.
    fn len(&self) -> u64;
    /// The hash of leaf `i`; callers only ask for `i < len()`.
    fn leaf(&self, i: u64) -> Hash;
    /// The stored hash of the perfect subtree over leaves `index << level ..
    /// (index + 1) << level` (`level` >= 1), if the store keeps it; callers only ask for
    /// subtrees inside `len()`.
    fn perfect_subtree(&self, _level: u32, _index: u64) -> Option<Hash> {
        None
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LeafHashes for [Hash] {
    fn len(&self) -> u64 {
        <[Hash]>::len(self) as u64
    }
    fn leaf(&self, i: u64) -> Hash {
        self[i as usize]
    }
}

impl LeafHashes for Vec<Hash> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn leaf(&self, i: u64) -> Hash {
        self[i as usize]
    }
}

/// Why a proof or root could not be generated: the request names leaves the store lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("tree size {size} exceeds the {available} leaves stored")]
    SizeBeyondLog { size: u64, available: u64 },
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    OldSizeAfterNew { old_size: u64, new_size: u64 },
}

/// Why a proof did not verify. Each reason is a refusal; none is retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    OldSizeAfterNew { old_size: u64, new_size: u64 },
    #[error("the proof has more hashes than the tree sizes allow")]
    ProofTooLong,
    #[error("the proof has fewer hashes than the tree sizes need")]
    ProofTooShort,
    #[error("the proof is empty but the tree sizes need hashes")]
    EmptyProof,
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
    #[error("the proof does not lead to the old root")]
    OldRootMismatch,
    #[error("the proof does not lead to the new root")]
    NewRootMismatch,
}

/// The largest power of two strictly below `n` (n >= 2): RFC 6962's split point `k`.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

fn check_size<L: LeafHashes + ?Sized>(leaves: &L, size: u64) -> Result<(), ProofError> {
    let available = leaves.len();
    if size > available {
        return Err(ProofError::SizeBeyondLog { size, available });
    }
    Ok(())
}

/// MTH(D[start..end]) for a non-empty range, recursing at most 64 levels deep.
fn subtree_root<L: LeafHashes + ?Sized>(leaves: &L, start: u64, end: u64) -> Hash {
    let n = end - start;
    if n == 1 {
        return leaves.leaf(start);
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        if let Some(hash) = leaves.perfect_subtree(n.trailing_zeros(), start / n) {
            return hash;
        }
    }
    let k = split(n);
    node_hash(
        &subtree_root(leaves, start, start + k),
        &subtree_root(leaves, start + k, end),
    )
}

/// The Merkle Tree Hash of the first `size` leaves (RFC 6962 section 2.1).
pub fn tree_root<L: LeafHashes + ?Sized>(leaves: &L, size: u64) -> Result<Hash, ProofError> {
    check_size(leaves, size)?;
    Ok(match size {
        0 => empty_root(),
        _ => subtree_root(leaves, 0, size),
    })
}

/// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962
/// section 2.1.1), ordered from the leaf's sibling up to the root's child.
pub fn inclusion_proof<L: LeafHashes + ?Sized>(
    leaves: &L,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    check_size(leaves, size)?;
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut proof = Vec::new();
    path(leaves, index, 0, size, &mut proof);
    Ok(proof)
}

/// PATH(m, D[start..end]), appended bottom-up: the recursion pushes the deepest sibling
/// first because it descends before pushing.
fn path<L: LeafHashes + ?Sized>(leaves: &L, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) {
    let n = end - start;
    if n == 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(leaves, m, start, start + k, out);
        out.push(subtree_root(leaves, start + k, end));
    } else {
        path(leaves, m - k, start + k, end, out);
        out.push(subtree_root(leaves, start, start + k));
    }
}

/// The consistency proof between the trees of the first `old_size` and `new_size` leaves
/// (RFC 6962 section 2.1.2). Empty when `old_size` is 0 or equals `new_size`: those are
/// consistent by definition.
pub fn consistency_proof<L: LeafHashes + ?Sized>(
    leaves: &L,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProofError> {
    check_size(leaves, new_size)?;
    if old_size > new_size {
        return Err(ProofError::OldSizeAfterNew { old_size, new_size });
    }
    let mut proof = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof(leaves, old_size, 0, new_size, true, &mut proof);
    }
    Ok(proof)
}

/// SUBPROOF(m, D[start..end], b). `whole` is RFC 6962's `b`: true while the old tree is
/// the whole left edge, whose root the verifier already has.
fn subproof<L: LeafHashes + ?Sized>(
    leaves: &L,
    m: u64,
    start: u64,
    end: u64,
    whole: bool,
    out: &mut Vec<Hash>,
) {
    let n = end - start;
    if m == n {
        if !whole {
            out.push(subtree_root(leaves, start, end));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(leaves, m, start, start + k, whole, out);
        out.push(subtree_root(leaves, start + k, end));
    } else {
        subproof(leaves, m - k, start + k, end, false, out);
        out.push(subtree_root(leaves, start, start + k));
    }
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`
/// (RFC 9162 section 2.1.3.2). A proof only binds the size through the root: one audit
/// path can fit several sizes, which is why a tree head signs size and root together.
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), VerifyError> {
    if index >= size {
        return Err(VerifyError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(VerifyError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            // Climb past the levels where this node is the last one and has no sibling.
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(VerifyError::ProofTooShort);
    }
    if r != *root {
        return Err(VerifyError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree of `new_size` leaves with root `new_root` extends the tree of
/// `old_size` leaves with root `old_root` (RFC 9162 section 2.1.4.2, which covers
/// 0 < old < new). The edges the RFC leaves to the caller: equal sizes need equal roots
/// and an empty proof; an empty old tree needs the empty root and an empty proof.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), VerifyError> {
    if old_size > new_size {
        return Err(VerifyError::OldSizeAfterNew { old_size, new_size });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(VerifyError::ProofTooLong);
        }
        if old_size == 0 && *old_root != empty_root() {
            return Err(VerifyError::OldRootMismatch);
        }
        if old_size == new_size && old_root != new_root {
            return Err(VerifyError::NewRootMismatch);
        }
        return Ok(());
    }
    if proof.is_empty() {
        return Err(VerifyError::EmptyProof);
    }
    // When the old tree is a perfect subtree the proof omits its root, the verifier's own.
    let mut path = std::iter::once(old_root)
        .filter(|_| old_size.is_power_of_two())
        .chain(proof);
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let first = path.next().ok_or(VerifyError::EmptyProof)?;
    let (mut fr, mut sr) = (*first, *first);
    for c in path {
        if sn == 0 {
            return Err(VerifyError::ProofTooLong);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(VerifyError::ProofTooShort);
    }
    if fr != *old_root {
        return Err(VerifyError::OldRootMismatch);
    }
    if sr != *new_root {
        return Err(VerifyError::NewRootMismatch);
    }
    Ok(())
}

/// A restored compact range whose hashes do not match its size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a compact range of size {size} holds {expected} hashes, got {got}")]
pub struct CompactRangeError {
    pub size: u64,
    pub expected: u32,
    pub got: usize,
}

/// A complete subtree of `2^level` leaves, the `index`-th of its size from the left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerfectSubtree {
    pub level: u32,
    pub index: u64,
    pub hash: Hash,
}

/// The right frontier of an append-only tree: the roots of the perfect subtrees that the
/// leaves `0..size` decompose into, one per set bit of `size`, largest (leftmost) first.
/// Appending and computing the root never read old leaves, so the coordinator keeps this
/// (at most 64 hashes) instead of walking its store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    hashes: Vec<Hash>,
}

impl CompactRange {
    /// The range of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds a range from a stored `size` and [`Self::hashes`].
    pub fn from_parts(size: u64, hashes: Vec<Hash>) -> Result<Self, CompactRangeError> {
        let expected = size.count_ones();
        if hashes.len() != expected as usize {
            return Err(CompactRangeError {
                size,
                expected,
                got: hashes.len(),
            });
        }
        Ok(Self { size, hashes })
    }

    /// How many leaves have been appended.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect subtree roots, leftmost first: what to store to restore the range.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// Appends one leaf hash: equal-sized subtrees merge as a binary counter carries.
    /// Returns the perfect subtrees this leaf completed, smallest first, for a store
    /// that keeps them for proofs (see [`LeafHashes::perfect_subtree`]).
    /// A log never reaches 2^64 - 1 leaves, so the size cannot overflow in practice.
    pub fn append(&mut self, leaf: Hash) -> Vec<PerfectSubtree> {
        let position = self.size;
        let mut completed = Vec::new();
        let mut carry = leaf;
        let mut size = self.size;
        let mut level = 0;
        while size & 1 == 1 {
            let left = self.hashes.pop().expect("one hash per set bit of size");
            carry = node_hash(&left, &carry);
            size >>= 1;
            level += 1;
            completed.push(PerfectSubtree {
                level,
                index: position >> level,
                hash: carry,
            });
        }
        self.hashes.push(carry);
        self.size += 1;
        completed
    }

    /// The Merkle Tree Hash of the leaves appended so far: the subtree roots folded from
    /// the right, which is how the largest-power-of-two split nests them.
    pub fn root(&self) -> Hash {
        let mut rest = self.hashes.iter().rev();
        match rest.next() {
            None => empty_root(),
            Some(last) => rest.fold(*last, |right, left| node_hash(left, &right)),
        }
    }
}
