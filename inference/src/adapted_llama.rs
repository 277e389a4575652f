//! The llama forward pass written out in this crate (after candle-transformers'
//! `quantized_llama`, Apache-2.0/MIT) so that a LoRA delta can be added, unmerged, to each
//! targeted linear layer of the quantized base. Dense (non-MoE) llama models only.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;
use candle_transformers::utils::{build_causal_mask, repeat_kv};

use crate::cpu_attention;
use crate::lora::{LoraAdapter, LoraDelta, LoraTarget};
use crate::quant_linear::{MappedFile, MappedWeights, QuantLinear};

/// Positions the rotary tables cover, as in candle's loader, so both enforce one context.
pub(crate) const MAX_SEQ_LEN: usize = candle_transformers::models::quantized_llama::MAX_SEQ_LEN;

/// Prompt rows the feed-forward block takes at a time, so that its intermediates (gate,
/// up, and the two products: four rows of the hidden width, 1536 wide in SmolLM2-135M,
/// per token) stay a few MB at any prompt length; prompt speed was the same as in one
/// piece (measured at 512 tokens).
const FEED_FORWARD_ROWS: usize = 128;

/// A quantized linear layer with an optional low-rank update.
#[derive(Debug, Clone)]
struct AdaptedLinear {
    base: QuantLinear,
    delta: Option<LoraDelta>,
}

impl AdaptedLinear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = self.base.forward(xs)?;
        match &self.delta {
            None => Ok(ys),
            Some(delta) => ys + delta.forward(xs)?,
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    wq: AdaptedLinear,
    wk: AdaptedLinear,
    wv: AdaptedLinear,
    wo: AdaptedLinear,
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
    attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    cache: LayerCache,
}

/// A layer's keys and values so far: the CPU's fused attention keeps f16 rows, other
/// devices candle tensors.
#[derive(Debug, Clone)]
enum LayerCache {
    Cpu(cpu_attention::KvCache),
    Tensors(Option<(Tensor, Tensor)>),
}

/// Weights shared by every session: the rotary tables and sizes.
#[derive(Debug)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Rope,
}

/// The rotary tables in the form the device's attention takes.
#[derive(Debug)]
enum Rope {
    /// Plain rows, for the CPU's fused attention.
    Rows(cpu_attention::Rotary),
    /// Tensors, for candle's attention on other devices (with the masks' fill value).
    Tensors {
        cos: Tensor,
        sin: Tensor,
        neg_inf: Tensor,
    },
}

/// The token embedding table: kept quantized where this crate's kernels read its format
/// (and shared with the output layer when the model ties them), else dequantized.
#[derive(Debug, Clone)]
enum TokenEmbedding {
    Quantized(QuantLinear),
    Dense(Embedding),
}

impl TokenEmbedding {
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quantized(table) => table
                .lookup(tokens)?
                .ok_or_else(|| candle_core::Error::Msg("the table has no row access".into())),
            Self::Dense(embedding) => embedding.forward(tokens),
        }
    }
}

/// A llama model with an adapter applied; `Clone` gives a session with its own KV cache
/// (layer weights are shared, the cache is per clone).
#[derive(Debug, Clone)]
pub(crate) struct AdaptedLlama {
    embeddings: TokenEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QuantLinear,
    shape: Arc<Shape>,
}

fn metadata_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(value) => Ok(value.to_u32()? as usize),
        None => candle_core::bail!("cannot find {key} in metadata"),
    }
}

impl AdaptedLlama {
    pub(crate) fn from_gguf<R: Read + Seek>(
        ct: gguf_file::Content,
        reader: &mut R,
        mapped: Option<&MappedFile>,
        device: &Device,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Self> {
        if ct
            .metadata
            .get("llama.expert_count")
            .is_some_and(|v| v.to_u32().is_ok_and(|n| n > 0))
        {
            candle_core::bail!("LoRA on mixture-of-experts llama models is not supported");
        }
        let heads = metadata_u32(&ct, "llama.attention.head_count")?;
        let kv_heads = metadata_u32(&ct, "llama.attention.head_count_kv")?;
        let block_count = metadata_u32(&ct, "llama.block_count")?;
        let hidden = metadata_u32(&ct, "llama.embedding_length")?;
        let rope_dim = metadata_u32(&ct, "llama.rope.dimension_count")?;
        let eps = match ct.metadata.get("llama.attention.layer_norm_rms_epsilon") {
            Some(v) => f64::from(v.to_f32()?),
            None => {
                candle_core::bail!("cannot find llama.attention.layer_norm_rms_epsilon in metadata")
            }
        };
        let freq_base = ct
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let (cos, sin) = rotary_tables(rope_dim, freq_base, device)?;
        let rope = match device {
            Device::Cpu => Rope::Rows(cpu_attention::Rotary {
                cos: cos.flatten_all()?.to_vec1()?,
                sin: sin.flatten_all()?.to_vec1()?,
                positions: MAX_SEQ_LEN,
            }),
            _ => Rope::Tensors {
                cos,
                sin,
                neg_inf: Tensor::new(f32::NEG_INFINITY, device)?,
            },
        };

        // Our kernels' weights, packed from the mapped file all at once.
        let mapped = match mapped {
            Some(file) if device.is_cpu() => Some(MappedWeights::pack(file, &ct)?),
            _ => None,
        };
        let mapped = mapped.as_ref();
        let table = QuantLinear::load(&ct, reader, mapped, "token_embd.weight", device)?;
        let embeddings = match &table {
            QuantLinear::Own(_) => TokenEmbedding::Quantized(table.clone()),
            QuantLinear::Candle(_) => TokenEmbedding::Dense(Embedding::new(
                ct.tensor(reader, "token_embd.weight", device)?
                    .dequantize(device)?,
                hidden,
            )),
        };
        let norm = RmsNorm::from_qtensor(ct.tensor(reader, "output_norm.weight", device)?, eps)?;
        // Tied embeddings when the file has no separate output matrix (SmolLM2).
        let output = if ct.tensor_infos.contains_key("output.weight") {
            QuantLinear::load(&ct, reader, mapped, "output.weight", device)?
        } else {
            table
        };
        let mut layers = Vec::with_capacity(block_count);
        for layer in 0..block_count {
            let mut linear = |name: &str, target: LoraTarget| -> Result<AdaptedLinear> {
                let weight = format!("blk.{layer}.{name}.weight");
                Ok(AdaptedLinear {
                    base: QuantLinear::load(&ct, reader, mapped, &weight, device)?,
                    delta: adapter.and_then(|a| a.delta(layer, target)).cloned(),
                })
            };
            let wq = linear("attn_q", LoraTarget::Query)?;
            let wk = linear("attn_k", LoraTarget::Key)?;
            let wv = linear("attn_v", LoraTarget::Value)?;
            let wo = linear("attn_output", LoraTarget::Output)?;
            let gate = linear("ffn_gate", LoraTarget::Gate)?;
            let up = linear("ffn_up", LoraTarget::Up)?;
            let down = linear("ffn_down", LoraTarget::Down)?;
            let norm_weight = |name: &str, reader: &mut R| {
                ct.tensor(reader, &format!("blk.{layer}.{name}.weight"), device)
                    .and_then(|w| RmsNorm::from_qtensor(w, eps))
            };
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
                attention_norm: norm_weight("attn_norm", reader)?,
                ffn_norm: norm_weight("ffn_norm", reader)?,
                cache: if device.is_cpu() {
                    LayerCache::Cpu(Default::default())
                } else {
                    LayerCache::Tensors(None)
                },
            });
        }
        Ok(Self {
            embeddings,
            layers,
            norm,
            output,
            shape: Arc::new(Shape {
                heads,
                kv_heads,
                head_dim: hidden / heads,
                rope,
            }),
        })
    }

    /// Logits after the last of `tokens` (batch, seq) placed at `position..`.
    pub(crate) fn forward(&mut self, tokens: &Tensor, position: usize) -> Result<Tensor> {
        let (_batch, seq_len) = tokens.dims2()?;
        let mask = if seq_len == 1 || matches!(self.shape.rope, Rope::Rows(_)) {
            None
        } else {
            Some(build_causal_mask(seq_len, position, tokens.device())?)
        };
        let mut hidden = self.embeddings.forward(tokens)?;
        for layer in self.layers.iter_mut() {
            let residual = &hidden;
            let normed = layer.attention_norm.forward(residual)?;
            let attention = attend(layer, &self.shape, &normed, mask.as_ref(), position)?;
            let hidden_after_attention = (attention + residual)?;
            let normed = layer.ffn_norm.forward(&hidden_after_attention)?;
            hidden = (feed_forward(layer, &normed)? + hidden_after_attention)?;
        }
        let hidden = self.norm.forward(&hidden)?;
        self.output.forward(&hidden.i((.., seq_len - 1, ..))?)
    }
}

/// The SwiGLU feed-forward block on `x` (batch, seq, hidden), `FEED_FORWARD_ROWS`
/// positions at a time.
fn feed_forward(layer: &Layer, x: &Tensor) -> Result<Tensor> {
    let seq_len = x.dim(1)?;
    let mut parts = Vec::with_capacity(seq_len.div_ceil(FEED_FORWARD_ROWS));
    for start in (0..seq_len).step_by(FEED_FORWARD_ROWS) {
        let rows = x.narrow(1, start, FEED_FORWARD_ROWS.min(seq_len - start))?;
        let gate = layer.gate.forward(&rows)?;
        let up = layer.up.forward(&rows)?;
        parts.push(layer.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?);
    }
    match parts.len() {
        1 => Ok(parts.remove(0)),
        _ => Tensor::cat(&parts, 1),
    }
}

fn rotary_tables(head_dim: usize, freq_base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / freq_base.powf(i as f32 / head_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let angles = Tensor::arange(0, MAX_SEQ_LEN as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_SEQ_LEN, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, position: usize) -> Result<Tensor> {
    let (_b, _h, seq_len, _d) = x.dims4()?;
    let cos = cos.narrow(0, position, seq_len)?;
    let sin = sin.narrow(0, position, seq_len)?;
    // llama uses interleaved pairs (llama.cpp's "norm" rope).
    candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin)
}

fn attend(
    layer: &mut Layer,
    shape: &Shape,
    x: &Tensor,
    mask: Option<&Tensor>,
    position: usize,
) -> Result<Tensor> {
    let (batch, seq_len, hidden) = x.dims3()?;
    if let (LayerCache::Cpu(cache), Rope::Rows(rotary)) = (&mut layer.cache, &shape.rope) {
        if batch != 1 {
            candle_core::bail!("attention on the CPU takes one sequence at a time, not {batch}");
        }
        let rows = |linear: &AdaptedLinear| linear.forward(x)?.flatten_all()?.to_vec1::<f32>();
        let (mut q, mut k, v) = (rows(&layer.wq)?, rows(&layer.wk)?, rows(&layer.wv)?);
        let dims = cpu_attention::Dims {
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
        };
        let y = cpu_attention::attend(
            dims,
            cache,
            &mut q,
            &mut k,
            &v,
            rotary,
            position,
            nanofleet_quant::Pool::global(),
        )?;
        return layer
            .wo
            .forward(&Tensor::from_vec(y, (batch, seq_len, hidden), x.device())?);
    }
    let (LayerCache::Tensors(kv_cache), Rope::Tensors { cos, sin, neg_inf }) =
        (&mut layer.cache, &shape.rope)
    else {
        candle_core::bail!("the CPU's attention state outside the CPU");
    };
    let q = layer
        .wq
        .forward(x)?
        .reshape((batch, seq_len, shape.heads, shape.head_dim))?
        .transpose(1, 2)?;
    let k = layer
        .wk
        .forward(x)?
        .reshape((batch, seq_len, shape.kv_heads, shape.head_dim))?
        .transpose(1, 2)?;
    let v = layer
        .wv
        .forward(x)?
        .reshape((batch, seq_len, shape.kv_heads, shape.head_dim))?
        .transpose(1, 2)?
        .contiguous()?;
    let q = rotate(&q, cos, sin, position)?;
    let k = rotate(&k, cos, sin, position)?;
    let (k, v) = match kv_cache {
        Some((k_cache, v_cache)) if position > 0 => (
            Tensor::cat(&[k_cache, &k], 2)?,
            Tensor::cat(&[v_cache, &v], 2)?,
        ),
        _ => (k, v),
    };
    *kv_cache = Some((k.clone(), v.clone()));
    let k = repeat_kv(k, shape.heads / shape.kv_heads)?;
    let v = repeat_kv(v, shape.heads / shape.kv_heads)?;
    let scores = (q.matmul(&k.t()?)? / (shape.head_dim as f64).sqrt())?;
    let scores = match mask {
        None => scores,
        Some(mask) => {
            let mask = mask.broadcast_as(scores.shape())?;
            mask.where_cond(&neg_inf.broadcast_as(scores.shape().dims())?, &scores)?
        }
    };
    let weights = candle_nn::ops::softmax_last_dim(&scores)?;
    let y = weights.matmul(&v.contiguous()?)?;
    let y = y.transpose(1, 2)?.reshape((batch, seq_len, hidden))?;
    layer.wo.forward(&y)
}
