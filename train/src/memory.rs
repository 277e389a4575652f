//! The memory a training run is expected to take, checked against a declared budget before
//! any work so that a device refuses a job it cannot finish instead of being killed midway.

use crate::model::TrainModel;

/// Bytes training needs, by kind. An estimate from the shapes, not a measurement: it counts
/// what the autograd graph keeps alive, and is meant to err on the high side: for
/// SmolLM2-135M (all seven targets, rank 4, batch 4 × 35 tokens) it says 2.4 GB where the
/// process peaked at 1.25 GB (Q4_1) and 1.33 GB (Q8_0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The frozen base as held: quantized matrices, the f32 embedding table and norms, plus
    /// one matrix dequantized to f32 (each backward of a frozen layer makes one in turn).
    pub weights: u64,
    /// Adapter parameters × 5: values, one micro-batch's gradients, the accumulated
    /// gradients, AdamW's two moments.
    pub adapter: u64,
    /// One micro-batch's activations, doubled for the backward pass (gradients of the nodes
    /// not yet processed live beside the activations they are computed from).
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.adapter + self.activations
    }
}

/// The estimate for micro-batches of `batch` sequences padded to `seq_len` tokens.
///
/// candle keeps every intermediate tensor of the forward pass until `backward` has run, so
/// activations are the sum of those intermediates, in f32 values per token and layer:
/// - two RMSNorms, 4 tensors of `hidden` each: `8·hidden`;
/// - q, k, v, o outputs, their per-head copies, RoPE's products and concatenation for q and
///   k, the repeated K and V, the attention output and its transpose, two residual sums:
///   `25·hidden + 11·kv` (kv = KV heads × head size);
/// - the MLP's gate, up, SiLU and product: `4·ffn`;
/// - attention scores, scaled, masked, shifted by the max, exponentiated, normalized:
///   `6·heads·seq_len` (this term makes the whole quadratic in `seq_len`);
/// - per adapter: dropout mask and masked input, A's output, B's output, scaled, sum:
///   `2·in + 3·out + rank`.
///
/// Plus the embeddings and the final norm (`5·hidden` per token) and, for the tokens the
/// loss reads (at most all of them), logits, their shift, exponent and log-softmax:
/// `4·vocab` per token.
pub(crate) fn estimate(model: &TrainModel, batch: usize, seq_len: usize) -> MemoryEstimate {
    let c = &model.config;
    let (h, f, r) = (c.hidden as u64, c.feed_forward as u64, rank(model));
    let kv = (c.kv_heads * c.head_dim) as u64;
    let seq = seq_len as u64;
    let tokens = (batch * seq_len) as u64;
    let adapter_floats: u64 = model
        .lora
        .iter()
        .map(|p| {
            let (out, inputs) = (p.b.dims()[0] as u64, p.a.dims()[1] as u64);
            2 * inputs + 3 * out + r
        })
        .sum();
    let per_layer = 8 * h + 25 * h + 11 * kv + 4 * f + 6 * c.heads as u64 * seq;
    let per_token = c.layers as u64 * per_layer + adapter_floats + 5 * h + 4 * c.vocab as u64;
    let parameters: u64 = model
        .lora
        .iter()
        .map(|p| (p.a.elem_count() + p.b.elem_count()) as u64)
        .sum();
    MemoryEstimate {
        weights: model.weight_bytes + model.largest_matrix_bytes,
        adapter: 4 * 5 * parameters,
        activations: 2 * 4 * tokens * per_token,
    }
}

fn rank(model: &TrainModel) -> u64 {
    model.lora.first().map_or(0, |p| p.a.dims()[0] as u64)
}
