//! NEON kernels (aarch64) over the panel layout (`panels`): each weight vector's halves
//! (four rows each) times four activation bytes in every lane, widened to 16 bits and
//! pairwise added to 32, four rows per vector of sums, then one FMA per block. Safety:
//! NEON is part of every aarch64 CPU; callers check it at run time all the same
//! ([`crate::Kernel::Neon`]).

use std::arch::aarch64::*;

use half::f16;

use crate::panels::{panel_block_bytes, scale_bytes, PANEL_ROWS};
use crate::scalar::integer_offset;
use crate::{Format, QuantizedActivations, BLOCK};

/// Sums of `w * x` over the block, for rows 0..4 and 4..8 of the panel: `w[j]` holds
/// weights `4j..4j + 4` of rows `4h..4h + 4` in half `h`, as signed bytes.
#[target_feature(enable = "neon")]
unsafe fn block_dots(w: &[[int8x16_t; 2]; 8], x: *const i8) -> [int32x4_t; 2] {
    std::array::from_fn(|h| {
        // Rows 4h, 4h + 1 in `low`, rows 4h + 2, 4h + 3 in `high`, as pairs.
        let (mut low, mut high) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for (j, w) in w.iter().enumerate() {
            let x =
                vreinterpretq_s8_s32(vdupq_n_s32((x.add(4 * j) as *const i32).read_unaligned()));
            low = vpadalq_s16(low, vmull_s8(vget_low_s8(w[h]), vget_low_s8(x)));
            high = vpadalq_s16(high, vmull_high_s8(w[h], x));
        }
        vpaddq_s32(low, high)
    })
}

/// Eight f16 values at `p` as two vectors of four.
fn halves(p: &[u8]) -> [float32x4_t; 2] {
    let values: [f32; PANEL_ROWS] =
        std::array::from_fn(|r| f16::from_le_bytes([p[2 * r], p[2 * r + 1]]).to_f32());
    // SAFETY: `values` holds eight floats.
    unsafe {
        [
            vld1q_f32(values.as_ptr()),
            vld1q_f32(values.as_ptr().add(4)),
        ]
    }
}

/// Panel `panel` (whole panel blocks of `format`, as many as `x` has per row) times
/// activation rows `first..first + R` of `x`: eight values per activation row.
///
/// # Safety
/// The CPU must have NEON; `panel` holds `x.cols / 32` panel blocks and `x` at least
/// `first + R` rows.
#[target_feature(enable = "neon")]
pub unsafe fn panel_product<const R: usize>(
    format: Format,
    panel: &[u8],
    x: &QuantizedActivations,
    first: usize,
) -> [[f32; PANEL_ROWS]; R] {
    let rows: [_; R] = std::array::from_fn(|r| x.row(first + r));
    let mut acc = [[vdupq_n_f32(0.0); 2]; R];
    for (b, block) in panel.chunks_exact(panel_block_bytes(format)).enumerate() {
        let dw = halves(block);
        let minimums = (format == Format::Q4_1).then(|| halves(&block[16..]));
        let p = block.as_ptr().add(scale_bytes(format));
        let mut w = [[vdupq_n_s8(0); 2]; 8];
        match format {
            Format::Q8_0 => {
                let bias = vdupq_n_u8(crate::panels::Q8_0_BIAS);
                for (j, w) in w.iter_mut().enumerate() {
                    for (h, w) in w.iter_mut().enumerate() {
                        *w = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(32 * j + 16 * h)), bias));
                    }
                }
            }
            Format::Q4_0 | Format::Q4_1 => {
                for v in 0..4 {
                    for h in 0..2 {
                        let raw = vld1q_u8(p.add(32 * v + 16 * h));
                        w[2 * v][h] = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0F)));
                        w[2 * v + 1][h] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
                    }
                }
            }
        }
        // Q8_0's bytes were made signed above, so only Q4_0's offset is left to take.
        let offset = match format {
            Format::Q8_0 => 0,
            _ => integer_offset(format),
        };
        for (acc, row) in acc.iter_mut().zip(&rows) {
            let dots = block_dots(&w, row.q.as_ptr().add(b * BLOCK));
            let correction = vdupq_n_s32(offset * row.sums[b]);
            for h in 0..2 {
                let dots = vcvtq_f32_s32(vsubq_s32(dots[h], correction));
                acc[h] = vfmaq_f32(acc[h], dots, vmulq_n_f32(dw[h], row.d[b]));
                if let Some(minimums) = minimums {
                    acc[h] = vfmaq_n_f32(acc[h], minimums[h], row.s[b]);
                }
            }
        }
    }
    acc.map(|[low, high]| {
        let mut out = [0f32; PANEL_ROWS];
        vst1q_f32(out.as_mut_ptr(), low);
        vst1q_f32(out.as_mut_ptr().add(4), high);
        out
    })
}

/// One Q8_0 weight row, as the GGUF file stores it (whole 34-byte blocks, as many as
/// `x` has per row), times activation row `x`: products widened to 16 bits (a pair of
/// them fits), pairwise added to 32.
///
/// # Safety
/// The CPU must have NEON; `w` holds `x.q.len() / 32` blocks.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn row_dot_q8_0(w: &[u8], x: crate::ActivationRow) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for (b, block) in w.chunks_exact(Format::Q8_0.block_bytes()).enumerate() {
        let mut sums = vdupq_n_s32(0);
        for h in 0..2 {
            let weights = vld1q_s8(block[2 + 16 * h..].as_ptr().cast());
            let values = vld1q_s8(x.q[b * BLOCK + 16 * h..].as_ptr());
            let pairs = vmull_s8(vget_low_s8(weights), vget_low_s8(values));
            sums = vpadalq_s16(sums, vmlal_high_s8(pairs, weights, values));
        }
        let scale = f16::from_le_bytes([block[0], block[1]]).to_f32() * x.d[b];
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(sums), scale);
    }
    vaddvq_f32(acc)
}
