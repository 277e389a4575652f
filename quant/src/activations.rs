//! Activations quantized to 8 bits per 32-element block (scale `d = max|x| / 127`), with
//! each block's scale, the sum of its bytes and `d * sum(q)` kept beside it for the
//! formats with an offset.

use crate::{Kernel, KernelChoice, BLOCK};

/// One row or several rows of activations, quantized block by block.
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    /// Signed 8-bit values, `rows * cols` of them.
    pub(crate) q: Vec<i8>,
    /// Per block: the scale `d`.
    pub(crate) d: Vec<f32>,
    /// Per block: `d * sum(q)`, what an offset in the weights multiplies.
    pub(crate) s: Vec<f32>,
    /// Per block: `sum(q)`, what a bias in the stored weights adds to their products.
    pub(crate) sums: Vec<i32>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl QuantizedActivations {
    /// Quantizes `rows` rows of `cols` values each (`cols` a multiple of 32) with
    /// `kernel`'s code (every kernel gives the same bytes), reusing this value's buffers.
    pub fn quantize_into(&mut self, kernel: KernelChoice, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "activations are rows * cols values");
        assert_eq!(cols % BLOCK, 0, "columns are whole blocks");
        let blocks = x.len() / BLOCK;
        self.q.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.sums.resize(blocks, 0);
        self.rows = rows;
        self.cols = cols;
        for (b, chunk) in x.chunks_exact(BLOCK).enumerate() {
            let out = &mut self.q[b * BLOCK..(b + 1) * BLOCK];
            let (d, sum) = match kernel.kernel() {
                // SAFETY: `KernelChoice` checked the CPU features; both hold 32 values.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 | Kernel::Avx512Vnni => unsafe {
                    crate::x86::quantize_block(chunk, out)
                },
                _ => quantize_block(chunk, out),
            };
            self.d[b] = d;
            self.s[b] = d * sum as f32;
            self.sums[b] = sum;
        }
    }

    pub fn quantize(kernel: KernelChoice, x: &[f32], rows: usize, cols: usize) -> Self {
        let mut out = Self::default();
        out.quantize_into(kernel, x, rows, cols);
        out
    }

    /// Row `r`: its values, scales, offset terms and sums.
    pub(crate) fn row(&self, r: usize) -> ActivationRow<'_> {
        let blocks = self.cols / BLOCK;
        ActivationRow {
            q: &self.q[r * self.cols..(r + 1) * self.cols],
            d: &self.d[r * blocks..(r + 1) * blocks],
            s: &self.s[r * blocks..(r + 1) * blocks],
            sums: &self.sums[r * blocks..(r + 1) * blocks],
        }
    }
}

/// One row of [`QuantizedActivations`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ActivationRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sums: &'a [i32],
}

/// Quantizes 32 values to signed bytes with scale `max|x| / 127`, rounding to nearest
/// with ties to even (as the SIMD conversions do); returns the scale and the bytes' sum.
fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max / 127.0;
    let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut sum = 0i32;
    for (q, v) in out.iter_mut().zip(x) {
        *q = (v * inverse).round_ties_even() as i8;
        sum += i32::from(*q);
    }
    (d, sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every kernel's quantization gives the scalar one's bytes, scales and sums.
        #[test]
        fn every_kernel_quantizes_alike(
            x in proptest::collection::vec(-100.0f32..100.0, 3 * BLOCK),
            zero_block in any::<bool>(),
        ) {
            let mut x = x;
            if zero_block {
                x[BLOCK..2 * BLOCK].fill(0.0);
            }
            let scalar = KernelChoice::new(Kernel::Scalar).unwrap();
            let reference = QuantizedActivations::quantize(scalar, &x, 1, x.len());
            for kernel in KernelChoice::available() {
                let got = QuantizedActivations::quantize(kernel, &x, 1, x.len());
                prop_assert_eq!(&got.q, &reference.q);
                prop_assert_eq!(&got.d, &reference.d);
                prop_assert_eq!(&got.s, &reference.s);
                prop_assert_eq!(&got.sums, &reference.sums);
            }
        }
    }
}
