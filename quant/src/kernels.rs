//! Which kernel runs: the best the CPU has, detected once, or one named for tests and
//! benchmarks.

use crate::{scalar, Format, QuantizedActivations};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// aarch64 NEON.
    Neon,
}

/// A kernel the CPU can run (only [`KernelChoice::new`] makes one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelChoice(Kernel);

impl KernelChoice {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        Self::available()
            .last()
            .copied()
            .unwrap_or(Self(Kernel::Scalar))
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Self> {
        [Kernel::Scalar, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .filter_map(Self::new)
            .collect()
    }

    /// `kernel`, if this CPU runs it.
    pub fn new(kernel: Kernel) -> Option<Self> {
        let runs = match kernel {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(not(target_arch = "aarch64"))]
            Kernel::Neon => false,
        };
        runs.then_some(Self(kernel))
    }

    pub fn kernel(self) -> Kernel {
        self.0
    }

    /// One weight row (whole blocks of `format`) times row `row` of `x`.
    pub fn dot(self, format: Format, w: &[u8], x: &QuantizedActivations, row: usize) -> f32 {
        let (q, d, s) = x.row(row);
        assert_eq!(
            w.len() / format.block_bytes() * crate::BLOCK,
            q.len(),
            "weight row and activation row differ in length"
        );
        match self.0 {
            Kernel::Scalar => scalar::dot(format, w, q, d, s),
            // SAFETY: `new` checked the CPU features; lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { crate::x86::dot(format, w, q, d, s) },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => unreachable!("no AVX2 kernel off x86-64"),
            // SAFETY: as above.
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { crate::arm::dot(format, w, q, d, s) },
            #[cfg(not(target_arch = "aarch64"))]
            Kernel::Neon => unreachable!("no NEON kernel off aarch64"),
        }
    }

    /// Consecutive weight rows (`w`, whole rows of `x`'s length) times row `row` of `x`,
    /// into `out`, one value per weight row: one call per band, not per row (a row of a
    /// small model is a few dozen blocks, so the call costs show).
    pub fn dot_band(
        self,
        format: Format,
        w: &[u8],
        x: &QuantizedActivations,
        row: usize,
        out: &mut [f32],
    ) {
        let (q, d, s) = x.row(row);
        let row_bytes = q.len() / crate::BLOCK * format.block_bytes();
        assert_eq!(
            w.len(),
            out.len() * row_bytes,
            "the band is whole rows, one per output"
        );
        match self.0 {
            // SAFETY: `new` checked the CPU features; lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { crate::x86::dot_band(format, w, row_bytes, q, d, s, out) },
            _ => {
                for (w, out) in w.chunks_exact(row_bytes).zip(out) {
                    *out = self.dot(format, w, x, row);
                }
            }
        }
    }

    /// Weight rows `w` (`N` of them) times activation rows `first..first + 4` of `x`.
    pub fn dot_tile<const N: usize>(
        self,
        format: Format,
        w: [&[u8]; N],
        x: &QuantizedActivations,
        first: usize,
    ) -> [[f32; 4]; N] {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                let rows: [_; 4] = std::array::from_fn(|r| x.row(first + r));
                let cols = rows[0].0.len();
                for w in &w {
                    assert_eq!(
                        w.len() / format.block_bytes() * crate::BLOCK,
                        cols,
                        "weight row and activation row differ in length"
                    );
                }
                // SAFETY: `new` checked the CPU features; lengths were checked above (the
                // activation rows all have `cols` values).
                unsafe {
                    crate::x86::dot_tile(
                        format,
                        w,
                        rows.map(|r| r.0),
                        rows.map(|r| r.1),
                        rows.map(|r| r.2),
                    )
                }
            }
            _ => w.map(|w| std::array::from_fn(|r| self.dot(format, w, x, first + r))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{scalar, Pool, QuantMatrix, BLOCK};
    use proptest::prelude::*;

    /// Random well-formed blocks of `format`: scales (and minimums) as f16 in +-0.25.
    fn blocks(format: Format, count: usize) -> impl Strategy<Value = Vec<u8>> {
        let scales = proptest::collection::vec(-0.25f32..0.25, count * 2);
        let bytes = proptest::collection::vec(any::<u8>(), count * format.block_bytes());
        (scales, bytes).prop_map(move |(scales, mut bytes)| {
            let size = format.block_bytes();
            for (b, block) in bytes.chunks_exact_mut(size).enumerate() {
                block[..2].copy_from_slice(&half::f16::from_f32(scales[2 * b]).to_le_bytes());
                if format == Format::Q4_1 {
                    block[2..4]
                        .copy_from_slice(&half::f16::from_f32(scales[2 * b + 1]).to_le_bytes());
                }
            }
            bytes
        })
    }

    fn case() -> impl Strategy<Value = (Format, Vec<u8>, Vec<f32>)> {
        (prop::sample::select(Format::ALL.to_vec()), 1usize..12).prop_flat_map(|(format, n)| {
            (
                Just(format),
                blocks(format, n),
                proptest::collection::vec(-4.0f32..4.0, n * BLOCK),
            )
        })
    }

    proptest! {
        /// Every kernel this CPU runs gives the scalar kernel's result: the same integer
        /// sums, so only the order of the float additions differs (relative 1e-5 of the
        /// sum of the terms' magnitudes).
        #[test]
        fn every_kernel_equals_the_scalar_reference((format, w, x) in case()) {
            let acts = QuantizedActivations::quantize(KernelChoice::detect(), &x, 1, x.len());
            let (q, d, s) = acts.row(0);
            let reference = scalar::dot(format, &w, q, d, s);
            let mut dequantized = vec![0f32; x.len()];
            scalar::dequantize(format, &w, &mut dequantized);
            let magnitude: f32 = dequantized.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
            for kernel in KernelChoice::available() {
                let got = kernel.dot(format, &w, &acts, 0);
                prop_assert!(
                    (got - reference).abs() <= 1e-5 * magnitude + 1e-6,
                    "{:?} {format:?}: {got} against {reference}", kernel.kernel()
                );
            }
        }

        /// The scalar kernel is the f32 dot product of the dequantized weights, up to the
        /// rounding of the activations (at most half a step of each block's scale).
        #[test]
        fn the_scalar_kernel_is_the_dequantized_dot_product((format, w, x) in case()) {
            let acts = QuantizedActivations::quantize(KernelChoice::detect(), &x, 1, x.len());
            let (q, d, s) = acts.row(0);
            let got = scalar::dot(format, &w, q, d, s);
            let mut dequantized = vec![0f32; x.len()];
            scalar::dequantize(format, &w, &mut dequantized);
            let exact: f32 = dequantized.iter().zip(&x).map(|(w, x)| w * x).sum();
            let rounding: f32 = dequantized
                .chunks(BLOCK)
                .zip(d)
                .map(|(w, d)| w.iter().map(|w| w.abs()).sum::<f32>() * d / 2.0)
                .sum();
            let magnitude: f32 = dequantized.iter().zip(&x).map(|(w, x)| (w * x).abs()).sum();
            prop_assert!(
                (got - exact).abs() <= rounding * 1.001 + 1e-5 * magnitude + 1e-6,
                "{format:?}: {got} against {exact} (rounding bound {rounding})"
            );
        }
    }

    #[test]
    fn a_product_on_several_threads_equals_one_on_one() {
        let (rows, cols, m) = (301, 256, 5);
        for format in Format::ALL {
            let mut data = Vec::new();
            let mut state = 7u32;
            for _ in 0..rows * cols / BLOCK {
                let mut block = vec![0u8; format.block_bytes()];
                for byte in block.iter_mut() {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    *byte = (state >> 24) as u8;
                }
                block[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                if format == Format::Q4_1 {
                    block[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
                }
                data.extend(block);
            }
            let matrix = QuantMatrix::new(format, rows, cols, data).unwrap();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let acts = QuantizedActivations::quantize(KernelChoice::detect(), &x, m, cols);
            let kernel = KernelChoice::detect();
            let mut one = vec![0f32; m * rows];
            matrix.matmul(kernel, &acts, &mut one, &Pool::new(1));
            let mut several = vec![0f32; m * rows];
            matrix.matmul(kernel, &acts, &mut several, &Pool::new(3));
            assert!(one == several, "{format:?}: the bands differ");
            assert!(one.iter().all(|v| v.is_finite()));
            let single = kernel.dot(format, matrix.row(7), &acts, 2);
            assert!((one[2 * rows + 7] - single).abs() <= 1e-4 * (1.0 + single.abs()));
        }
    }

    proptest! {
        /// A tile of weight rows by four activation rows gives what single dot products give.
        #[test]
        fn four_rows_at_once_equal_one_at_a_time(
            (format, w, x) in case(),
            rows in proptest::collection::vec(-4.0f32..4.0, 4 * 11 * BLOCK),
        ) {
            let cols = x.len();
            let acts = QuantizedActivations::quantize(KernelChoice::detect(), &rows[..4 * cols], 4, cols);
            for kernel in KernelChoice::available() {
                // The same weight row twice, and once alone.
                let pair = kernel.dot_tile(format, [&w[..], &w[..]], &acts, 0);
                let [single] = kernel.dot_tile(format, [&w[..]], &acts, 0);
                prop_assert_eq!(pair[0], single);
                prop_assert_eq!(pair[1], single);
                for (r, got) in single.iter().enumerate() {
                    let one = kernel.dot(format, &w, &acts, r);
                    prop_assert!((got - one).abs() <= 1e-4 * (1.0 + one.abs()), "{got} against {one}");
                }
            }
        }
    }

    #[test]
    fn the_simd_kernel_of_the_architecture_is_found() {
        // NEON is part of every aarch64 CPU, so there the property tests above always
        // cover it (under qemu-user too); on x86-64 AVX2 depends on the CPU.
        #[cfg(target_arch = "aarch64")]
        assert_eq!(KernelChoice::detect().kernel(), Kernel::Neon);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_eq!(KernelChoice::detect().kernel(), Kernel::Avx2);
        }
    }

    #[test]
    fn a_band_of_rows_equals_its_rows_one_by_one() {
        let (rows, cols) = (9, 96);
        for format in Format::ALL {
            let w: Vec<u8> = (0..rows * cols / BLOCK * format.block_bytes())
                .map(|i| {
                    if i % format.block_bytes() < 4 {
                        0x20
                    } else {
                        (i * 73 % 251) as u8
                    }
                })
                .collect();
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            for kernel in KernelChoice::available() {
                let acts = QuantizedActivations::quantize(kernel, &x, 1, cols);
                let mut band = vec![0f32; rows];
                kernel.dot_band(format, &w, &acts, 0, &mut band);
                let row_bytes = w.len() / rows;
                for (n, got) in band.iter().enumerate() {
                    let one = kernel.dot(format, &w[n * row_bytes..(n + 1) * row_bytes], &acts, 0);
                    assert_eq!(*got, one, "{format:?} {:?} row {n}", kernel.kernel());
                }
            }
        }
    }

    #[test]
    fn matrices_of_the_wrong_size_are_refused() {
        assert_eq!(
            QuantMatrix::new(Format::Q4_0, 2, 48, vec![0; 36]).unwrap_err(),
            crate::QuantError::PartialBlock { cols: 48 }
        );
        assert!(matches!(
            QuantMatrix::new(Format::Q8_0, 2, 64, vec![0; 135]),
            Err(crate::QuantError::WrongSize {
                expected: 136,
                got: 135,
                ..
            })
        ));
    }
}
