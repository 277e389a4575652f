//! Gaussian noise for the sum of clipped updates: the sampler, central noise, distributed shares and their calibration.
//!
//! # Calibration
//! With every update clipped to L2 norm `C`, the sum has sensitivity `C`
//! and the Gaussian mechanism adds `N(0, sigma^2)` per coordinate with
//! `sigma = z * C`, where `z` is the *noise multiplier* the accountant
//! ([`crate::rdp`]) works with ([`noise_std`]).
//!
//! # Central vs distributed DP
//! * **Central** ([`central_noise`]): the coordinator adds `N(0, sigma^2)` once
//!   to the sum. Whoever sees the sum before the noise (the coordinator)
//!   must be trusted.
//! * **Distributed** ([`distributed_share`]): each of `n` nodes adds
//!   `N(0, sigma^2 / n)` to its own (clipped) update before secure
//!   aggregation; independent Gaussians add up, so the sum carries
//!   `N(0, sigma^2)` and nobody ever sees a less noisy value.
//!
//! # What distributed DP assumes
//! 1. The `n` shares the noise was sized for actually arrive *and* come from
//!    honest nodes. A node knows its own share, so colluding nodes can
//!    subtract theirs: against them only the honest shares count. With
//!    dropouts the sum simply carries less noise. [`effective_noise_multiplier`]
//!    gives the multiplier that really protected the round; record *that* in
//!    the ledger, not the planned one. To keep the target noise despite up to
//!    `d` dropouts or colluders, size the shares for `n - d`
//!    (`distributed_share(.., n - d, ..)`): more noise than needed when all
//!    arrive, never less than the target when at least `n - d` honest ones do.
//! 2. Secure aggregation reveals only the sum; if individual noisy updates
//!    leak, each carries only `sigma^2 / n` of noise and the round's
//!    guarantee is much weaker than accounted.
//! 3. Each node's sampler is seeded independently and secretly (see
//!    [`GaussianSampler::from_rng`]); two nodes or two rounds sharing a seed
//!    produce correlated noise that can cancel.
//!
//! # The sampler and its limits
//! [`GaussianSampler`] draws standard normals with the Box–Muller transform
//! over ChaCha20 (`rand_chacha` 0.3). `rand_distr` is not used: the only
//! version in the workspace lock (0.5) is built on `rand` 0.9 and cannot
//! drive a `rand` 0.8 RNG, and owning the transform also keeps the noise for
//! a given seed stable across dependency upgrades (reproducible audits).
//! Uniforms carry 53 random bits, so samples are bounded by
//! `sqrt(2 * 53 * ln 2) ≈ 8.57` standard deviations (probability of a larger
//! normal: ~1e-17 per draw, irrelevant for accounting). This is textbook
//! floating-point sampling: it is not hardened against the floating-point
//! side channels described by Mironov (CCS 2012) or against timing
//! attacks; a hardened deployment would add discrete Gaussian noise over the
//! integers of the secure-aggregation field (Canonne, Kamath, Steinke 2020;
//! Kairouz, Liu, Steinke 2021), which this crate does not provide.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;

/// Why noise could not be calibrated or added.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum NoiseError {
    /// The standard deviation is negative, NaN or infinite.
    #[error("noise standard deviation must be finite and >= 0, got {0}; compute it with noise_std(noise_multiplier, clip_bound)")]
    InvalidStd(f64),
    /// The noise multiplier is negative, NaN or infinite.
    #[error("noise multiplier must be finite and >= 0, got {0} (typical values are 0.5 to 5)")]
    InvalidNoiseMultiplier(f64),
    /// The clip bound is not positive and finite.
    #[error(
        "clip bound must be finite and > 0, got {0}; use the same C the updates were clipped to"
    )]
    InvalidClipBound(f64),
    /// A distributed share was requested for zero nodes.
    #[error("the noise must be split over at least one node's share, got 0; pass the number of honest shares you expect to reach the sum")]
    ZeroShares,
}

/// A deterministic, seeded sampler of Gaussian noise (Box–Muller over ChaCha20).
///
/// The same seed always yields the same noise; that is for tests and audit
/// replays. In production the seed must be secret and fresh per node and
/// round: use [`GaussianSampler::from_rng`] with the OS CSPRNG.
#[derive(Clone, Debug)]
pub struct GaussianSampler {
    rng: ChaCha20Rng,
    /// Box–Muller yields normals in pairs; the second one waits here.
    spare: Option<f64>,
}

/// 2^-53: turns 53 random bits into a uniform in [0, 1).
const TWO_POW_M53: f64 = 1.0 / (1u64 << 53) as f64;

impl GaussianSampler {
    /// Sampler whose noise is fully determined by `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            rng: ChaCha20Rng::from_seed(seed),
            spare: None,
        }
    }

    /// Sampler seeded from a cryptographic RNG (e.g. `rand::rngs::OsRng`), for real noise.
    pub fn from_rng<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self::from_seed(seed)
    }

    /// One draw from N(0, 1).
    pub fn standard_normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so that ln(u1) is finite; u2 in [0, 1).
        let u1 = ((self.rng.next_u64() >> 11) + 1) as f64 * TWO_POW_M53;
        let u2 = (self.rng.next_u64() >> 11) as f64 * TWO_POW_M53;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// One draw from N(0, std^2).
    pub fn normal(&mut self, std: f64) -> Result<f64, NoiseError> {
        check_std(std)?;
        Ok(std * self.standard_normal())
    }

    /// Adds independent N(0, std^2) noise to every coordinate of `values`.
    pub fn add_noise(&mut self, values: &mut [f32], std: f64) -> Result<(), NoiseError> {
        check_std(std)?;
        for v in values.iter_mut() {
            // Add in f64, round once.
            *v = (f64::from(*v) + std * self.standard_normal()) as f32;
        }
        Ok(())
    }
}

fn check_std(std: f64) -> Result<(), NoiseError> {
    if std.is_finite() && std >= 0.0 {
        Ok(())
    } else {
        Err(NoiseError::InvalidStd(std))
    }
}

/// Standard deviation of the noise for noise multiplier `z` and clip bound `C`: `z * C`.
pub fn noise_std(noise_multiplier: f64, clip_bound: f64) -> Result<f64, NoiseError> {
    if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
        return Err(NoiseError::InvalidNoiseMultiplier(noise_multiplier));
    }
    if !(clip_bound.is_finite() && clip_bound > 0.0) {
        return Err(NoiseError::InvalidClipBound(clip_bound));
    }
    Ok(noise_multiplier * clip_bound)
}

/// Central DP: adds N(0, sigma^2) per coordinate to the aggregated `sum` (done once, by the coordinator).
pub fn central_noise(
    sum: &mut [f32],
    sigma: f64,
    sampler: &mut GaussianSampler,
) -> Result<(), NoiseError> {
    sampler.add_noise(sum, sigma)
}

/// Standard deviation of one node's share, `sigma / sqrt(n_shares)`, so that `n_shares` shares add up to N(0, sigma^2).
pub fn distributed_share_std(sigma: f64, n_shares: u32) -> Result<f64, NoiseError> {
    check_std(sigma)?;
    if n_shares == 0 {
        return Err(NoiseError::ZeroShares);
    }
    Ok(sigma / f64::from(n_shares).sqrt())
}

/// Distributed DP: one node adds its share N(0, sigma^2 / n_shares) to its own clipped `update`.
///
/// `n_shares` is the number of *honest* shares the federation counts on
/// reaching the sum (see the module docs): the planned participants minus
/// the dropouts and colluders you want to tolerate.
pub fn distributed_share(
    update: &mut [f32],
    sigma: f64,
    n_shares: u32,
    sampler: &mut GaussianSampler,
) -> Result<(), NoiseError> {
    let std = distributed_share_std(sigma, n_shares)?;
    sampler.add_noise(update, std)
}

/// The noise multiplier that actually protected a round of distributed DP.
///
/// Each share carried variance `(z C)^2 / n_shares`; if only `honest_arrived`
/// honest shares reached the sum, its noise variance is
/// `(z C)^2 * honest_arrived / n_shares`, i.e. the effective multiplier is
/// `z * sqrt(honest_arrived / n_shares)`. Record this value in the ledger so
/// the reported epsilon is the true one. More arrivals than planned give a
/// larger multiplier (more noise), which is also reported truthfully.
pub fn effective_noise_multiplier(
    noise_multiplier: f64,
    n_shares: u32,
    honest_arrived: u32,
) -> Result<f64, NoiseError> {
    if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
        return Err(NoiseError::InvalidNoiseMultiplier(noise_multiplier));
    }
    if n_shares == 0 {
        return Err(NoiseError::ZeroShares);
    }
    Ok(noise_multiplier * (f64::from(honest_arrived) / f64::from(n_shares)).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn standard_normal_statistics() {
        let mut s = GaussianSampler::from_seed([1; 32]);
        let n = 400_000;
        let xs: Vec<f64> = (0..n).map(|_| s.standard_normal()).collect();
        let (mean, var) = mean_var(&xs);
        // Standard errors: mean 1/sqrt(n) = 0.0016, variance sqrt(2/n) = 0.0022.
        assert!(mean.abs() < 5.0 / (n as f64).sqrt(), "mean {mean}");
        assert!(
            (var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
            "var {var}"
        );
        // Tail mass P(|Z| > 2) = 0.0455; its standard error here is 0.00033.
        let tail = xs.iter().filter(|x| x.abs() > 2.0).count() as f64 / n as f64;
        assert!((tail - 0.0455).abs() < 0.002, "tail {tail}");
        // Fourth moment E[Z^4] = 3 (a uniform or a two-point law would fail this).
        let m4 = xs.iter().map(|x| x.powi(4)).sum::<f64>() / n as f64;
        assert!((m4 - 3.0).abs() < 0.1, "m4 {m4}");
    }

    #[test]
    fn scaled_noise_statistics() {
        let mut s = GaussianSampler::from_seed([2; 32]);
        let sigma = 3.5;
        let mut v = vec![10.0f32; 200_000];
        central_noise(&mut v, sigma, &mut s).unwrap();
        let xs: Vec<f64> = v.iter().map(|&x| f64::from(x) - 10.0).collect();
        let (mean, var) = mean_var(&xs);
        let n = xs.len() as f64;
        assert!(mean.abs() < 5.0 * sigma / n.sqrt(), "mean {mean}");
        let rel = var / (sigma * sigma) - 1.0;
        assert!(rel.abs() < 5.0 * (2.0 / n).sqrt(), "var {var}");
    }

    #[test]
    fn same_seed_same_noise_different_seed_different_noise() {
        let mut a = GaussianSampler::from_seed([9; 32]);
        let mut b = GaussianSampler::from_seed([9; 32]);
        let mut c = GaussianSampler::from_seed([10; 32]);
        let xa: Vec<f64> = (0..1001).map(|_| a.standard_normal()).collect();
        let xb: Vec<f64> = (0..1001).map(|_| b.standard_normal()).collect();
        let xc: Vec<f64> = (0..1001).map(|_| c.standard_normal()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn from_rng_gives_independent_samplers() {
        let mut seeder = ChaCha20Rng::seed_from_u64(5);
        let mut a = GaussianSampler::from_rng(&mut seeder);
        let mut b = GaussianSampler::from_rng(&mut seeder);
        assert_ne!(a.standard_normal(), b.standard_normal());
    }

    #[test]
    fn distributed_shares_sum_to_target_variance() {
        let sigma = 2.0;
        let n_nodes = 16u32;
        let dim = 100_000;
        let mut sum = vec![0.0f64; dim];
        for node in 0..n_nodes {
            let mut seed = [0u8; 32];
            seed[0] = node as u8;
            seed[31] = 0xd5;
            let mut s = GaussianSampler::from_seed(seed);
            let mut share = vec![0.0f32; dim];
            distributed_share(&mut share, sigma, n_nodes, &mut s).unwrap();
            for (acc, x) in sum.iter_mut().zip(&share) {
                *acc += f64::from(*x);
            }
        }
        let (mean, var) = mean_var(&sum);
        assert!(
            mean.abs() < 5.0 * sigma / (dim as f64).sqrt(),
            "mean {mean}"
        );
        let rel = var / (sigma * sigma) - 1.0;
        assert!(rel.abs() < 5.0 * (2.0 / dim as f64).sqrt(), "var {var}");
        // ...while one share alone carries only sigma^2 / n.
        let std = distributed_share_std(sigma, n_nodes).unwrap();
        assert!((std * std - sigma * sigma / f64::from(n_nodes)).abs() < 1e-12);
    }

    #[test]
    fn effective_multiplier_with_dropouts() {
        assert_eq!(effective_noise_multiplier(1.0, 10, 10).unwrap(), 1.0);
        let z = effective_noise_multiplier(2.0, 100, 25).unwrap();
        assert!((z - 1.0).abs() < 1e-15);
        assert_eq!(effective_noise_multiplier(1.0, 10, 0).unwrap(), 0.0);
        assert!(effective_noise_multiplier(1.0, 10, 40).unwrap() > 1.9);
        assert_eq!(
            effective_noise_multiplier(1.0, 0, 0),
            Err(NoiseError::ZeroShares)
        );
    }

    #[test]
    fn calibration_and_validation() {
        assert_eq!(noise_std(1.1, 2.0).unwrap(), 1.1 * 2.0);
        assert!(matches!(
            noise_std(-1.0, 1.0),
            Err(NoiseError::InvalidNoiseMultiplier(_))
        ));
        assert!(matches!(
            noise_std(1.0, 0.0),
            Err(NoiseError::InvalidClipBound(_))
        ));
        let mut s = GaussianSampler::from_seed([0; 32]);
        assert!(matches!(s.normal(f64::NAN), Err(NoiseError::InvalidStd(_))));
        assert_eq!(distributed_share_std(1.0, 0), Err(NoiseError::ZeroShares));
        // Zero noise leaves values unchanged.
        let mut v = vec![1.5f32, -2.0];
        central_noise(&mut v, 0.0, &mut s).unwrap();
        assert_eq!(v, vec![1.5, -2.0]);
    }
}
