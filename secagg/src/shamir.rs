//! Shamir secret sharing of 32-byte secrets over the prime field GF(2^61 - 1).
//!
//! A secret is cut into five limbs of at most 56 bits (7+7+7+7+4 bytes), each below the
//! Mersenne prime `p = 2^61 - 1`, and every limb gets its own random polynomial of
//! degree `t - 1`. Holder `h` receives the evaluations at `x = h + 1`. Multiplication
//! is one 64x64-bit product and a Mersenne reduction, so sharing and reconstruction are
//! cheap next to mask expansion; limbs above 56 bits after reconstruction reveal a
//! wrong share.

use std::fmt;

use rand_core::CryptoRngCore;
use zeroize::Zeroize;

use crate::ClientId;

const P: u64 = (1 << 61) - 1;
const LIMBS: usize = 5;
const LIMB_BYTES: usize = 7;
/// Wire size of a share: five little-endian `u64` limbs.
pub const SHARE_BYTES: usize = LIMBS * 8;

/// One holder's share of one 32-byte secret. Zeroed on drop; hidden from `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    holder: ClientId,
    limbs: [u64; LIMBS],
}

/// Why a secret could not be rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconstructError {
    /// Fewer distinct holders than the threshold.
    NotEnough { have: usize, need: usize },
    /// The shares do not lie on one polynomial of degree `t - 1`, or decode to no secret.
    Inconsistent,
}

impl Share {
    pub fn holder(&self) -> ClientId {
        self.holder
    }

    pub fn to_bytes(&self) -> [u8; SHARE_BYTES] {
        let mut out = [0u8; SHARE_BYTES];
        for (chunk, limb) in out.chunks_exact_mut(8).zip(&self.limbs) {
            chunk.copy_from_slice(&limb.to_le_bytes());
        }
        out
    }

    /// Parses the wire form; `None` if the length is wrong or a limb is not in the field.
    pub fn from_bytes(holder: ClientId, bytes: &[u8]) -> Option<Share> {
        if bytes.len() != SHARE_BYTES {
            return None;
        }
        let mut limbs = [0u64; LIMBS];
        for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
            *limb = u64::from_le_bytes(chunk.try_into().ok()?);
            if *limb >= P {
                return None;
            }
        }
        Some(Share { holder, limbs })
    }

    fn x(&self) -> u64 {
        u64::from(self.holder) + 1
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.limbs.zeroize();
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn reduce(x: u128) -> u64 {
    // 2^61 = 1 (mod p): fold the high bits onto the low ones twice.
    let folded = (x & u128::from(P)) + (x >> 61);
    let folded = ((folded & u128::from(P)) + (folded >> 61)) as u64;
    if folded >= P {
        folded - P
    } else {
        folded
    }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn add(a: u64, b: u64) -> u64 {
    let sum = a + b;
    if sum >= P {
        sum - P
    } else {
        sum
    }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b {
        a - b
    } else {
        a + P - b
    }
}

fn inverse(a: u64) -> u64 {
    // Fermat: a^(p-2).
    let (mut base, mut exponent, mut result) = (a, P - 2, 1u64);
    while exponent > 0 {
        if exponent & 1 == 1 {
            result = mul(result, base);
        }
        base = mul(base, base);
        exponent >>= 1;
    }
    result
}

fn random_element(rng: &mut impl CryptoRngCore) -> u64 {
    loop {
        let candidate = rng.next_u64() >> 3;
        if candidate < P {
            return candidate;
        }
    }
}

fn secret_to_limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut limbs = [0u64; LIMBS];
    for (limb, chunk) in limbs.iter_mut().zip(secret.chunks(LIMB_BYTES)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *limb = u64::from_le_bytes(bytes);
        bytes.zeroize();
    }
    limbs
}

fn limbs_to_secret(limbs: &[u64; LIMBS]) -> Option<[u8; 32]> {
    let mut secret = [0u8; 32];
    for (limb, chunk) in limbs.iter().zip(secret.chunks_mut(LIMB_BYTES)) {
        if *limb >> (8 * chunk.len()) != 0 {
            return None;
        }
        chunk.copy_from_slice(&limb.to_le_bytes()[..chunk.len()]);
    }
    Some(secret)
}

/// Splits `secret` into one share per holder (distinct ids), any `threshold` of which
/// rebuild it.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    holders: &[ClientId],
    rng: &mut impl CryptoRngCore,
) -> Vec<Share> {
    let mut coefficients = vec![[0u64; LIMBS]; threshold.max(1)];
    coefficients[0] = secret_to_limbs(secret);
    for row in coefficients.iter_mut().skip(1) {
        for coefficient in row.iter_mut() {
            *coefficient = random_element(rng);
        }
    }
    let shares = holders
        .iter()
        .map(|&holder| {
            let x = u64::from(holder) + 1;
            let mut limbs = [0u64; LIMBS];
            for (index, limb) in limbs.iter_mut().enumerate() {
                // Horner from the highest coefficient down.
                *limb = coefficients
                    .iter()
                    .rev()
                    .fold(0, |acc, row| add(mul(acc, x), row[index]));
            }
            Share { holder, limbs }
        })
        .collect();
    for row in &mut coefficients {
        row.zeroize();
    }
    shares
}

/// Lagrange weights for interpolating the points at `xs` and evaluating at `at`.
fn lagrange_weights(xs: &[u64], at: u64) -> Vec<u64> {
    xs.iter()
        .enumerate()
        .map(|(i, &xi)| {
            let (numerator, denominator) = xs
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .fold((1u64, 1u64), |(num, den), (_, &xj)| {
                    (mul(num, sub(at, xj)), mul(den, sub(xi, xj)))
                });
            mul(numerator, inverse(denominator))
        })
        .collect()
}

fn interpolate(points: &[&Share], weights: &[u64]) -> [u64; LIMBS] {
    let mut limbs = [0u64; LIMBS];
    for (index, limb) in limbs.iter_mut().enumerate() {
        *limb = points
            .iter()
            .zip(weights)
            .fold(0, |acc, (share, &w)| add(acc, mul(share.limbs[index], w)));
    }
    limbs
}

/// Rebuilds the secret from at least `threshold` shares of distinct holders. The first
/// `threshold` define the polynomial; every further share must lie on it.
pub fn reconstruct(shares: &[Share], threshold: usize) -> Result<[u8; 32], ReconstructError> {
    let mut distinct: Vec<&Share> = shares.iter().collect();
    distinct.sort_by_key(|share| share.holder);
    distinct.dedup_by_key(|share| share.holder);
    if distinct.len() < threshold || threshold == 0 {
        return Err(ReconstructError::NotEnough {
            have: distinct.len(),
            need: threshold,
        });
    }
    let (basis, extra) = distinct.split_at(threshold);
    let xs: Vec<u64> = basis.iter().map(|share| share.x()).collect();
    for check in extra {
        if interpolate(basis, &lagrange_weights(&xs, check.x())) != check.limbs {
            return Err(ReconstructError::Inconsistent);
        }
    }
    let mut limbs = interpolate(basis, &lagrange_weights(&xs, 0));
    let secret = limbs_to_secret(&limbs).ok_or(ReconstructError::Inconsistent);
    limbs.zeroize();
    secret
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    #[test]
    fn field_inverse_and_reduction() {
        for a in [1u64, 2, 12345, P - 1, 1 << 60] {
            assert_eq!(mul(a, inverse(a)), 1);
        }
        assert_eq!(mul(P - 1, P - 1), 1);
    }

    proptest! {
        #[test]
        fn any_threshold_subset_rebuilds_the_secret(
            secret in any::<[u8; 32]>(),
            threshold in 1usize..8,
            extra in 0usize..5,
            rotate in 0usize..16,
        ) {
            let mut holders: Vec<ClientId> = (0..(threshold + extra) as u32).map(|h| h * 3 + 1).collect();
            let len = holders.len();
            holders.rotate_left(rotate % len);
            let shares = split(&secret, threshold, &holders, &mut OsRng);
            prop_assert_eq!(reconstruct(&shares, threshold), Ok(secret));
            prop_assert_eq!(reconstruct(&shares[extra..], threshold), Ok(secret));
            prop_assert_eq!(
                reconstruct(&shares[..threshold - 1], threshold),
                Err(ReconstructError::NotEnough { have: threshold - 1, need: threshold })
            );
        }
    }

    #[test]
    fn altered_share_is_detected() {
        let secret = [42u8; 32];
        let holders: Vec<ClientId> = (0..7).collect();
        let mut shares = split(&secret, 4, &holders, &mut OsRng);
        shares[5].limbs[2] = add(shares[5].limbs[2], 1);
        assert_eq!(reconstruct(&shares, 4), Err(ReconstructError::Inconsistent));
        // With exactly t shares an alteration cannot be seen from consistency, but it
        // almost surely pushes a limb above 56 bits.
        assert_ne!(reconstruct(&shares[2..6], 4), Ok(secret));
    }

    #[test]
    fn wire_form_round_trips_and_rejects_non_field_limbs() {
        let shares = split(&[7u8; 32], 2, &[3, 9], &mut OsRng);
        let bytes = shares[1].to_bytes();
        assert_eq!(Share::from_bytes(9, &bytes), Some(shares[1].clone()));
        assert_eq!(Share::from_bytes(9, &bytes[1..]), None);
        let mut bad = bytes;
        bad[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Share::from_bytes(9, &bad), None);
        assert!(!format!("{:?}", shares[0]).contains("limbs"));
    }
}
