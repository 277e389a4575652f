//! AVX2 kernels (with FMA and F16C): 32 weights against 32 activation bytes per step,
//! `maddubs` pairs to 16-bit, `madd` to 32-bit, one FMA per block into eight lanes.
//! Safety: callers check the features at run time ([`crate::Kernel::Avx2`]).

use std::arch::x86_64::*;

use crate::{Format, BLOCK};

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_at(p: *const u8) -> f32 {
    let bits = i32::from(u16::from_le_bytes([*p, *p.add(1)]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
}

/// 16 bytes of nibbles as 32 unsigned bytes in weight order (low nibbles first).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let low = _mm_and_si128(raw, mask);
    let high = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(high, low)
}

/// Eight 32-bit lanes of `sum(w * x)` for 32 unsigned weights and 32 signed activations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unsigned_dot(w: __m256i, x: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(w, x);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// Runs `$kernel::<FORMAT, ..>($args)` for the `FORMAT` (0 = Q4_0, 1 = Q4_1, 2 = Q8_0)
/// of `$format`: one loop per format, so that nothing in the loops branches on it.
macro_rules! by_format {
    ($format:expr, $kernel:ident $(<$($generic:tt),*>)? ($($arg:expr),*)) => {
        match $format {
            Format::Q4_0 => $kernel::<0 $($(, $generic)*)?>($($arg),*),
            Format::Q4_1 => $kernel::<1 $($(, $generic)*)?>($($arg),*),
            Format::Q8_0 => $kernel::<2 $($(, $generic)*)?>($($arg),*),
        }
    };
}

/// One weight row times one quantized activation row (see `scalar::dot`).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds whole blocks of `format` and `q`,
/// `d`, `s` the matching activation blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot(format: Format, w: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let blocks = w.len() / format.block_bytes();
    debug_assert!(q.len() >= blocks * BLOCK && d.len() >= blocks && s.len() >= blocks);
    by_format!(format, row(w, q, d, s, blocks))
}

/// Consecutive weight rows of `row_bytes` each times one activation row, one value per
/// row into `out`.
///
/// # Safety
/// As [`dot`]; `w` holds `out.len()` rows of `row_bytes`, each as long as `q`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_band(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    q: &[i8],
    d: &[f32],
    s: &[f32],
    out: &mut [f32],
) {
    for (row, out) in w.chunks_exact(row_bytes).zip(out) {
        *out = dot(format, row, q, d, s);
    }
}

/// `N` weight rows times `R` quantized activation rows at once: each weight block is
/// loaded and unpacked once for all `R` rows, and each activation block once for all `N`
/// (prefill multiplies many rows by each weight).
///
/// # Safety
/// As [`dot`], for each of the `N` weight rows and `R` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_tile<const N: usize, const R: usize>(
    format: Format,
    w: [&[u8]; N],
    q: [&[i8]; R],
    d: [&[f32]; R],
    s: [&[f32]; R],
) -> [[f32; R]; N] {
    let blocks = w[0].len() / format.block_bytes();
    debug_assert!(w.iter().all(|w| w.len() == blocks * format.block_bytes()));
    debug_assert!((0..R)
        .all(|r| q[r].len() >= blocks * BLOCK && d[r].len() >= blocks && s[r].len() >= blocks));
    by_format!(format, tile < N, R > (w, q, d, s, blocks))
}

const fn block_bytes<const FORMAT: u8>() -> usize {
    match FORMAT {
        0 => Format::Q4_0.block_bytes(),
        1 => Format::Q4_1.block_bytes(),
        _ => Format::Q8_0.block_bytes(),
    }
}

/// A weight block as the products use it: its scale, its weights as bytes (the nibbles
/// unpacked to 0..15, or Q8_0's signed bytes) and the weight of its offset term (`-8 d`
/// for Q4_0, `m` for Q4_1).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_block<const FORMAT: u8>(block: *const u8) -> (f32, __m256i, f32) {
    let dw = half_at(block);
    match FORMAT {
        0 => (dw, unpack_nibbles(block.add(2)), -8.0 * dw),
        1 => (dw, unpack_nibbles(block.add(4)), half_at(block.add(2))),
        _ => (dw, _mm256_loadu_si256(block.add(2) as *const __m256i), 0.0),
    }
}

/// Eight lanes of `sum(w * x)` for a block's weights (from [`load_block`]) and 32
/// activation bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_product<const FORMAT: u8>(weights: __m256i, x: __m256i) -> __m256 {
    match FORMAT {
        // |w| times x with w's sign: maddubs wants its first operand unsigned.
        2 => unsigned_dot(
            _mm256_sign_epi8(weights, weights),
            _mm256_sign_epi8(x, weights),
        ),
        _ => unsigned_dot(weights, x),
    }
}

/// One row: the generation path, kept apart from [`tile`] because a 1 x 1 tile's
/// arrays cost it about an eighth of its speed.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row<const FORMAT: u8>(w: &[u8], q: &[i8], d: &[f32], s: &[f32], blocks: usize) -> f32 {
    let (w, q) = (w.as_ptr(), q.as_ptr());
    // Two accumulators, alternating blocks, so that one block's FMA does not wait on the
    // one before.
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut offsets = [0f32; 2];
    for b in 0..blocks {
        let lane = b % 2;
        let (dw, weights, offset_weight) = load_block::<FORMAT>(w.add(b * block_bytes::<FORMAT>()));
        let x = _mm256_loadu_si256(q.add(b * BLOCK) as *const __m256i);
        let product = block_product::<FORMAT>(weights, x);
        acc[lane] = _mm256_fmadd_ps(product, _mm256_set1_ps(dw * *d.get_unchecked(b)), acc[lane]);
        offsets[lane] += offset_weight * *s.get_unchecked(b);
    }
    horizontal_sum(_mm256_add_ps(acc[0], acc[1])) + offsets[0] + offsets[1]
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const FORMAT: u8, const N: usize, const R: usize>(
    w: [&[u8]; N],
    q: [&[i8]; R],
    d: [&[f32]; R],
    s: [&[f32]; R],
    blocks: usize,
) -> [[f32; R]; N] {
    let mut acc = [[_mm256_setzero_ps(); R]; N];
    let mut offsets = [[0f32; R]; N];
    for b in 0..blocks {
        let mut loaded = [(0f32, _mm256_setzero_si256(), 0f32); N];
        for n in 0..N {
            loaded[n] = load_block::<FORMAT>(w[n].as_ptr().add(b * block_bytes::<FORMAT>()));
        }
        for r in 0..R {
            let x = _mm256_loadu_si256(q[r].as_ptr().add(b * BLOCK) as *const __m256i);
            let (dx, sx) = (*d[r].get_unchecked(b), *s[r].get_unchecked(b));
            for n in 0..N {
                let (dw, weights, offset_weight) = loaded[n];
                let product = block_product::<FORMAT>(weights, x);
                acc[n][r] = _mm256_fmadd_ps(product, _mm256_set1_ps(dw * dx), acc[n][r]);
                offsets[n][r] += offset_weight * sx;
            }
        }
    }
    let mut out = [[0f32; R]; N];
    for n in 0..N {
        for r in 0..R {
            out[n][r] = horizontal_sum(acc[n][r]) + offsets[n][r];
        }
    }
    out
}

/// Quantizes 32 values to signed bytes with scale `max|x| / 127` (rounding to nearest,
/// ties to even); returns the scale and the sum of the bytes.
///
/// # Safety
/// The CPU must have AVX2; `x` holds 32 values and `out` room for 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    debug_assert!(x.len() >= BLOCK && out.len() >= BLOCK);
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let sign_bit = _mm256_set1_ps(-0.0);
    let mut max = _mm256_andnot_ps(sign_bit, v[0]);
    for value in &v[1..] {
        max = _mm256_max_ps(max, _mm256_andnot_ps(sign_bit, *value));
    }
    let quad = _mm_max_ps(_mm256_extractf128_ps(max, 1), _mm256_castps256_ps128(max));
    let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
    let max = _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
    let d = max / 127.0;
    let inverse = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
    let ints: [__m256i; 4] =
        std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)));
    // Pack 32-bit to 16-bit to 8-bit; the packs interleave 128-bit lanes, which the
    // final permutation puts back in order.
    let words = [
        _mm256_packs_epi32(ints[0], ints[1]),
        _mm256_packs_epi32(ints[2], ints[3]),
    ];
    let bytes = _mm256_packs_epi16(words[0], words[1]);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes);
    // The sum of the bytes: pairs against ones, then lanes.
    let pairs = _mm256_madd_epi16(
        _mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes),
        _mm256_set1_epi16(1),
    );
    let quad = _mm_add_epi32(
        _mm256_extracti128_si256(pairs, 1),
        _mm256_castsi256_si128(pairs),
    );
    let pair = _mm_add_epi32(quad, _mm_shuffle_epi32(quad, 0b01_00_11_10));
    let sum = _mm_add_epi32(pair, _mm_shuffle_epi32(pair, 0b10_11_00_01));
    (d, _mm_cvtsi128_si32(sum))
}
