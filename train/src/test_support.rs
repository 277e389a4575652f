//! Helpers shared by the crate's tests: tiny models, seeded adapters, a tiny dataset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use nanofleet_inference::tiny::{write_tiny_model, TinyTokenizer};
use nanofleet_inference::{Architecture, ChatMessage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Example, LoraSpec, LoraTarget, Trainer};

/// The tiny random llama of `nanofleet_inference` (Q8_0 matrices, ChatML byte-level tokenizer).
pub(crate) fn tiny_llama(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-llama.gguf");
    write_tiny_model(&path, Architecture::Llama, TinyTokenizer::ByteLevel, 7).unwrap();
    path
}

/// The same model with every tensor stored as f32, so the quantized kernel is exact.
pub(crate) fn tiny_llama_f32(dir: &Path) -> PathBuf {
    let source = tiny_llama(dir);
    let mut reader = std::io::BufReader::new(std::fs::File::open(&source).unwrap());
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|name| {
            let q = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
            let dense = q.dequantize(&Device::Cpu).unwrap();
            (
                name.clone(),
                QTensor::quantize(&dense, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let path = dir.join("tiny-llama-f32.gguf");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    std::io::Write::flush(&mut out).unwrap();
    path
}

pub(crate) fn spec(targets: &[LoraTarget], freeze_a: bool) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: targets.to_vec(),
        freeze_a,
    }
}

pub(crate) const ALL_TARGETS: [LoraTarget; 7] = [
    LoraTarget::Query,
    LoraTarget::Key,
    LoraTarget::Value,
    LoraTarget::Output,
    LoraTarget::Gate,
    LoraTarget::Up,
    LoraTarget::Down,
];

/// A uniform in ±1/√in (PEFT's Kaiming-uniform bound, near enough), B uniform in
/// ±`b_spread` (0: zeros, the usual start; nonzero: so that A has gradients too).
pub(crate) fn seeded_adapter(
    trainer: &Trainer,
    seed: u64,
    b_spread: f32,
) -> HashMap<String, Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    trainer
        .adapter_layout()
        .into_iter()
        .map(|(name, (rows, columns))| {
            let values = if name.contains("lora_A") {
                let bound = 1.0 / (columns as f32).sqrt();
                (0..rows * columns)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect()
            } else if b_spread > 0.0 {
                (0..rows * columns)
                    .map(|_| rng.gen_range(-b_spread..b_spread))
                    .collect()
            } else {
                vec![0.0; rows * columns]
            };
            (name, values)
        })
        .collect()
}

/// A tiny task the tiny model can learn in a few steps: answer with a fixed word per prompt.
pub(crate) fn examples() -> Vec<Example> {
    [
        ("ping", "the pong"),
        ("hi", "the hat"),
        ("abc", "in a tree"),
        ("go", "her"),
    ]
    .into_iter()
    .map(|(prompt, response)| Example {
        messages: vec![ChatMessage::new("user", prompt)],
        response: response.into(),
    })
    .collect()
}
