//! The two SHA-256 digests an artifact's bytes need, the chunk being read and the whole
//! file so far, from one pass over the bytes: the publisher's chunker, the coordinator's
//! upload check and the agent's download each feed every byte once.
//!
//! Hashing is the agent's largest cost in a download. One SHA-256 state is a chain of
//! dependent rounds that leaves the CPU's SHA unit idle most of each round's latency;
//! where the CPU has SHA-NI, both states are advanced through each block together
//! (`two_lane`), sharing the block's message schedule, so that both digests cost little
//! more than one. Elsewhere each state goes through the `sha2` crate's compression.

use crate::ids::Sha256Digest;
use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;
/// FIPS 180-4's initial hash value for SHA-256.
const INITIAL_STATE: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Digests of the current chunk and of the whole file, fed the same bytes.
#[derive(Clone, Debug)]
pub struct Digests {
    chunk: Lane,
    whole: Lane,
    sha_ni: bool,
}

impl Default for Digests {
    fn default() -> Self {
        Digests::with_sha_ni(two_lane::available())
    }
}

impl Digests {
    /// `sha_ni` must only be true where [`two_lane::available`] is.
    fn with_sha_ni(sha_ni: bool) -> Self {
        Digests {
            chunk: Lane::default(),
            whole: Lane::default(),
            sha_ni,
        }
    }

    /// Feeds the next bytes to both digests.
    pub fn update(&mut self, mut data: &[u8]) {
        // A chunk that started inside a block of the whole file keeps its blocks apart
        // from the file's (the offset between the two lanes never changes): hashed apart.
        if self.chunk.buffered != self.whole.buffered {
            self.chunk.update(data);
            self.whole.update(data);
            return;
        }
        // Otherwise both lanes hold the same partial block, and take the same blocks.
        if self.chunk.buffered > 0 {
            let taken = self.chunk.buffer(data);
            self.whole.buffer(data);
            data = &data[taken..];
            if self.chunk.buffered < BLOCK {
                return;
            }
            let block = self.chunk.block;
            self.compress_both(&block);
            self.chunk.buffered = 0;
            self.whole.buffered = 0;
        }
        let whole_blocks = data.len() / BLOCK * BLOCK;
        let (blocks, rest) = data.split_at(whole_blocks);
        self.compress_both(blocks);
        self.chunk.bytes += whole_blocks as u64;
        self.whole.bytes += whole_blocks as u64;
        self.chunk.buffer(rest);
        self.whole.buffer(rest);
    }

    fn compress_both(&mut self, blocks: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        if self.sha_ni {
            // SAFETY: `sha_ni` is only set where `two_lane::available()`.
            unsafe { two_lane::compress(&mut self.chunk.state, &mut self.whole.state, blocks) };
            return;
        }
        compress(&mut self.chunk.state, blocks);
        compress(&mut self.whole.state, blocks);
    }

    /// Ends the current chunk: returns its digest; the next byte starts the next chunk.
    pub fn finish_chunk(&mut self) -> Sha256Digest {
        std::mem::take(&mut self.chunk).finish()
    }

    /// The digest of every byte fed.
    pub fn finish_whole(self) -> Sha256Digest {
        self.whole.finish()
    }
}

/// One SHA-256 computation: its state, the bytes of an unfinished block, the length.
#[derive(Clone, Debug)]
struct Lane {
    state: [u32; 8],
    block: [u8; BLOCK],
    buffered: usize,
    bytes: u64,
}

impl Default for Lane {
    fn default() -> Self {
        Lane {
            state: INITIAL_STATE,
            block: [0; BLOCK],
            buffered: 0,
            bytes: 0,
        }
    }
}

impl Lane {
    /// Copies what fits of `data` into the unfinished block; returns how much.
    fn buffer(&mut self, data: &[u8]) -> usize {
        let taken = (BLOCK - self.buffered).min(data.len());
        self.block[self.buffered..self.buffered + taken].copy_from_slice(&data[..taken]);
        self.buffered += taken;
        self.bytes += taken as u64;
        taken
    }

    fn update(&mut self, mut data: &[u8]) {
        if self.buffered > 0 {
            data = &data[self.buffer(data)..];
            if self.buffered < BLOCK {
                return;
            }
            let block = self.block;
            compress(&mut self.state, &block);
            self.buffered = 0;
        }
        let whole_blocks = data.len() / BLOCK * BLOCK;
        compress(&mut self.state, &data[..whole_blocks]);
        self.bytes += whole_blocks as u64;
        self.buffer(&data[whole_blocks..]);
    }

    /// FIPS 180-4 padding: a one bit, zeros, the length in bits as 64 bits big-endian.
    fn finish(mut self) -> Sha256Digest {
        let bits = self.bytes.wrapping_mul(8);
        let mut block = [0u8; BLOCK];
        block[..self.buffered].copy_from_slice(&self.block[..self.buffered]);
        block[self.buffered] = 0x80;
        if self.buffered >= BLOCK - 8 {
            compress(&mut self.state, &block);
            block = [0; BLOCK];
        }
        block[BLOCK - 8..].copy_from_slice(&bits.to_be_bytes());
        compress(&mut self.state, &block);
        let mut digest = [0u8; 32];
        for (out, word) in digest.chunks_exact_mut(4).zip(self.state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        Sha256Digest::from_bytes(digest)
    }
}

/// Advances `state` through `blocks` (whole 64-byte blocks) with the `sha2` crate.
fn compress(state: &mut [u32; 8], blocks: &[u8]) {
    for block in blocks.chunks_exact(BLOCK) {
        sha2::compress256(state, std::slice::from_ref(GenericArray::from_slice(block)));
    }
}

#[cfg(target_arch = "x86_64")]
mod two_lane {
    //! Two SHA-256 states advanced through the same blocks with the SHA-NI
    //! instructions, after Intel's published reference sequence: the state is held as
    //! (A, B, E, F) and (C, D, G, H), each `sha256rnds2` does two rounds, and the
    //! message schedule (`sha256msg1`/`sha256msg2`) is computed once per block for
    //! both.

    use std::arch::x86_64::*;

    /// FIPS 180-4's round constants.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse4.1")
            && is_x86_feature_detected!("ssse3")
    }

    /// (A, B, E, F) and (C, D, G, H) from the state's words A..H.
    #[inline]
    #[target_feature(enable = "sse2,ssse3,sse4.1")]
    fn load(state: &[u32; 8]) -> (__m128i, __m128i) {
        // SAFETY: 16 bytes read unaligned from each half of an 8-word array.
        let (abcd, efgh) = unsafe {
            (
                _mm_loadu_si128(state.as_ptr().cast()),
                _mm_loadu_si128(state.as_ptr().add(4).cast()),
            )
        };
        let cdab = _mm_shuffle_epi32::<0xb1>(abcd);
        let hgfe = _mm_shuffle_epi32::<0x1b>(efgh);
        (
            _mm_alignr_epi8::<8>(cdab, hgfe),
            _mm_blend_epi16::<0xf0>(hgfe, cdab),
        )
    }

    /// The inverse of [`load`].
    #[inline]
    #[target_feature(enable = "sse2,ssse3,sse4.1")]
    fn store(state: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32::<0x1b>(abef);
        let dchg = _mm_shuffle_epi32::<0xb1>(cdgh);
        let abcd = _mm_blend_epi16::<0xf0>(feba, dchg);
        let efgh = _mm_alignr_epi8::<8>(dchg, feba);
        // SAFETY: 16 bytes written unaligned into each half of an 8-word array.
        unsafe {
            _mm_storeu_si128(state.as_mut_ptr().cast(), abcd);
            _mm_storeu_si128(state.as_mut_ptr().add(4).cast(), efgh);
        }
    }

    /// Advances both states through `blocks` (whole 64-byte blocks).
    ///
    /// # Safety
    /// The CPU must have SHA-NI, SSSE3 and SSE4.1 ([`available`]).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn compress(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[u8]) {
        let big_endian_words = _mm_set_epi64x(0x0c0d0e0f08090a0b, 0x0405060700010203);
        let (mut a_abef, mut a_cdgh) = load(a);
        let (mut b_abef, mut b_cdgh) = load(b);
        for block in blocks.chunks_exact(64) {
            let saved = (a_abef, a_cdgh, b_abef, b_cdgh);
            // The schedule's last four groups of four words, in a ring.
            let mut w = [_mm_setzero_si128(); 4];
            for (i, words) in w.iter_mut().enumerate() {
                // SAFETY: 16 bytes read unaligned inside the 64-byte block.
                let bytes = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * i).cast()) };
                *words = _mm_shuffle_epi8(bytes, big_endian_words);
            }
            for group in 0..16 {
                if group >= 4 {
                    let (w0, w1, w2, w3) = (
                        w[group % 4],
                        w[(group + 1) % 4],
                        w[(group + 2) % 4],
                        w[(group + 3) % 4],
                    );
                    let partial =
                        _mm_add_epi32(_mm_sha256msg1_epu32(w0, w1), _mm_alignr_epi8::<4>(w3, w2));
                    w[group % 4] = _mm_sha256msg2_epu32(partial, w3);
                }
                // SAFETY: 16 bytes read unaligned from the 64 round constants.
                let k = unsafe { _mm_loadu_si128(K.as_ptr().add(4 * group).cast()) };
                let low = _mm_add_epi32(w[group % 4], k);
                let high = _mm_shuffle_epi32::<0x0e>(low);
                a_cdgh = _mm_sha256rnds2_epu32(a_cdgh, a_abef, low);
                b_cdgh = _mm_sha256rnds2_epu32(b_cdgh, b_abef, low);
                a_abef = _mm_sha256rnds2_epu32(a_abef, a_cdgh, high);
                b_abef = _mm_sha256rnds2_epu32(b_abef, b_cdgh, high);
            }
            a_abef = _mm_add_epi32(a_abef, saved.0);
            a_cdgh = _mm_add_epi32(a_cdgh, saved.1);
            b_abef = _mm_add_epi32(b_abef, saved.2);
            b_cdgh = _mm_add_epi32(b_cdgh, saved.3);
        }
        store(a, a_abef, a_cdgh);
        store(b, b_abef, b_cdgh);
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod two_lane {
    //! No SHA-NI off x86-64: both states go through the `sha2` crate.

    pub(super) fn available() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The ways to compute both digests that this CPU can run.
    fn variants() -> Vec<Digests> {
        let mut all = vec![Digests::with_sha_ni(false)];
        if two_lane::available() {
            all.push(Digests::with_sha_ni(true));
        }
        all
    }

    #[test]
    fn chunk_and_whole_digests_equal_separate_hashes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for mut digests in variants() {
            for chunk in data.chunks(3000) {
                for piece in chunk.chunks(777) {
                    digests.update(piece);
                }
                assert_eq!(digests.finish_chunk(), Sha256Digest::of(chunk));
            }
            assert_eq!(digests.finish_whole(), Sha256Digest::of(&data));
        }
    }

    #[test]
    fn empty_input_gives_the_digest_of_nothing() {
        for mut digests in variants() {
            assert_eq!(digests.finish_chunk(), Sha256Digest::of(b""));
            assert_eq!(digests.finish_whole(), Sha256Digest::of(b""));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any data, cut into chunks of any sizes (aligned to 64-byte blocks of the file
        /// or not) and fed in pieces of any sizes, gives the `sha2` crate's digest of
        /// each chunk and of the whole.
        #[test]
        fn equal_the_sha2_crate(
            data in proptest::collection::vec(any::<u8>(), 0..5000),
            chunk_sizes in proptest::collection::vec(prop_oneof![1usize..200, Just(64), Just(128), 200usize..3000], 1..8),
            piece_size in prop_oneof![1usize..130, 130usize..2000],
        ) {
            for mut digests in variants() {
                let mut rest = &data[..];
                let mut sizes = chunk_sizes.iter().cycle();
                while !rest.is_empty() {
                    let (chunk, after) = rest.split_at((*sizes.next().unwrap()).min(rest.len()));
                    for piece in chunk.chunks(piece_size) {
                        digests.update(piece);
                    }
                    prop_assert_eq!(digests.finish_chunk(), Sha256Digest::of(chunk));
                    rest = after;
                }
                prop_assert_eq!(digests.finish_whole(), Sha256Digest::of(&data));
            }
        }
    }
}
