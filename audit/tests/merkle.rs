//! Merkle hashing, proofs and the compact range against the certificate-transparency
//! reference vectors (transparency-dev/merkle `proof/verify_test.go`, the same leaves and
//! roots as the C++ CT tests) and against exhaustive and random checks.

use nanofleet_audit::merkle::{
    consistency_proof, empty_root, inclusion_proof, leaf_hash, node_hash, tree_root,
    verify_consistency, verify_inclusion, CompactRange, Hash, LeafHashes, ProofError, VerifyError,
};
use proptest::prelude::*;
use std::cell::Cell;
use std::collections::HashMap;

const LEAVES: [&[u8]; 8] = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
];

/// Roots of the trees of the first 1..=8 reference leaves.
const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (leaf index, tree size, audit path) from the reference inclusion vectors.
const INCLUSION: [(u64, u64, &[&str]); 4] = [
    (
        0,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        &[
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
];

/// (old size, new size, proof) from the reference consistency vectors.
const CONSISTENCY: [(u64, u64, &[&str]); 4] = [
    (
        1,
        8,
        &[
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        &[
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        &[
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
];

fn h(text: &str) -> Hash {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).unwrap();
    out
}

fn hashes(texts: &[&str]) -> Vec<Hash> {
    texts.iter().map(|t| h(t)).collect()
}

fn reference_leaves() -> Vec<Hash> {
    LEAVES.iter().map(|d| leaf_hash(d)).collect()
}

/// Distinct leaf hashes for generated trees.
fn leaves(n: u64) -> Vec<Hash> {
    (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
}

fn flip(hash: &Hash, bit: usize) -> Hash {
    let mut out = *hash;
    out[bit / 8] ^= 1 << (bit % 8);
    out
}

#[test]
fn empty_tree_root_is_sha256_of_nothing() {
    assert_eq!(
        empty_root(),
        h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    assert_eq!(tree_root(&Vec::new(), 0).unwrap(), empty_root());
    assert_eq!(CompactRange::new().root(), empty_root());
}

#[test]
fn reference_roots_for_sizes_1_to_8() {
    let leaves = reference_leaves();
    let mut range = CompactRange::new();
    for (i, root) in ROOTS.iter().enumerate() {
        let size = i as u64 + 1;
        assert_eq!(tree_root(&leaves, size).unwrap(), h(root), "size {size}");
        range.append(leaves[i]);
        assert_eq!(range.root(), h(root), "compact range at size {size}");
    }
}

#[test]
fn reference_inclusion_proofs_generate_and_verify() {
    let leaves = reference_leaves();
    for (index, size, proof) in INCLUSION {
        let proof = hashes(proof);
        let root = h(ROOTS[size as usize - 1]);
        assert_eq!(inclusion_proof(&leaves, index, size).unwrap(), proof);
        verify_inclusion(&leaves[index as usize], index, size, &proof, &root).unwrap();
    }
}

#[test]
fn reference_consistency_proofs_generate_and_verify() {
    let leaves = reference_leaves();
    for (old, new, proof) in CONSISTENCY {
        let proof = hashes(proof);
        let (old_root, new_root) = (h(ROOTS[old as usize - 1]), h(ROOTS[new as usize - 1]));
        assert_eq!(consistency_proof(&leaves, old, new).unwrap(), proof);
        verify_consistency(old, new, &old_root, &new_root, &proof).unwrap();
    }
}

/// The corruptions of the reference suite: wrong index, size, leaf or root, extra or
/// missing hashes.
#[test]
fn reference_inclusion_corruptions_fail() {
    let leaves = reference_leaves();
    for (index, size, proof) in INCLUSION {
        let proof = hashes(proof);
        let root = h(ROOTS[size as usize - 1]);
        let leaf = leaves[index as usize];
        let other = h("abacaba000000000000000000000000000000000000000000060061e00123456");
        let with = |front: Option<Hash>, back: Option<Hash>| -> Vec<Hash> {
            front.into_iter().chain(proof.clone()).chain(back).collect()
        };
        let probes: Vec<(Hash, u64, u64, Vec<Hash>, Hash)> = vec![
            (leaf, index.wrapping_sub(1), size, proof.clone(), root),
            (leaf, index + 1, size, proof.clone(), root),
            (leaf, index ^ 2, size, proof.clone(), root),
            (leaf, index, size * 2, proof.clone(), root),
            (leaf, index, size / 2, proof.clone(), root),
            (other, index, size, proof.clone(), root),
            (leaf, index, size, proof.clone(), empty_root()),
            (leaf, index, size, proof.clone(), other),
            (leaf, index, size, with(None, Some([0; 32])), root),
            (leaf, index, size, with(None, Some(root)), root),
            (leaf, index, size, with(Some([0; 32]), None), root),
            (leaf, index, size, with(Some(root), None), root),
            (leaf, index, size, proof[..proof.len() - 1].to_vec(), root),
        ];
        for (leaf, index, size, proof, root) in probes {
            assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_err());
        }
    }
}

#[test]
fn reference_consistency_corruptions_fail() {
    for (old, new, proof) in CONSISTENCY {
        let proof = hashes(proof);
        let (r1, r2) = (h(ROOTS[old as usize - 1]), h(ROOTS[new as usize - 1]));
        let with = |front: Option<Hash>, back: Option<Hash>| -> Vec<Hash> {
            front.into_iter().chain(proof.clone()).chain(back).collect()
        };
        let probes: Vec<(u64, u64, Hash, Hash, Vec<Hash>)> = vec![
            (old - 1, new, r1, r2, proof.clone()),
            (old + 1, new, r1, r2, proof.clone()),
            (old ^ 2, new, r1, r2, proof.clone()),
            (old, new * 2, r1, r2, proof.clone()),
            (old, new / 2, r1, r2, proof.clone()),
            (old, new, [1; 32], r2, proof.clone()),
            (old, new, r1, [1; 32], proof.clone()),
            (old, new, r2, r1, proof.clone()),
            (old, new, r1, r2, Vec::new()),
            (old, new, r1, r2, with(None, Some([0; 32]))),
            (old, new, r1, r2, with(None, Some(r1))),
            (old, new, r1, r2, with(None, Some(r2))),
            (old, new, r1, r2, with(Some([0; 32]), None)),
            (old, new, r1, r2, with(Some(r1), None)),
            (old, new, r1, r2, with(Some(r2), None)),
            (old, new, r1, r2, with(Some(proof[0]), None)),
            (old, new, r1, r2, proof[..proof.len() - 1].to_vec()),
        ];
        for (old, new, r1, r2, proof) in probes {
            assert!(verify_consistency(old, new, &r1, &r2, &proof).is_err());
        }
    }
}

/// The edges RFC 9162 leaves to the caller, with the reference suite's expectations,
/// except that an empty old tree must present the empty root.
#[test]
fn consistency_edges() {
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let empty = empty_root();
    assert!(verify_consistency(0, 0, &empty, &empty, &[]).is_ok());
    assert!(verify_consistency(0, 5, &empty, &b, &[]).is_ok());
    assert!(verify_consistency(1, 1, &b, &b, &[]).is_ok());
    assert_eq!(
        verify_consistency(0, 5, &a, &b, &[]),
        Err(VerifyError::OldRootMismatch)
    );
    assert!(verify_consistency(1, 1, &a, &b, &[]).is_err());
    assert!(verify_consistency(1, 1, &a, &a, &[empty]).is_err());
    assert!(verify_consistency(0, 1, &empty, &a, &[empty]).is_err());
    assert!(verify_consistency(1, 0, &a, &b, &[]).is_err());
    assert_eq!(
        verify_consistency(1, 2, &a, &b, &[]),
        Err(VerifyError::EmptyProof)
    );
}

#[test]
fn inclusion_edges() {
    let leaf = leaf_hash(b"data");
    assert!(verify_inclusion(&leaf, 0, 1, &[], &leaf).is_ok());
    assert!(verify_inclusion(&leaf, 0, 1, &[], &empty_root()).is_err());
    for (index, size) in [(0, 0), (1, 0), (1, 1), (2, 1), (u64::MAX, u64::MAX)] {
        assert_eq!(
            verify_inclusion(&leaf, index, size, &[], &leaf),
            Err(VerifyError::IndexOutOfRange { index, size })
        );
    }
}

#[test]
fn generation_refuses_what_the_store_lacks() {
    let leaves = leaves(4);
    assert_eq!(
        tree_root(&leaves, 5),
        Err(ProofError::SizeBeyondLog {
            size: 5,
            available: 4
        })
    );
    assert_eq!(
        inclusion_proof(&leaves, 4, 4),
        Err(ProofError::IndexOutOfRange { index: 4, size: 4 })
    );
    assert!(inclusion_proof(&leaves, 0, 5).is_err());
    assert_eq!(
        consistency_proof(&leaves, 3, 2),
        Err(ProofError::OldSizeAfterNew {
            old_size: 3,
            new_size: 2
        })
    );
    assert!(consistency_proof(&leaves, 2, 5).is_err());
}

/// MTH written straight from RFC 6962 section 2.1, independent of the crate's recursion.
fn reference_mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = (1..n)
                .map(|p| 1usize << p)
                .take_while(|&p| p < n)
                .last()
                .unwrap_or(1);
            node_hash(&reference_mth(&leaves[..k]), &reference_mth(&leaves[k..]))
        }
    }
}

#[test]
fn every_inclusion_proof_up_to_64_leaves_verifies() {
    let all = leaves(64);
    for size in 1..=64u64 {
        let root = tree_root(&all, size).unwrap();
        assert_eq!(root, reference_mth(&all[..size as usize]));
        for index in 0..size {
            let proof = inclusion_proof(&all, index, size).unwrap();
            verify_inclusion(&all[index as usize], index, size, &proof, &root)
                .unwrap_or_else(|e| panic!("({index}, {size}): {e}"));
        }
    }
}

#[test]
fn every_consistency_proof_up_to_64_leaves_verifies() {
    let all = leaves(64);
    let roots: Vec<Hash> = (0..=64).map(|n| tree_root(&all, n).unwrap()).collect();
    for new in 0..=64u64 {
        for old in 0..=new {
            let proof = consistency_proof(&all, old, new).unwrap();
            verify_consistency(old, new, &roots[old as usize], &roots[new as usize], &proof)
                .unwrap_or_else(|e| panic!("({old}, {new}): {e}"));
        }
    }
}

/// Which side the sibling is on at each level of leaf `m`'s path in a tree of `n` leaves,
/// from RFC 6962's PATH recursion: two (index, size) pairs with equal sides accept the
/// same audit path, because the root then hashes the same nodes in the same order.
fn path_sides(m: u64, n: u64) -> Vec<bool> {
    if n <= 1 {
        return Vec::new();
    }
    let k = (0..64)
        .map(|p| 1u64 << p)
        .take_while(|&p| p < n)
        .last()
        .unwrap();
    let (mut sides, sibling_right) = if m < k {
        (path_sides(m, k), true)
    } else {
        (path_sides(m - k, n - k), false)
    };
    sides.push(sibling_right);
    sides
}

#[test]
fn a_path_fits_every_size_of_the_same_shape() {
    // Leaf 0's path in 5 leaves is also leaf 0's path in 7 leaves: only the signed size
    // next to the root tells them apart.
    let all = leaves(5);
    let proof = inclusion_proof(&all, 0, 5).unwrap();
    let root = tree_root(&all, 5).unwrap();
    assert_eq!(path_sides(0, 5), path_sides(0, 7));
    assert!(verify_inclusion(&all[0], 0, 7, &proof, &root).is_ok());
}

/// A store that keeps the perfect subtrees the compact range reports, as the coordinator
/// does, and counts leaf reads.
struct CachedLeaves {
    leaves: Vec<Hash>,
    subtrees: HashMap<(u32, u64), Hash>,
    leaf_reads: Cell<u64>,
}

impl CachedLeaves {
    fn build(leaves: Vec<Hash>) -> Self {
        let mut range = CompactRange::new();
        let mut subtrees = HashMap::new();
        for leaf in &leaves {
            for subtree in range.append(*leaf) {
                subtrees.insert((subtree.level, subtree.index), subtree.hash);
            }
        }
        Self {
            leaves,
            subtrees,
            leaf_reads: Cell::new(0),
        }
    }
}

impl LeafHashes for CachedLeaves {
    fn len(&self) -> u64 {
        self.leaves.len() as u64
    }
    fn leaf(&self, i: u64) -> Hash {
        self.leaf_reads.set(self.leaf_reads.get() + 1);
        self.leaves[i as usize]
    }
    fn perfect_subtree(&self, level: u32, index: u64) -> Option<Hash> {
        self.subtrees.get(&(level, index)).copied()
    }
}

#[test]
fn stored_perfect_subtrees_give_the_same_proofs_with_log_reads() {
    let size = 1000;
    let cached = CachedLeaves::build(leaves(size));
    // Every perfect aligned subtree inside the log was reported once.
    let expected: u64 = (1..10).map(|level| size >> level).sum();
    assert_eq!(cached.subtrees.len() as u64, expected);
    for (level, index) in cached.subtrees.keys() {
        let (start, end) = (index << level, (index + 1) << level);
        assert_eq!(
            cached.subtrees[&(*level, *index)],
            reference_mth(&cached.leaves[start as usize..end as usize])
        );
    }
    for index in [0, 1, 511, 512, 998, 999] {
        for tree in [index + 1, 777, size] {
            if index >= tree {
                continue;
            }
            cached.leaf_reads.set(0);
            let proof = inclusion_proof(&cached, index, tree).unwrap();
            assert!(
                cached.leaf_reads.get() <= 2 * 64,
                "reads {}",
                cached.leaf_reads.get()
            );
            assert_eq!(proof, inclusion_proof(&cached.leaves, index, tree).unwrap());
        }
    }
    cached.leaf_reads.set(0);
    assert_eq!(
        consistency_proof(&cached, 333, size).unwrap(),
        consistency_proof(&cached.leaves, 333, size).unwrap()
    );
    assert_eq!(
        tree_root(&cached, size).unwrap(),
        reference_mth(&cached.leaves)
    );
    assert!(cached.leaf_reads.get() <= 2 * 64);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compact_range_root_is_mth(n in 0u64..300) {
        let all = leaves(n);
        let mut range = CompactRange::new();
        for (i, leaf) in all.iter().enumerate() {
            range.append(*leaf);
            prop_assert_eq!(range.size(), i as u64 + 1);
            prop_assert_eq!(range.hashes().len(), range.size().count_ones() as usize);
        }
        prop_assert_eq!(range.root(), reference_mth(&all));
        let restored = CompactRange::from_parts(range.size(), range.hashes().to_vec()).unwrap();
        prop_assert_eq!(&restored, &range);
        let mut extra = range.hashes().to_vec();
        extra.push([0; 32]);
        prop_assert!(CompactRange::from_parts(n, extra).is_err());
    }

    #[test]
    fn inclusion_single_bit_changes_fail(
        size in 1u64..=64, index_seed in any::<u64>(), bit in 0usize..256, word_bit in 0u32..64,
    ) {
        let all = leaves(size);
        let index = index_seed % size;
        let leaf = all[index as usize];
        let root = tree_root(&all, size).unwrap();
        let proof = inclusion_proof(&all, index, size).unwrap();
        for i in 0..proof.len() {
            let mut bad = proof.clone();
            bad[i] = flip(&bad[i], bit);
            prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
        }
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &flip(&root, bit)).is_err());
        prop_assert!(verify_inclusion(&flip(&leaf, bit), index, size, &proof, &root).is_err());
        let other_index = index ^ (1 << word_bit);
        prop_assert!(verify_inclusion(&leaf, other_index, size, &proof, &root).is_err());
        // A changed size verifies only where the leaf's path has the very same shape.
        let other_size = size ^ (1 << word_bit);
        let same_shape = index < other_size && path_sides(index, other_size) == path_sides(index, size);
        prop_assert_eq!(
            verify_inclusion(&leaf, index, other_size, &proof, &root).is_ok(),
            same_shape
        );
    }

    #[test]
    fn consistency_single_bit_changes_fail(
        new in 1u64..=64, old_seed in any::<u64>(), bit in 0usize..256, word_bit in 0u32..64,
    ) {
        let all = leaves(128);
        let old = 1 + old_seed % new;
        let (r1, r2) = (tree_root(&all, old).unwrap(), tree_root(&all, new).unwrap());
        let proof = consistency_proof(&all, old, new).unwrap();
        for i in 0..proof.len() {
            let mut bad = proof.clone();
            bad[i] = flip(&bad[i], bit);
            prop_assert!(verify_consistency(old, new, &r1, &r2, &bad).is_err());
        }
        if old < new {
            prop_assert!(verify_consistency(old, new, &flip(&r1, bit), &r2, &proof).is_err());
            prop_assert!(verify_consistency(old, new, &r1, &flip(&r2, bit), &proof).is_err());
        }
        // A changed size that needs a proof of another length never verifies; one of the
        // same length can only where the roots are hashed from the same nodes.
        for (o, n) in [(old ^ (1 << word_bit), new), (old, new ^ (1 << word_bit))] {
            let verifies = verify_consistency(o, n, &r1, &r2, &proof).is_ok();
            if verifies {
                prop_assert!(o <= n);
                if n <= 128 {
                    prop_assert_eq!(consistency_proof(&all, o, n).unwrap().len(), proof.len());
                }
            }
        }
    }
}
