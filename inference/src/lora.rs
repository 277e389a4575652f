//! PEFT LoRA adapters (`adapter_model.safetensors` + `adapter_config.json`) read into per-layer
//! low-rank deltas in the GGUF weight layout, ready to be applied unmerged at inference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{model_err, InferenceError, Result};

/// The linear layers of a llama block that an adapter may target, by their PEFT names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    Query,
    Key,
    Value,
    Output,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    fn from_peft_module(name: &str) -> Option<Self> {
        Some(match name {
            "q_proj" => Self::Query,
            "k_proj" => Self::Key,
            "v_proj" => Self::Value,
            "o_proj" => Self::Output,
            "gate_proj" => Self::Gate,
            "up_proj" => Self::Up,
            "down_proj" => Self::Down,
            _ => return None,
        })
    }
}

/// One targeted linear layer's update: `y += scale · B (A x)`.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank), rows already in the GGUF order of the base weight.
    pub b: Tensor,
    pub scale: f64,
}

impl LoraDelta {
    /// The update for `xs` (…, in) → (…, out).
    pub(crate) fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let down = xs.broadcast_matmul(&self.a.t()?)?;
        down.broadcast_matmul(&self.b.t()?)? * self.scale
    }
}

/// The subset of PEFT's `adapter_config.json` that inference needs.
#[derive(Debug, Clone, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_rslora: bool,
}

impl LoraConfig {
    /// PEFT's scaling: alpha / r, or alpha / √r for rank-stabilized LoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// A loaded adapter: deltas keyed by (layer, target).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    deltas: HashMap<(usize, LoraTarget), LoraDelta>,
}

fn adapter_err(path: &Path, detail: impl std::fmt::Display) -> InferenceError {
    InferenceError::Adapter(format!("{}: {detail}", path.display()))
}

/// Where a PEFT tensor name (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`)
/// points: layer, target, and whether it is A.
fn parse_peft_name(name: &str) -> Option<(usize, LoraTarget, bool)> {
    let after = &name[name.find("layers.")? + "layers.".len()..];
    let (layer, rest) = after.split_once('.')?;
    let mut parts = rest.split('.');
    let _block = parts.next()?; // self_attn or mlp
    let target = LoraTarget::from_peft_module(parts.next()?)?;
    let is_a = match parts.next()? {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    Some((layer.parse().ok()?, target, is_a))
}

/// llama.cpp's converter reorders the rows of q and k within each head (HF's rotate-half
/// layout → interleaved pairs); B's rows are outputs of those matrices and need the same order.
pub(crate) fn permute_rows_for_gguf(b: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, rank) = b.dims2()?;
    let head_dim = out / heads;
    b.reshape((heads, 2, head_dim / 2, rank))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, rank))
}

impl LoraAdapter {
    /// Reads a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    /// `heads` and `kv_heads` of the base model are needed to reorder q/k rows.
    pub fn load_peft_dir(
        dir: impl AsRef<Path>,
        heads: usize,
        kv_heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("adapter_config.json");
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| adapter_err(&config_path, e))?;
        let config: LoraConfig =
            serde_json::from_str(&config_text).map_err(|e| adapter_err(&config_path, e))?;
        let weights_path: PathBuf = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| adapter_err(&weights_path, e))?;
        Self::from_peft_tensors(config, tensors, heads, kv_heads)
            .map_err(|e| adapter_err(&weights_path, e))
    }

    /// Reads one safetensors file whose header metadata holds `lora_r` and `lora_alpha`
    /// (and optionally `use_rslora`), as nanofleet's adapter artifacts do.
    pub fn load_safetensors(
        file: impl AsRef<Path>,
        heads: usize,
        kv_heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let file = file.as_ref();
        let bytes = std::fs::read(file).map_err(|e| adapter_err(file, e))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| adapter_err(file, e))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let number = |key: &str| -> Result<f64> {
            metadata
                .get(key)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| adapter_err(file, format!("the header has no numeric {key}")))
        };
        let config = LoraConfig {
            r: number("lora_r")? as usize,
            lora_alpha: number("lora_alpha")?,
            use_rslora: metadata.get("use_rslora").is_some_and(|v| v == "true"),
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| adapter_err(file, e))?;
        Self::from_peft_tensors(config, tensors, heads, kv_heads).map_err(|e| adapter_err(file, e))
    }

    /// Builds the adapter from PEFT-named tensors (HF layout).
    pub fn from_peft_tensors(
        config: LoraConfig,
        tensors: HashMap<String, Tensor>,
        heads: usize,
        kv_heads: usize,
    ) -> Result<Self> {
        if config.r == 0 {
            return Err(InferenceError::Adapter("rank r is 0".into()));
        }
        let mut halves: HashMap<(usize, LoraTarget), (Option<Tensor>, Option<Tensor>)> =
            HashMap::new();
        for (name, tensor) in tensors {
            let (layer, target, is_a) = parse_peft_name(&name).ok_or_else(|| {
                InferenceError::Adapter(format!(
                    "tensor `{name}` is not a LoRA A/B of a llama linear layer"
                ))
            })?;
            let tensor = tensor
                .to_dtype(DType::F32)
                .map_err(model_err("reading the adapter"))?;
            let entry = halves.entry((layer, target)).or_default();
            if is_a {
                entry.0 = Some(tensor);
            } else {
                entry.1 = Some(tensor);
            }
        }
        let scale = config.scale();
        let mut deltas = HashMap::new();
        for ((layer, target), pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(InferenceError::Adapter(format!(
                    "layer {layer} {target:?} has only one of lora_A and lora_B"
                )));
            };
            let (rank_a, _) = a.dims2().map_err(model_err("reading the adapter"))?;
            let (_, rank_b) = b.dims2().map_err(model_err("reading the adapter"))?;
            if rank_a != config.r || rank_b != config.r {
                return Err(InferenceError::Adapter(format!(
                    "layer {layer} {target:?}: A has rank {rank_a}, B has rank {rank_b}, config says r = {}",
                    config.r
                )));
            }
            let b = match target {
                LoraTarget::Query => permute_rows_for_gguf(&b, heads),
                LoraTarget::Key => permute_rows_for_gguf(&b, kv_heads),
                _ => Ok(b),
            }
            .map_err(model_err("reordering the adapter"))?;
            deltas.insert((layer, target), LoraDelta { a, b, scale });
        }
        Ok(Self { config, deltas })
    }

    /// The delta for one layer's linear, if the adapter targets it.
    pub fn delta(&self, layer: usize, target: LoraTarget) -> Option<&LoraDelta> {
        self.deltas.get(&(layer, target))
    }

    /// Number of adapted linear layers.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_are_parsed() {
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"),
            Some((12, LoraTarget::Query, true))
        );
        assert_eq!(
            parse_peft_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"),
            Some((0, LoraTarget::Down, false))
        );
        assert_eq!(parse_peft_name("base_model.model.lm_head.weight"), None);
    }

    #[test]
    fn rows_are_interleaved_per_head() {
        // One head of dim 4: HF rows [r0 r1 | r2 r3] (halves) → GGUF [r0 r2 r1 r3].
        let b = Tensor::new(&[[0f32], [1.], [2.], [3.]], &Device::Cpu).unwrap();
        let p = permute_rows_for_gguf(&b, 1).unwrap();
        assert_eq!(
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3.]
        );
    }

    #[test]
    fn scale_follows_peft() {
        let plain = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            use_rslora: false,
        };
        assert_eq!(plain.scale(), 2.0);
        let rs = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            use_rslora: true,
        };
        assert_eq!(rs.scale(), 4.0);
    }
}
