//! The privacy ledger: which rounds ran with which (q, noise multiplier), what they cost, and whether the next one fits the budget.
//!
//! The coordinator records every round it actually ran, with the noise
//! multiplier that actually protected it (for distributed DP, after
//! dropouts: [`crate::noise::effective_noise_multiplier`]). The ledger is
//! `serde`-serializable so the coordinator can persist it and resume; on
//! load it is validated and its cumulative RDP recomputed from the events,
//! so a stored ledger cannot carry a stale or edited total.
//!
//! To stop *before* overspending, ask [`PrivacyLedger::would_exceed`] (or use
//! [`PrivacyLedger::try_record`]) before starting a round: it uses exactly
//! the arithmetic of [`PrivacyLedger::record`], so a round it admits can be
//! recorded without crossing the budget.

use crate::rdp::{self, epsilon_from_rdp, rdp_sampled_gaussian, RdpError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Current format of the serialized ledger.
const LEDGER_FORMAT_VERSION: u32 = 1;

/// Upper limit of [`PrivacyLedger::remaining_rounds`]'s search (returned when rounds are free, e.g. `q = 0`).
pub const MAX_REMAINING_ROUNDS: u64 = 1 << 40;

/// Why the ledger refused an operation.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum BudgetError {
    /// The RDP computation refused the parameters.
    #[error(transparent)]
    Rdp(#[from] RdpError),
    /// A round event covering zero rounds.
    #[error("a round event must cover at least one round, got 0")]
    ZeroRounds,
    /// An unusable budget.
    #[error("a privacy budget needs epsilon finite and > 0 and delta in (0, 1), got epsilon = {epsilon}, delta = {delta}")]
    InvalidBudget {
        /// The budget's epsilon.
        epsilon: f64,
        /// The budget's delta.
        delta: f64,
    },
    /// The next round(s) would spend more than the budget.
    #[error("privacy budget exhausted: the next {rounds} round(s) would bring epsilon to {would_be} at delta = {delta}, over the budget of {budget} (spent so far: {spent}); stop the federation here, or continue only with a lower sampling rate q or a higher noise multiplier")]
    WouldExceed {
        /// Epsilon spent so far (at the budget's delta).
        spent: f64,
        /// Epsilon after the proposed round(s).
        would_be: f64,
        /// The budget's epsilon.
        budget: f64,
        /// The budget's delta.
        delta: f64,
        /// Rounds in the proposed event.
        rounds: u64,
    },
    /// The stored ledger has an unsupported format version.
    #[error("stored privacy ledger has format version {found}, this build reads version {supported}; upgrade nanofleet-privacy")]
    UnsupportedFormat {
        /// Version found in the data.
        found: u32,
        /// Version this build writes and reads.
        supported: u32,
    },
}

/// `rounds` consecutive rounds with node sampling rate `sampling_rate` and noise multiplier `noise_multiplier`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundEvent {
    /// Probability that each node takes part in a round (Poisson sampling); 1 if all nodes always do.
    pub sampling_rate: f64,
    /// Noise std divided by the clip bound, as it actually reached the sum.
    pub noise_multiplier: f64,
    /// Number of rounds (at least 1).
    pub rounds: u64,
}

impl RoundEvent {
    /// A validated event.
    pub fn new(
        sampling_rate: f64,
        noise_multiplier: f64,
        rounds: u64,
    ) -> Result<Self, BudgetError> {
        let ev = Self {
            sampling_rate,
            noise_multiplier,
            rounds,
        };
        ev.validate()?;
        Ok(ev)
    }

    /// A single validated round.
    pub fn one_round(sampling_rate: f64, noise_multiplier: f64) -> Result<Self, BudgetError> {
        Self::new(sampling_rate, noise_multiplier, 1)
    }

    fn validate(&self) -> Result<(), BudgetError> {
        rdp::check_mechanism(self.sampling_rate, self.noise_multiplier)?;
        if self.rounds == 0 {
            return Err(BudgetError::ZeroRounds);
        }
        Ok(())
    }
}

/// A federation's total privacy budget `(epsilon, delta)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyBudget {
    /// Largest total epsilon the federation may spend.
    pub epsilon: f64,
    /// The delta at which epsilon is measured.
    pub delta: f64,
}

impl PrivacyBudget {
    /// A validated budget.
    pub fn new(epsilon: f64, delta: f64) -> Result<Self, BudgetError> {
        let b = Self { epsilon, delta };
        b.validate()?;
        Ok(b)
    }

    fn validate(&self) -> Result<(), BudgetError> {
        if self.epsilon.is_finite() && self.epsilon > 0.0 && self.delta > 0.0 && self.delta < 1.0 {
            Ok(())
        } else {
            Err(BudgetError::InvalidBudget {
                epsilon: self.epsilon,
                delta: self.delta,
            })
        }
    }
}

/// Privacy spent: `(epsilon, delta)`-DP after `rounds` rounds, with the RDP order that gave the bound.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// Epsilon at `delta` (may be `+inf`: no finite guarantee, e.g. a round without noise).
    pub epsilon: f64,
    /// The delta epsilon is stated at.
    pub delta: f64,
    /// The RDP order achieving the bound.
    pub order: f64,
    /// Rounds counted.
    pub rounds: u64,
}

/// Whether `epsilon` is within the budget; a NaN epsilon never is.
fn fits(epsilon: f64, budget: &PrivacyBudget) -> bool {
    epsilon <= budget.epsilon
}

/// Serialized form of [`PrivacyLedger`]: the events only (the cumulative RDP is derived).
#[derive(Serialize, Deserialize)]
struct LedgerRecord {
    format_version: u32,
    target_delta: f64,
    #[serde(default = "rdp::default_orders")]
    orders: Vec<f64>,
    events: Vec<RoundEvent>,
}

/// Record of the rounds a federation ran and the privacy they cost (RDP accounting).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LedgerRecord", into = "LedgerRecord")]
pub struct PrivacyLedger {
    target_delta: f64,
    orders: Vec<f64>,
    events: Vec<RoundEvent>,
    /// Cumulative RDP per order; always equal to the sum over `events`.
    rdp: Vec<f64>,
}

impl From<PrivacyLedger> for LedgerRecord {
    fn from(l: PrivacyLedger) -> Self {
        Self {
            format_version: LEDGER_FORMAT_VERSION,
            target_delta: l.target_delta,
            orders: l.orders,
            events: l.events,
        }
    }
}

impl TryFrom<LedgerRecord> for PrivacyLedger {
    type Error = BudgetError;

    fn try_from(r: LedgerRecord) -> Result<Self, BudgetError> {
        if r.format_version != LEDGER_FORMAT_VERSION {
            return Err(BudgetError::UnsupportedFormat {
                found: r.format_version,
                supported: LEDGER_FORMAT_VERSION,
            });
        }
        let mut ledger = Self::with_orders(r.target_delta, r.orders)?;
        // Recompute the total; identical (q, sigma) pairs are computed once.
        let mut cache: Vec<(RoundEvent, Vec<f64>)> = Vec::new();
        for ev in r.events {
            ev.validate()?;
            let per = match cache.iter().find(|(e, _)| {
                e.sampling_rate.to_bits() == ev.sampling_rate.to_bits()
                    && e.noise_multiplier.to_bits() == ev.noise_multiplier.to_bits()
            }) {
                Some((_, per)) => per.clone(),
                None => {
                    let per = ledger.per_round_rdp(&ev)?;
                    cache.push((ev, per.clone()));
                    per
                }
            };
            ledger.rdp = ledger.rdp_after(&per, ev.rounds);
            ledger.events.push(ev);
        }
        Ok(ledger)
    }
}

impl PrivacyLedger {
    /// Empty ledger reporting epsilon at `target_delta`, using dp-accounting's default orders.
    pub fn new(target_delta: f64) -> Result<Self, BudgetError> {
        Self::with_orders(target_delta, rdp::default_orders())
    }

    /// Empty ledger at custom RDP orders.
    pub fn with_orders(target_delta: f64, orders: Vec<f64>) -> Result<Self, BudgetError> {
        // Validates both delta and the orders.
        epsilon_from_rdp(&orders, &vec![0.0; orders.len()], target_delta)?;
        let rdp = vec![0.0; orders.len()];
        Ok(Self {
            target_delta,
            orders,
            events: Vec::new(),
            rdp,
        })
    }

    /// The delta at which [`spent`](Self::spent) reports epsilon.
    pub fn target_delta(&self) -> f64 {
        self.target_delta
    }

    /// The RDP orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Recorded events, oldest first.
    pub fn events(&self) -> &[RoundEvent] {
        &self.events
    }

    /// Total rounds recorded.
    pub fn rounds(&self) -> u64 {
        self.events
            .iter()
            .fold(0u64, |acc, e| acc.saturating_add(e.rounds))
    }

    /// Cumulative RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    fn per_round_rdp(&self, ev: &RoundEvent) -> Result<Vec<f64>, BudgetError> {
        Ok(rdp_sampled_gaussian(
            ev.sampling_rate,
            ev.noise_multiplier,
            &self.orders,
        )?)
    }

    /// The single place where composition happens, shared by `record` and the budget checks.
    fn rdp_after(&self, per_round: &[f64], rounds: u64) -> Vec<f64> {
        let k = rounds as f64;
        self.rdp
            .iter()
            .zip(per_round)
            .map(|(&acc, &r)| acc + k * r)
            .collect()
    }

    fn spent_of(&self, rdp: &[f64], delta: f64, rounds: u64) -> Result<Spent, BudgetError> {
        let (epsilon, order) = epsilon_from_rdp(&self.orders, rdp, delta)?;
        Ok(Spent {
            epsilon,
            delta,
            order,
            rounds,
        })
    }

    /// Records rounds that ran and returns the cumulative spend at the target delta.
    pub fn record(&mut self, event: RoundEvent) -> Result<Spent, BudgetError> {
        event.validate()?;
        let per = self.per_round_rdp(&event)?;
        self.rdp = self.rdp_after(&per, event.rounds);
        self.events.push(event);
        self.spent_at(self.target_delta)
    }

    /// Cumulative `(epsilon, delta)` spent, at the target delta.
    pub fn spent(&self) -> Spent {
        // Delta and orders were validated at construction, so this cannot fail.
        self.spent_of(&self.rdp, self.target_delta, self.rounds())
            .unwrap_or(Spent {
                epsilon: f64::INFINITY,
                delta: self.target_delta,
                order: f64::NAN,
                rounds: self.rounds(),
            })
    }

    /// Cumulative epsilon spent, measured at another `delta`.
    pub fn spent_at(&self, delta: f64) -> Result<Spent, BudgetError> {
        self.spent_of(&self.rdp, delta, self.rounds())
    }

    /// Epsilon (at the target delta) of `event` on its own, e.g. the cost of one round.
    pub fn event_epsilon(&self, event: &RoundEvent) -> Result<f64, BudgetError> {
        event.validate()?;
        let per = self.per_round_rdp(event)?;
        let k = event.rounds as f64;
        let rdp: Vec<f64> = per.iter().map(|&r| k * r).collect();
        Ok(epsilon_from_rdp(&self.orders, &rdp, self.target_delta)?.0)
    }

    /// Cumulative spend after each recorded event, oldest first.
    pub fn history(&self) -> Result<Vec<Spent>, BudgetError> {
        let mut replay = Self::with_orders(self.target_delta, self.orders.clone())?;
        self.events.iter().map(|&ev| replay.record(ev)).collect()
    }

    /// What would be spent (at the budget's delta) after also running `next`.
    pub fn spent_after(&self, next: &RoundEvent, delta: f64) -> Result<Spent, BudgetError> {
        next.validate()?;
        let per = self.per_round_rdp(next)?;
        let rdp = self.rdp_after(&per, next.rounds);
        self.spent_of(&rdp, delta, self.rounds().saturating_add(next.rounds))
    }

    /// Whether running `next` would take the cumulative epsilon over `budget`.
    pub fn would_exceed(
        &self,
        next: &RoundEvent,
        budget: &PrivacyBudget,
    ) -> Result<bool, BudgetError> {
        budget.validate()?;
        let after = self.spent_after(next, budget.delta)?;
        Ok(!fits(after.epsilon, budget))
    }

    /// Records `next` only if it fits the budget; otherwise returns [`BudgetError::WouldExceed`] and records nothing.
    pub fn try_record(
        &mut self,
        next: RoundEvent,
        budget: &PrivacyBudget,
    ) -> Result<Spent, BudgetError> {
        budget.validate()?;
        let after = self.spent_after(&next, budget.delta)?;
        if !fits(after.epsilon, budget) {
            return Err(BudgetError::WouldExceed {
                spent: self.spent_at(budget.delta)?.epsilon,
                would_be: after.epsilon,
                budget: budget.epsilon,
                delta: budget.delta,
                rounds: next.rounds,
            });
        }
        self.record(next)
    }

    /// Whether the budget is spent: not even one more round with these parameters fits.
    pub fn is_exhausted(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
        budget: &PrivacyBudget,
    ) -> Result<bool, BudgetError> {
        self.would_exceed(
            &RoundEvent::one_round(sampling_rate, noise_multiplier)?,
            budget,
        )
    }

    /// How many more rounds with these parameters fit in `budget` (recorded as one event).
    ///
    /// Capped at [`MAX_REMAINING_ROUNDS`] (rounds that cost nothing, `q = 0`).
    pub fn remaining_rounds(
        &self,
        sampling_rate: f64,
        noise_multiplier: f64,
        budget: &PrivacyBudget,
    ) -> Result<u64, BudgetError> {
        budget.validate()?;
        let per = self.per_round_rdp(&RoundEvent::one_round(sampling_rate, noise_multiplier)?)?;
        let fits = |k: u64| -> Result<bool, BudgetError> {
            let rdp = self.rdp_after(&per, k);
            let (eps, _) = epsilon_from_rdp(&self.orders, &rdp, budget.delta)?;
            Ok(fits(eps, budget))
        };
        if !fits(1)? {
            return Ok(0);
        }
        // Epsilon is non-decreasing in k: gallop, then bisect.
        let mut lo = 1u64; // fits
        let mut hi = 2u64;
        while hi <= MAX_REMAINING_ROUNDS && fits(hi)? {
            lo = hi;
            hi *= 2;
        }
        if hi > MAX_REMAINING_ROUNDS {
            return Ok(MAX_REMAINING_ROUNDS);
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(eps: f64) -> PrivacyBudget {
        PrivacyBudget::new(eps, 1e-5).unwrap()
    }

    #[test]
    fn empty_ledger_spends_nothing() {
        let l = PrivacyLedger::new(1e-5).unwrap();
        let s = l.spent();
        assert_eq!(s.epsilon, 0.0);
        assert_eq!(s.rounds, 0);
    }

    #[test]
    fn record_matches_accountant() {
        let mut l = PrivacyLedger::new(1e-5).unwrap();
        l.record(RoundEvent::new(0.1, 1.2, 30).unwrap()).unwrap();
        l.record(RoundEvent::new(0.05, 0.9, 20).unwrap()).unwrap();
        let mut acc = rdp::RdpAccountant::new();
        acc.compose_sampled_gaussian(0.1, 1.2, 30).unwrap();
        acc.compose_sampled_gaussian(0.05, 0.9, 20).unwrap();
        assert_eq!(l.rdp(), acc.rdp());
        assert_eq!(l.spent().epsilon, acc.epsilon(1e-5).unwrap());
        assert_eq!(l.rounds(), 50);
    }

    #[test]
    fn per_round_and_cumulative() {
        let mut l = PrivacyLedger::new(1e-5).unwrap();
        let ev = RoundEvent::one_round(0.2, 1.0).unwrap();
        let one = l.event_epsilon(&ev).unwrap();
        for _ in 0..5 {
            l.record(ev).unwrap();
        }
        let h = l.history().unwrap();
        assert_eq!(h.len(), 5);
        assert!((h[0].epsilon - one).abs() <= 1e-12 * one);
        assert!(h.windows(2).all(|w| w[0].epsilon <= w[1].epsilon));
        assert_eq!(h[4], l.spent());
        // Composition is sub-additive in epsilon: 5 rounds cost less than 5x one.
        assert!(l.spent().epsilon < 5.0 * one);
    }

    #[test]
    fn federation_stops_before_overspending() {
        let b = budget(3.0);
        let mut l = PrivacyLedger::new(b.delta).unwrap();
        let ev = RoundEvent::one_round(0.1, 1.0).unwrap();
        let planned = l.remaining_rounds(0.1, 1.0, &b).unwrap();
        assert!(planned > 0);
        let mut ran = 0u64;
        loop {
            match l.try_record(ev, &b) {
                Ok(s) => {
                    assert!(s.epsilon <= b.epsilon);
                    ran += 1;
                }
                Err(BudgetError::WouldExceed {
                    spent, would_be, ..
                }) => {
                    assert!(spent <= b.epsilon && would_be > b.epsilon);
                    break;
                }
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(ran < 100_000, "never stopped");
        }
        // Nothing was recorded by the refused round.
        assert_eq!(l.rounds(), ran);
        assert!(l.spent().epsilon <= b.epsilon);
        assert!(l.would_exceed(&ev, &b).unwrap());
        assert!(l.is_exhausted(0.1, 1.0, &b).unwrap());
        assert_eq!(l.remaining_rounds(0.1, 1.0, &b).unwrap(), 0);
        // Recording one by one and planning in one block agree up to rounding
        // at the boundary.
        assert!(ran.abs_diff(planned) <= 1, "ran {ran}, planned {planned}");
    }

    #[test]
    fn non_private_round_always_exceeds() {
        let l = PrivacyLedger::new(1e-5).unwrap();
        let ev = RoundEvent::one_round(0.5, 0.0).unwrap();
        assert!(l.would_exceed(&ev, &budget(100.0)).unwrap());
    }

    #[test]
    fn free_rounds_are_capped() {
        let l = PrivacyLedger::new(1e-5).unwrap();
        assert_eq!(
            l.remaining_rounds(0.0, 1.0, &budget(1.0)).unwrap(),
            MAX_REMAINING_ROUNDS
        );
    }

    #[test]
    fn serde_roundtrip_recomputes_total() {
        let mut l = PrivacyLedger::new(1e-6).unwrap();
        l.record(RoundEvent::new(0.01, 1.1, 100).unwrap()).unwrap();
        l.record(RoundEvent::new(1.0, 5.0, 3).unwrap()).unwrap();
        l.record(RoundEvent::new(0.01, 1.1, 7).unwrap()).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"format_version\":1"));
        assert!(
            !json.contains("\"rdp\""),
            "derived total must not be stored"
        );
        let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.spent(), l.spent());
    }

    #[test]
    fn invalid_stored_ledgers_are_refused() {
        let bad_event = r#"{"format_version":1,"target_delta":1e-5,"events":[{"sampling_rate":2.0,"noise_multiplier":1.0,"rounds":1}]}"#;
        let err = serde_json::from_str::<PrivacyLedger>(bad_event).unwrap_err();
        assert!(err.to_string().contains("sampling rate"), "{err}");
        let bad_version = r#"{"format_version":9,"target_delta":1e-5,"events":[]}"#;
        let err = serde_json::from_str::<PrivacyLedger>(bad_version).unwrap_err();
        assert!(err.to_string().contains("format version 9"), "{err}");
        // Orders default to dp-accounting's when absent.
        let ok = r#"{"format_version":1,"target_delta":1e-5,"events":[]}"#;
        let l: PrivacyLedger = serde_json::from_str(ok).unwrap();
        assert_eq!(l.orders(), rdp::default_orders().as_slice());
    }

    #[test]
    fn validation_errors() {
        assert_eq!(RoundEvent::new(0.1, 1.0, 0), Err(BudgetError::ZeroRounds));
        assert!(matches!(
            PrivacyBudget::new(0.0, 1e-5),
            Err(BudgetError::InvalidBudget { .. })
        ));
        assert!(matches!(
            PrivacyLedger::new(1.5),
            Err(BudgetError::Rdp(RdpError::InvalidDelta(_)))
        ));
        let mut l = PrivacyLedger::new(1e-5).unwrap();
        let bad = RoundEvent {
            sampling_rate: -0.1,
            noise_multiplier: 1.0,
            rounds: 1,
        };
        assert!(l.record(bad).is_err());
        assert!(l.events().is_empty());
    }
}
