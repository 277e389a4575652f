//! nanofleet-inference against llama.cpp on the reference model (SmolLM2-135M-Instruct Q4_1):
//! token ids for the texts in testdata/prompts.json, and greedy continuations of the prompts
//! there compared with llama.cpp's at its default settings (f16 KV cache, flash attention), as
//! recorded by tools/make-testdata.sh. Skipped, with a notice, when the model file is absent.
//! Run with `-- --nocapture` to see, per prompt, how many leading tokens are equal and the logit
//! gaps where the two engines part.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use nanofleet_inference::{Architecture, ChatMessage, Engine, EngineOptions, GenerateRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn model_path() -> PathBuf {
    match std::env::var_os("NANOFLEET_TEST_GGUF") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/nanofleet/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

fn expected() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/smollm2-llama-cpp.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The engine, loaded once for all tests; `None` (with a notice) without the model file or when
/// the file is not the one the test data was recorded with.
fn engine() -> Option<&'static Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = model_path();
            let Ok(bytes) = std::fs::read(&path) else {
                eprintln!(
                    "SKIPPED: reference model {} not found (run deploy/fetch-model.sh or set NANOFLEET_TEST_GGUF)",
                    path.display()
                );
                return None;
            };
            let digest = hex::encode(Sha256::digest(&bytes));
            if digest != expected()["model_sha256"].as_str().unwrap() {
                eprintln!(
                    "SKIPPED: {} is not the model the test data was recorded with (sha256 {digest})",
                    path.display()
                );
                return None;
            }
            Some(Engine::load(&path, EngineOptions::default()).unwrap())
        })
        .as_ref()
}

#[test]
fn token_ids_equal_llama_cpp() {
    let Some(engine) = engine() else { return };
    let cases = expected()["tokenize"].as_array().unwrap().clone();
    assert!(cases.len() >= 20);
    let mut mismatches = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = engine.tokenize(text, true).unwrap();
        if got != want {
            mismatches.push(format!(
                "{}: llama.cpp {want:?}, nanofleet {got:?}",
                case["name"]
            ));
        }
    }
    println!(
        "{} of {} tokenizations equal llama.cpp's",
        cases.len() - mismatches.len(),
        cases.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// Leading generated tokens compared with llama.cpp's (the must-show: 16).
const COMPARED_TOKENS: usize = 16;

/// Prompts whose first [`COMPARED_TOKENS`] greedy tokens must equal llama.cpp's. When the test
/// data was recorded (llama.cpp defaults: f16 KV cache, flash attention) this engine matched 5
/// of the 12 prompts for 16 tokens or more, and a sixth whose whole 12-token answer and stop
/// were equal; the others part at near-ties (see the printed logit gaps). llama.cpp's own output
/// changes as much with its attention settings: its f32-KV, no-flash-attention run agrees with
/// its default for 16 tokens on 4 of the 12.
const MIN_EQUAL_PROMPTS: usize = 3;

/// Top two of `logits` as (id, logit).
fn top_two(logits: &[f32]) -> [(u32, f32); 2] {
    let mut best = [(0u32, f32::NEG_INFINITY); 2];
    for (id, &logit) in logits.iter().enumerate() {
        if logit > best[0].1 {
            best[1] = best[0];
            best[0] = (id as u32, logit);
        } else if logit > best[1].1 {
            best[1] = (id as u32, logit);
        }
    }
    best
}

#[test]
fn greedy_tokens_equal_llama_cpp() {
    let Some(engine) = engine() else { return };
    let tokenizer = engine.tokenizer();
    let cases = expected()["greedy"].as_array().unwrap().clone();
    assert!(cases.len() >= 10);
    // `None` stands for an end-of-generation token: llama.cpp's text only says that one ended
    // its run ("[end of text]"), not which.
    let as_events = |ids: &[u32]| -> Vec<Option<u32>> {
        ids.iter()
            .map(|&id| (!tokenizer.is_end_of_generation(id)).then_some(id))
            .collect()
    };
    let show = |token: Option<u32>| match token {
        Some(id) => format!("{:?}", tokenizer.decode(&[id]).unwrap()),
        None => "end of generation".to_string(),
    };
    let mut equal = Vec::new();
    let mut whole_but_shorter = Vec::new();
    let mut llama_cpp_self_agreement = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let n_predict = case["n_predict"].as_u64().unwrap() as usize;
        assert!(n_predict >= COMPARED_TOKENS);
        let prompt = case["prompt"].as_str().unwrap();
        let completion = engine
            .generate(&GenerateRequest::greedy(prompt, n_predict), |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        let ours = as_events(&completion.tokens);
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let mut theirs: Vec<Option<u32>> = ids.iter().copied().map(Some).collect();
        if case["ended_by_eog"].as_bool().unwrap() {
            theirs.push(None);
        }
        let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();

        // llama.cpp against itself: does its f32-attention run start with the same 16 tokens?
        let head = tokenizer
            .decode(&ids[..ids.len().min(COMPARED_TOKENS)])
            .unwrap();
        let f32_text = case["text_f32_attention"].as_str().unwrap();
        if ids.len() >= COMPARED_TOKENS && f32_text.starts_with(&head) {
            llama_cpp_self_agreement += 1;
        }

        let verdict = if same >= COMPARED_TOKENS {
            equal.push(name);
            format!("first {COMPARED_TOKENS} equal")
        } else if same == theirs.len() && same == ours.len() {
            whole_but_shorter.push(name);
            format!(
                "whole {same}-token output equal (both stopped), shorter than {COMPARED_TOKENS}"
            )
        } else {
            "DIFFERENT".to_string()
        };
        let mut line = format!(
            "{name}: {same} leading tokens equal ({} nanofleet, {} llama.cpp) - {verdict}",
            ours.len(),
            theirs.len()
        );
        if same < ours.len() && same < theirs.len() {
            // Where the runs part: this engine's logits for the shared context (one prefill
            // pass; the generation above went token by token, which can differ in the last
            // digits).
            let mut context = engine.tokenize(prompt, true).unwrap();
            context.extend_from_slice(&completion.tokens[..same]);
            let logits = engine.next_token_logits(&context).unwrap();
            let [first, second] = top_two(&logits);
            let logit_of = |token: Option<u32>| match token {
                Some(id) => logits[id as usize],
                None => tokenizer
                    .end_of_generation()
                    .iter()
                    .map(|&id| logits[id as usize])
                    .fold(f32::NEG_INFINITY, f32::max),
            };
            line.push_str(&format!(
                "; then nanofleet {} vs llama.cpp {}; nanofleet's logits there (one prefill pass): top-2 gap {:.4} ({} over {}), logit(nanofleet's token) - logit(llama.cpp's) = {:.4}",
                show(ours[same]),
                show(theirs[same]),
                first.1 - second.1,
                show(as_events(&[first.0])[0]),
                show(as_events(&[second.0])[0]),
                logit_of(ours[same]) - logit_of(theirs[same]),
            ));
        }
        println!("{line}");
    }
    let summary = format!(
        "{} of {} prompts: first {COMPARED_TOKENS} greedy tokens equal llama.cpp's (defaults: f16 KV cache, flash attention) {:?}; \
         {} more: whole shorter output equal {:?}; \
         llama.cpp's own f32-attention run starts with the same {COMPARED_TOKENS} tokens as its default on {} of {}",
        equal.len(),
        cases.len(),
        equal,
        whole_but_shorter.len(),
        whole_but_shorter,
        llama_cpp_self_agreement,
        cases.len()
    );
    println!("{summary}");
    assert!(equal.len() >= MIN_EQUAL_PROMPTS, "{summary}");
}

#[test]
fn reference_model_metadata_and_chat_template() {
    let Some(engine) = engine() else { return };
    let info = engine.model_info();
    assert_eq!(info.architecture, Architecture::Llama);
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.eos_token, Some(2));
    assert!(info.chat_template_from_model);
    // The model says 8192; candle's llama loader has rotary tables for 4096 positions.
    assert_eq!(info.model_context_length, 8192);
    assert_eq!(info.context_length, 4096);
    // The rendered chat prompts are exactly the ones llama.cpp was given.
    let cases = expected()["greedy"].as_array().unwrap().clone();
    let mut chat_cases = 0;
    for case in cases.iter().filter(|c| c.get("user").is_some()) {
        let rendered = engine
            .render_chat(&[ChatMessage::new("user", case["user"].as_str().unwrap())])
            .unwrap();
        assert_eq!(
            rendered,
            case["prompt"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        chat_cases += 1;
    }
    assert!(
        chat_cases >= 10,
        "only {chat_cases} chat-formatted greedy prompts"
    );
}
