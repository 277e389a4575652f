//! x86-64 kernels over the panel layout (`panels`): a block's eight weight vectors, each
//! four weights of every row of the panel, against four activation bytes broadcast to
//! every lane, into eight 32-bit lanes (one per row), then one FMA per block. Two forms:
//! AVX2 (`maddubs` pairs to 16 bits, `madd` to 32) and AVX-512 VNNI (`dpbusd`, bytes
//! straight to 32 bits, on 256-bit vectors).
//! Safety: callers check the features at run time ([`crate::Kernel`]).

use std::arch::x86_64::*;

use crate::panels::{panel_block_bytes, scale_bytes, PANEL_ROWS};
use crate::scalar::integer_offset;
use crate::{Format, QuantizedActivations, BLOCK};

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

const fn format<const FORMAT: u8>() -> Format {
    match FORMAT {
        0 => Format::Q4_0,
        1 => Format::Q4_1,
        _ => Format::Q8_0,
    }
}

/// A panel block's eight weight vectors, as unsigned bytes: vector `j` holds weights
/// `4j..4j+4` of every row (row `r` in bytes `4r..4r+4`); Q4's nibbles (0..15) or Q8_0's
/// biased bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load_weights<const FORMAT: u8>(p: *const u8) -> [__m256i; 8] {
    let mut w = [_mm256_setzero_si256(); 8];
    if FORMAT == 2 {
        for (j, w) in w.iter_mut().enumerate() {
            *w = _mm256_loadu_si256(p.add(32 * j) as *const __m256i);
        }
    } else {
        let mask = _mm256_set1_epi8(0x0F);
        for v in 0..4 {
            let raw = _mm256_loadu_si256(p.add(32 * v) as *const __m256i);
            w[2 * v] = _mm256_and_si256(raw, mask);
            w[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
        }
    }
    w
}

/// Activation bytes `4j..4j + 4` of the block at `x`, in every 32-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn broadcast(x: *const i8, j: usize) -> __m256i {
    _mm256_set1_epi32((x.add(4 * j) as *const i32).read_unaligned())
}

/// Per row, the block's integer dot product less [`integer_offset`] times `sum` (the sum
/// of the activation bytes): `maddubs` of unsigned weights and signed activations.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_dots_avx2<const FORMAT: u8>(w: &[__m256i; 8], x: *const i8, sum: i32) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if FORMAT == 2 {
        // Biased bytes times activations would overflow `maddubs`' 16-bit pairs: take the
        // signed weights back and move their signs onto the activations instead.
        let bias = _mm256_set1_epi8(-128);
        let mut dots = _mm256_setzero_si256();
        for (j, w) in w.iter().enumerate() {
            let signed = _mm256_xor_si256(*w, bias);
            let pairs = _mm256_maddubs_epi16(
                _mm256_sign_epi8(signed, signed),
                _mm256_sign_epi8(broadcast(x, j), signed),
            );
            dots = _mm256_add_epi32(dots, _mm256_madd_epi16(pairs, ones));
        }
        dots
    } else {
        // Nibbles times bytes: eight pairs of at most 2 * 15 * 127 fit 16 bits summed.
        let mut pairs = _mm256_setzero_si256();
        for (j, w) in w.iter().enumerate() {
            pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(*w, broadcast(x, j)));
        }
        let dots = _mm256_madd_epi16(pairs, ones);
        _mm256_sub_epi32(
            dots,
            _mm256_set1_epi32(integer_offset(format::<FORMAT>()) * sum),
        )
    }
}

/// As [`block_dots_avx2`], with `dpbusd`: bytes to 32-bit sums in one step, two chains.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
#[inline]
unsafe fn block_dots_vnni<const FORMAT: u8>(w: &[__m256i; 8], x: *const i8, sum: i32) -> __m256i {
    let mut even = _mm256_setzero_si256();
    let mut odd = _mm256_setzero_si256();
    for j in (0..8).step_by(2) {
        even = _mm256_dpbusd_epi32(even, w[j], broadcast(x, j));
        odd = _mm256_dpbusd_epi32(odd, w[j + 1], broadcast(x, j + 1));
    }
    let dots = _mm256_add_epi32(even, odd);
    _mm256_sub_epi32(
        dots,
        _mm256_set1_epi32(integer_offset(format::<FORMAT>()) * sum),
    )
}

/// Stamps out a panel product for one feature set and its block dot products: panel
/// `panel` times activation rows `first..first + R`, eight values (the panel's rows) per
/// activation row.
macro_rules! panel_product {
    ($name:ident, $body:ident, $features:literal, $block_dots:ident) => {
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $body<const FORMAT: u8, const R: usize>(
            panel: &[u8],
            x: &QuantizedActivations,
            first: usize,
        ) -> [[f32; PANEL_ROWS]; R] {
            let size = panel_block_bytes(format::<FORMAT>());
            let blocks = x.cols / BLOCK;
            let rows: [_; R] = std::array::from_fn(|r| x.row(first + r));
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..blocks {
                let block = panel.as_ptr().add(b * size);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(block as *const __m128i));
                let minimums = _mm256_cvtph_ps(_mm_loadu_si128(block.add(16) as *const __m128i));
                let w = load_weights::<FORMAT>(block.add(scale_bytes(format::<FORMAT>())));
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    let x = row.q.as_ptr().add(b * BLOCK);
                    let dots = $block_dots::<FORMAT>(&w, x, *row.sums.get_unchecked(b));
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*row.d.get_unchecked(b)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, *acc);
                    if FORMAT == 1 {
                        let s = _mm256_set1_ps(*row.s.get_unchecked(b));
                        *acc = _mm256_fmadd_ps(minimums, s, *acc);
                    }
                }
            }
            acc.map(|acc| {
                let mut out = [0f32; PANEL_ROWS];
                _mm256_storeu_ps(out.as_mut_ptr(), acc);
                out
            })
        }

        /// Panel `panel` (whole panel blocks of `format`, as many as `x` has per row)
        /// times activation rows `first..first + R` of `x`.
        ///
        /// # Safety
        /// The CPU must have the features named above; `panel` holds `x.cols / 32` panel
        /// blocks and `x` at least `first + R` rows.
        #[target_feature(enable = $features)]
        pub unsafe fn $name<const R: usize>(
            format: Format,
            panel: &[u8],
            x: &QuantizedActivations,
            first: usize,
        ) -> [[f32; PANEL_ROWS]; R] {
            by_format!(format, $body<R>(panel, x, first))
        }
    };
}

panel_product!(
    panel_product_avx2,
    panel_avx2,
    "avx2,fma,f16c",
    block_dots_avx2
);
panel_product!(
    panel_product_vnni,
    panel_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    block_dots_vnni
);

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

/// The eight rows' GGUF blocks `blocks` of a full panel as one panel block (`panels`'
/// layout) in `out`: the scales gathered, and the weights' 32-bit words transposed, eight
/// by eight for Q8_0 (with its bias) and four by eight for the 4-bit formats (after
/// regrouping each row's nibbles).
/// Safety: the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_panel_block<const SIZE: usize, const PANEL: usize>(
    format: Format,
    blocks: [&[u8; SIZE]; PANEL_ROWS],
    out: &mut [u8; PANEL],
) {
    debug_assert_eq!(
        (SIZE, PANEL),
        (format.block_bytes(), panel_block_bytes(format))
    );
    for (r, block) in blocks.iter().enumerate() {
        out[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
        if format == Format::Q4_1 {
            out[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&block[2..4]);
        }
    }
    let weights = out[scale_bytes(format)..].as_mut_ptr().cast::<__m256i>();
    match format {
        Format::Q8_0 => {
            // Row r's words v = 0..8 in vector r; after the transpose vector v holds word v
            // of rows 0..8.
            let rows = blocks.map(|block| _mm256_loadu_si256(block[2..].as_ptr().cast()));
            let bias = _mm256_set1_epi8(crate::panels::Q8_0_BIAS as i8);
            for (v, vector) in transpose_8x8(rows).into_iter().enumerate() {
                _mm256_storeu_si256(weights.add(v), _mm256_xor_si256(vector, bias));
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
            // Rows r and r + 4 in the two halves of vector r; each row's four nibble words
            // a, b, c, e become the panel's words p0..p3 (see `panels::pack_block`):
            // p0 = a.lo | b.lo << 4, p1 = c.lo | e.lo << 4, p2 = a.hi | b.hi << 4,
            // p3 = c.hi | e.hi << 4, where .lo and .hi are each byte's low and high nibble.
            let nibbles = |r: usize| _mm_loadu_si128(blocks[r][SIZE - BLOCK / 2..].as_ptr().cast());
            let low = _mm256_set1_epi8(0x0F);
            let rows: [__m256i; 4] = std::array::from_fn(|r| {
                let x = _mm256_set_m128i(nibbles(r + 4), nibbles(r));
                let lo = _mm256_castsi256_ps(_mm256_and_si256(x, low));
                let hi = _mm256_castsi256_ps(_mm256_and_si256(_mm256_srli_epi16(x, 4), low));
                // [a.lo, c.lo, a.hi, c.hi] and [b.lo, e.lo, b.hi, e.hi] in each half.
                let even = _mm256_castps_si256(_mm256_shuffle_ps(lo, hi, 0x88));
                let odd = _mm256_castps_si256(_mm256_shuffle_ps(lo, hi, 0xDD));
                _mm256_or_si256(even, _mm256_slli_epi32(odd, 4))
            });
            // Words p0 of rows 0, 1 (and 4, 5), then p1 of them; p2 and p3; likewise for
            // rows 2, 3 (and 6, 7).
            let t0 = _mm256_unpacklo_epi32(rows[0], rows[1]);
            let t1 = _mm256_unpackhi_epi32(rows[0], rows[1]);
            let t2 = _mm256_unpacklo_epi32(rows[2], rows[3]);
            let t3 = _mm256_unpackhi_epi32(rows[2], rows[3]);
            // Halves hold rows 0..4 and 4..8: exactly a panel vector's order.
            let vectors = [
                _mm256_unpacklo_epi64(t0, t2),
                _mm256_unpackhi_epi64(t0, t2),
                _mm256_unpacklo_epi64(t1, t3),
                _mm256_unpackhi_epi64(t1, t3),
            ];
            for (v, vector) in vectors.into_iter().enumerate() {
                _mm256_storeu_si256(weights.add(v), vector);
            }
        }
    }
}

/// Vector `v` of the result holds 32-bit word `v` of each of `rows`, in order.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose_8x8(rows: [__m256i; 8]) -> [__m256i; 8] {
    let pairs: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (
            rows[i / 4 * 4 + i % 4 / 2 * 2],
            rows[i / 4 * 4 + i % 4 / 2 * 2 + 1],
        );
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // pairs: rows (0,1) lo, hi; rows (2,3) lo, hi; rows (4,5) ...; (6,7) ...
    let quads = |p: usize| {
        let (lo, hi) = (pairs[p], pairs[p + 1]);
        let (lo2, hi2) = (pairs[p + 2], pairs[p + 3]);
        [
            _mm256_unpacklo_epi64(lo, lo2),
            _mm256_unpackhi_epi64(lo, lo2),
            _mm256_unpacklo_epi64(hi, hi2),
            _mm256_unpackhi_epi64(hi, hi2),
        ]
    };
    // Words 0..4 (low halves: 0..4, high halves: 4..8) of rows 0..4, then of rows 4..8.
    let (first, second) = (quads(0), quads(4));
    std::array::from_fn(|v| {
        let (a, b) = (first[v % 4], second[v % 4]);
        if v < 4 {
            _mm256_permute2x128_si256(a, b, 0x20)
        } else {
            _mm256_permute2x128_si256(a, b, 0x31)
        }
    })
}

/// One Q8_0 weight row, as the GGUF file stores it (whole 34-byte blocks, as many as
/// `x` has per row), times activation row `x`. The weights' magnitudes (unsigned, 128 at
/// most) multiply the activations with the weights' signs (127 at most in magnitude), so
/// that a pair of products fits `maddubs`' 16 bits.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `x.q.len() / 32` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn row_dot_q8_0(w: &[u8], x: crate::ActivationRow) -> f32 {
    debug_assert_eq!(w.len() / Format::Q8_0.block_bytes() * BLOCK, x.q.len());
    let mut acc = _mm256_setzero_ps();
    let ones = _mm256_set1_epi16(1);
    for (b, block) in w.chunks_exact(Format::Q8_0.block_bytes()).enumerate() {
        let weights = _mm256_loadu_si256(block[2..].as_ptr().cast());
        let values = _mm256_loadu_si256(x.q[b * BLOCK..].as_ptr().cast());
        let pairs = _mm256_maddubs_epi16(
            _mm256_sign_epi8(weights, weights),
            _mm256_sign_epi8(values, weights),
        );
        let dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32() * x.d[b];
        acc = _mm256_fmadd_ps(dots, _mm256_set1_ps(scale), acc);
    }
    let quad = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
}
