//! End to end: the reference model rolled out to an agent and served by its local
//! OpenAI-compatible API: the official `openai` Python client, seeds, per-version counters,
//! and a model swap while four streaming requests are in flight; and `nanofleet-agent serve`
//! with a local file.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nanofleet_e2e::fleet::{
    agent_trust_policy, create_rollout, publish, start_agents, trusted_key, wait_state,
};
use nanofleet_e2e::{http, http_sse, path, reference_model, wait_until, Agent, Coordinator};
use serde_json::{json, Value};

const MODEL: &str = "smollm2-135m-instruct";

/// A coordinator with the reference model published as each of `versions`, and one agent
/// (started with `extra` flags) running the first of them.
fn serving(root: &Path, versions: &[&str], extra: &[&str]) -> (Coordinator, Agent) {
    let coordinator = Coordinator::start(root);
    let (key, public) = trusted_key(&coordinator, root, "publisher", "smollm2-*");
    let trust = agent_trust_policy(root, &public, "smollm2-*");
    for version in versions {
        publish(
            &coordinator,
            &reference_model(),
            MODEL,
            version,
            &key,
            "4194304",
        );
    }
    let trust = path(&trust);
    let mut flags = vec!["--trust-policy", trust.as_str()];
    flags.extend_from_slice(extra);
    let agent = start_agents(&coordinator, root, 1, &flags).remove(0);
    let id = create_rollout(&coordinator, &format!("{MODEL}@{}", versions[0]), "100%");
    wait_state(&coordinator, &id, "completed", Duration::from_secs(120));
    (coordinator, agent)
}

fn chat_body(content: &str, max_tokens: usize, extra: Value) -> String {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body.to_string()
}

fn answer(address: &str, body: &str) -> Value {
    let response = http(address, "POST", "/v1/chat/completions", body);
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

fn text_of(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn the_openai_python_client_talks_to_the_agent() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("agent.toml");
    std::fs::write(&config, "api_key = \"local-secret\"\n").unwrap();
    let (_coordinator, agent) = serving(root.path(), &["1.0.0"], &["--config", &path(&config)]);
    let address = agent.api_address();
    assert!(
        !agent.log().contains("local-secret"),
        "the API key must not reach the log"
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py");
    let mut python = std::process::Command::new("python3");
    if let Some(pythonpath) = std::env::var_os("NANOFLEET_TEST_PYTHONPATH") {
        python.env("PYTHONPATH", pythonpath);
    }
    let output = python
        .arg(&script)
        .args([&address, MODEL, "local-secret"])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the openai client checks failed (tests/run.sh installs the `openai` package and sets NANOFLEET_TEST_PYTHONPATH):\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");

    // Without the key nothing is served.
    let refused = http(&address, "GET", "/v1/models", "");
    assert_eq!(refused.status, 401);
}

#[test]
fn seeds_decide_sampled_text_and_counters_are_kept_per_version() {
    let root = tempfile::tempdir().unwrap();
    let (_coordinator, agent) = serving(root.path(), &["1.0.0"], &[]);
    let address = agent.api_address();
    let sampled = |seed: u64| {
        text_of(&answer(
            &address,
            &chat_body(
                "Write a short poem about the sea.",
                24,
                json!({"temperature": 0.9, "seed": seed}),
            ),
        ))
    };
    let first = sampled(7);
    assert_eq!(first, sampled(7), "the same seed gives the same text");
    assert_ne!(first, sampled(8), "another seed gives other text");

    let stats = http(&address, "GET", "/v1/stats", "").json();
    let version = &stats["versions"][0];
    assert_eq!(version["version"], "1.0.0", "{stats:#}");
    assert_eq!(version["requests"], 3);
    assert_eq!(version["errors"], 0);
    assert!(version["completion_tokens"].as_u64().unwrap() > 0);
    assert!(version["generation_tokens_per_second"].as_f64().unwrap() > 0.0);
}

/// What one streaming request saw.
struct Streamed {
    status: u16,
    text: String,
    fingerprint: String,
    finish_reason: Option<String>,
    done: bool,
    errors: Vec<String>,
    last_data_at: Instant,
}

#[test]
fn a_model_swap_lets_four_streaming_requests_finish() {
    let root = tempfile::tempdir().unwrap();
    let (coordinator, agent) = serving(
        root.path(),
        &["1.0.0", "1.1.0"],
        &["--api-max-concurrent", "4"],
    );
    let address = agent.api_address();

    let (started, first_data) = mpsc::channel();
    let streams: Vec<_> = (0..4)
        .map(|i| {
            let address = address.clone();
            let started = started.clone();
            std::thread::spawn(move || {
                let body = chat_body(
                    &format!("Tell me a long story about robot number {i} who learns to paint."),
                    120,
                    json!({"temperature": 0, "stream": true}),
                );
                let mut seen = Streamed {
                    status: 0,
                    text: String::new(),
                    fingerprint: String::new(),
                    finish_reason: None,
                    done: false,
                    errors: Vec::new(),
                    last_data_at: Instant::now(),
                };
                seen.status = http_sse(&address, "/v1/chat/completions", &body, |data| {
                    if seen.text.is_empty() && seen.fingerprint.is_empty() {
                        let _ = started.send(i);
                    }
                    seen.last_data_at = Instant::now();
                    if data == "[DONE]" {
                        seen.done = true;
                        return;
                    }
                    let chunk: Value = serde_json::from_str(data).unwrap();
                    if let Some(error) = chunk.get("error") {
                        seen.errors.push(error.to_string());
                        return;
                    }
                    seen.fingerprint = chunk["system_fingerprint"].as_str().unwrap().to_owned();
                    let choice = &chunk["choices"][0];
                    seen.text += choice["delta"]["content"].as_str().unwrap_or("");
                    if let Some(reason) = choice["finish_reason"].as_str() {
                        seen.finish_reason = Some(reason.to_owned());
                    }
                });
                seen
            })
        })
        .collect();
    for _ in 0..4 {
        first_data
            .recv_timeout(Duration::from_secs(60))
            .expect("every stream starts");
    }

    // Swap the model under the four streams.
    let swap = create_rollout(&coordinator, &format!("{MODEL}@1.1.0"), "100%");
    let mut served = Value::Null;
    let swapped = wait_until(Duration::from_secs(120), || {
        served = http(&address, "GET", "/v1/models", "").json();
        served["data"][0]["version"] == "1.1.0"
    });
    assert!(swapped, "{served:#}");
    let swapped_at = Instant::now();
    wait_state(&coordinator, &swap, "completed", Duration::from_secs(60));

    for stream in streams {
        let seen = stream.join().expect("stream thread");
        assert_eq!(seen.status, 200);
        assert!(seen.errors.is_empty(), "{:?}", seen.errors);
        assert!(seen.done, "the stream ended with [DONE]");
        assert!(seen.finish_reason.is_some(), "a finish reason came");
        assert!(!seen.text.is_empty());
        assert_eq!(
            seen.fingerprint, "1.0.0",
            "finished on the model it began with"
        );
        assert!(
            seen.last_data_at > swapped_at,
            "the stream was still running when the new model took over"
        );
    }
    // New requests go to the new version.
    let after = answer(
        &address,
        &chat_body("Say hi.", 4, json!({"temperature": 0})),
    );
    assert_eq!(after["system_fingerprint"], "1.1.0");
    let stats = http(&address, "GET", "/v1/stats", "").json();
    let requests = |version: &str| {
        stats["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == version)
            .map(|v| v["requests"].as_u64().unwrap())
    };
    assert_eq!(requests("1.0.0"), Some(4), "{stats:#}");
    assert_eq!(requests("1.1.0"), Some(1), "{stats:#}");
}

/// `nanofleet-agent serve --model FILE` answers on the local API with a local file and no
/// coordinator, after the same smoke prompt a rollout's model must pass; a model that fails
/// it is never served.
#[test]
fn serve_answers_a_local_model_without_a_coordinator() {
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("tiny.gguf");
    std::fs::write(&model, nanofleet_e2e::tiny_gguf(1)).unwrap();
    let agent = Agent::serve_local(root.path(), "local", &model);
    let address = agent.api_address();

    let models = http(&address, "GET", "/v1/models", "").json();
    assert_eq!(models["data"][0]["id"], "tiny", "{models}");
    assert_eq!(models["data"][0]["device"], "cpu", "{models}");
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
    });
    let response = http(&address, "POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["object"], "chat.completion");

    let broken = root.path().join("broken.gguf");
    std::fs::write(&broken, nanofleet_e2e::broken_tiny_gguf(1)).unwrap();
    let mut refused = Agent::serve_local(root.path(), "broken", &broken);
    assert!(
        wait_until(Duration::from_secs(30), || refused.exit_code().is_some()),
        "an agent serving a broken model kept running: {}",
        refused.log()
    );
    assert_eq!(refused.exit_code(), Some(1));
    assert!(refused.log().contains("serving"), "{}", refused.log());
}
