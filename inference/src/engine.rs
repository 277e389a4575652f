//! The engine the node agent holds: load a GGUF once, then serve generation requests from any
//! number of threads, each with its own KV cache and sampler.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::Device;
use serde::Serialize;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{model_err, InferenceError, Result};
use crate::gguf;
use crate::lora::{LoraAdapter, LoraConfig};
use crate::metadata::Metadata;
use crate::model::{Architecture, Weights};
use crate::output::TextOutput;
use crate::quant_linear::MappedFile;
use crate::sampling::{Sampler, SamplingParams};
use crate::text::ModelText;
use crate::tokenizer::Tokenizer;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Threads for the forward pass; `None` takes candle's default (physical cores, or
    /// `CANDLE_NUM_THREADS`/`RAYON_NUM_THREADS`). candle sizes its worker pools once per
    /// process, from those variables: the first `Engine::load` sets them when they are unset,
    /// so the first engine loaded decides for every later one.
    pub threads: Option<usize>,
    /// A context shorter than the model's, to bound KV-cache memory on small devices.
    pub context_length: Option<usize>,
    /// Where the weights live and the forward pass runs; see [`crate::DeviceChoice::open`].
    pub device: Device,
    /// A LoRA adapter applied unmerged on top of the quantized base (llama models only).
    pub lora: Option<LoraSource>,
}

/// Where a LoRA adapter comes from.
#[derive(Debug, Clone)]
pub enum LoraSource {
    /// A PEFT output directory: `adapter_config.json` and `adapter_model.safetensors`.
    PeftDir(PathBuf),
    /// One safetensors file of PEFT-named A/B tensors whose header metadata carries the
    /// configuration (`lora_r`, `lora_alpha`): a nanofleet adapter artifact.
    Safetensors(PathBuf),
    /// PEFT-named A/B tensors in HF layout, e.g. fresh from a training round.
    PeftTensors {
        config: LoraConfig,
        tensors: std::collections::HashMap<String, candle_core::Tensor>,
    },
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            threads: None,
            context_length: None,
            device: Device::Cpu,
            lora: None,
        }
    }
}

/// Facts about the loaded model, for the agent's `/v1/models` and telemetry.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub architecture: Architecture,
    /// `general.name`, when the file has one.
    pub name: Option<String>,
    /// The context the engine enforces: the smallest of the model's, the loader's and the
    /// one asked for in [`EngineOptions::context_length`].
    pub context_length: usize,
    /// `<arch>.context_length` as the model declares it.
    pub model_context_length: usize,
    pub vocab_size: usize,
    pub bos_token: Option<u32>,
    pub eos_token: Option<u32>,
    /// Whether the chat template came from the file (false: the ChatML fallback).
    pub chat_template_from_model: bool,
    pub tensor_count: usize,
    /// Linear layers with a LoRA delta; 0 without an adapter.
    pub lora_adapted_layers: usize,
    /// Where the model runs, as [`crate::device::describe`] says it.
    pub device: String,
    pub load_time: Duration,
}

/// What to continue: a text (tokenized with BOS if the model asks for it) or exact token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Most tokens to generate. Prompt plus this must fit the context, or the request is
    /// refused with [`InferenceError::ContextOverflow`] before any work: a caller that wants
    /// "as many as fit" asks for `context_length - prompt_tokens`.
    pub max_tokens: usize,
    /// Texts that end generation; the stop text itself is not returned.
    pub stop: Vec<String>,
    pub seed: u64,
    /// Keep generating through end-of-generation tokens (their text is dropped), e.g. to
    /// measure speed over a fixed number of tokens.
    pub ignore_eos: bool,
}

impl GenerateRequest {
    /// Greedy continuation of `text`, up to `max_tokens`.
    pub fn greedy(text: impl Into<String>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            seed: 0,
            ignore_eos: false,
        }
    }
}

/// One generated token, given to the caller as soon as it is sampled; an end-of-generation
/// token comes too (its text is only what was still held back, never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEvent {
    /// 0 for the first generated token.
    pub index: usize,
    pub token: u32,
    /// Text this token releases. Empty while a UTF-8 character or a possible stop sequence is
    /// incomplete; the held text comes with a later token (the last one at the latest).
    pub text: String,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller's callback returned `ControlFlow::Break`.
    Cancelled,
}

/// Counts and timings of one request.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Tokens sampled, an end-of-generation token included.
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// Running the prompt through the model.
    pub prompt_time: Duration,
    /// From the first generated token's forward pass to the end.
    pub generation_time: Duration,
    /// From the call to the first token given to the callback.
    pub time_to_first_token: Duration,
}

impl GenerateStats {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        per_second(self.prompt_tokens, self.prompt_time)
    }

    /// Decode speed: tokens after the first, over the time spent producing them.
    pub fn generation_tokens_per_second(&self) -> f64 {
        per_second(
            self.completion_tokens.saturating_sub(1),
            self.generation_time,
        )
    }
}

fn per_second(count: usize, time: Duration) -> f64 {
    if time.is_zero() {
        0.0
    } else {
        count as f64 / time.as_secs_f64()
    }
}

/// The result of [`Engine::generate`].
#[derive(Debug, Clone)]
pub struct Completion {
    /// All released text (stop sequence excluded).
    pub text: String,
    pub tokens: Vec<u32>,
    pub stats: GenerateStats,
}

/// A loaded model. `Engine` is `Send + Sync`: share it in an `Arc` and call
/// [`Engine::generate`] from several threads at once; each call clones the model's layers
/// (sharing the quantized weights) to get its own KV cache, so requests do not wait for each
/// other. Exception: qwen2 requests run one at a time (see [`crate::model`]).
pub struct Engine {
    weights: Weights,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    info: ModelInfo,
    device: Device,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

static CANDLE_THREADS: Once = Once::new();

/// candle's quantized matmul and its f32 matmul run on process-wide pools created on first use
/// from `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS`; setting them before any model runs is the
/// only way to size those pools.
fn size_candle_workers(threads: usize) {
    CANDLE_THREADS.call_once(|| {
        for variable in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
            if std::env::var_os(variable).is_none() {
                std::env::set_var(variable, threads.to_string());
            }
        }
    });
}

impl Engine {
    /// Reads the GGUF at `path`: metadata, tokenizer, chat template and weights.
    pub fn load(path: impl AsRef<Path>, options: EngineOptions) -> Result<Self> {
        let started = Instant::now();
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|source| InferenceError::Open {
            path: path.clone(),
            source,
        })?;
        let mapped = MappedFile::new(&file);
        let mut content =
            gguf::read_content(&path, &file, mapped.as_ref().map(MappedFile::as_bytes))?;
        let mut reader = std::io::BufReader::new(file);
        // The tokenizer and chat template are built on a thread of their own from their
        // keys, taken out of the metadata, while the weights are packed.
        let text_metadata: HashMap<String, gguf_file::Value> = content
            .metadata
            .extract_if(|key, _| key.starts_with("tokenizer."))
            .collect();
        let md = Metadata::new(&content.metadata);
        let architecture =
            Architecture::from_gguf_name(md.required_string("general.architecture")?)?;
        let context_key = format!("{}.context_length", architecture.gguf_name());
        let model_context_length = md.required_unsigned(&context_key)? as usize;
        let context_length = [
            Some(model_context_length),
            architecture.loader_position_limit(),
            options.context_length,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(model_context_length);
        let name = md.string("general.name")?.map(str::to_string);
        let tensor_count = content.tensor_infos.len();

        if let Some(threads) = options.threads {
            size_candle_workers(threads.max(1));
        }
        let adapter = match options.lora {
            None => None,
            Some(source) => {
                let prefix = architecture.gguf_name();
                let heads =
                    md.required_unsigned(&format!("{prefix}.attention.head_count"))? as usize;
                let kv_heads =
                    md.required_unsigned(&format!("{prefix}.attention.head_count_kv"))? as usize;
                Some(match source {
                    LoraSource::PeftDir(dir) => {
                        LoraAdapter::load_peft_dir(dir, heads, kv_heads, &options.device)?
                    }
                    LoraSource::Safetensors(file) => {
                        LoraAdapter::load_safetensors(file, heads, kv_heads, &options.device)?
                    }
                    LoraSource::PeftTensors { config, tensors } => {
                        // Fresh from training on the CPU; the adapter lives beside the weights.
                        let tensors = tensors
                            .into_iter()
                            .map(|(name, tensor)| Ok((name, tensor.to_device(&options.device)?)))
                            .collect::<candle_core::Result<_>>()
                            .map_err(model_err("moving the adapter to the device"))?;
                        LoraAdapter::from_peft_tensors(config, tensors, heads, kv_heads)?
                    }
                })
            }
        };
        let (text, weights) = std::thread::scope(|scope| {
            let text = std::thread::Builder::new()
                .name("nanofleet-tokenizer".into())
                .spawn_scoped(scope, || ModelText::from_gguf_metadata(&text_metadata));
            let weights = Weights::load(
                architecture,
                content,
                &mut reader,
                mapped.as_ref(),
                &options.device,
                adapter.as_ref(),
            );
            let text = match text {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // No thread to be had: build it here.
                Err(_) => ModelText::from_gguf_metadata(&text_metadata),
            };
            (text, weights)
        });
        // The tokenizer's error first, as when the two were built one after the other.
        let ModelText {
            tokenizer,
            template,
        } = text?;
        let weights = weights?;
        // The header's 100,000 strings and the tokenizer's building leave freed pages in
        // glibc's heaps, which it keeps unless asked: give them back.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        let info = ModelInfo {
            path,
            architecture,
            name,
            context_length,
            model_context_length,
            vocab_size: tokenizer.vocab_size(),
            bos_token: tokenizer.bos_token(),
            eos_token: tokenizer.eos_token(),
            chat_template_from_model: template.is_from_model(),
            tensor_count,
            lora_adapted_layers: adapter.as_ref().map_or(0, LoraAdapter::len),
            device: crate::device::describe(&options.device),
            load_time: started.elapsed(),
        };
        Ok(Self {
            weights,
            tokenizer,
            template,
            info,
            device: options.device,
        })
    }

    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text`; see [`Tokenizer::encode`].
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, add_special)
    }

    pub fn detokenize(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer.decode(tokens)
    }

    /// The prompt for a conversation, ending with the opened assistant turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        self.template.render(messages, true)
    }

    /// Refuses prompts the model cannot run: empty, unknown ids, or too long with `max_tokens`.
    fn check_prompt(&self, prompt: &[u32], max_tokens: usize) -> Result<()> {
        if prompt.is_empty() {
            return Err(InferenceError::EmptyPrompt);
        }
        let vocab_size = self.tokenizer.vocab_size();
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(InferenceError::UnknownToken { id, vocab_size });
        }
        if prompt.len() + max_tokens > self.info.context_length {
            return Err(InferenceError::ContextOverflow {
                prompt_tokens: prompt.len(),
                max_tokens,
                context_length: self.info.context_length,
            });
        }
        Ok(())
    }

    /// Whether `request` can run: what [`Engine::generate`] refuses before any work, without
    /// doing any, so that a server can answer at once instead of after a queue.
    pub fn check_request(&self, request: &GenerateRequest) -> Result<()> {
        request.sampling.validate()?;
        match &request.prompt {
            Prompt::Text(text) => {
                self.check_prompt(&self.tokenizer.encode(text, true)?, request.max_tokens)
            }
            Prompt::Tokens(tokens) => self.check_prompt(tokens, request.max_tokens),
        }
    }

    /// The model's logits for the token after `tokens` (fresh context), e.g. for evaluation.
    pub fn next_token_logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_prompt(tokens, 0)?;
        self.weights.session().forward(tokens, 0, &self.device)
    }

    /// Generates a continuation, calling `on_token` for every sampled token; returning
    /// `ControlFlow::Break(())` from it ends generation (finish reason `Cancelled`).
    pub fn generate(
        &self,
        request: &GenerateRequest,
        mut on_token: impl FnMut(TokenEvent) -> ControlFlow<()>,
    ) -> Result<Completion> {
        let started = Instant::now();
        let prompt = match &request.prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true)?,
            Prompt::Tokens(tokens) => tokens.clone(),
        };
        self.check_prompt(&prompt, request.max_tokens)?;
        let mut sampler = Sampler::new(request.sampling.clone(), request.seed)?;
        let mut output = TextOutput::new(&request.stop);
        let mut session = self.weights.session();
        let mut history = prompt.clone();
        let mut text = String::new();
        let mut finish_reason = FinishReason::Length;
        let mut time_to_first_token = Duration::ZERO;

        let prompt_started = Instant::now();
        let mut logits = if request.max_tokens == 0 {
            Vec::new()
        } else {
            session.forward(&prompt, 0, &self.device)?
        };
        let prompt_time = prompt_started.elapsed();
        let generation_started = Instant::now();

        for index in 0..request.max_tokens {
            let token = sampler.sample(&mut logits, &history);
            history.push(token);
            let is_last = index + 1 == request.max_tokens;
            let mut released = if self.tokenizer.is_end_of_generation(token) {
                if !request.ignore_eos {
                    finish_reason = FinishReason::Stop;
                }
                crate::output::Released::default()
            } else {
                output.push(self.tokenizer.piece(token)?)
            };
            if released.stopped {
                finish_reason = FinishReason::Stop;
            } else if is_last || finish_reason == FinishReason::Stop {
                released.text.push_str(&output.finish());
            }
            text.push_str(&released.text);
            if index == 0 {
                time_to_first_token = started.elapsed();
            }
            let flow = on_token(TokenEvent {
                index,
                token,
                text: released.text,
            });
            if released.stopped || finish_reason == FinishReason::Stop || is_last {
                break;
            }
            if flow.is_break() {
                finish_reason = FinishReason::Cancelled;
                break;
            }
            let position = history.len() - 1;
            logits = session.forward(&[token], position, &self.device)?;
        }
        Ok(Completion {
            text,
            stats: GenerateStats {
                prompt_tokens: prompt.len(),
                completion_tokens: history.len() - prompt.len(),
                finish_reason,
                prompt_time,
                generation_time: generation_started.elapsed(),
                time_to_first_token,
            },
            tokens: history.split_off(prompt.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Engine>();
    }

    #[test]
    fn rates_handle_zero_time() {
        let stats = GenerateStats {
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: FinishReason::Length,
            prompt_time: Duration::from_millis(500),
            generation_time: Duration::ZERO,
            time_to_first_token: Duration::from_millis(600),
        };
        assert_eq!(stats.prompt_tokens_per_second(), 20.0);
        assert_eq!(stats.generation_tokens_per_second(), 0.0);
    }
}
