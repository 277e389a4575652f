//! nanofleet-federated: the pure logic of federated LoRA rounds, shared by the coordinator
//! (which aggregates) and the agent (which trains). No I/O.
//!
//! - [`spec`]: what a federation trains (rank, alpha, targets, aggregation mode) and the
//!   per-round training plan, with their limits.
//! - [`tensors`]: an adapter or an update as PEFT-named f32 matrices, and its wire form
//!   (safetensors bytes, bounded decoder).
//! - [`init`]: the seeded initial adapter every node derives alike (A uniform as PEFT's
//!   Kaiming init, B zero), so round 1 needs no adapter on the wire.
//! - [`aggregate`]: FedAvg weighted by example count, and the exact mode (FFA-LoRA: A frozen
//!   from the shared seed, only B averaged, so the average of the updates is the update of
//!   the average).

pub mod aggregate;
pub mod init;
pub mod spec;
pub mod tensors;

pub use aggregate::{
    apply_delta, mean_from_weighted_sum, update_element_count, update_layout, weighted_vector,
    AggregateError, Aggregator,
};
pub use init::initial_adapter;
pub use spec::{AdapterSpec, AggregationMode, SpecError, Target, TrainingPlan};
pub use tensors::{AdapterTensors, Matrix, TensorError};
