//! This engine measured the way llama-bench measures llama.cpp, for tools/bench.sh: `pp` runs a
//! prompt of N token ids through the model in one batch (tokens/s of that forward pass); `tg`
//! generates M tokens greedily after the short prompt "1, 2, 3," (tokens/s of the M forward
//! passes after the first token); each R times after one short warm-up. Also reports the
//! engine's load time (`Engine::load`: GGUF read, tokenizer, weights). Peak RSS is measured
//! from outside (tools/bench.sh runs this under `/usr/bin/time -v`).
//!
//! llama-bench feeds random token ids for `tg` and never stops early; here generation is the
//! engine's own loop (sampling included), which ends at an end-of-generation token. The prompt
//! is a count, which greedy decoding goes on continuing; the number of tokens generated is
//! reported all the same.
//!
//! Prints one JSON object on stdout.
//! Usage: bench MODEL.gguf [THREADS] [PROMPT_TOKENS] [GEN_TOKENS] [REPETITIONS] [DEVICE]
//! (DEVICE: cpu (default), cuda or cuda:N, the latter with the `cuda` feature.)

use std::ops::ControlFlow;
use std::time::Instant;

use nanofleet_inference::{
    DeviceChoice, Engine, EngineOptions, GenerateRequest, Prompt, TokenType,
};

fn mean_and_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// `count` ordinary (non-special) token ids spread over the vocabulary; fixed, so every run
/// sees the same prompt (llama-bench draws random ids).
fn prompt_ids(engine: &Engine, count: usize) -> Vec<u32> {
    let vocab_size = engine.model_info().vocab_size as u64;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut ids = Vec::with_capacity(count);
    while ids.len() < count {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let id = ((state >> 33) % vocab_size) as u32;
        if engine.tokenizer().token_type(id) == Some(TokenType::Normal) {
            ids.push(id);
        }
    }
    ids
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: bench MODEL.gguf [THREADS] [PROMPT_TOKENS] [GEN_TOKENS] [REPETITIONS] [DEVICE]";
    let path = args.first().ok_or(usage)?;
    let arg = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let threads = arg(1, 2)?;
    let n_prompt = arg(2, 512)?;
    let n_gen = arg(3, 128)?;
    let repetitions = arg(4, 3)?.max(1);
    let device: DeviceChoice = args.get(5).map_or("cpu", String::as_str).parse()?;

    let started = Instant::now();
    let engine = Engine::load(
        path,
        EngineOptions {
            threads: Some(threads),
            device: device.open()?,
            ..EngineOptions::default()
        },
    )?;
    let load_s = started.elapsed().as_secs_f64();
    let prompt = prompt_ids(&engine, n_prompt);
    // A count, which greedy decoding continues ("4, 5, 6, ...") instead of ending the text.
    let tg_start = engine.tokenize("1, 2, 3,", false)?;

    let run = |tokens: &[u32], max_tokens: usize| {
        let request = GenerateRequest {
            prompt: Prompt::Tokens(tokens.to_vec()),
            ..GenerateRequest::greedy("", max_tokens)
        };
        engine.generate(&request, |_| ControlFlow::Continue(()))
    };
    // Warm-up: thread pools, page faults, caches.
    run(&prompt[..prompt.len().min(32)], 2)?;

    let mut pp = Vec::new();
    let mut tg = Vec::new();
    let mut tg_tokens = Vec::new();
    for _ in 0..repetitions {
        let done = run(&prompt, 1)?;
        pp.push(done.stats.prompt_tokens_per_second());
    }
    for _ in 0..repetitions {
        // n_gen + 1 tokens: the rate counts the forward passes after the first token, n_gen of
        // them when nothing ends generation early.
        let done = run(&tg_start, n_gen + 1)?;
        tg.push(done.stats.generation_tokens_per_second());
        tg_tokens.push(done.stats.completion_tokens.saturating_sub(1));
    }
    let (pp_mean, pp_sd) = mean_and_sd(&pp);
    let (tg_mean, tg_sd) = mean_and_sd(&tg);
    println!(
        "{{\"device\": {:?}, \"load_s\": {load_s:.4}, \"threads\": {threads}, \"n_prompt\": {n_prompt}, \"pp_tps\": {pp_mean:.3}, \"pp_sd\": {pp_sd:.3}, \"n_gen\": {n_gen}, \"tg_tokens_min\": {}, \"tg_tps\": {tg_mean:.3}, \"tg_sd\": {tg_sd:.3}, \"repetitions\": {repetitions}}}",
        engine.model_info().device,
        tg_tokens.iter().min().copied().unwrap_or(0)
    );
    Ok(())
}
