//! nanofleet-privacy: differential privacy for federated LoRA fine-tuning (pure logic, no I/O).
//!
//! A nanofleet round sums the (LoRA) updates of the participating nodes,
//! usually through secure aggregation, so that the coordinator only ever sees
//! the sum. This crate provides what it takes to make that sum differentially
//! private with respect to any single node's whole contribution
//! (node-level DP, "add or remove one node" neighbouring relation):
//!
//! * [`clip`]: bound each node's influence by clipping its update to an L2
//!   norm `C` (the sensitivity of the sum).
//! * [`noise`]: Gaussian noise with standard deviation `z * C`, added either
//!   once to the sum by the coordinator (central DP) or in shares by the
//!   nodes so that only the sum carries the full noise (distributed DP).
//! * [`rdp`]: a Rényi-DP accountant for the Poisson-subsampled Gaussian
//!   mechanism, numerically following Google's `dp-accounting`
//!   (`RdpAccountant`), with conversion to `(epsilon, delta)`.
//! * [`budget`]: a serializable [`budget::PrivacyLedger`] recording rounds
//!   and telling when a federation's `(epsilon, delta)` budget would be
//!   exceeded.
//!
//! The README states the privacy model and its assumptions; read it before
//! choosing parameters.
//!
//! # Example: one round of distributed DP under a budget
//! ```
//! use nanofleet_privacy::{
//!     clip_l2, distributed_share, effective_noise_multiplier, noise_std, GaussianSampler,
//!     PrivacyBudget, PrivacyLedger, RoundEvent,
//! };
//!
//! let (clip_bound, z, q) = (1.0, 1.1, 0.1); // C, noise multiplier, node sampling rate
//! let budget = PrivacyBudget::new(8.0, 1e-5)?;
//! let mut ledger = PrivacyLedger::new(budget.delta)?;
//!
//! // Coordinator, before the round: does it fit the budget?
//! if ledger.would_exceed(&RoundEvent::one_round(q, z)?, &budget)? {
//!     return Ok(()); // stop the federation
//! }
//!
//! // Each of the 10 sampled nodes: clip, then add its noise share.
//! // (Real nodes seed from the OS CSPRNG: GaussianSampler::from_rng(&mut OsRng).)
//! let sigma = noise_std(z, clip_bound)?;
//! let mut update = vec![0.3f32; 8];
//! clip_l2(&mut update, clip_bound)?;
//! let mut sampler = GaussianSampler::from_seed([7; 32]);
//! distributed_share(&mut update, sigma, 10, &mut sampler)?;
//!
//! // Coordinator, after secure aggregation: 9 of 10 shares arrived.
//! let z_eff = effective_noise_multiplier(z, 10, 9)?;
//! let spent = ledger.try_record(RoundEvent::one_round(q, z_eff)?, &budget)?;
//! assert!(spent.epsilon <= budget.epsilon);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod budget;
pub mod clip;
pub mod noise;
pub mod rdp;
mod special;

pub use budget::{BudgetError, PrivacyBudget, PrivacyLedger, RoundEvent, Spent};
pub use clip::{clip_l2, l2_norm, ClipError};
pub use noise::{
    central_noise, distributed_share, distributed_share_std, effective_noise_multiplier, noise_std,
    GaussianSampler, NoiseError,
};
pub use rdp::{
    default_orders, delta_from_rdp, epsilon_from_rdp, rdp_sampled_gaussian, RdpAccountant, RdpError,
};
