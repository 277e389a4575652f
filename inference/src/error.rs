//! The crate's error type: every way loading, tokenizing, templating or generating can fail.

use std::path::PathBuf;

/// Why the engine could not do what was asked; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        source: nanofleet_artifact::gguf::GgufError,
    },
    #[error("tensor `{tensor}` is of type {type_name}, which this engine cannot load; re-quantize the model to a GGML type candle reads (F32, F16, BF16, Q4_0 to Q8_1, or a K-quant)")]
    UnsupportedTensorType { tensor: String, type_name: String },
    #[error("GGUF metadata key `{key}` is missing; the file was not written by a GGUF converter this engine understands")]
    MissingMetadata { key: String },
    #[error("GGUF metadata key `{key}` has an unexpected type or value: {detail}")]
    BadMetadata { key: String, detail: String },
    #[error("model architecture `{0}` is not supported; supported: llama (SmolLM2, TinyLlama, Mistral), phi3, qwen2, qwen3, gemma3")]
    UnsupportedArchitecture(String),
    #[error("tokenizer model `{0}` is not supported; supported: gpt2 (byte-level BPE) and llama (SentencePiece)")]
    UnsupportedTokenizer(String),
    #[error("pre-tokenizer `{0}` (tokenizer.ggml.pre) is not supported; supported: default, gpt2, smollm, llama-bpe, llama3, qwen2")]
    UnsupportedPreTokenizer(String),
    #[error("cannot use the LoRA adapter {0}")]
    Adapter(String),
    #[error("LoRA adapters are applied to llama-architecture models only; this model is `{0}`")]
    AdapterArchitecture(String),
    #[error("cannot build the tokenizer from the GGUF metadata: {0}")]
    TokenizerBuild(String),
    #[error("cannot tokenize the text: {0}")]
    Tokenize(String),
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownToken { id: u32, vocab_size: usize },
    #[error("the chat template from the model does not compile: {0}")]
    TemplateSyntax(String),
    #[error("the chat template could not render these messages: {0}")]
    TemplateRender(String),
    #[error("the prompt is empty: give at least one token (or a text that tokenizes to one)")]
    EmptyPrompt,
    #[error("prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context length of {context_length} tokens; shorten the prompt or lower max_tokens")]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    },
    #[error("invalid sampling parameter: {0}")]
    InvalidSampling(String),
    #[error("{0}")]
    Device(String),
    #[error("model {operation} failed: {source}")]
    Model {
        operation: &'static str,
        source: candle_core::Error,
    },
}

pub type Result<T> = std::result::Result<T, InferenceError>;

/// Wraps a candle error with the step that produced it.
pub(crate) fn model_err(
    operation: &'static str,
) -> impl FnOnce(candle_core::Error) -> InferenceError {
    move |source| InferenceError::Model { operation, source }
}
