//! NEON kernels (aarch64): 16 weights against 16 activation bytes per widening multiply,
//! pairwise-added to 32-bit, one FMA per block into four lanes. Safety: NEON is part of
//! every aarch64 CPU; callers check it at run time all the same ([`crate::Kernel::Neon`]).

use std::arch::aarch64::*;

use half::f16;

use crate::{Format, BLOCK};

fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Four 32-bit lanes of `sum(w * x)` over 2 x 16 signed bytes.
#[target_feature(enable = "neon")]
unsafe fn block_dot(w: [int8x16_t; 2], x: [int8x16_t; 2]) -> int32x4_t {
    let mut sum = vdupq_n_s32(0);
    for half in 0..2 {
        let low = vmull_s8(vget_low_s8(w[half]), vget_low_s8(x[half]));
        let high = vmull_high_s8(w[half], x[half]);
        sum = vaddq_s32(sum, vaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high)));
    }
    sum
}

/// One weight row times one quantized activation row (see `scalar::dot`).
///
/// # Safety
/// The CPU must have NEON; `w` holds whole blocks of `format` and `q`, `d`, `s` the
/// matching activation blocks.
#[target_feature(enable = "neon")]
pub unsafe fn dot(format: Format, w: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let size = format.block_bytes();
    let mut acc = vdupq_n_f32(0.0);
    let mut offsets = 0f32;
    for (b, block) in w.chunks_exact(size).enumerate() {
        let x = q.as_ptr().add(b * BLOCK);
        let x = [vld1q_s8(x), vld1q_s8(x.add(BLOCK / 2))];
        let dw = half_at(block, 0);
        let weights = match format {
            Format::Q4_0 | Format::Q4_1 => {
                let nibbles = match format {
                    Format::Q4_0 => {
                        offsets -= 8.0 * dw * s[b];
                        vld1q_u8(block.as_ptr().add(2))
                    }
                    _ => {
                        offsets += half_at(block, 2) * s[b];
                        vld1q_u8(block.as_ptr().add(4))
                    }
                };
                [
                    vreinterpretq_s8_u8(vandq_u8(nibbles, vdupq_n_u8(0x0F))),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(nibbles)),
                ]
            }
            Format::Q8_0 => {
                let p = block.as_ptr().add(2) as *const i8;
                [vld1q_s8(p), vld1q_s8(p.add(BLOCK / 2))]
            }
        };
        let lanes = vcvtq_f32_s32(block_dot(weights, x));
        acc = vfmaq_f32(acc, lanes, vdupq_n_f32(dw * d[b]));
    }
    vaddvq_f32(acc) + offsets
}
