//! The trainable low-rank adapters: which layers they target, their A/B variables, their PEFT
//! names, and the q/k row order between HF layout (PEFT files) and GGUF layout (the base).

use candle_core::{DType, Device, Tensor, Var};
use nanofleet_inference::lora::LoraTarget;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{tensor_err, Result, TrainError};

/// What to train: rank, scaling, dropout and which linear layers of every block get an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    /// The update is scaled by `alpha / rank` (PEFT's plain LoRA scaling).
    pub alpha: f64,
    /// Dropout on the adapter's input, in training only.
    pub dropout: f64,
    pub targets: Vec<LoraTarget>,
    /// FFA-LoRA: A stays as set, only B is trained (which makes averaging B across clients exact).
    pub freeze_a: bool,
}

impl LoraSpec {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(TrainError::Spec("rank must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(TrainError::Spec(format!(
                "alpha must be positive, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainError::Spec(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(TrainError::Spec("no target layers".into()));
        }
        Ok(())
    }

    pub(crate) fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The PEFT module path of a target inside a llama block (`self_attn.q_proj`, `mlp.up_proj`).
fn peft_module(target: LoraTarget) -> &'static str {
    match target {
        LoraTarget::Query => "self_attn.q_proj",
        LoraTarget::Key => "self_attn.k_proj",
        LoraTarget::Value => "self_attn.v_proj",
        LoraTarget::Output => "self_attn.o_proj",
        LoraTarget::Gate => "mlp.gate_proj",
        LoraTarget::Up => "mlp.up_proj",
        LoraTarget::Down => "mlp.down_proj",
    }
}

/// The PEFT tensor name of A (`lora_A`) or B (`lora_B`) of one layer's target.
pub(crate) fn peft_name(layer: usize, target: LoraTarget, half: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{half}.weight",
        peft_module(target)
    )
}

/// llama.cpp's converter reorders the rows of q and k within each head, from HF's
/// rotate-half layout (first halves, then second halves) to interleaved pairs; B's rows are
/// outputs of those matrices and follow the same rule as `nanofleet_inference::lora`'s
/// `permute_rows_for_gguf`. `to_gguf = false` undoes it.
pub(crate) fn permute_rows(
    values: &[f32],
    heads: usize,
    columns: usize,
    to_gguf: bool,
) -> Vec<f32> {
    let rows = values.len() / columns;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for head in 0..heads {
        for side in 0..2 {
            for i in 0..half {
                let hf = head * head_dim + side * half + i;
                let gguf = head * head_dim + 2 * i + side;
                let (from, to) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[to * columns..(to + 1) * columns]
                    .copy_from_slice(&values[from * columns..(from + 1) * columns]);
            }
        }
    }
    out
}

/// How a forward pass treats the adapters.
pub(crate) enum Mode<'a> {
    /// Gradients flow to the trainable halves; dropout masks come from `rng`.
    Train {
        dropout: f64,
        freeze_a: bool,
        rng: &'a mut ChaCha8Rng,
    },
    /// No graph through the adapters, no dropout.
    Eval,
}

/// One targeted linear layer's adapter: `y += scale · B (A x)` with B's rows in GGUF order.
#[derive(Debug)]
pub(crate) struct LoraPair {
    pub(crate) layer: usize,
    pub(crate) target: LoraTarget,
    /// (rank, in)
    pub(crate) a: Var,
    /// (out, rank)
    pub(crate) b: Var,
    pub(crate) scale: f64,
}

impl LoraPair {
    pub(crate) fn zeros(
        layer: usize,
        target: LoraTarget,
        rank: usize,
        (out, inputs): (usize, usize),
        scale: f64,
        device: &Device,
    ) -> Result<Self> {
        let zeros = |dims: (usize, usize)| {
            Var::zeros(dims, DType::F32, device).map_err(tensor_err("allocating the adapter"))
        };
        Ok(Self {
            layer,
            target,
            a: zeros((rank, inputs))?,
            b: zeros((out, rank))?,
            scale,
        })
    }

    /// The update for `xs` (…, in) → (…, out).
    pub(crate) fn forward(&self, xs: &Tensor, mode: &mut Mode<'_>) -> candle_core::Result<Tensor> {
        let (a, b, xs) = match mode {
            Mode::Eval => (
                self.a.as_detached_tensor(),
                self.b.as_detached_tensor(),
                xs.clone(),
            ),
            Mode::Train {
                dropout,
                freeze_a,
                rng,
            } => {
                let a = if *freeze_a {
                    self.a.as_detached_tensor()
                } else {
                    self.a.as_tensor().clone()
                };
                let xs = if *dropout > 0.0 {
                    apply_dropout(xs, *dropout, rng)?
                } else {
                    xs.clone()
                };
                (a, self.b.as_tensor().clone(), xs)
            }
        };
        let dims = xs.dims().to_vec();
        let inputs = a.dim(1)?;
        let rows = xs.elem_count() / inputs;
        let down = xs.reshape((rows, inputs))?.matmul(&a.t()?)?;
        let up = (down.matmul(&b.t()?)? * self.scale)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = b.dim(0)?;
        }
        up.reshape(out_dims)
    }
}

/// Inverted dropout with a seeded mask: kept values are scaled by 1/(1-p) so the expected
/// input is unchanged and evaluation needs no rescaling.
fn apply_dropout(xs: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> candle_core::Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..xs.elem_count())
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?;
    xs * mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_inference_and_inverts() {
        // One head of dim 4: HF rows [r0 r1 | r2 r3] → GGUF [r0 r2 r1 r3], as in
        // nanofleet_inference::lora's own test.
        assert_eq!(
            permute_rows(&[0., 1., 2., 3.], 1, 1, true),
            vec![0., 2., 1., 3.]
        );
        let values: Vec<f32> = (0..3 * 8 * 2).map(|v| v as f32).collect();
        let there = permute_rows(&values, 3, 2, true);
        assert_ne!(there, values);
        assert_eq!(permute_rows(&there, 3, 2, false), values);
    }

    #[test]
    fn names_are_what_the_engine_parses() {
        assert_eq!(
            peft_name(3, LoraTarget::Query, "lora_A"),
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            peft_name(0, LoraTarget::Down, "lora_B"),
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        );
    }
}
