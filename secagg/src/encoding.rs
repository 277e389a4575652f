//! Fixed-point encoding of float vectors into the ring `Z_{2^m}` and decoding of sums.
//!
//! Matches Flower's SecAgg+ quantization: a value is clipped to `[-c, c]`, shifted and
//! scaled onto `[0, Q]` (`Q` = quantization range) and rounded stochastically (up with
//! probability equal to the fractional part), so the encoding is unbiased. The sum of
//! `n` encodings decodes as `sum * 2c / Q - n * c`. [`crate::Params`] refuses
//! parameters where `n * Q` would reach the modulus, so sums never wrap.

use crate::prg::MaskPrg;
use crate::{Config, SecAggError};

/// Values quantized per block of stochastic-rounding randomness.
const BLOCK: usize = 4096;

/// Clips, scales and stochastically rounds `values` onto `0..=quantization_range`,
/// drawing the rounding randomness from `randomness`.
pub fn quantize(
    values: &[f32],
    config: &Config,
    randomness: &mut MaskPrg,
) -> Result<Vec<u32>, SecAggError> {
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(SecAggError::NonFinite { index });
    }
    let clip = config.clipping_range;
    let levels = config.quantization_range as f64;
    let scale = levels / (2.0 * clip);
    // Below 2^32: `Params` keeps `num_clients * quantization_range` inside a 32-bit ring.
    let top = u32::try_from(config.quantization_range).unwrap_or(u32::MAX);
    let mut random_bytes = vec![0u8; BLOCK * 4];
    let mut out = Vec::with_capacity(values.len());
    for block in values.chunks(BLOCK) {
        let random_bytes = &mut random_bytes[..block.len() * 4];
        randomness.fill(random_bytes);
        out.extend(
            block
                .iter()
                .zip(random_bytes.chunks_exact(4))
                .map(|(&v, r)| {
                    let scaled = (f64::from(v).clamp(-clip, clip) + clip) * scale;
                    // `scaled` is not negative, so truncation is the floor (and needs no
                    // libm call on baseline x86-64).
                    let floor = scaled as u32;
                    let uniform = f64::from(u32::from_le_bytes([r[0], r[1], r[2], r[3]]))
                        * (1.0 / 4294967296.0);
                    let round_up = uniform < scaled - f64::from(floor);
                    floor.saturating_add(u32::from(round_up)).min(top)
                }),
        );
    }
    Ok(out)
}

/// Decodes the ring sum of `contributors` encodings back to the float sum, in the sum's
/// own allocation.
pub fn decode_sum(sum: Vec<u32>, contributors: usize, config: &Config) -> Vec<f32> {
    let clip = config.clipping_range;
    let step = 2.0 * clip / config.quantization_range as f64;
    let offset = contributors as f64 * clip;
    // `s` is read as the signed `s - 2^31` and the 2^31 put back in the offset: baseline
    // x86-64 converts signed 32-bit integers to doubles in vectors, unsigned ones not.
    let shift = 2f64.powi(31) * step - offset;
    sum.into_iter()
        .map(|s| (f64::from((s ^ 0x8000_0000) as i32) * step + shift) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prg::MaskKey;

    #[test]
    fn round_trip_within_one_step_and_clipped() {
        let config = Config::new(10, 5);
        let mut prg = MaskPrg::new(&MaskKey::from_bytes([1; 32]));
        let values = [0.0f32, 1.234_567, -7.999, 100.0, -100.0];
        let encoded = quantize(&values, &config, &mut prg).unwrap();
        assert_eq!(u64::from(encoded[3]), config.quantization_range);
        assert_eq!(encoded[4], 0);
        let decoded = decode_sum(encoded, 1, &config);
        let step = 16.0 / config.quantization_range as f32;
        for (d, v) in decoded.iter().zip(values) {
            assert!((d - v.clamp(-8.0, 8.0)).abs() <= step, "{d} vs {v}");
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased() {
        let mut config = Config::new(10, 1);
        config.quantization_range = 16; // step 1.0, so 0.25 sits a quarter step up
        let mut prg = MaskPrg::new(&MaskKey::from_bytes([2; 32]));
        let values = vec![0.25f32; 100_000];
        let encoded = quantize(&values, &config, &mut prg).unwrap();
        let mean = encoded.iter().map(|&e| u64::from(e)).sum::<u64>() as f64 / encoded.len() as f64;
        assert!((mean - 8.25).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn non_finite_input_is_refused() {
        let config = Config::new(10, 2);
        let mut prg = MaskPrg::new(&MaskKey::from_bytes([3; 32]));
        assert_eq!(
            quantize(&[1.0, f32::NAN], &config, &mut prg),
            Err(SecAggError::NonFinite { index: 1 })
        );
    }
}
