//! Greedy output on a GPU against the CPU, for the GPU build's check. The prompts are the greedy
//! cases of testdata/smollm2-llama-cpp.json (those of the llama.cpp parity test); each is
//! generated greedily on both devices from one GGUF and the leading equal tokens are counted.
//! Where the two part, both devices' top-two logit gaps at that step are printed: a near tie is
//! where different arithmetic (the CUDA kernels against the CPU's quantized dot products, each
//! summing in its own order) may rightly pick different tokens.
//!
//! To tell numerics from a fault, llama.cpp is put through the same: its CPU output is the one
//! the test data recorded, and with LLAMA_GPU_TEXTS (a JSON object of prompt name to the text
//! llama.cpp generated on the GPU, as deploy/gpu/run-on-gpu.sh writes it) its GPU output too.
//! Texts are compared as token ids of this engine's tokenizer, which equals llama.cpp's.
//!
//! Prints a table and a summary. Usage: device_parity MODEL.gguf [DEVICE (cuda)] [TOKENS (16)]
//! [LLAMA_GPU_TEXTS]

use std::collections::HashMap;
use std::ops::ControlFlow;

use nanofleet_inference::{DeviceChoice, Engine, EngineOptions, GenerateRequest};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The largest logit minus the runner-up: how firmly greedy decoding chose.
fn top_gap(logits: &[f32]) -> f32 {
    let mut best = [f32::NEG_INFINITY; 2];
    for &logit in logits {
        if logit > best[0] {
            best = [logit, best[0]];
        } else if logit > best[1] {
            best[1] = logit;
        }
    }
    best[0] - best[1]
}

/// Greedy tokens, without the end-of-generation token that may end them (texts have none).
fn greedy(engine: &Engine, prompt: &str, tokens: usize) -> AnyResult<Vec<u32>> {
    let request = GenerateRequest::greedy(prompt, tokens);
    let mut ids = engine
        .generate(&request, |_| ControlFlow::Continue(()))?
        .tokens;
    ids.retain(|&id| !engine.tokenizer().is_end_of_generation(id));
    Ok(ids)
}

/// How many leading tokens two runs share, and whether they agree on the first `compared`
/// (or on all of both, when both stopped sooner).
fn agreement(a: &[u32], b: &[u32], compared: usize) -> (usize, bool) {
    let same = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let agree = same >= compared || (same == a.len() && same == b.len());
    (same, agree)
}

fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or("usage: device_parity MODEL.gguf [DEVICE] [TOKENS] [LLAMA_GPU_TEXTS]")?;
    let device: DeviceChoice = args.get(1).map_or("cuda", String::as_str).parse()?;
    let compared: usize = args.get(2).map_or(Ok(16), |n| n.parse())?;
    let llama_gpu: Option<HashMap<String, String>> = args
        .get(3)
        .map(|file| -> AnyResult<_> { Ok(serde_json::from_str(&std::fs::read_to_string(file)?)?) })
        .transpose()?;
    let cases: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/smollm2-llama-cpp.json"
    )))?;
    let cases = cases["greedy"].as_array().ok_or("no greedy cases")?;

    let cpu = Engine::load(path, EngineOptions::default())?;
    let gpu = Engine::load(
        path,
        EngineOptions {
            device: device.open()?,
            ..EngineOptions::default()
        },
    )?;
    println!(
        "Leading greedy tokens equal (of the first {compared}; * = all of a shorter output), {} against {}:",
        gpu.model_info().device,
        cpu.model_info().device
    );
    println!("| prompt | nanofleet CPU = GPU | llama.cpp CPU = GPU | nanofleet GPU = llama.cpp GPU | where nanofleet's CPU and GPU part |");
    println!("|---|---|---|---|---|");
    let show = |(same, agree): (usize, bool)| -> String {
        match (agree, same >= compared) {
            (true, false) => format!("{same}*"),
            _ => same.min(compared).to_string(),
        }
    };
    let mut agreeing = [0usize; 3];
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let prompt = case["prompt"].as_str().ok_or("a case without a prompt")?;
        let on_cpu = greedy(&cpu, prompt, compared)?;
        let on_gpu = greedy(&gpu, prompt, compared)?;
        let devices = agreement(&on_cpu, &on_gpu, compared);
        agreeing[0] += usize::from(devices.1);
        let mut row = [show(devices), "–".to_owned(), "–".to_owned()];
        if let Some(texts) = &llama_gpu {
            let text = texts
                .get(name)
                .ok_or_else(|| format!("no llama.cpp GPU text for {name}"))?;
            let llama_on_gpu = cpu.tokenize(text, false)?;
            let llama_on_cpu = cpu.tokenize(case["text"].as_str().unwrap_or_default(), false)?;
            let llama = agreement(&llama_on_cpu, &llama_on_gpu, compared);
            let gpus = agreement(&on_gpu, &llama_on_gpu, compared);
            agreeing[1] += usize::from(llama.1);
            agreeing[2] += usize::from(gpus.1);
            row[1] = show(llama);
            row[2] = show(gpus);
        }
        let parting = if devices.1 {
            String::new()
        } else {
            let equal = devices.0;
            let mut context = cpu.tokenize(prompt, true)?;
            context.extend_from_slice(&on_cpu[..equal]);
            let token = |engine: &Engine, ids: &[u32]| -> AnyResult<String> {
                Ok(match ids.get(equal) {
                    Some(&id) => format!("{:?}", engine.tokenizer().decode(&[id])?),
                    None => "end".to_owned(),
                })
            };
            format!(
                "token {equal}: CPU {} (top-two gap {:.3}), GPU {} (gap {:.3})",
                token(&cpu, &on_cpu)?,
                top_gap(&cpu.next_token_logits(&context)?),
                token(&gpu, &on_gpu)?,
                top_gap(&gpu.next_token_logits(&context)?),
            )
        };
        println!(
            "| {name} | {} | {} | {} | {parting} |",
            row[0], row[1], row[2]
        );
    }
    let of = cases.len();
    print!(
        "Prompts whose first {compared} tokens agree: nanofleet CPU/GPU {} of {of}",
        agreeing[0]
    );
    if llama_gpu.is_some() {
        print!(
            "; llama.cpp CPU/GPU {} of {of}; nanofleet GPU/llama.cpp GPU {} of {of}",
            agreeing[1], agreeing[2]
        );
    }
    println!();
    Ok(())
}
