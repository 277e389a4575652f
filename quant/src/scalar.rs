//! The scalar kernels: the reference every kernel is tested against (on GGUF rows), and
//! the panel and row products for CPUs without SIMD.

use half::f16;

use crate::panels::{panel_block_bytes, scale_bytes, weight_at, PANEL_ROWS};
use crate::{ActivationRow, Format, BLOCK};

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The integer dot product of one block of 4-bit weights (16 bytes of nibbles) with 32
/// activation values.
fn nibble_dot(nibbles: &[u8], q: &[i8]) -> i32 {
    let mut sum = 0i32;
    for j in 0..BLOCK / 2 {
        sum += i32::from(nibbles[j] & 0x0F) * i32::from(q[j]);
        sum += i32::from(nibbles[j] >> 4) * i32::from(q[j + BLOCK / 2]);
    }
    sum
}

/// One weight row (whole blocks of `format`, as GGUF stores them) times one quantized
/// activation row: the reference every product is tested against, and the row product
/// for CPUs without SIMD.
pub fn dot(format: Format, w: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let size = format.block_bytes();
    let mut total = 0f32;
    for (b, block) in w.chunks_exact(size).enumerate() {
        let q = &q[b * BLOCK..(b + 1) * BLOCK];
        let dw = half_at(block, 0);
        total += match format {
            Format::Q4_0 => dw * (d[b] * nibble_dot(&block[2..], q) as f32) - 8.0 * dw * s[b],
            Format::Q4_1 => {
                dw * (d[b] * nibble_dot(&block[4..], q) as f32) + half_at(block, 2) * s[b]
            }
            Format::Q8_0 => {
                let sum: i32 = block[2..]
                    .iter()
                    .zip(q)
                    .map(|(w, x)| i32::from(*w as i8) * i32::from(*x))
                    .sum();
                dw * (d[b] * sum as f32)
            }
        };
    }
    total
}

/// The f32 values of one row of whole blocks.
pub fn dequantize(format: Format, w: &[u8], out: &mut [f32]) {
    let size = format.block_bytes();
    for (block, out) in w.chunks_exact(size).zip(out.chunks_exact_mut(BLOCK)) {
        let dw = half_at(block, 0);
        match format {
            Format::Q4_0 => {
                for j in 0..BLOCK / 2 {
                    out[j] = f32::from(i16::from(block[2 + j] & 0x0F) - 8) * dw;
                    out[j + BLOCK / 2] = f32::from(i16::from(block[2 + j] >> 4) - 8) * dw;
                }
            }
            Format::Q4_1 => {
                let m = half_at(block, 2);
                for j in 0..BLOCK / 2 {
                    out[j] = f32::from(block[4 + j] & 0x0F) * dw + m;
                    out[j + BLOCK / 2] = f32::from(block[4 + j] >> 4) * dw + m;
                }
            }
            Format::Q8_0 => {
                for (o, w) in out.iter_mut().zip(&block[2..]) {
                    *o = f32::from(*w as i8) * dw;
                }
            }
        }
    }
}

/// What the products subtract from a block's integer dot product: the weights' offset
/// for Q4_0 (`q - 8`) and the bias of Q8_0's stored bytes, each times the sum of the
/// activation bytes. Q4_1's offset is a float (`m`), added apart.
pub(crate) const fn integer_offset(format: Format) -> i32 {
    match format {
        Format::Q4_0 => 8,
        Format::Q4_1 => 0,
        Format::Q8_0 => crate::panels::Q8_0_BIAS as i32,
    }
}

/// A panel (whole panel blocks of `format`) times one activation row: the values of the
/// panel's eight rows, from the same integer sums as the SIMD kernels.
pub(crate) fn panel_product(format: Format, panel: &[u8], x: ActivationRow) -> [f32; PANEL_ROWS] {
    let mut out = [0f32; PANEL_ROWS];
    for (b, block) in panel.chunks_exact(panel_block_bytes(format)).enumerate() {
        let weights = &block[scale_bytes(format)..];
        let q = &x.q[b * BLOCK..(b + 1) * BLOCK];
        for (r, out) in out.iter_mut().enumerate() {
            let mut dot = 0i32;
            for (i, q) in q.iter().enumerate() {
                let (at, high) = weight_at(format, r, i);
                let w = match (format, high) {
                    (Format::Q8_0, _) => weights[at],
                    (_, true) => weights[at] >> 4,
                    (_, false) => weights[at] & 0x0F,
                };
                dot += i32::from(w) * i32::from(*q);
            }
            dot -= integer_offset(format) * x.sums[b];
            *out += dot as f32 * (half_at(block, 2 * r) * x.d[b]);
            if format == Format::Q4_1 {
                *out += half_at(block, 16 + 2 * r) * x.s[b];
            }
        }
    }
    out
}
