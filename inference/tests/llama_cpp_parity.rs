//! nanofleet-inference against llama.cpp on the reference model (SmolLM2-135M-Instruct Q4_1):
//! token ids for the texts in testdata/prompts.json and greedy continuations, as recorded by
//! tools/make-testdata.sh. Skipped, with a notice, when the model file is absent.

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

/// Largest logit gap at which two engines may pick different greedy tokens: candle and
/// llama.cpp sum in different orders and llama.cpp keeps the KV cache in f16, which moves
/// logits by a few hundredths; a smaller gap is a numerical tie. (llama.cpp's own greedy text
/// changes with its KV-cache type on 4 of the 5 prompts.)
const TIE_MARGIN: f32 = 0.1;

#[test]
fn greedy_tokens_equal_llama_cpp() {
    let Some(engine) = engine() else { return };
    let cases = expected()["greedy"].as_array().unwrap().clone();
    assert!(cases.len() >= 3);
    let mut failures = Vec::new();
    let mut exact = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let n_predict = case["n_predict"].as_u64().unwrap() as usize;
        assert!(n_predict >= 16);
        let prompt = case["prompt"].as_str().unwrap();
        let completion = engine
            .generate(&GenerateRequest::greedy(prompt, n_predict), |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        let references = [
            ("default", case["text"].as_str().unwrap()),
            (
                "f32 attention",
                case["text_f32_attention"].as_str().unwrap(),
            ),
        ];
        if let Some((config, _)) = references.iter().find(|(_, text)| completion.text == *text) {
            exact += 1;
            println!(
                "{name}: all {} tokens equal llama.cpp's ({config})",
                completion.tokens.len()
            );
            continue;
        }
        // Where the runs part: llama.cpp's text as tokens (its output re-tokenized), the
        // configuration that agrees longest.
        let ours = &completion.tokens;
        let (config, want, theirs, same) = references
            .iter()
            .map(|(config, text)| {
                let theirs = engine.tokenize(text, false).unwrap();
                let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
                (*config, *text, theirs, same)
            })
            .max_by_key(|(_, _, _, same)| *same)
            .unwrap();
        if same == ours.len().min(theirs.len()) {
            failures.push(format!(
                "{name}: one run stopped early: llama.cpp ({config}) {want:?}, nanofleet {:?}",
                completion.text
            ));
            continue;
        }
        let mut context = engine.tokenize(prompt, true).unwrap();
        context.extend_from_slice(&ours[..same]);
        let logits = engine.next_token_logits(&context).unwrap();
        let gap = (logits[ours[same] as usize] - logits[theirs[same] as usize]).abs();
        println!(
            "{name}: first {same} tokens equal llama.cpp's ({config}); then nanofleet {:?} vs llama.cpp {:?}, logit gap {gap:.4}",
            engine.tokenizer().token_text(ours[same]),
            engine.tokenizer().token_text(theirs[same]),
        );
        if gap > TIE_MARGIN {
            failures.push(format!(
                "{name}: diverges after {same} tokens where the logits are {gap} apart: llama.cpp ({config}) {want:?}, nanofleet {:?}",
                completion.text
            ));
        }
    }
    println!(
        "{exact} of {} greedy runs equal one of llama.cpp's token for token",
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Recorded when the test data was made: chat-capital (f32 attention), plain-fox and
    // chat-python (default) equal for all 24 tokens; fewer means a change in numerics or
    // sampling worth looking at.
    assert!(exact >= 3, "only {exact} greedy runs equal llama.cpp's");
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
    // The rendered chat prompt is exactly the one llama.cpp was given.
    let cases = expected()["greedy"].as_array().unwrap().clone();
    let case = cases.iter().find(|c| c["name"] == "chat-capital").unwrap();
    let rendered = engine
        .render_chat(&[ChatMessage::new("user", "What is the capital of France?")])
        .unwrap();
    assert_eq!(rendered, case["prompt"].as_str().unwrap());
}
