//! Property tests: the accountant's monotonicity (epsilon grows with rounds and sampling rate, falls with noise) and the clipping guarantee.

use nanofleet_privacy::clip::{clip_l2, l2_norm};
use nanofleet_privacy::rdp::{default_orders, rdp_sampled_gaussian, RdpAccountant};
use proptest::prelude::*;

const DELTA: f64 = 1e-5;

fn epsilon(q: f64, sigma: f64, steps: u64) -> f64 {
    let mut acc = RdpAccountant::new();
    acc.compose_sampled_gaussian(q, sigma, steps).unwrap();
    acc.epsilon(DELTA).unwrap()
}

/// Allows for rounding when two epsilons are (nearly) equal.
fn not_below(later: f64, earlier: f64) -> bool {
    later >= earlier * (1.0 - 1e-9) - 1e-12
}

proptest! {
    // Each case evaluates the full series at 156 orders; keep the count moderate.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn epsilon_grows_with_steps(
        q in 1e-3f64..=1.0,
        sigma in 0.5f64..10.0,
        steps in 1u64..2000,
        more in 1u64..2000,
    ) {
        let one = rdp_sampled_gaussian(q, sigma, &default_orders()).unwrap();
        let mut a = RdpAccountant::new();
        a.compose_rdp(&one, steps).unwrap();
        let mut b = RdpAccountant::new();
        b.compose_rdp(&one, steps + more).unwrap();
        let (ea, eb) = (a.epsilon(DELTA).unwrap(), b.epsilon(DELTA).unwrap());
        prop_assert!(eb >= ea, "steps {steps}: {ea}, steps {}: {eb}", steps + more);
    }

    // Sampling rates up to 0.5 only. Above, dp-accounting's fractional-order
    // series (which this crate reproduces) is a loose upper bound or does not
    // converge, and its epsilon is itself not monotone in q: with sigma = 0.5
    // and 289 steps it reports 747.60 at q = 0.891 but 747.58 at q = 1.
    // Both are conservative; the property just does not hold there.
    #[test]
    fn epsilon_grows_with_sampling_rate(
        q in 1e-3f64..0.5,
        factor in 1.01f64..10.0,
        sigma in 0.5f64..10.0,
        steps in 1u64..1000,
    ) {
        let q2 = (q * factor).min(0.5);
        prop_assume!(q2 > q);
        let (e1, e2) = (epsilon(q, sigma, steps), epsilon(q2, sigma, steps));
        prop_assert!(not_below(e2, e1), "q {q}: {e1}, q {q2}: {e2}");
        // Order by order too, at the integer orders, where the RDP is the
        // exact binomial sum. The fractional orders use dp-accounting's
        // series with |binomial coefficients|, an *upper bound* that is loose
        // and not monotone in q once q > ~0.5 (e.g. q = 0.59, sigma = 8.6,
        // order 1.6: 0.0383 where the true RDP is 0.00378): conservative, but
        // not a property to test.
        let orders = default_orders();
        let r1 = rdp_sampled_gaussian(q, sigma, &orders).unwrap();
        let r2 = rdp_sampled_gaussian(q2, sigma, &orders).unwrap();
        for ((o, a), b) in orders.iter().zip(&r1).zip(&r2) {
            if o.fract() == 0.0 {
                prop_assert!(not_below(*b, *a), "order {o}: q {q}: {a}, q {q2}: {b}");
            }
        }
    }

    #[test]
    fn epsilon_falls_with_noise(
        q in 1e-3f64..=1.0,
        sigma in 0.5f64..10.0,
        factor in 1.01f64..5.0,
        steps in 1u64..1000,
    ) {
        let s2 = sigma * factor;
        let (e1, e2) = (epsilon(q, sigma, steps), epsilon(q, s2, steps));
        prop_assert!(not_below(e1, e2), "sigma {sigma}: {e1}, sigma {s2}: {e2}");
    }

    #[test]
    fn clipping_bounds_the_norm(
        v in prop::collection::vec(-1e6f32..1e6, 0..2000),
        bound in 1e-4f64..1e4,
    ) {
        let mut w = v.clone();
        let before = l2_norm(&v);
        let factor = clip_l2(&mut w, bound).unwrap();
        prop_assert!(l2_norm(&w) <= bound);
        if before <= bound {
            prop_assert_eq!(factor, 1.0);
            prop_assert_eq!(w, v);
        } else {
            prop_assert!(factor < 1.0);
        }
    }
}
