//! LoRA applied unmerged on a quantized tiny llama: a zero adapter changes nothing, a random
//! one changes the logits, and those equal the logits of the base with the adapter merged into
//! dequantized weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use nanofleet_inference::lora::LoraConfig;
use nanofleet_inference::tiny::{write_tiny_model, TinyTokenizer};
use nanofleet_inference::{Architecture, Engine, EngineOptions, InferenceError, LoraSource};

const RANK: usize = 4;
const ALPHA: f64 = 8.0;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
/// PEFT module, GGUF tensor, (out, in) of the tiny llama.
const TARGETS: [(&str, &str, &str, usize, usize); 7] = [
    ("self_attn", "q_proj", "attn_q", 64, 64),
    ("self_attn", "k_proj", "attn_k", 32, 64),
    ("self_attn", "v_proj", "attn_v", 32, 64),
    ("self_attn", "o_proj", "attn_output", 64, 64),
    ("mlp", "gate_proj", "ffn_gate", 128, 64),
    ("mlp", "up_proj", "ffn_up", 128, 64),
    ("mlp", "down_proj", "ffn_down", 64, 128),
];

fn peft_name(layer: usize, block: &str, module: &str, half: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{block}.{module}.lora_{half}.weight")
}

/// PEFT tensors in HF layout; B is zero when `zero_b` (PEFT's initial state).
fn adapter(zero_b: bool, seed: u64) -> HashMap<String, Tensor> {
    let mut tensors = HashMap::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // A deterministic pseudo-random sequence in [-0.5, 0.5) (a 64-bit LCG's top bits).
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for layer in 0..LAYERS {
        for (block, module, _, out, inp) in TARGETS {
            let a: Vec<f32> = (0..RANK * inp).map(|_| next() * 0.5).collect();
            let b: Vec<f32> = (0..out * RANK)
                .map(|_| if zero_b { 0.0 } else { next() * 0.5 })
                .collect();
            tensors.insert(
                peft_name(layer, block, module, "A"),
                Tensor::from_vec(a, (RANK, inp), &Device::Cpu).unwrap(),
            );
            tensors.insert(
                peft_name(layer, block, module, "B"),
                Tensor::from_vec(b, (out, RANK), &Device::Cpu).unwrap(),
            );
        }
    }
    tensors
}

fn config() -> LoraConfig {
    LoraConfig {
        r: RANK,
        lora_alpha: ALPHA,
        use_rslora: false,
    }
}

fn load(path: &Path, tensors: Option<HashMap<String, Tensor>>) -> Engine {
    let options = EngineOptions {
        lora: tensors.map(|tensors| LoraSource::PeftTensors {
            config: config(),
            tensors,
        }),
        ..EngineOptions::default()
    };
    Engine::load(path, options).unwrap()
}

/// HF q/k row order → llama.cpp's, written as an index map (independent of the crate's
/// tensor reshapes): HF row h·d + i·d/2 + j goes to GGUF row h·d + 2j + i.
fn hf_rows_to_gguf(b: &[f32], out: usize, rank: usize, heads: usize) -> Vec<f32> {
    let d = out / heads;
    let mut permuted = vec![0.0; b.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..d / 2 {
                let from = h * d + i * d / 2 + j;
                let to = h * d + 2 * j + i;
                permuted[to * rank..(to + 1) * rank]
                    .copy_from_slice(&b[from * rank..(from + 1) * rank]);
            }
        }
    }
    permuted
}

/// The base model with `scale · B A` added to each dequantized target weight, stored as f32.
fn write_merged(base: &Path, merged: &Path, tensors: &HashMap<String, Tensor>) {
    let mut reader = std::fs::File::open(base).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let scale = ALPHA / RANK as f64;
    let mut out_tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
        let target = TARGETS.iter().find_map(|(block, module, gguf, out, _)| {
            (0..LAYERS)
                .find(|layer| *name == format!("blk.{layer}.{gguf}.weight"))
                .map(|layer| (layer, *block, *module, *out))
        });
        let Some((layer, block, module, out)) = target else {
            out_tensors.push((name.clone(), q));
            continue;
        };
        let a = &tensors[&peft_name(layer, block, module, "A")];
        let b = &tensors[&peft_name(layer, block, module, "B")];
        let b_rows: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let b_rows = match module {
            "q_proj" => hf_rows_to_gguf(&b_rows, out, RANK, HEADS),
            "k_proj" => hf_rows_to_gguf(&b_rows, out, RANK, KV_HEADS),
            _ => b_rows,
        };
        let b = Tensor::from_vec(b_rows, (out, RANK), &Device::Cpu).unwrap();
        let delta = (b.matmul(a).unwrap() * scale).unwrap();
        let weight = (q.dequantize(&Device::Cpu).unwrap() + delta).unwrap();
        out_tensors.push((
            name.clone(),
            QTensor::quantize(&weight, GgmlDType::F32).unwrap(),
        ));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        out_tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(merged).unwrap();
    gguf_file::write(&mut file, &metadata, &tensor_refs).unwrap();
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn zero_adapter_leaves_logits_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    write_tiny_model(&path, Architecture::Llama, TinyTokenizer::ByteLevel, 3).unwrap();
    let base = load(&path, None);
    let adapted = load(&path, Some(adapter(true, 1)));
    assert_eq!(
        adapted.model_info().lora_adapted_layers,
        LAYERS * TARGETS.len()
    );
    let tokens = base.tokenize("the cat in the hat sat", false).unwrap();
    for end in [1, 3, tokens.len()] {
        assert_eq!(
            base.next_token_logits(&tokens[..end]).unwrap(),
            adapted.next_token_logits(&tokens[..end]).unwrap(),
            "prefix of {end} tokens"
        );
    }
    // With the KV cache too: the same greedy continuation.
    let request = nanofleet_inference::GenerateRequest::greedy("the cat", 12);
    let run = |engine: &Engine| {
        engine
            .generate(&request, |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
            .tokens
    };
    assert_eq!(run(&base), run(&adapted));
}

#[test]
fn random_adapter_equals_merged_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    let merged = dir.path().join("tiny-llama-merged.gguf");
    write_tiny_model(&path, Architecture::Llama, TinyTokenizer::ByteLevel, 3).unwrap();
    let tensors = adapter(false, 7);
    write_merged(&path, &merged, &tensors);
    let base = load(&path, None);
    let adapted = load(&path, Some(tensors));
    let reference = load(&merged, None);
    let tokens = base.tokenize("the cat in the hat sat", false).unwrap();
    let base_logits = base.next_token_logits(&tokens).unwrap();
    let adapted_logits = adapted.next_token_logits(&tokens).unwrap();
    let merged_logits = reference.next_token_logits(&tokens).unwrap();
    let changed = max_abs_diff(&base_logits, &adapted_logits);
    let error = max_abs_diff(&adapted_logits, &merged_logits);
    let spread = merged_logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    println!("adapter moved logits by up to {changed}; unmerged vs merged differ by up to {error} (logits up to {spread})");
    assert!(
        changed > 0.1,
        "the adapter should change the logits, moved {changed}"
    );
    // The quantized base multiplies Q8_0-quantized activations, the merged reference f32 ones:
    // they agree to about 1% of the logit range.
    assert!(
        error < 0.02 * spread.max(1.0),
        "unmerged and merged differ by {error}"
    );
    assert!(
        error < changed / 10.0,
        "error {error} is not small next to the change {changed}"
    );
}

#[test]
fn adapters_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-qwen2.gguf");
    write_tiny_model(&path, Architecture::Qwen2, TinyTokenizer::ByteLevel, 3).unwrap();
    let options = EngineOptions {
        lora: Some(LoraSource::PeftTensors {
            config: config(),
            tensors: adapter(false, 1),
        }),
        ..EngineOptions::default()
    };
    assert!(matches!(
        Engine::load(&path, options),
        Err(InferenceError::AdapterArchitecture(a)) if a == "qwen2"
    ));

    let llama = dir.path().join("tiny-llama.gguf");
    write_tiny_model(&llama, Architecture::Llama, TinyTokenizer::ByteLevel, 3).unwrap();
    let mut tensors = adapter(false, 1);
    tensors.remove(&peft_name(0, "mlp", "up_proj", "B"));
    let options = EngineOptions {
        lora: Some(LoraSource::PeftTensors {
            config: config(),
            tensors,
        }),
        ..EngineOptions::default()
    };
    let err = Engine::load(&llama, options).unwrap_err();
    assert!(
        err.to_string().contains("only one of lora_A and lora_B"),
        "{err}"
    );

    let options = EngineOptions {
        lora: Some(LoraSource::PeftDir(dir.path().join("no-such-adapter"))),
        ..EngineOptions::default()
    };
    let err = Engine::load(&llama, options).unwrap_err();
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
}
