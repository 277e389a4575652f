//! nanofleet-inference: the on-device inference engine of the node agent. Loads a quantized
//! GGUF with candle, rebuilds its tokenizer and chat template from the file's metadata, and
//! generates text with seeded, reproducible sampling.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use nanofleet_inference::{ChatMessage, Engine, EngineOptions, GenerateRequest, Prompt};
//!
//! let engine = Engine::load("model.gguf", EngineOptions::default())?;
//! let prompt = engine.render_chat(&[ChatMessage::new("user", "Hi")])?;
//! let request = GenerateRequest::greedy(prompt, 32);
//! let completion = engine.generate(&request, |event| {
//!     print!("{}", event.text);
//!     ControlFlow::Continue(())
//! })?;
//! println!("\n{:?}", completion.stats.finish_reason);
//! # Ok::<(), nanofleet_inference::InferenceError>(())
//! ```

mod adapted_llama;
mod chat;
mod cpu_attention;
pub mod device;
mod engine;
mod error;
pub mod gguf;
pub mod lora;
mod metadata;
pub mod model;
mod output;
mod quant_linear;
mod sampling;
mod text;
pub mod tiny;
mod tokenizer;

pub use candle_core::Device;
pub use chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
pub use device::DeviceChoice;
pub use engine::{
    Completion, Engine, EngineOptions, FinishReason, GenerateRequest, GenerateStats, LoraSource,
    ModelInfo, Prompt, TokenEvent,
};
pub use error::{InferenceError, Result};
pub use model::Architecture;
pub use quant_linear::CpuQuantMatMul;
pub use sampling::{Sampler, SamplingParams};
pub use text::ModelText;
pub use tokenizer::{TokenType, Tokenizer};
