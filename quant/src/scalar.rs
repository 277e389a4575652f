//! The scalar kernels: the reference every SIMD path is tested against, and the path for
//! CPUs without one.

use half::f16;

use crate::{Format, BLOCK};

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

/// One weight row (whole blocks of `format`) times one quantized activation row.
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
