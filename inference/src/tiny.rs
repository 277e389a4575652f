//! Small random GGUF models of every supported architecture, written on demand, so that code
//! which needs a loadable model (this crate's tests, the agent's) runs without a real one.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::chat::CHATML_TEMPLATE;
use crate::error::{model_err, Result};
use crate::model::Architecture;
use crate::tokenizer::byte_level_char;

/// Which tokenizer the tiny model carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyTokenizer {
    /// `gpt2` byte-level BPE with ChatML special tokens and a ChatML template (SmolLM2-like).
    ByteLevel,
    /// `llama` SentencePiece with byte fallback and no chat template (TinyLlama-like).
    SentencePiece,
}

/// Shape of the tiny models: every matrix is a multiple of the 32-wide quantization block.
const HIDDEN: usize = 64;
const FEED_FORWARD: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;
/// Context of the tiny models, small so that overflow is easy to reach in tests.
pub const TINY_CONTEXT_LENGTH: usize = 256;

struct Writer {
    rng: ChaCha8Rng,
    metadata: Vec<(String, gguf_file::Value)>,
    tensors: Vec<(String, QTensor)>,
}

impl Writer {
    fn meta(&mut self, key: impl Into<String>, value: gguf_file::Value) {
        self.metadata.push((key.into(), value));
    }

    fn random(&mut self, shape: &[usize], center: f32, spread: f32) -> Result<Tensor> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| center + self.rng.gen_range(-spread..spread))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).map_err(model_err("making a tiny tensor"))
    }

    /// A Q8_0 matrix of shape (rows, columns) = (out, in).
    fn matrix(&mut self, name: impl Into<String>, rows: usize, columns: usize) -> Result<()> {
        let spread = 1.0 / (columns as f32).sqrt();
        let tensor = self.random(&[rows, columns], 0.0, spread)?;
        let q = QTensor::quantize(&tensor, GgmlDType::Q8_0)
            .map_err(model_err("quantizing a tiny tensor"))?;
        self.tensors.push((name.into(), q));
        Ok(())
    }

    /// An f32 vector: norm weights near 1, biases near 0.
    fn vector(&mut self, name: impl Into<String>, len: usize, center: f32) -> Result<()> {
        let tensor = self.random(&[len], center, 0.1)?;
        let q = QTensor::quantize(&tensor, GgmlDType::F32)
            .map_err(model_err("storing a tiny tensor"))?;
        self.tensors.push((name.into(), q));
        Ok(())
    }
}

fn strings(items: impl IntoIterator<Item = String>) -> gguf_file::Value {
    gguf_file::Value::Array(items.into_iter().map(gguf_file::Value::String).collect())
}

fn byte_level_tokenizer(w: &mut Writer) {
    use gguf_file::Value;
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut types = vec![3; 3];
    tokens.extend((0..=255u8).map(|b| byte_level_char(b).to_string()));
    let merges = [
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("i", "n"),
        ("Ġ", "a"),
        ("e", "r"),
    ];
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    types.resize(tokens.len(), 1);
    w.meta("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.meta("tokenizer.ggml.pre", Value::String("smollm".into()));
    w.meta("tokenizer.ggml.tokens", strings(tokens));
    w.meta(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    w.meta(
        "tokenizer.ggml.merges",
        strings(merges.iter().map(|(a, b)| format!("{a} {b}"))),
    );
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.meta("tokenizer.ggml.add_bos_token", Value::Bool(false));
    w.meta(
        "tokenizer.chat_template",
        Value::String(CHATML_TEMPLATE.into()),
    );
}

fn sentencepiece_tokenizer(w: &mut Writer) {
    use gguf_file::Value;
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"]
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut types = vec![2, 3, 3];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.resize(tokens.len(), 6);
    let pieces = [
        "▁", "e", "t", "a", "o", "h", "▁t", "he", "▁the", "▁a", "in", "er",
    ];
    tokens.extend(pieces.iter().map(|p| p.to_string()));
    types.resize(tokens.len(), 1);
    let scores = (0..tokens.len()).map(|i| Value::F32(-(i as f32)));
    w.meta("tokenizer.ggml.model", Value::String("llama".into()));
    w.meta("tokenizer.ggml.tokens", strings(tokens));
    w.meta(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    w.meta("tokenizer.ggml.scores", Value::Array(scores.collect()));
    w.meta("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.meta("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.meta("tokenizer.ggml.unknown_token_id", Value::U32(0));
}

/// Writes a random model of `architecture` with `tokenizer` to `path`; the same `seed` writes
/// the same bytes.
pub fn write_tiny_model(
    path: impl AsRef<Path>,
    architecture: Architecture,
    tokenizer: TinyTokenizer,
    seed: u64,
) -> Result<()> {
    write_model(path.as_ref(), architecture, tokenizer, seed, false)
}

/// Like [`write_tiny_model`], but the final norm holds NaN: a well-formed file whose model
/// answers nothing, as a corrupted fine-tune or a bad conversion would. For health-gate tests.
pub fn write_broken_tiny_model(
    path: impl AsRef<Path>,
    architecture: Architecture,
    tokenizer: TinyTokenizer,
    seed: u64,
) -> Result<()> {
    write_model(path.as_ref(), architecture, tokenizer, seed, true)
}

fn write_model(
    path: &Path,
    architecture: Architecture,
    tokenizer: TinyTokenizer,
    seed: u64,
    broken: bool,
) -> Result<()> {
    use gguf_file::Value;
    let mut w = Writer {
        rng: ChaCha8Rng::seed_from_u64(seed),
        metadata: Vec::new(),
        tensors: Vec::new(),
    };
    match tokenizer {
        TinyTokenizer::ByteLevel => byte_level_tokenizer(&mut w),
        TinyTokenizer::SentencePiece => sentencepiece_tokenizer(&mut w),
    }
    let vocab = match &w
        .metadata
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
    {
        Some((_, Value::Array(tokens))) => tokens.len(),
        _ => unreachable!("both tokenizers write their tokens"),
    };
    let arch = architecture.gguf_name();
    w.meta("general.architecture", Value::String(arch.into()));
    w.meta("general.name", Value::String(format!("tiny-random-{arch}")));
    let dims = [
        ("context_length", TINY_CONTEXT_LENGTH),
        ("embedding_length", HIDDEN),
        ("block_count", LAYERS),
        ("feed_forward_length", FEED_FORWARD),
        ("attention.head_count", HEADS),
        ("attention.head_count_kv", KV_HEADS),
        ("rope.dimension_count", HEAD_DIM),
        ("attention.key_length", HEAD_DIM),
        ("attention.value_length", HEAD_DIM),
        ("attention.sliding_window", 64),
    ];
    for (key, value) in dims {
        w.meta(format!("{arch}.{key}"), Value::U32(value as u32));
    }
    w.meta(
        format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-5),
    );
    w.meta(format!("{arch}.rope.freq_base"), Value::F32(10_000.0));

    w.matrix("token_embd.weight", vocab, HIDDEN)?;
    w.vector(
        "output_norm.weight",
        HIDDEN,
        if broken { f32::NAN } else { 1.0 },
    )?;
    if architecture == Architecture::Phi3 {
        // The phi3 loader has no tied-embedding fallback.
        w.matrix("output.weight", vocab, HIDDEN)?;
    }
    let kv = KV_HEADS * HEAD_DIM;
    for layer in 0..LAYERS {
        let p = format!("blk.{layer}");
        w.vector(format!("{p}.attn_norm.weight"), HIDDEN, 1.0)?;
        w.vector(format!("{p}.ffn_norm.weight"), HIDDEN, 1.0)?;
        w.matrix(format!("{p}.ffn_down.weight"), HIDDEN, FEED_FORWARD)?;
        w.matrix(format!("{p}.attn_output.weight"), HIDDEN, HIDDEN)?;
        if architecture == Architecture::Phi3 {
            w.matrix(format!("{p}.attn_qkv.weight"), HIDDEN + 2 * kv, HIDDEN)?;
            // phi3 keeps gate and up in one matrix.
            w.matrix(format!("{p}.ffn_up.weight"), 2 * FEED_FORWARD, HIDDEN)?;
            continue;
        }
        w.matrix(format!("{p}.attn_q.weight"), HIDDEN, HIDDEN)?;
        w.matrix(format!("{p}.attn_k.weight"), kv, HIDDEN)?;
        w.matrix(format!("{p}.attn_v.weight"), kv, HIDDEN)?;
        w.matrix(format!("{p}.ffn_gate.weight"), FEED_FORWARD, HIDDEN)?;
        w.matrix(format!("{p}.ffn_up.weight"), FEED_FORWARD, HIDDEN)?;
        match architecture {
            Architecture::Qwen2 => {
                w.vector(format!("{p}.attn_q.bias"), HIDDEN, 0.0)?;
                w.vector(format!("{p}.attn_k.bias"), kv, 0.0)?;
                w.vector(format!("{p}.attn_v.bias"), kv, 0.0)?;
            }
            Architecture::Qwen3 => {
                w.vector(format!("{p}.attn_q_norm.weight"), HEAD_DIM, 1.0)?;
                w.vector(format!("{p}.attn_k_norm.weight"), HEAD_DIM, 1.0)?;
            }
            Architecture::Gemma3 => {
                w.vector(format!("{p}.attn_q_norm.weight"), HEAD_DIM, 1.0)?;
                w.vector(format!("{p}.attn_k_norm.weight"), HEAD_DIM, 1.0)?;
                w.vector(format!("{p}.post_attention_norm.weight"), HIDDEN, 1.0)?;
                w.vector(format!("{p}.post_ffw_norm.weight"), HIDDEN, 1.0)?;
            }
            Architecture::Llama | Architecture::Phi3 => {}
        }
    }

    let file = std::fs::File::create(path).map_err(|source| crate::InferenceError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file = std::io::BufWriter::new(file);
    let metadata: Vec<(&str, &Value)> = w.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = w.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut file, &metadata, &tensors)
        .map_err(model_err("writing the tiny model"))?;
    std::io::Write::flush(&mut file).map_err(|source| crate::InferenceError::Open {
        path: path.to_path_buf(),
        source,
    })
}
