//! Which kernel runs: the best the CPU has, detected once, or one named for tests and
//! benchmarks.

use crate::panels::{panel_block_bytes, PANEL_ROWS};
use crate::{scalar, Format, QuantizedActivations, BLOCK};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX2, FMA, F16C and AVX-512 VNNI (with AVX-512 VL, for 256-bit
    /// vectors).
    Avx512Vnni,
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
        [
            Kernel::Scalar,
            Kernel::Avx2,
            Kernel::Avx512Vnni,
            Kernel::Neon,
        ]
        .into_iter()
        .filter_map(Self::new)
        .collect()
    }

    /// `kernel`, if this CPU runs it.
    pub fn new(kernel: Kernel) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let runs = match kernel {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                avx2 && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Avx512Vnni => false,
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

    /// A panel of packed weights (whole panel blocks of `format`, `panels` layout) times
    /// activation rows `first..first + R` of `x`: the panel's eight row values for each.
    pub(crate) fn panel_product<const R: usize>(
        self,
        format: Format,
        panel: &[u8],
        x: &QuantizedActivations,
        first: usize,
    ) -> [[f32; PANEL_ROWS]; R] {
        assert_eq!(
            panel.len(),
            x.cols / BLOCK * panel_block_bytes(format),
            "the panel's blocks and the activation rows differ in length"
        );
        assert!(first + R <= x.rows, "activation rows out of range");
        match self.0 {
            Kernel::Scalar => {
                std::array::from_fn(|r| scalar::panel_product(format, panel, x.row(first + r)))
            }
            // SAFETY (all three): `new` checked the CPU features; the lengths and rows
            // were checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { crate::x86::panel_product_avx2(format, panel, x, first) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe {
                crate::x86::panel_product_vnni(format, panel, x, first)
            },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Avx512Vnni => unreachable!("no x86 kernels off x86-64"),
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { crate::arm::panel_product(format, panel, x, first) },
            #[cfg(not(target_arch = "aarch64"))]
            Kernel::Neon => unreachable!("no NEON kernel off aarch64"),
        }
    }

    /// One weight row as the GGUF file stores it (whole blocks of `format`) times
    /// activation row `m` of `x`: SIMD for Q8_0, the matrices read in place; the scalar
    /// reference otherwise.
    pub(crate) fn row_dot(
        self,
        format: Format,
        w: &[u8],
        x: &QuantizedActivations,
        m: usize,
    ) -> f32 {
        assert_eq!(
            w.len(),
            x.cols / BLOCK * format.block_bytes(),
            "the weight row and the activation rows differ in length"
        );
        let row = x.row(m);
        match (self.0, format) {
            // SAFETY (both): `new` checked the CPU features; the length was checked above.
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2 | Kernel::Avx512Vnni, Format::Q8_0) => unsafe {
                crate::x86::row_dot_q8_0(w, row)
            },
            #[cfg(target_arch = "aarch64")]
            (Kernel::Neon, Format::Q8_0) => unsafe { crate::arm::row_dot_q8_0(w, row) },
            _ => scalar::dot(format, w, row.q, row.d, row.s),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{Pool, QuantError, QuantMatrix};
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

    /// A format, a matrix of 1..20 rows (so panels full and padded) by 1..8 blocks, and
    /// 1..10 activation rows (so four-row tiles and the rows left over).
    #[allow(clippy::type_complexity)]
    fn product() -> impl Strategy<Value = (Format, usize, usize, Vec<u8>, Vec<f32>)> {
        (
            prop::sample::select(Format::ALL.to_vec()),
            1usize..20,
            1usize..8,
            1usize..10,
        )
            .prop_flat_map(|(format, rows, blocks, m)| {
                (
                    Just(format),
                    Just(rows),
                    Just(m),
                    self::blocks(format, rows * blocks),
                    proptest::collection::vec(-4.0f32..4.0, m * blocks * BLOCK),
                )
            })
    }

    proptest! {
        /// Every kernel this CPU runs gives the scalar reference's `dot` for every weight
        /// row and activation row: the same integer sums, so only the order and grouping
        /// of the float operations differ (relative 1e-5 of the sum of the terms'
        /// magnitudes).
        #[test]
        fn every_kernel_equals_the_scalar_reference((format, rows, m, w, x) in product()) {
            let cols = x.len() / m;
            let mut matrices = vec![QuantMatrix::new(format, rows, cols, &w, &Pool::new(1)).unwrap()];
            if format == Format::Q8_0 {
                // Q8_0 is also read in place, through the row products.
                matrices.push(QuantMatrix::in_place(format, rows, cols, Arc::new(w.clone())).unwrap());
            }
            let acts = QuantizedActivations::quantize(KernelChoice::detect(), &x, m, cols);
            let row_bytes = w.len() / rows;
            let mut dequantized = vec![0f32; cols];
            for (kernel, matrix) in KernelChoice::available()
                .into_iter()
                .flat_map(|kernel| matrices.iter().map(move |matrix| (kernel, matrix)))
            {
                let mut out = vec![0f32; m * rows];
                matrix.matmul(kernel, &acts, &mut out, &Pool::new(1));
                for n in 0..rows {
                    let weights = &w[n * row_bytes..(n + 1) * row_bytes];
                    scalar::dequantize(format, weights, &mut dequantized);
                    for r in 0..m {
                        let row = acts.row(r);
                        let reference = scalar::dot(format, weights, row.q, row.d, row.s);
                        let magnitude: f32 = dequantized
                            .iter()
                            .zip(&x[r * cols..(r + 1) * cols])
                            .map(|(w, x)| (w * x).abs())
                            .sum();
                        let got = out[r * rows + n];
                        prop_assert!(
                            (got - reference).abs() <= 1e-5 * magnitude + 1e-6,
                            "{:?} {format:?} row {n} x {r}: {got} against {reference}",
                            kernel.kernel()
                        );
                    }
                }
            }
        }

        /// The scalar reference is the f32 dot product of the dequantized weights, up to
        /// the rounding of the activations (at most half a step of each block's scale).
        #[test]
        fn the_scalar_reference_is_the_dequantized_dot_product(
            (format, rows, _m, w, x) in product()
        ) {
            let weights = &w[..w.len() / rows];
            let x = &x[..weights.len() / format.block_bytes() * BLOCK];
            let acts = QuantizedActivations::quantize(KernelChoice::detect(), x, 1, x.len());
            let row = acts.row(0);
            let got = scalar::dot(format, weights, row.q, row.d, row.s);
            let mut dequantized = vec![0f32; x.len()];
            scalar::dequantize(format, weights, &mut dequantized);
            let exact: f32 = dequantized.iter().zip(x).map(|(w, x)| w * x).sum();
            let rounding: f32 = dequantized
                .chunks(BLOCK)
                .zip(row.d)
                .map(|(w, d)| w.iter().map(|w| w.abs()).sum::<f32>() * d / 2.0)
                .sum();
            let magnitude: f32 = dequantized.iter().zip(x).map(|(w, x)| (w * x).abs()).sum();
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
            let matrix = QuantMatrix::new(format, rows, cols, &data, &Pool::new(2)).unwrap();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let kernel = KernelChoice::detect();
            let acts = QuantizedActivations::quantize(kernel, &x, m, cols);
            let mut one = vec![0f32; m * rows];
            matrix.matmul(kernel, &acts, &mut one, &Pool::new(1));
            let mut several = vec![0f32; m * rows];
            matrix.matmul(kernel, &acts, &mut several, &Pool::new(3));
            assert!(one == several, "{format:?}: the bands differ");
            assert!(one.iter().all(|v| v.is_finite() && *v != 0.0));
        }
    }

    #[test]
    fn the_best_simd_kernel_of_the_cpu_is_found() {
        // NEON is part of every aarch64 CPU, so there the property tests above always
        // cover it (under qemu-user too); on x86-64 the kernels depend on the CPU.
        #[cfg(target_arch = "aarch64")]
        assert_eq!(KernelChoice::detect().kernel(), Kernel::Neon);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let vnni =
                is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
            let expected = if vnni {
                Kernel::Avx512Vnni
            } else {
                Kernel::Avx2
            };
            assert_eq!(KernelChoice::detect().kernel(), expected);
        }
    }

    #[test]
    fn matrices_of_the_wrong_size_are_refused() {
        assert_eq!(
            QuantMatrix::new(Format::Q4_0, 2, 48, &[0; 36], &Pool::new(1)).unwrap_err(),
            crate::QuantError::PartialBlock { cols: 48 }
        );
        assert!(matches!(
            QuantMatrix::new(Format::Q8_0, 2, 64, &[0; 135], &Pool::new(1)),
            Err(crate::QuantError::WrongSize {
                expected: 136,
                got: 135,
                ..
            })
        ));
        assert!(matches!(
            QuantMatrix::in_place(Format::Q8_0, 2, 64, Arc::new(vec![0u8; 135])),
            Err(QuantError::WrongSize {
                expected: 136,
                got: 135,
                ..
            })
        ));
        assert_eq!(
            QuantMatrix::in_place(Format::Q4_1, 2, 64, Arc::new(vec![0u8; 80])).unwrap_err(),
            QuantError::NotInPlace {
                format: Format::Q4_1
            }
        );
    }

    #[test]
    fn a_row_dequantizes_from_the_panels_as_from_its_blocks() {
        let (rows, cols) = (11, 64);
        for format in Format::ALL {
            let data: Vec<u8> = (0..rows * cols / BLOCK * format.block_bytes())
                .map(|i| {
                    if i % format.block_bytes() < 4 {
                        0x21
                    } else {
                        (i * 73 % 251) as u8
                    }
                })
                .collect();
            let mut matrices =
                vec![QuantMatrix::new(format, rows, cols, &data, &Pool::new(2)).unwrap()];
            if format == Format::Q8_0 {
                matrices.push(
                    QuantMatrix::in_place(format, rows, cols, Arc::new(data.clone())).unwrap(),
                );
            }
            let row_bytes = data.len() / rows;
            for (matrix, row) in matrices
                .iter()
                .flat_map(|m| [0, 7, 8, 10].map(|row| (m, row)))
            {
                let mut expected = vec![0f32; cols];
                scalar::dequantize(
                    format,
                    &data[row * row_bytes..(row + 1) * row_bytes],
                    &mut expected,
                );
                let mut got = vec![0f32; cols];
                matrix.dequantize_row(row, &mut got);
                assert_eq!(got, expected, "{format:?} row {row}");
            }
        }
    }
}
