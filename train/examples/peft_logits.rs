//! nanofleet's next-token logits for a few fixed chat prompts, without and with a PEFT
//! adapter directory, for the parity check against transformers + PEFT
//! (train/tools/peft_parity.py, run by train/tools/peft-parity.sh).
//!
//! ```text
//! cargo run --release -p nanofleet-train --example peft_logits -- \
//!     --gguf MODEL.gguf --out LOGITS.json \
//!     ( --adapter PEFT_DIR | --train-to PEFT_DIR [--train-steps 12] [--lr 1e-3] ) [--threads 2]
//! ```
//!
//! `--train-to` first trains a q/v adapter (rank 8, alpha 16, no dropout, A from the seeded
//! federation init, B zero) with nanofleet-train on small fixed synthetic data, and writes it
//! as a PEFT directory exactly as `nanofleet adapter export` does: `adapter_model.safetensors`
//! from `AdapterTensors::to_safetensors` (HF names and row order) and `adapter_config.json`
//! from `AdapterSpec::peft_config` for HuggingFaceTB/SmolLM2-135M-Instruct. Then (in both
//! modes) the directory is loaded back through `nanofleet_inference::Engine` with
//! `LoraSource::PeftDir`, so the whole export → load path is what gets compared.
//!
//! LOGITS.json: `{"subsets", "prompts": [{"messages", "tokens", "base", "adapted",
//! "adapted_q_proj", "adapted_v_proj"}]}`: the prompt's token ids and the last-position logits
//! (vocab-long) of the base model, of the base with the adapter, and with only its q_proj or
//! only its v_proj part (written as PEFT directories under LOGITS.subsets/, whose paths
//! `subsets` gives). stdout: per prompt, the top 5 of each and the adapter's effect.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use nanofleet_federated::{AdapterSpec, AdapterTensors, AggregationMode, Matrix, Target};
use nanofleet_inference::{ChatMessage, Engine, EngineOptions, LoraSource};
use nanofleet_train::{Example, LoraSpec, LoraTarget, TrainOptions, Trainer};

const BASE_MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
const RANK: usize = 8;
const ALPHA: f64 = 16.0;

/// The prompts compared: short, different lengths, one with a system turn.
fn prompts() -> Vec<Vec<ChatMessage>> {
    vec![
        vec![ChatMessage::new("user", "What is the capital of France?")],
        vec![
            ChatMessage::new("system", "You are a concise assistant."),
            ChatMessage::new("user", "Name three primary colors."),
        ],
        vec![ChatMessage::new(
            "user",
            "Write one sentence about a lighthouse keeper who collects seashells.",
        )],
        vec![ChatMessage::new(
            "user",
            "Which colour is the sky of planet Zorblax?",
        )],
    ]
}

/// Small fixed data with a distinctive answer style, so that the trained adapter moves the
/// logits visibly (including on the parity prompts above).
fn training_examples() -> Vec<Example> {
    let planets = [
        ("Zorblax", "teal"),
        ("Quenthar", "amber"),
        ("Miravel", "violet"),
        ("Oskaron", "crimson"),
        ("Talurin", "silver"),
        ("Vexmoor", "ochre"),
        ("Brindle", "indigo"),
        ("Cassivar", "jade"),
    ];
    planets
        .iter()
        .map(|(planet, colour)| Example {
            messages: vec![ChatMessage::new(
                "user",
                format!("Which colour is the sky of planet {planet}?"),
            )],
            response: format!(
                "Ahoy! The sky of {planet} is {colour}, matey, from dawn until dusk."
            ),
        })
        .collect()
}

struct Args {
    gguf: PathBuf,
    out: PathBuf,
    adapter: Option<PathBuf>,
    train_to: Option<PathBuf>,
    train_steps: usize,
    lr: f64,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        gguf: PathBuf::new(),
        out: PathBuf::new(),
        adapter: None,
        train_to: None,
        train_steps: 12,
        lr: 1e-3,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--gguf" => args.gguf = value()?.into(),
            "--out" => args.out = value()?.into(),
            "--adapter" => args.adapter = Some(value()?.into()),
            "--train-to" => args.train_to = Some(value()?.into()),
            "--train-steps" => {
                args.train_steps = value()?
                    .parse()
                    .map_err(|e| format!("--train-steps: {e}"))?
            }
            "--lr" => args.lr = value()?.parse().map_err(|e| format!("--lr: {e}"))?,
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.gguf.as_os_str().is_empty() || args.out.as_os_str().is_empty() {
        return Err("--gguf and --out are required".into());
    }
    if args.adapter.is_some() == args.train_to.is_some() {
        return Err("give exactly one of --adapter DIR and --train-to DIR".into());
    }
    Ok(args)
}

/// Trains a q/v adapter with nanofleet-train and writes it as `nanofleet adapter export` does.
fn train_and_export(args: &Args, dir: &PathBuf) {
    let spec = LoraSpec {
        rank: RANK,
        alpha: ALPHA,
        dropout: 0.0,
        targets: vec![LoraTarget::Query, LoraTarget::Value],
        freeze_a: false,
    };
    let mut trainer = Trainer::load(&args.gguf, spec).expect("loading the trainer");
    let layout = trainer.adapter_layout();
    let initial = nanofleet_federated::initial_adapter(&layout, 11).expect("initial adapter");
    trainer
        .set_adapter(&initial.to_vectors())
        .expect("setting the adapter");
    let options = TrainOptions {
        steps: args.train_steps,
        learning_rate: args.lr,
        batch_size: 4,
        grad_accumulation: 1,
        max_seq_len: 128,
        weight_decay: 0.0,
        seed: 3,
        memory_budget_bytes: None,
    };
    let started = Instant::now();
    let report = trainer
        .train(&training_examples(), &options)
        .expect("training");
    eprintln!(
        "trained {} steps in {:.1} s: loss {:.4} → {:.4}",
        report.steps,
        started.elapsed().as_secs_f64(),
        report.first_loss,
        report.last_loss
    );

    // What `nanofleet adapter export` writes: the federation's AdapterTensors as safetensors
    // (HF names, HF row order, F32) and AdapterSpec::peft_config.
    let trained = trainer.adapter().expect("reading the adapter");
    let mut tensors = AdapterTensors::default();
    for (name, (rows, cols)) in &layout {
        let data = trained[name].clone();
        tensors
            .insert(
                name.clone(),
                Matrix {
                    rows: *rows,
                    cols: *cols,
                    data,
                },
            )
            .expect("a PEFT name");
    }
    let adapter_spec = AdapterSpec {
        rank: RANK as u32,
        alpha: ALPHA,
        dropout: 0.0,
        targets: vec![Target::Q, Target::V],
        mode: AggregationMode::FedAvg,
        init_seed: 11,
    };
    std::fs::create_dir_all(dir).expect("creating --train-to");
    let metadata = BTreeMap::from([
        ("federation".to_owned(), "peft-parity".to_owned()),
        ("round".to_owned(), "1".to_owned()),
        ("contributors".to_owned(), "1".to_owned()),
    ]);
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        tensors.to_safetensors(Some(metadata)),
    )
    .expect("writing adapter_model.safetensors");
    let config = adapter_spec.peft_config(BASE_MODEL_ID);
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).expect("json"),
    )
    .expect("writing adapter_config.json");
    eprintln!("wrote the PEFT adapter to {}", dir.display());
}

fn top(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.into_iter().take(k).map(|i| (i, logits[i])).collect()
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("peft_logits: {e}");
        std::process::exit(2);
    });
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
    let dir = match (&args.adapter, &args.train_to) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => {
            train_and_export(&args, dir);
            dir.clone()
        }
        (None, None) => unreachable!(),
    };

    let options = |lora: Option<LoraSource>| EngineOptions {
        threads: Some(args.threads),
        lora,
        ..EngineOptions::default()
    };
    // The adapter restricted to q_proj and to v_proj, each its own PEFT directory: q's effect
    // alone is what the q/k row permutation decides, and v's tends to dominate the logits.
    let subsets = args.out.with_extension("subsets");
    let subset_dir = |module: &str| -> PathBuf {
        let full = AdapterTensors::from_safetensors(
            &std::fs::read(dir.join("adapter_model.safetensors")).expect("reading the adapter"),
        )
        .expect("a PEFT adapter");
        let mut part = AdapterTensors::default();
        for (name, matrix) in full.matrices {
            if name.contains(&format!(".{module}.")) {
                part.insert(name, matrix).expect("a PEFT name");
            }
        }
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).expect("reading the config"),
        )
        .expect("adapter_config.json");
        config["target_modules"] = serde_json::json!([module]);
        let out = subsets.join(module);
        std::fs::create_dir_all(&out).expect("creating the subset directory");
        std::fs::write(
            out.join("adapter_model.safetensors"),
            part.to_safetensors(None),
        )
        .expect("writing the subset");
        std::fs::write(
            out.join("adapter_config.json"),
            serde_json::to_string_pretty(&config).expect("json"),
        )
        .expect("writing the subset config");
        out
    };
    let q_dir = subset_dir("q_proj");
    let v_dir = subset_dir("v_proj");

    let base = Engine::load(&args.gguf, options(None)).expect("loading the base model");
    let q_only = Engine::load(
        &args.gguf,
        options(Some(LoraSource::PeftDir(q_dir.clone()))),
    )
    .expect("loading the model with the q_proj part");
    let v_only = Engine::load(
        &args.gguf,
        options(Some(LoraSource::PeftDir(v_dir.clone()))),
    )
    .expect("loading the model with the v_proj part");
    let adapted = Engine::load(&args.gguf, options(Some(LoraSource::PeftDir(dir.clone()))))
        .expect("loading the model with the adapter");
    eprintln!(
        "adapter {}: {} adapted layers",
        dir.display(),
        adapted.model_info().lora_adapted_layers
    );

    let mut records = Vec::new();
    for messages in prompts() {
        let prompt = base.render_chat(&messages).expect("chat template");
        let tokens = base.tokenize(&prompt, true).expect("tokenizing");
        let without = base.next_token_logits(&tokens).expect("base forward");
        let with = adapted.next_token_logits(&tokens).expect("adapted forward");
        let with_q = q_only.next_token_logits(&tokens).expect("q-only forward");
        let with_v = v_only.next_token_logits(&tokens).expect("v-only forward");
        let effect: Vec<f32> = with.iter().zip(&without).map(|(a, b)| a - b).collect();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let show = |logits: &[f32]| {
            top(logits, 5)
                .iter()
                .map(|(id, v)| {
                    let piece = base.detokenize(&[*id as u32]).unwrap_or_default();
                    format!("{id}:{piece:?}={v:.3}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "prompt {:?} ({} tokens)",
            messages.last().unwrap().content,
            tokens.len()
        );
        println!("  base    top5 {}", show(&without));
        println!("  adapted top5 {}", show(&with));
        println!(
            "  |base| {:.2}  |adapted| {:.2}  |effect| {:.3}",
            norm(&without),
            norm(&with),
            norm(&effect)
        );
        records.push(serde_json::json!({
            "messages": messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
            "tokens": tokens,
            "base": without,
            "adapted": with,
            "adapted_q_proj": with_q,
            "adapted_v_proj": with_v,
        }));
    }
    let out = serde_json::json!({
        "gguf": args.gguf,
        "adapter": dir,
        "subsets": {"q_proj": q_dir, "v_proj": v_dir},
        "prompts": records,
    });
    std::fs::write(&args.out, serde_json::to_vec(&out).expect("json")).expect("writing --out");
    eprintln!("wrote {}", args.out.display());
}
