//! The crate's error type: every way loading, reading data or training can fail.

use std::path::PathBuf;

/// Why the trainer could not do what was asked; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("the model cannot be trained: {0}")]
    Model(String),
    #[error("{path}, line {line}: {detail}")]
    Data {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("invalid LoRA spec: {0}")]
    Spec(String),
    #[error("invalid training options: {0}")]
    Options(String),
    #[error("invalid adapter tensors: {0}")]
    Adapter(String),
    #[error("training needs about {estimate} bytes for batch {batch} × {seq_len} tokens, above the budget of {budget} bytes; lower batch_size or max_seq_len")]
    MemoryBudget {
        estimate: u64,
        budget: u64,
        batch: usize,
        seq_len: usize,
    },
    #[error("no example has a response token left within max_seq_len = {0}")]
    NothingToLearn(usize),
    #[error(transparent)]
    Inference(#[from] nanofleet_inference::InferenceError),
    #[error("tensor operation failed while {operation}: {source}")]
    Tensor {
        operation: &'static str,
        source: candle_core::Error,
    },
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// Wraps a candle error with the step that produced it.
pub(crate) fn tensor_err(operation: &'static str) -> impl FnOnce(candle_core::Error) -> TrainError {
    move |source| TrainError::Tensor { operation, source }
}
