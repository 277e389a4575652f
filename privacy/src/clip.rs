//! Per-node L2 clipping of an update: the step that bounds one node's influence on the sum.
//!
//! The Gaussian mechanism's guarantee is stated for a sum whose L2
//! sensitivity is at most `C`: adding or removing one node may move the sum
//! by at most `C`. Clipping every node's update to norm `<= C` before it is
//! summed is what makes that true, so the bound must hold *after* rounding to
//! `f32`, not only in exact arithmetic; [`clip_l2`] checks it.

use thiserror::Error;

/// Relative shrink applied on top of `C / norm` when clipping.
///
/// Scaling in `f64` and rounding each coordinate back to `f32` can grow the
/// norm by up to `2^-24` (half an `f32` ulp per coordinate, relatively); the
/// `f64` norm itself is accurate to far better than `2^-22` for any update
/// under ~10^9 coordinates. Shrinking by `2^-22` therefore keeps the clipped
/// norm `<= C` while changing the update by a negligible 2.4e-7.
const CLIP_MARGIN: f64 = 1.0 / (1u64 << 22) as f64;

/// Why an update could not be clipped.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ClipError {
    /// The clip bound is not a positive finite number.
    #[error("clip bound must be a finite number > 0, got {0}; pick C from the typical update norm of a round (e.g. its median)")]
    InvalidBound(f64),
    /// The update holds a NaN or infinity, so its norm (and sensitivity) is undefined.
    #[error("update coordinate {index} is {value}, so the update has no finite norm; the node's training diverged, drop this update instead of aggregating it")]
    NonFinite {
        /// Index of the first offending coordinate.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Rounding kept the norm above the bound even after repeated shrinking (not expected to happen).
    #[error("could not bring the update norm ({norm}) under the bound {bound} after rounding; please report this with the update size")]
    CouldNotClip {
        /// Norm after the last attempt.
        norm: f64,
        /// The requested bound.
        bound: f64,
    },
}

/// L2 norm of an update, accumulated in `f64`.
///
/// `f64` accumulation avoids both overflow (squares of large `f32` values fit
/// in `f64`) and the precision loss of summing millions of `f32` squares.
pub fn l2_norm(update: &[f32]) -> f64 {
    update
        .iter()
        .map(|&x| {
            let x = f64::from(x);
            x * x
        })
        .sum::<f64>()
        .sqrt()
}

/// Clips `update` in place to L2 norm at most `bound` and returns the factor applied.
///
/// An update whose norm is already `<= bound` is left untouched and the
/// factor is `1.0`. Otherwise every coordinate is scaled by
/// `min(1, bound / norm)` (times a `1 - 2^-22` safety margin, see
/// [`CLIP_MARGIN`]), and the result is checked to have norm `<= bound` after
/// rounding to `f32`.
///
/// Errors if `bound` is not finite and positive, or if the update contains a
/// NaN or infinity (such an update must be dropped, not clipped: its norm,
/// and so the sensitivity argument, is meaningless).
pub fn clip_l2(update: &mut [f32], bound: f64) -> Result<f64, ClipError> {
    if !(bound.is_finite() && bound > 0.0) {
        return Err(ClipError::InvalidBound(bound));
    }
    if let Some(index) = update.iter().position(|x| !x.is_finite()) {
        return Err(ClipError::NonFinite {
            index,
            value: update[index],
        });
    }
    let norm = l2_norm(update);
    if norm <= bound {
        return Ok(1.0);
    }
    let mut factor = bound / norm * (1.0 - CLIP_MARGIN);
    scale(update, factor);
    // Belt and braces: the margin should always suffice, but the guarantee
    // is what the whole DP argument rests on, so verify and shrink further
    // if rounding ever disagrees.
    let mut after = l2_norm(update);
    let mut attempts = 0;
    while after > bound {
        if attempts == 8 {
            return Err(ClipError::CouldNotClip { norm: after, bound });
        }
        let extra = 1.0 - CLIP_MARGIN * 4.0;
        scale(update, extra);
        factor *= extra;
        after = l2_norm(update);
        attempts += 1;
    }
    Ok(factor)
}

fn scale(update: &mut [f32], factor: f64) {
    for x in update.iter_mut() {
        *x = (f64::from(*x) * factor) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_of_3_4_is_5() {
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(l2_norm(&[]), 0.0);
    }

    #[test]
    fn norm_does_not_overflow_for_large_f32() {
        let v = [f32::MAX, f32::MAX];
        let n = l2_norm(&v);
        assert!(n.is_finite());
        assert!((n / (f64::from(f32::MAX) * 2f64.sqrt()) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn below_bound_is_unchanged() {
        let mut v = vec![0.1f32, -0.2, 0.3];
        let orig = v.clone();
        let f = clip_l2(&mut v, 1.0).unwrap();
        assert_eq!(f, 1.0);
        assert_eq!(v, orig);
    }

    #[test]
    fn exactly_at_bound_is_unchanged() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 5.0).unwrap(), 1.0);
        assert_eq!(v, vec![3.0, 4.0]);
    }

    #[test]
    fn above_bound_is_scaled_to_bound() {
        let mut v = vec![3.0f32, 4.0];
        let f = clip_l2(&mut v, 1.0).unwrap();
        assert!((f - 0.2).abs() < 1e-6);
        let n = l2_norm(&v);
        assert!(n <= 1.0);
        assert!(n > 1.0 - 1e-6);
        // Direction is preserved.
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn large_random_update_ends_under_bound() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        for &bound in &[1e-3, 0.5, 1.0, 37.0] {
            let mut v: Vec<f32> = (0..100_000).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let before = l2_norm(&v);
            let f = clip_l2(&mut v, bound).unwrap();
            assert!(l2_norm(&v) <= bound, "bound {bound}");
            assert!((f - bound / before).abs() <= bound / before * 1e-6);
        }
    }

    #[test]
    fn rejects_bad_bound_and_non_finite() {
        let mut v = vec![1.0f32];
        assert_eq!(clip_l2(&mut v, 0.0), Err(ClipError::InvalidBound(0.0)));
        assert!(matches!(
            clip_l2(&mut v, f64::NAN),
            Err(ClipError::InvalidBound(_))
        ));
        let mut w = vec![1.0f32, f32::NAN];
        assert!(matches!(
            clip_l2(&mut w, 1.0),
            Err(ClipError::NonFinite { index: 1, .. })
        ));
        let mut w = vec![f32::INFINITY];
        assert!(matches!(
            clip_l2(&mut w, 1.0),
            Err(ClipError::NonFinite { index: 0, .. })
        ));
    }
}
