//! Benchmark of one LoRA training step of nanofleet-train on a GGUF llama.
//!
//! ```text
//! cargo run --release -p nanofleet-train --example train_step -- \
//!     --gguf MODEL.gguf --data DATA.jsonl [--steps 5] [--threads 2] [--seq 256] \
//!     [--batch 4] [--rank 8] [--alpha 16] [--tokens-out TOKENS.jsonl]
//! ```
//!
//! DATA.jsonl holds `{"prompt": …, "response": …}` lines (train/bench/train-step.sh writes
//! them); the first `--batch` examples make the batch. Each is rendered and tokenized exactly as
//! `Trainer::train` does (chat template with the generation prompt, the response, the end
//! token) and cut to `seq + 1` tokens, so that the model sees `seq` input tokens; an example
//! shorter than that is an error. `--tokens-out` writes those token ids with the prompt
//! length (`{"tokens": […], "prompt_len": n}`), so that another implementation can run the very
//! same step (train/bench/train_step.py).
//!
//! One warm-up step, then `--steps` timed steps (each a forward, a backward and an AdamW
//! update with lr 1e-4, no dropout; q and v targeted; adapter initialized like a federation's
//! first round: A uniform ±1/√in, B zero). Prints one JSON line: median seconds per step,
//! tokens per second (batch × seq / median) and peak RSS (VmHWM).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use nanofleet_inference::ModelText;
use nanofleet_train::{load_jsonl, Example, LoraSpec, LoraTarget, TrainOptions, Trainer};

struct Args {
    gguf: PathBuf,
    data: PathBuf,
    steps: usize,
    threads: usize,
    seq: usize,
    batch: usize,
    rank: usize,
    alpha: f64,
    tokens_out: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        gguf: PathBuf::new(),
        data: PathBuf::new(),
        steps: 5,
        threads: 2,
        seq: 256,
        batch: 4,
        rank: 8,
        alpha: 16.0,
        tokens_out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--gguf" => args.gguf = value()?.into(),
            "--data" => args.data = value()?.into(),
            "--steps" => args.steps = number(value()?)?,
            "--threads" => args.threads = number(value()?)?,
            "--seq" => args.seq = number(value()?)?,
            "--batch" => args.batch = number(value()?)?,
            "--rank" => args.rank = number(value()?)?,
            "--alpha" => args.alpha = value()?.parse().map_err(|e| format!("--alpha: {e}"))?,
            "--tokens-out" => args.tokens_out = Some(value()?.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.gguf.as_os_str().is_empty() || args.data.as_os_str().is_empty() {
        return Err("--gguf and --data are required".into());
    }
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    Ok(args)
}

/// Peak resident set size in bytes, from /proc/self/status.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The tokens `Trainer::train` makes of `example` (see nanofleet-train's batch::encode).
fn encode(text: &ModelText, example: &Example, end: u32, max_len: usize) -> (Vec<u32>, usize) {
    let prompt = text
        .template
        .render(&example.messages, true)
        .expect("rendering the chat template");
    let mut tokens = text.tokenizer.encode(&prompt, true).expect("tokenizing");
    let prompt_len = tokens.len();
    tokens.extend(
        text.tokenizer
            .encode(&example.response, false)
            .expect("tokenizing"),
    );
    tokens.push(end);
    tokens.truncate(max_len);
    (tokens, prompt_len)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("train_step: {e}");
        std::process::exit(2);
    });
    // candle sizes its worker pools once, from these, at the first parallel op.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());

    let examples: Vec<Example> = load_jsonl(&args.data)
        .expect("reading --data")
        .into_iter()
        .take(args.batch)
        .collect();
    assert_eq!(
        examples.len(),
        args.batch,
        "--data has fewer than --batch examples"
    );

    // The token ids the step trains on, checked to be exactly `seq` inputs each.
    let mut file = std::fs::File::open(&args.gguf).expect("opening the GGUF");
    let content = gguf_file::Content::read(&mut file).expect("reading the GGUF header");
    let text = ModelText::from_gguf_metadata(&content.metadata).expect("tokenizer");
    let end = text
        .tokenizer
        .eos_token()
        .or_else(|| text.tokenizer.end_of_generation().first().copied())
        .expect("an end-of-generation token");
    let sequences: Vec<(Vec<u32>, usize)> = examples
        .iter()
        .map(|e| encode(&text, e, end, args.seq + 1))
        .collect();
    for (i, (tokens, _)) in sequences.iter().enumerate() {
        assert_eq!(
            tokens.len(),
            args.seq + 1,
            "example {i} has only {} tokens; make it longer than --seq",
            tokens.len()
        );
    }
    if let Some(path) = &args.tokens_out {
        let mut out = std::fs::File::create(path).expect("creating --tokens-out");
        for (tokens, prompt_len) in &sequences {
            let line = serde_json::json!({"tokens": tokens, "prompt_len": prompt_len});
            writeln!(out, "{line}").expect("writing --tokens-out");
        }
    }
    drop(content);

    let spec = LoraSpec {
        rank: args.rank,
        alpha: args.alpha,
        dropout: 0.0,
        targets: vec![LoraTarget::Query, LoraTarget::Value],
        freeze_a: false,
    };
    let load_started = Instant::now();
    let mut trainer = Trainer::load(&args.gguf, spec).expect("loading the trainer");
    let load_seconds = load_started.elapsed().as_secs_f64();
    let initial = nanofleet_federated::initial_adapter(&trainer.adapter_layout(), 7)
        .expect("initial adapter");
    trainer
        .set_adapter(&initial.to_vectors())
        .expect("setting the adapter");

    let options = TrainOptions {
        steps: 1,
        learning_rate: 1e-4,
        batch_size: args.batch,
        grad_accumulation: 1,
        max_seq_len: args.seq + 1,
        weight_decay: 0.0,
        seed: 0,
        memory_budget_bytes: None,
    };
    let mut losses = Vec::new();
    let mut times = Vec::new();
    for step in 0..=args.steps {
        let started = Instant::now();
        let report = trainer.train(&examples, &options).expect("training step");
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "nanofleet step {step}{}: {seconds:.3} s, loss {:.4}",
            if step == 0 { " (warm-up)" } else { "" },
            report.first_loss
        );
        losses.push(report.first_loss);
        if step > 0 {
            times.push(seconds);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    let tokens = (args.batch * args.seq) as f64;
    let line = serde_json::json!({
        "impl": "nanofleet",
        "seconds_per_step": median,
        "tokens_per_s": tokens / median,
        "peak_rss_mib": peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        "steps": args.steps,
        "step_seconds": times,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "alpha": args.alpha,
        "threads": args.threads,
        "load_seconds": load_seconds,
        "loss_first_step": losses[0],
        "loss_last_step": losses[losses.len() - 1],
    });
    println!("{line}");
}
