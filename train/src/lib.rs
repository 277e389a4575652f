//! nanofleet-train: LoRA fine-tuning of a quantized llama GGUF on the device itself, for
//! nanofleet's federated rounds.
//!
//! # Design
//!
//! The base model stays quantized and frozen; only the low-rank adapters (A, B per targeted
//! linear layer) are candle `Var`s. The forward pass ([`model`](crate) module) is the llama
//! forward of `nanofleet_inference`'s adapted llama rewritten with pieces candle can
//! differentiate: softmax (`ops::softmax` over the last dim), interleaved RoPE
//! (`rope_i_slow`) and the causal mask are primitive ops, because candle's fused
//! `softmax_last_dim` and `rope_i` have no backward. RMSNorm takes its value from the fused
//! kernel and its gradient from the primitive formula (`fused + slow − detach(slow)`): the
//! formula alone rounds differently, and quantized matmuls amplify that over many layers.
//!
//! The frozen matrices are the crux. candle runs `QMatMul` through `apply_op1_no_bwd`, which
//! cuts the graph: no gradient would reach an adapter upstream of any quantized layer, which
//! is all of them. Dequantizing the base to f32 would restore autograd at 4-8× the memory.
//! Instead each frozen matmul is a `CustomOp1` ([`frozen`](crate) module) whose forward is
//! candle's quantized kernel itself (the very computation the engine serves) and whose
//! backward is `dX = dY · W` with `W` dequantized on the fly, the exact gradient of the
//! layer with respect to its input. The gradient checks compare it with ordinary autograd
//! through the dequantized weights and with finite differences; a parity test shows the
//! trained forward equals the engine's forward with the same adapter.
//!
//! Adapters cross the crate boundary as PEFT-named, HF-layout `f32` tensors
//! ([`Trainer::adapter`], [`Trainer::set_adapter`]); the q/k rows of B are reordered to and
//! from the GGUF layout inside, by the rule the engine applies to PEFT adapters.
//!
//! Training data are conversations ([`load_jsonl`]) rendered with the model's own chat
//! template; the loss is the mean token cross-entropy over the response tokens and the
//! end-of-generation token that closes them. Micro-batches are right-padded (the causal mask
//! keeps padding out of every real token's view); gradients are summed over
//! `grad_accumulation` micro-batches, then AdamW steps. A declared memory budget is checked
//! against [`MemoryEstimate`] before any work.
//!
//! ```no_run
//! use std::path::Path;
//! use nanofleet_inference::lora::LoraTarget;
//! use nanofleet_train::{load_jsonl, split_holdout, LoraSpec, TrainOptions, Trainer};
//!
//! let spec = LoraSpec {
//!     rank: 8,
//!     alpha: 16.0,
//!     dropout: 0.05,
//!     targets: vec![LoraTarget::Query, LoraTarget::Value],
//!     freeze_a: false,
//! };
//! let mut trainer = Trainer::load(Path::new("model.gguf"), spec)?;
//! # let initial = std::collections::HashMap::new();
//! trainer.set_adapter(&initial)?; // A, B from the federated crate's seeded init
//! let (train, held_out) = split_holdout(load_jsonl(Path::new("data.jsonl"))?, 0.1);
//! let report = trainer.train(&train, &TrainOptions::default())?;
//! let eval = trainer.evaluate(&held_out, 64)?;
//! println!("{} → {}, exact match {}", report.first_loss, eval.loss, eval.exact_match);
//! # Ok::<(), nanofleet_train::TrainError>(())
//! ```

mod batch;
mod data;
mod error;
mod frozen;
#[cfg(test)]
mod gradcheck;
mod lora;
mod memory;
mod model;
#[cfg(test)]
mod test_support;
mod trainer;

pub use data::{load_jsonl, split_holdout, Example};
pub use error::{Result, TrainError};
pub use lora::LoraSpec;
pub use memory::MemoryEstimate;
pub use nanofleet_inference::lora::LoraTarget;
pub use trainer::{EvalReport, TrainOptions, TrainReport, Trainer};
