//! Rényi-DP accounting for the Poisson-subsampled Gaussian mechanism and conversion to (epsilon, delta).
//!
//! # What is computed
//! One round in which every node takes part independently with probability
//! `q` and the sum of clipped updates gets Gaussian noise with multiplier
//! `sigma` (noise std / clip bound) is the *sampled Gaussian mechanism*. Its
//! RDP at order `alpha` is `log(A_alpha) / (alpha - 1)`, computed exactly as
//! in Mironov, Talwar, Zhang (2019), "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism" (arXiv:1908.10530), Section 3.3:
//!
//! * `q = 1`: the plain Gaussian mechanism, `alpha / (2 sigma^2)`.
//! * integer `alpha`: the finite binomial sum
//!   `A = sum_i C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2))`,
//!   in log space.
//! * fractional `alpha`: the two infinite series split at
//!   `z0 = sigma^2 ln(1/q - 1) + 1/2`, summed until both terms decrease and
//!   are below `e^-30` of the total, for at most 1000 terms. When that fails
//!   (small `sigma` with large `q`, at orders close to 1) the order is
//!   reported as `+inf` and so never chosen, exactly as dp-accounting does
//!   (`_compute_log_a_frac`).
//!
//! RDP composes by addition, so `steps` identical rounds cost `steps` times
//! one round ([`RdpAccountant::compose_sampled_gaussian`]).
//!
//! # RDP -> (epsilon, delta)
//! [`epsilon_from_rdp`] implements the conversion of dp-accounting's
//! `compute_epsilon` (v0.6.0): per order the improved bound of Canonne,
//! Kamath, Steinke (2020, arXiv:2004.00010, Prop. 12; also Asoodeh et al.
//! 2020, arXiv:2001.05990, Eq. 20)
//! `eps = rdp + ln(1 - 1/alpha) - ln(delta * alpha) / (alpha - 1)` for
//! `alpha > 1.01`, plus `eps = 0` where the KL bound
//! `delta >= sqrt(1 - exp(-rdp))` already holds; the minimum over orders is
//! returned. [`delta_from_rdp`] is the matching `compute_delta`.
//!
//! # Deviation from dp-accounting
//! For a *negative* RDP value (only possible through rounding in extreme
//! parameter regimes) dp-accounting returns `epsilon = 0` / `delta = 0` for
//! that order, which would under-report the privacy loss. Here such an order
//! is skipped instead (treated as giving no bound), the conservative choice.
//! Nothing else differs; `testdata/dp_accounting_reference.json` and
//! `tests/reference.rs` check the numbers.
//!
//! The neighbouring relation is add-or-remove-one (one node's whole
//! contribution). Poisson sampling must be real and hidden from the
//! adversary for the amplification by `q` to hold; see the README.

use crate::special::{log_add, log_comb, log_erfc};
use std::f64::consts::SQRT_2;
use thiserror::Error;

/// Why an RDP computation or conversion was refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RdpError {
    /// `q` outside `[0, 1]`.
    #[error("sampling rate q must be in [0, 1] (the probability that a node takes part in a round), got {0}")]
    InvalidSamplingRate(f64),
    /// Negative, NaN or infinite noise multiplier.
    #[error(
        "noise multiplier must be finite and >= 0 (noise std divided by the clip bound), got {0}"
    )]
    InvalidNoiseMultiplier(f64),
    /// An RDP order that is not a finite number above 1.
    #[error("RDP orders must be finite and > 1, got {0}; use rdp::default_orders()")]
    InvalidOrder(f64),
    /// An empty list of orders.
    #[error("at least one RDP order is needed; use rdp::default_orders()")]
    NoOrders,
    /// Orders and RDP values do not pair up.
    #[error("got {orders} orders but {rdp} RDP values; they must pair up one to one")]
    LengthMismatch {
        /// Number of orders.
        orders: usize,
        /// Number of RDP values.
        rdp: usize,
    },
    /// `delta` outside `(0, 1)`.
    #[error("delta must be in (0, 1), got {0}; a common choice is below 1 / (number of nodes)")]
    InvalidDelta(f64),
    /// `epsilon` negative or not finite.
    #[error("epsilon must be finite and >= 0, got {0}")]
    InvalidEpsilon(f64),
}

/// The RDP orders dp-accounting uses by default (`DEFAULT_RDP_ORDERS`, v0.6.0):
/// `1.1, 1.2, ..., 10.9`, then `11..=63`, `128`, `256`, `512`, `1024` (156 orders).
///
/// Computed with the same floating-point operations (`1 + x / 10`) so the
/// values are bit-identical to Python's.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

fn check_orders(orders: &[f64]) -> Result<(), RdpError> {
    if orders.is_empty() {
        return Err(RdpError::NoOrders);
    }
    match orders.iter().find(|a| !(a.is_finite() && **a > 1.0)) {
        Some(&a) => Err(RdpError::InvalidOrder(a)),
        None => Ok(()),
    }
}

pub(crate) fn check_mechanism(q: f64, sigma: f64) -> Result<(), RdpError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(RdpError::InvalidSamplingRate(q));
    }
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(RdpError::InvalidNoiseMultiplier(sigma));
    }
    Ok(())
}

fn check_delta(delta: f64) -> Result<(), RdpError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(RdpError::InvalidDelta(delta))
    }
}

/// `log(A_alpha)` for integer `alpha`, `0 < q < 1` (dp-accounting `_compute_log_a_int`).
fn log_a_int(q: f64, sigma: f64, alpha: u32) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let logq = q.ln();
    let n = f64::from(alpha);
    for i in 0..=alpha {
        let fi = f64::from(i);
        let log_coef_i = log_comb(n, fi) + fi * logq + (n - fi) * log1mq;
        let s = log_coef_i + (fi * fi - fi) / (2.0 * (sigma * sigma));
        log_a = log_add(log_a, s);
    }
    log_a
}

/// Term budget of the fractional-order series (dp-accounting `_MAX_STEPS_LOG_A_FRAC`).
const MAX_STEPS_LOG_A_FRAC: u32 = 1000;

/// `log(A_alpha)` for fractional `alpha`, `0 < q < 1` (dp-accounting `_compute_log_a_frac`);
/// `+inf` when the series has not converged after [`MAX_STEPS_LOG_A_FRAC`] terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    // The integrals over (-inf, z0] and [z0, +inf), as two series.
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let logq = q.ln();
    let log_half = 0.5f64.ln();
    let two_sigma2 = 2.0 * (sigma * sigma);
    let mut last_s0 = f64::NEG_INFINITY;
    let mut last_s1 = f64::NEG_INFINITY;
    for i in 0..MAX_STEPS_LOG_A_FRAC {
        let fi = f64::from(i);
        let log_coef = log_comb(alpha, fi);
        let j = alpha - fi;

        let log_t0 = log_coef + fi * logq + j * log1mq;
        let log_t1 = log_coef + j * logq + fi * log1mq;

        let log_e0 = log_half + log_erfc((fi - z0) / (SQRT_2 * sigma));
        let log_e1 = log_half + log_erfc((z0 - j) / (SQRT_2 * sigma));

        let log_s0 = log_t0 + (fi * fi - fi) / two_sigma2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_sigma2 + log_e1;

        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);

        // Stop once both series are decreasing and their terms are
        // negligible (< e^-30) relative to the total.
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

fn rdp_one_order(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * (sigma * sigma));
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= f64::from(u32::MAX) {
        log_a_int(q, sigma, alpha as u32)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// RDP of *one* round of the Poisson-sampled Gaussian mechanism at each of `orders`.
///
/// `q` is the per-node sampling probability (1 when every node takes part),
/// `sigma` the noise multiplier. Entries may be `+inf` (no usable bound at
/// that order: `sigma = 0`, or a fractional-order series that did not converge).
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, orders: &[f64]) -> Result<Vec<f64>, RdpError> {
    check_mechanism(q, sigma)?;
    check_orders(orders)?;
    Ok(orders
        .iter()
        .map(|&alpha| rdp_one_order(q, sigma, alpha))
        .collect())
}

fn check_pairs(orders: &[f64], rdp: &[f64]) -> Result<(), RdpError> {
    check_orders(orders)?;
    if orders.len() != rdp.len() {
        return Err(RdpError::LengthMismatch {
            orders: orders.len(),
            rdp: rdp.len(),
        });
    }
    Ok(())
}

/// Smallest epsilon at `delta` over the given orders, and the order achieving it.
///
/// See the module docs for the conversion used. Returns `(+inf, orders[0])`
/// when no order gives a finite bound.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), RdpError> {
    check_delta(delta)?;
    check_pairs(orders, rdp)?;
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r.is_nan() || r < 0.0 {
            // Rounding artefact (see module docs): no bound from this order.
            f64::INFINITY
        } else if delta * delta + (-r).exp_m1() > 0.0 {
            // KL bound delta <= sqrt(1 - exp(-rdp)) already gives epsilon 0.
            0.0
        } else if a > 1.01 {
            // Not numerically stable as alpha -> 1 (and useless there).
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        // Strict `<` keeps the first minimum, like numpy's argmin.
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// Smallest delta at `epsilon` over the given orders, and the order achieving it
/// (dp-accounting `compute_delta`).
pub fn delta_from_rdp(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<(f64, f64), RdpError> {
    if !(epsilon.is_finite() && epsilon >= 0.0) {
        return Err(RdpError::InvalidEpsilon(epsilon));
    }
    check_pairs(orders, rdp)?;
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        let mut log_delta = if r.is_nan() || r < 0.0 {
            // Rounding artefact: this order bounds nothing (delta <= 1).
            0.0
        } else if r == 0.0 {
            f64::NEG_INFINITY
        } else {
            // KL bound: delta <= sqrt(1 - exp(-rdp)).
            0.5 * (-(-r).exp()).ln_1p()
        };
        if a > 1.01 && r >= 0.0 {
            let rdp_bound = (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln();
            log_delta = log_delta.min(rdp_bound);
        }
        if log_delta < best.0 {
            best = (log_delta, a);
        }
    }
    Ok((best.0.exp().min(1.0), best.1))
}

/// Accumulates RDP over rounds at a fixed set of orders (RDP composes by addition).
#[derive(Clone, Debug, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// Empty accountant at [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Empty accountant at custom orders (each finite and > 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, RdpError> {
        check_orders(&orders)?;
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// Adds `steps` rounds of the sampled Gaussian mechanism with rate `q` and multiplier `sigma`.
    pub fn compose_sampled_gaussian(
        &mut self,
        q: f64,
        sigma: f64,
        steps: u64,
    ) -> Result<(), RdpError> {
        let one = rdp_sampled_gaussian(q, sigma, &self.orders)?;
        self.compose_rdp(&one, steps)
    }

    /// Adds `count` times an RDP vector computed at this accountant's orders.
    pub fn compose_rdp(&mut self, rdp: &[f64], count: u64) -> Result<(), RdpError> {
        check_pairs(&self.orders, rdp)?;
        let c = count as f64;
        for (acc, &r) in self.rdp.iter_mut().zip(rdp) {
            *acc += c * r;
        }
        Ok(())
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Cumulative RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Cumulative epsilon at `delta`.
    pub fn epsilon(&self, delta: f64) -> Result<f64, RdpError> {
        Ok(self.epsilon_and_order(delta)?.0)
    }

    /// Cumulative epsilon at `delta` and the optimal order.
    pub fn epsilon_and_order(&self, delta: f64) -> Result<(f64, f64), RdpError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// Cumulative delta at `epsilon` and the optimal order.
    pub fn delta_and_order(&self, epsilon: f64) -> Result<(f64, f64), RdpError> {
        delta_from_rdp(&self.orders, &self.rdp, epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_orders_shape() {
        let o = default_orders();
        assert_eq!(o.len(), 156);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[9], 2.0);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 11.0);
        assert_eq!(o[151], 63.0);
        assert_eq!(&o[152..], &[128.0, 256.0, 512.0, 1024.0]);
    }

    #[test]
    fn q_one_is_closed_form() {
        let r = rdp_sampled_gaussian(1.0, 2.0, &[2.0, 3.5, 64.0]).unwrap();
        assert_eq!(r, vec![2.0 / 8.0, 3.5 / 8.0, 64.0 / 8.0]);
    }

    #[test]
    fn q_zero_is_free_and_sigma_zero_is_unbounded() {
        assert_eq!(
            rdp_sampled_gaussian(0.0, 1.0, &[2.0, 1.5]).unwrap(),
            vec![0.0, 0.0]
        );
        let r = rdp_sampled_gaussian(0.1, 0.0, &[2.0, 1.5]).unwrap();
        assert!(r.iter().all(|x| x.is_infinite()));
        let mut acc = RdpAccountant::new();
        acc.compose_sampled_gaussian(0.1, 0.0, 1).unwrap();
        assert_eq!(acc.epsilon(1e-5).unwrap(), f64::INFINITY);
    }

    #[test]
    fn integer_order_two_closed_form() {
        // For alpha = 2: A = (1-q)^2 + 2q(1-q) + q^2 e^{1/sigma^2} = 1 + q^2 (e^{1/sigma^2} - 1).
        let (q, s) = (0.05f64, 1.3f64);
        let expected = (q * q * ((1.0 / (s * s)).exp() - 1.0)).ln_1p();
        let r = rdp_sampled_gaussian(q, s, &[2.0]).unwrap()[0];
        // The log-space sum loses a few digits to cancellation (log A is close to
        // 0 when q is small): the same happens in dp-accounting.
        assert!(
            (r - expected).abs() <= 1e-12 * expected,
            "{r} vs {expected}"
        );
    }

    #[test]
    fn fractional_order_lies_between_neighbouring_integers() {
        // RDP is non-decreasing in the order.
        let r = rdp_sampled_gaussian(0.01, 1.5, &[2.0, 2.5, 3.0]).unwrap();
        assert!(r[0] <= r[1] && r[1] <= r[2], "{r:?}");
    }

    #[test]
    fn rejects_bad_inputs() {
        assert_eq!(
            rdp_sampled_gaussian(1.5, 1.0, &[2.0]),
            Err(RdpError::InvalidSamplingRate(1.5))
        );
        assert!(matches!(
            rdp_sampled_gaussian(0.5, f64::NAN, &[2.0]),
            Err(RdpError::InvalidNoiseMultiplier(_))
        ));
        assert_eq!(
            rdp_sampled_gaussian(0.5, 1.0, &[1.0]),
            Err(RdpError::InvalidOrder(1.0))
        );
        assert_eq!(rdp_sampled_gaussian(0.5, 1.0, &[]), Err(RdpError::NoOrders));
        assert_eq!(
            epsilon_from_rdp(&[2.0], &[0.1], 0.0),
            Err(RdpError::InvalidDelta(0.0))
        );
        assert!(matches!(
            epsilon_from_rdp(&[2.0, 3.0], &[0.1], 1e-5),
            Err(RdpError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn negative_rdp_is_skipped_not_trusted() {
        // dp-accounting would report epsilon 0 from the negative entry.
        let (eps, order) = epsilon_from_rdp(&[2.0, 3.0], &[-1e-12, 0.5], 1e-5).unwrap();
        assert!(eps > 0.0);
        assert_eq!(order, 3.0);
    }

    #[test]
    fn delta_and_epsilon_are_consistent() {
        let mut acc = RdpAccountant::new();
        acc.compose_sampled_gaussian(0.01, 1.1, 1000).unwrap();
        let (eps, _) = acc.epsilon_and_order(1e-5).unwrap();
        let (delta, _) = acc.delta_and_order(eps).unwrap();
        assert!(delta <= 1e-5 * (1.0 + 1e-9), "delta {delta}");
    }
}
