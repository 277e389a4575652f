//! The AES-256-CTR keystream under the masks: a 64-bit little-endian block counter from
//! zero (the `ctr` crate's `Ctr64LE` with a zero nonce). On x86-64 CPUs with VAES it is
//! computed two blocks per 256-bit instruction; elsewhere by the `aes` and `ctr` crates.
//!
//! Both give the same bytes (a test holds them to each other); VAES is about twice as
//! fast as 128-bit AES-NI on the CPUs that have it, and the masks are most of a round's
//! compute.

use aes::Aes256;
use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use zeroize::Zeroize;

/// Whether a mask is added to the values or subtracted from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaskSign {
    Add,
    Subtract,
}

/// An AES-256-CTR keystream with a byte position.
pub(crate) struct Keystream {
    backend: Backend,
    position: u64,
}

enum Backend {
    #[cfg(target_arch = "x86_64")]
    Vaes(Box<vaes::RoundKeys>),
    Crate(Box<ctr::Ctr64LE<Aes256>>),
}

impl Keystream {
    /// The fastest implementation this CPU runs.
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if vaes::available() {
            return Keystream {
                // SAFETY: `available` checked the CPU features the function enables.
                backend: Backend::Vaes(Box::new(unsafe { vaes::expand_key(key) })),
                position: 0,
            };
        }
        Self::with_crate(key)
    }

    /// The `aes`/`ctr` implementation, whatever the CPU.
    pub(crate) fn with_crate(key: &[u8; 32]) -> Self {
        Keystream {
            backend: Backend::Crate(Box::new(ctr::Ctr64LE::<Aes256>::new(
                key.into(),
                &[0u8; 16].into(),
            ))),
            position: 0,
        }
    }

    /// Moves to absolute byte position `offset`.
    pub(crate) fn seek(&mut self, offset: u64) {
        self.position = offset;
        match &mut self.backend {
            // Stateless but for `position`.
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(_) => {}
            Backend::Crate(cipher) => cipher.seek(offset),
        }
    }

    /// Overwrites `out` with the next `out.len()` bytes.
    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        match &mut self.backend {
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes(keys) => fill_by_blocks(self.position, out, |first, blocks| {
                // SAFETY: the backend is only chosen when `vaes::available()`.
                unsafe { vaes::blocks(keys, first, blocks) }
            }),
            Backend::Crate(cipher) => {
                out.fill(0);
                cipher.apply_keystream(out);
            }
        }
        self.position += out.len() as u64;
    }

    /// Adds the next `4 * values.len()` bytes, read as little-endian 32-bit words, to
    /// `values` or subtracts them, wrapping.
    pub(crate) fn combine(&mut self, values: &mut [u32], sign: MaskSign) {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut rest = values;
        #[cfg(target_arch = "x86_64")]
        if let Backend::Vaes(keys) = &self.backend {
            if self.position.is_multiple_of(16) {
                let whole = rest.len() / vaes::BATCH_WORDS * vaes::BATCH_WORDS;
                let (body, tail) = rest.split_at_mut(whole);
                // SAFETY: the backend is only chosen when `vaes::available()`.
                unsafe { vaes::combine(keys, self.position / 16, body, sign) };
                self.position += 4 * whole as u64;
                rest = tail;
            }
        }
        let mut scratch = [0u8; 1024];
        for chunk in rest.chunks_mut(scratch.len() / 4) {
            let bytes = &mut scratch[..4 * chunk.len()];
            self.fill(bytes);
            let words = bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            match sign {
                MaskSign::Add => chunk
                    .iter_mut()
                    .zip(words)
                    .for_each(|(v, w)| *v = v.wrapping_add(w)),
                MaskSign::Subtract => chunk
                    .iter_mut()
                    .zip(words)
                    .for_each(|(v, w)| *v = v.wrapping_sub(w)),
            }
        }
        scratch.zeroize();
    }
}

/// Fills `out`, which starts at byte `position` of the stream, from `blocks`, which writes
/// whole 16-byte blocks from a block index: partial blocks at either end go through a
/// scratch block.
#[cfg(target_arch = "x86_64")]
fn fill_by_blocks(position: u64, out: &mut [u8], mut blocks: impl FnMut(u64, &mut [u8])) {
    let mut block_index = position / 16;
    let mut out = out;
    let skip = (position % 16) as usize;
    if skip != 0 {
        let mut scratch = [0u8; 16];
        blocks(block_index, &mut scratch);
        let n = (16 - skip).min(out.len());
        out[..n].copy_from_slice(&scratch[skip..skip + n]);
        out = &mut out[n..];
        block_index += 1;
        scratch.zeroize();
    }
    let whole = out.len() / 16 * 16;
    let (body, tail) = out.split_at_mut(whole);
    blocks(block_index, body);
    if !tail.is_empty() {
        let mut scratch = [0u8; 16];
        blocks(block_index + (whole / 16) as u64, &mut scratch);
        tail.copy_from_slice(&scratch[..tail.len()]);
        scratch.zeroize();
    }
}

#[cfg(target_arch = "x86_64")]
mod vaes {
    //! AES-256 with AES-NI key expansion and VAES rounds on 256-bit vectors.

    use std::arch::x86_64::*;

    use zeroize::Zeroize;

    use super::MaskSign;

    /// Blocks encrypted per loop turn: eight vectors of two keep the AES units busy
    /// through each instruction's latency.
    const BATCH: usize = 16;
    /// 32-bit words of keystream per loop turn.
    pub(super) const BATCH_WORDS: usize = BATCH * 4;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("aes")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("vaes")
    }

    /// The 15 round keys of AES-256, zeroed on drop.
    pub(super) struct RoundKeys([[u8; 16]; 15]);

    impl Drop for RoundKeys {
        fn drop(&mut self) {
            self.0.zeroize();
        }
    }

    /// One step of the AES-256 key schedule: `previous` xor its three word-shifted
    /// copies, xor `assist` (the output of `aeskeygenassist`, word already broadcast).
    #[target_feature(enable = "sse2")]
    fn schedule_step(previous: __m128i, assist: __m128i) -> __m128i {
        let s1 = _mm_slli_si128::<4>(previous);
        let s2 = _mm_slli_si128::<4>(s1);
        let s3 = _mm_slli_si128::<4>(s2);
        _mm_xor_si128(
            _mm_xor_si128(previous, s1),
            _mm_xor_si128(_mm_xor_si128(s2, s3), assist),
        )
    }

    /// FIPS-197 key expansion for a 256-bit key.
    ///
    /// # Safety
    /// The CPU must have AES-NI.
    #[target_feature(enable = "aes,sse2")]
    pub(super) unsafe fn expand_key(key: &[u8; 32]) -> RoundKeys {
        let mut keys = [_mm_setzero_si128(); 15];
        // SAFETY: 32 bytes read unaligned from a 32-byte array.
        let (mut even, mut odd) = unsafe {
            (
                _mm_loadu_si128(key.as_ptr().cast()),
                _mm_loadu_si128(key.as_ptr().add(16).cast()),
            )
        };
        keys[0] = even;
        keys[1] = odd;
        for i in 1..8 {
            let assist = match i {
                1 => _mm_aeskeygenassist_si128::<0x01>(odd),
                2 => _mm_aeskeygenassist_si128::<0x02>(odd),
                3 => _mm_aeskeygenassist_si128::<0x04>(odd),
                4 => _mm_aeskeygenassist_si128::<0x08>(odd),
                5 => _mm_aeskeygenassist_si128::<0x10>(odd),
                6 => _mm_aeskeygenassist_si128::<0x20>(odd),
                _ => _mm_aeskeygenassist_si128::<0x40>(odd),
            };
            even = schedule_step(even, _mm_shuffle_epi32::<0xff>(assist));
            keys[2 * i] = even;
            if i < 7 {
                let assist = _mm_aeskeygenassist_si128::<0>(even);
                odd = schedule_step(odd, _mm_shuffle_epi32::<0xaa>(assist));
                keys[2 * i + 1] = odd;
            }
        }
        let mut bytes = [[0u8; 16]; 15];
        for (out, key) in bytes.iter_mut().zip(&keys) {
            // SAFETY: 16 bytes written unaligned into a 16-byte array.
            unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), *key) };
        }
        keys.iter_mut().for_each(|k| *k = _mm_setzero_si128());
        RoundKeys(bytes)
    }

    /// Encrypts the next `BATCH` counter blocks, advancing `counter`.
    #[inline]
    #[target_feature(enable = "aes,avx2,vaes")]
    fn encrypt_batch(round: &[__m256i; 15], counter: &mut __m256i) -> [__m256i; BATCH / 2] {
        let two = _mm256_set_epi64x(0, 2, 0, 2);
        let mut state = [_mm256_setzero_si256(); BATCH / 2];
        for s in &mut state {
            *s = _mm256_xor_si256(*counter, round[0]);
            *counter = _mm256_add_epi64(*counter, two);
        }
        for key in &round[1..14] {
            for s in &mut state {
                *s = _mm256_aesenc_epi128(*s, *key);
            }
        }
        for s in &mut state {
            *s = _mm256_aesenclast_epi128(*s, round[14]);
        }
        state
    }

    /// Adds keystream blocks `first..`, as little-endian words, to `values` (a whole
    /// number of batches) or subtracts them.
    ///
    /// # Safety
    /// The CPU must have AES-NI, AVX2 and VAES.
    #[target_feature(enable = "aes,avx2,vaes")]
    pub(super) unsafe fn combine(keys: &RoundKeys, first: u64, values: &mut [u32], sign: MaskSign) {
        debug_assert_eq!(values.len() % BATCH_WORDS, 0);
        let round = broadcast(keys);
        let mut counter = first_counter(first);
        for chunk in values.chunks_exact_mut(BATCH_WORDS) {
            let state = encrypt_batch(&round, &mut counter);
            for (i, s) in state.iter().enumerate() {
                let at = chunk[8 * i..].as_mut_ptr().cast::<__m256i>();
                // SAFETY: eight words read and written unaligned inside the chunk.
                unsafe {
                    let v = _mm256_loadu_si256(at);
                    let v = match sign {
                        MaskSign::Add => _mm256_add_epi32(v, *s),
                        MaskSign::Subtract => _mm256_sub_epi32(v, *s),
                    };
                    _mm256_storeu_si256(at, v);
                }
            }
        }
    }

    /// The round keys, each broadcast to both 128-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn broadcast(keys: &RoundKeys) -> [__m256i; 15] {
        let mut round = [_mm256_setzero_si256(); 15];
        for (r, key) in round.iter_mut().zip(&keys.0) {
            // SAFETY: 16 bytes read unaligned from a round key.
            *r = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(key.as_ptr().cast()) });
        }
        round
    }

    /// Counter blocks `first` and `first + 1`: the block index in the low 64 bits,
    /// little-endian, zero above.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn first_counter(first: u64) -> __m256i {
        _mm256_set_epi64x(0, first.wrapping_add(1) as i64, 0, first as i64)
    }

    /// Writes keystream blocks `first..` into `out` (a whole number of 16-byte blocks).
    ///
    /// # Safety
    /// The CPU must have AES-NI, AVX2 and VAES.
    #[target_feature(enable = "aes,avx2,vaes")]
    pub(super) unsafe fn blocks(keys: &RoundKeys, first: u64, out: &mut [u8]) {
        debug_assert_eq!(out.len() % 16, 0);
        let round = broadcast(keys);
        let mut counter = first_counter(first);
        let mut chunks = out.chunks_exact_mut(BATCH * 16);
        for chunk in &mut chunks {
            let state = encrypt_batch(&round, &mut counter);
            for (i, s) in state.iter().enumerate() {
                // SAFETY: 32 bytes written unaligned inside a 256-byte chunk.
                unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().add(32 * i).cast(), *s) };
            }
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let state = encrypt_batch(&round, &mut counter);
            let mut scratch = [0u8; BATCH * 16];
            for (i, s) in state.iter().enumerate() {
                // SAFETY: 32 bytes written unaligned inside the 256-byte scratch.
                unsafe { _mm256_storeu_si256(scratch.as_mut_ptr().add(32 * i).cast(), *s) };
            }
            rest.copy_from_slice(&scratch[..rest.len()]);
            scratch.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(mut stream: Keystream, offset: u64, len: usize) -> Vec<u8> {
        stream.seek(offset);
        let mut out = vec![0u8; len];
        // Two calls, so that a partial block left by the first is picked up by the second.
        let (a, b) = out.split_at_mut(len / 3);
        stream.fill(a);
        stream.fill(b);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whichever backend this CPU picks gives the crate's bytes, at any position.
        #[test]
        fn equals_the_crate_keystream(
            key in any::<[u8; 32]>(),
            offset in prop_oneof![0u64..4096, any::<u64>().prop_map(|o| o >> 8)],
            len in 0usize..1200,
        ) {
            prop_assert_eq!(
                bytes(Keystream::new(&key), offset, len),
                bytes(Keystream::with_crate(&key), offset, len)
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Adding or subtracting the stream as words equals doing it with the crate's
        /// bytes, from any position, in two calls.
        #[test]
        fn combine_equals_the_crate_words(
            key in any::<[u8; 32]>(),
            offset in 0u64..512,
            values in proptest::collection::vec(any::<u32>(), 0..700),
            subtract in any::<bool>(),
        ) {
            let sign = if subtract { MaskSign::Subtract } else { MaskSign::Add };
            let expected: Vec<u32> = bytes(Keystream::with_crate(&key), offset, 4 * values.len())
                .chunks_exact(4)
                .zip(&values)
                .map(|(w, v)| {
                    let w = u32::from_le_bytes(w.try_into().unwrap());
                    if subtract { v.wrapping_sub(w) } else { v.wrapping_add(w) }
                })
                .collect();
            let mut got = values.clone();
            let mut stream = Keystream::new(&key);
            stream.seek(offset);
            let (a, b) = got.split_at_mut(values.len() / 2);
            stream.combine(a, sign);
            stream.combine(b, sign);
            prop_assert_eq!(got, expected);
        }
    }

    /// FIPS-197 appendix C.3: AES-256 of 00112233...eeff under key 000102...1f; the
    /// counter block of index 0 is all zeros, so check through the crate that both
    /// agree on a known cipher first, then that the stream starts with E_k(0).
    #[test]
    fn first_block_is_the_cipher_of_zero() {
        use aes::cipher::{BlockEncrypt, KeyInit};
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let cipher = Aes256::new(&key.into());
        let mut known: aes::Block = std::array::from_fn(|i| (i as u8) * 0x11).into();
        cipher.encrypt_block(&mut known);
        assert_eq!(
            known.as_slice(),
            [
                0x8e, 0xa2, 0xb7, 0xca, 0x51, 0x67, 0x45, 0xbf, 0xea, 0xfc, 0x49, 0x90, 0x4b, 0x49,
                0x60, 0x89
            ]
        );
        let mut zero = aes::Block::default();
        cipher.encrypt_block(&mut zero);
        let mut first = [0u8; 16];
        Keystream::new(&key).fill(&mut first);
        assert_eq!(first.as_slice(), zero.as_slice());
    }
}
