//! The transformer weights, loaded by candle-transformers' quantized loader for the file's
//! `general.architecture`, and per-request sessions that own their KV cache.

use std::io::{Read, Seek};
use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::{
    quantized_gemma3, quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};
use serde::Serialize;

use crate::adapted_llama::AdaptedLlama;
use crate::error::{model_err, InferenceError, Result};
use crate::lora::LoraAdapter;
use crate::quant_linear::MappedFile;

/// Model families the engine can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `llama`: Llama, SmolLM/SmolLM2, TinyLlama, Mistral (llama.cpp writes Mistral as llama).
    Llama,
    Phi3,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Architecture {
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Self::Llama,
            "phi3" => Self::Phi3,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            other => return Err(InferenceError::UnsupportedArchitecture(other.to_string())),
        })
    }

    /// The `general.architecture` value, also the prefix of the model's metadata keys.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Phi3 => "phi3",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }

    /// Positions the loader has rotary tables for; the usable context is the smaller of this
    /// and the model's `<arch>.context_length`.
    pub(crate) fn loader_position_limit(self) -> Option<usize> {
        match self {
            Self::Llama => Some(quantized_llama::MAX_SEQ_LEN),
            Self::Gemma3 => Some(quantized_gemma3::MAX_SEQ_LEN),
            // These build their tables from the context length itself.
            Self::Phi3 | Self::Qwen2 | Self::Qwen3 => None,
        }
    }
}

/// Loaded weights. Each candle model keeps its KV cache inside, so requests get a clone: the
/// clone shares the quantized weights (they sit behind `Arc`s) and brings an empty cache.
/// candle's qwen2 model is not `Clone`; its requests take turns on one instance.
pub(crate) enum Weights {
    Llama(quantized_llama::ModelWeights),
    /// llama through this crate's own forward pass: on the CPU always (nanofleet's own
    /// quantized kernels), elsewhere with a LoRA adapter.
    AdaptedLlama(AdaptedLlama),
    Phi3(quantized_phi3::ModelWeights),
    Qwen2(Mutex<quantized_qwen2::ModelWeights>),
    Qwen3(quantized_qwen3::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

/// One request's model state: its own KV cache, or the turn on the shared qwen2 instance.
pub(crate) enum Session<'a> {
    Llama(quantized_llama::ModelWeights),
    AdaptedLlama(AdaptedLlama),
    Phi3(quantized_phi3::ModelWeights),
    Qwen2(MutexGuard<'a, quantized_qwen2::ModelWeights>),
    Qwen3(quantized_qwen3::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

impl Weights {
    pub(crate) fn load<R: Read + Seek>(
        architecture: Architecture,
        content: gguf_file::Content,
        reader: &mut R,
        mapped: Option<&MappedFile>,
        device: &Device,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Self> {
        let load = model_err("loading");
        if let Some(adapter) = adapter {
            return match architecture {
                Architecture::Llama => Ok(Self::AdaptedLlama(
                    AdaptedLlama::from_gguf(content, reader, mapped, device, Some(adapter))
                        .map_err(load)?,
                )),
                other => Err(InferenceError::AdapterArchitecture(
                    other.gguf_name().to_string(),
                )),
            };
        }
        if architecture == Architecture::Llama && device.is_cpu() {
            return Ok(Self::AdaptedLlama(
                AdaptedLlama::from_gguf(content, reader, mapped, device, None).map_err(load)?,
            ));
        }
        Ok(match architecture {
            Architecture::Llama => Self::Llama(
                quantized_llama::ModelWeights::from_gguf(content, reader, device).map_err(load)?,
            ),
            Architecture::Phi3 => Self::Phi3(
                quantized_phi3::ModelWeights::from_gguf(false, content, reader, device)
                    .map_err(load)?,
            ),
            Architecture::Qwen2 => Self::Qwen2(Mutex::new(
                quantized_qwen2::ModelWeights::from_gguf(content, reader, device).map_err(load)?,
            )),
            Architecture::Qwen3 => Self::Qwen3(
                quantized_qwen3::ModelWeights::from_gguf(content, reader, device).map_err(load)?,
            ),
            Architecture::Gemma3 => Self::Gemma3(
                quantized_gemma3::ModelWeights::from_gguf(content, reader, device).map_err(load)?,
            ),
        })
    }

    /// A session with an empty KV cache.
    pub(crate) fn session(&self) -> Session<'_> {
        match self {
            Self::Llama(m) => Session::Llama(m.clone()),
            Self::AdaptedLlama(m) => Session::AdaptedLlama(m.clone()),
            Self::Phi3(m) => Session::Phi3(m.clone()),
            Self::Qwen2(m) => {
                // A panic in another request leaves the weights intact; only its cache is
                // stale, and that is cleared here.
                let mut guard = m.lock().unwrap_or_else(PoisonError::into_inner);
                guard.clear_kv_cache();
                Session::Qwen2(guard)
            }
            Self::Qwen3(m) => Session::Qwen3(m.clone()),
            Self::Gemma3(m) => Session::Gemma3(m.clone()),
        }
    }
}

impl Session<'_> {
    /// Runs `tokens` at positions `position..` and returns the logits after the last one.
    pub(crate) fn forward(
        &mut self,
        tokens: &[u32],
        position: usize,
        device: &Device,
    ) -> Result<Vec<f32>> {
        let forward = model_err("forward pass");
        let input = Tensor::new(tokens, device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(model_err("building the input"))?;
        let logits = match self {
            Self::Llama(m) => m.forward(&input, position),
            Self::AdaptedLlama(m) => m.forward(&input, position),
            Self::Phi3(m) => m.forward(&input, position),
            Self::Qwen2(m) => m.forward(&input, position),
            Self::Qwen3(m) => m.forward(&input, position),
            Self::Gemma3(m) => m.forward(&input, position),
        }
        .map_err(forward)?;
        last_row(&logits).map_err(model_err("reading the logits"))
    }
}

/// The loaders return `(batch, vocab)` or `(batch, seq, vocab)`; the last position's row as f32.
fn last_row(logits: &Tensor) -> candle_core::Result<Vec<f32>> {
    let row = match logits.rank() {
        3 => {
            let seq = logits.dim(1)?;
            logits.i((0, seq - 1))?
        }
        2 => logits.i(0)?,
        _ => logits.flatten_all()?,
    };
    row.to_dtype(DType::F32)?.to_vec1()
}
