//! The llama forward pass for training (dense llama, as `nanofleet_inference`'s adapted
//! llama), built only from pieces candle can differentiate: RMSNorm (gradient), RoPE, softmax
//! and the causal mask from primitive ops, the frozen matmuls through [`FrozenLinear`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor, D};
use nanofleet_inference::lora::LoraTarget;

use crate::error::{tensor_err, Result, TrainError};
use crate::frozen::FrozenLinear;
use crate::lora::{LoraPair, LoraSpec, Mode};

/// The targets in the order each block stores its linear layers.
pub(crate) const TARGETS: [LoraTarget; 7] = [
    LoraTarget::Query,
    LoraTarget::Key,
    LoraTarget::Value,
    LoraTarget::Output,
    LoraTarget::Gate,
    LoraTarget::Up,
    LoraTarget::Down,
];

fn slot(target: LoraTarget) -> usize {
    TARGETS
        .iter()
        .position(|t| *t == target)
        .unwrap_or_default()
}

fn gguf_name(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Query => "attn_q",
        LoraTarget::Key => "attn_k",
        LoraTarget::Value => "attn_v",
        LoraTarget::Output => "attn_output",
        LoraTarget::Gate => "ffn_gate",
        LoraTarget::Up => "ffn_up",
        LoraTarget::Down => "ffn_down",
    }
}

/// Sizes read from the GGUF metadata.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) hidden: usize,
    pub(crate) feed_forward: usize,
    pub(crate) layers: usize,
    pub(crate) vocab: usize,
    /// Positions the rotary tables cover: the model's context, capped like the engine's.
    pub(crate) max_positions: usize,
    eps: f64,
    /// Keys and values rounded to f16, as the engine's KV cache holds them (with a
    /// straight-through gradient); off only where a test needs the loss smooth.
    pub(crate) kv_in_f16: bool,
}

#[derive(Debug)]
struct Block {
    /// In [`TARGETS`] order.
    linears: Vec<FrozenLinear>,
    attention_norm: Tensor,
    ffn_norm: Tensor,
}

/// The frozen base plus the trainable adapters.
#[derive(Debug)]
pub(crate) struct TrainModel {
    pub(crate) config: Config,
    /// Dequantized once: a lookup needs rows, and no gradient is taken for it.
    embeddings: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: FrozenLinear,
    cos: Tensor,
    sin: Tensor,
    /// Sorted by (layer, target order).
    pub(crate) lora: Vec<LoraPair>,
    lora_index: HashMap<(usize, LoraTarget), usize>,
    /// Bytes of the frozen weights as held: quantized matrices, f32 norms and embeddings.
    pub(crate) weight_bytes: u64,
    /// The largest matrix dequantized to f32, held briefly by each backward.
    pub(crate) largest_matrix_bytes: u64,
}

fn metadata_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    ct.metadata
        .get(key)
        .ok_or_else(|| TrainError::Model(format!("metadata key `{key}` is missing")))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(|e| TrainError::Model(format!("metadata key `{key}`: {e}")))
}

/// Reads tensors of one GGUF and counts the bytes they take once loaded.
struct Loader<'a> {
    content: &'a gguf_file::Content,
    reader: std::io::BufReader<std::fs::File>,
    path: &'a Path,
    device: &'a Device,
    weight_bytes: u64,
    largest_matrix_bytes: u64,
}

impl Loader<'_> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, self.device)
            .map_err(|source| TrainError::Gguf {
                path: self.path.to_path_buf(),
                source,
            })
    }

    /// A weight matrix, kept quantized.
    fn matrix(&mut self, name: &str) -> Result<Arc<QTensor>> {
        let q = self.qtensor(name)?;
        self.weight_bytes += q.storage_size_in_bytes() as u64;
        self.largest_matrix_bytes = self
            .largest_matrix_bytes
            .max(4 * q.shape().elem_count() as u64);
        Ok(Arc::new(q))
    }

    /// A norm weight, as f32.
    fn vector(&mut self, name: &str) -> Result<Tensor> {
        let t = self
            .qtensor(name)?
            .dequantize(self.device)
            .map_err(tensor_err("reading a norm weight"))?;
        self.weight_bytes += 4 * t.elem_count() as u64;
        Ok(t)
    }
}

impl TrainModel {
    /// Reads a llama GGUF with zero adapters on `spec.targets` (A and B all zero).
    pub(crate) fn load(path: &Path, content: gguf_file::Content, spec: &LoraSpec) -> Result<Self> {
        let device = Device::Cpu;
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if architecture != "llama" {
            return Err(TrainError::Model(format!(
                "only llama-architecture models are supported, this one is `{architecture}`"
            )));
        }
        if content
            .metadata
            .get("llama.expert_count")
            .is_some_and(|v| v.to_u32().is_ok_and(|n| n > 0))
        {
            return Err(TrainError::Model(
                "mixture-of-experts llama models are not supported".into(),
            ));
        }
        let heads = metadata_usize(&content, "llama.attention.head_count")?;
        let kv_heads = metadata_usize(&content, "llama.attention.head_count_kv")?;
        let layers = metadata_usize(&content, "llama.block_count")?;
        let hidden = metadata_usize(&content, "llama.embedding_length")?;
        let rope_dim = metadata_usize(&content, "llama.rope.dimension_count")?;
        let context = metadata_usize(&content, "llama.context_length")?;
        let eps = content
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.to_f32().ok())
            .ok_or_else(|| {
                TrainError::Model(
                    "metadata key `llama.attention.layer_norm_rms_epsilon` is missing".into(),
                )
            })?;
        let freq_base = content
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || hidden % heads != 0 {
            return Err(TrainError::Model(format!(
                "{heads} heads, {kv_heads} KV heads and hidden size {hidden} do not fit together"
            )));
        }
        // The engine's llama loader has rotary tables for this many positions.
        let max_positions = context.min(4096);

        let file = std::fs::File::open(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut loader = Loader {
            content: &content,
            reader: std::io::BufReader::new(file),
            path,
            device: &device,
            weight_bytes: 0,
            largest_matrix_bytes: 0,
        };
        let embeddings_q = loader.matrix("token_embd.weight")?;
        let embeddings = embeddings_q
            .dequantize(&device)
            .map_err(tensor_err("dequantizing the embeddings"))?;
        loader.weight_bytes += 4 * embeddings.elem_count() as u64;
        let (vocab, embedding_width) = embeddings
            .dims2()
            .map_err(tensor_err("reading the embeddings"))?;
        if embedding_width != hidden {
            return Err(TrainError::Model(format!(
                "token_embd is {embedding_width} wide, the model's hidden size is {hidden}"
            )));
        }
        // Tied embeddings when the file has no separate output matrix (SmolLM2).
        let output = if content.tensor_infos.contains_key("output.weight") {
            loader.matrix("output.weight")?
        } else {
            Arc::clone(&embeddings_q)
        };
        let norm = loader.vector("output_norm.weight")?;
        let mut blocks = Vec::with_capacity(layers);
        for layer in 0..layers {
            let linears = TARGETS
                .iter()
                .map(|target| {
                    loader
                        .matrix(&format!("blk.{layer}.{}.weight", gguf_name(*target)))
                        .and_then(|w| {
                            FrozenLinear::new(w).map_err(tensor_err("preparing a frozen matrix"))
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            blocks.push(Block {
                linears,
                attention_norm: loader.vector(&format!("blk.{layer}.attn_norm.weight"))?,
                ffn_norm: loader.vector(&format!("blk.{layer}.ffn_norm.weight"))?,
            });
        }
        let (weight_bytes, largest_matrix_bytes) =
            (loader.weight_bytes, loader.largest_matrix_bytes);
        let feed_forward = blocks
            .first()
            .map(|b| b.linears[slot(LoraTarget::Up)].dims().map(|(out, _)| out))
            .transpose()
            .map_err(tensor_err("reading the shapes"))?
            .unwrap_or_default();
        let (cos, sin) = rotary_tables(rope_dim, freq_base, max_positions, &device)
            .map_err(tensor_err("building the rotary tables"))?;

        let mut lora = Vec::new();
        for (layer, block) in blocks.iter().enumerate() {
            for target in TARGETS.iter().filter(|t| spec.targets.contains(t)) {
                let dims = block.linears[slot(*target)]
                    .dims()
                    .map_err(tensor_err("reading the shapes"))?;
                lora.push(LoraPair::zeros(
                    layer,
                    *target,
                    spec.rank,
                    dims,
                    spec.scale(),
                    &device,
                )?);
            }
        }
        let lora_index = lora
            .iter()
            .enumerate()
            .map(|(i, pair)| ((pair.layer, pair.target), i))
            .collect();
        Ok(Self {
            config: Config {
                heads,
                kv_heads,
                head_dim: hidden / heads,
                hidden,
                feed_forward,
                layers,
                vocab,
                max_positions,
                eps: f64::from(eps),
                kv_in_f16: true,
            },
            embeddings,
            blocks,
            norm,
            output: FrozenLinear::new(output).map_err(tensor_err("preparing the output matrix"))?,
            cos,
            sin,
            lora,
            lora_index,
            weight_bytes,
            largest_matrix_bytes,
        })
    }

    /// Logits (n, vocab) after the tokens at `positions` (n,), flat indices `row · seq + column`
    /// into `tokens` (batch, seq). Only the rows asked for go through the output layer: the
    /// vocabulary-wide logits are the largest activation, and the loss needs only its rows.
    pub(crate) fn logits_at(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(tokens, mode)?;
        let rows = hidden
            .reshape(((), self.config.hidden))?
            .index_select(positions, 0)?;
        self.output.forward(&rows)
    }

    /// Final-norm hidden states (batch, seq, hidden) for `tokens` at positions 0..seq.
    fn hidden_states(&self, tokens: &Tensor, mode: &mut Mode<'_>) -> candle_core::Result<Tensor> {
        let (batch, seq_len) = tokens.dims2()?;
        if seq_len > self.config.max_positions {
            candle_core::bail!(
                "{seq_len} tokens exceed the {} positions of the model",
                self.config.max_positions
            );
        }
        let mask = causal_mask(seq_len, tokens.device())?;
        let mut hidden = self
            .embeddings
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((batch, seq_len, self.config.hidden))?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let normed = rms_norm(&hidden, &block.attention_norm, self.config.eps)?;
            let attention = self.attend(layer, block, &normed, &mask, mode)?;
            let hidden_after_attention = (attention + &hidden)?;
            let normed = rms_norm(&hidden_after_attention, &block.ffn_norm, self.config.eps)?;
            let gate = self.linear(layer, block, LoraTarget::Gate, &normed, mode)?;
            let up = self.linear(layer, block, LoraTarget::Up, &normed, mode)?;
            let mlp = self.linear(layer, block, LoraTarget::Down, &(gate.silu()? * up)?, mode)?;
            hidden = (mlp + hidden_after_attention)?;
        }
        rms_norm(&hidden, &self.norm, self.config.eps)
    }

    fn linear(
        &self,
        layer: usize,
        block: &Block,
        target: LoraTarget,
        xs: &Tensor,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let base = block.linears[slot(target)].forward(xs)?;
        match self.lora_index.get(&(layer, target)) {
            Some(&i) => base + self.lora[i].forward(xs, mode)?,
            None => Ok(base),
        }
    }

    fn attend(
        &self,
        layer: usize,
        block: &Block,
        xs: &Tensor,
        mask: &Tensor,
        mode: &mut Mode<'_>,
    ) -> candle_core::Result<Tensor> {
        let Config {
            heads,
            kv_heads,
            head_dim,
            ..
        } = self.config;
        let (batch, seq_len, _) = xs.dims3()?;
        let mut split = |target, count| -> candle_core::Result<Tensor> {
            self.linear(layer, block, target, xs, mode)?
                .reshape((batch, seq_len, count, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(LoraTarget::Query, heads)?;
        let k = split(LoraTarget::Key, kv_heads)?;
        let v = split(LoraTarget::Value, kv_heads)?;
        // llama uses interleaved pairs (llama.cpp's "norm" rope).
        let q = candle_nn::rotary_emb::rope_i_slow(&q, &self.cos, &self.sin)?;
        let k = candle_nn::rotary_emb::rope_i_slow(&k, &self.cos, &self.sin)?;
        let (k, v) = if self.config.kv_in_f16 {
            (as_cached(&k)?, as_cached(&v)?)
        } else {
            (k, v)
        };
        let k = repeat_kv(k, heads / kv_heads)?;
        let v = repeat_kv(v, heads / kv_heads)?;
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let y = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq_len, heads * head_dim))?;
        self.linear(layer, block, LoraTarget::Output, &y, mode)
    }

    /// A copy whose frozen layers are plain dequantized tensors under ordinary autograd.
    #[cfg(test)]
    pub(crate) fn dequantized(&self) -> candle_core::Result<Self> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    linears: b
                        .linears
                        .iter()
                        .map(FrozenLinear::dequantized)
                        .collect::<candle_core::Result<_>>()?,
                    attention_norm: b.attention_norm.clone(),
                    ffn_norm: b.ffn_norm.clone(),
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let lora = self
            .lora
            .iter()
            .map(|p| {
                Ok(LoraPair {
                    layer: p.layer,
                    target: p.target,
                    a: candle_core::Var::from_tensor(p.a.as_tensor())?,
                    b: candle_core::Var::from_tensor(p.b.as_tensor())?,
                    scale: p.scale,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            config: self.config.clone(),
            embeddings: self.embeddings.clone(),
            blocks,
            norm: self.norm.clone(),
            output: self.output.dequantized()?,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            lora,
            lora_index: self.lora_index.clone(),
            weight_bytes: self.weight_bytes,
            largest_matrix_bytes: self.largest_matrix_bytes,
        })
    }
}

/// `x / sqrt(mean(x²) + eps) · weight`: the value of candle's fused kernel, the gradient of
/// the differentiable formula (the fused op has no backward). The two are the same function
/// but round differently (last bits of the mean), and the 8-bit rounding of activations in
/// the next quantized matmul amplifies last-bit differences: over SmolLM2's 30 layers the
/// formula alone moved logits by up to 1.0 from the engine's. `slow − detach(slow)` is exactly
/// 0, so the value is the engine's to the bit while gradients flow through `slow`.
fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let fused = candle_nn::ops::rms_norm(&xs.contiguous()?, weight, eps as f32)?;
    let slow = candle_nn::ops::rms_norm_slow(xs, weight, eps as f32)?;
    fused + (&slow - slow.detach())?
}

/// `xs` rounded to f16 as the engine's KV cache holds keys and values, with the gradient
/// of `xs`: `r - xs` is exact for values this close (Sterbenz), so `xs + (r - xs)` is `r`
/// to the bit.
fn as_cached(xs: &Tensor) -> candle_core::Result<Tensor> {
    let rounded = xs.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
    xs + (rounded - xs)?.detach()
}

/// 0 on and below the diagonal, -∞ above: added to the scores, it hides later tokens. Padding
/// sits at the end of each row, so the causal mask alone keeps it from every real token.
fn causal_mask(seq_len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (seq_len, seq_len), device)
}

/// Grouped-query attention: each KV head serves `n_rep` consecutive query heads.
fn repeat_kv(xs: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs);
    }
    let (batch, kv_heads, seq_len, head_dim) = xs.dims4()?;
    Tensor::cat(&vec![&xs; n_rep], 2)?.reshape((batch, kv_heads * n_rep, seq_len, head_dim))
}

fn rotary_tables(
    rope_dim: usize,
    freq_base: f32,
    positions: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..rope_dim)
        .step_by(2)
        .map(|i| 1f32 / freq_base.powf(i as f32 / rope_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let angles = Tensor::arange(0, positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((positions, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}
