//! Federated-round fixtures shared by the tests: agents with local JSONL data that teaches
//! one answer, the tiny base model rolled out to them, and federations created, started
//! and awaited through the operator CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::fleet::{agent_trust_policy, create_rollout, publish, trusted_key, wait_state};
use crate::{ok, path, tiny_gguf, wait_until, Agent, Coordinator};

/// The answer every site's data teaches, which the random base model does not give.
pub const ANSWER: &str = "valve open";

/// A site's local examples: prompts carry a marker unique to the site, so that any leak
/// of training text to the coordinator can be found.
pub fn write_site_data(dir: &Path, site: usize, count: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join(format!("site-{site}.jsonl"));
    let lines: Vec<String> = (0..count)
        .map(|k| {
            serde_json::json!({
                "prompt": format!("site-{site}-secret-record {k}: state of line {}?", k % 7),
                "response": ANSWER,
            })
            .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

/// A coordinator with agents that train, and the root directory they live in.
pub struct Fleet {
    pub root: tempfile::TempDir,
    pub coordinator: Coordinator,
    pub agents: Vec<Agent>,
    /// Each agent's local training data.
    pub data: Vec<PathBuf>,
}

/// A coordinator, `sizes.len()` agents with that many local examples each, and the tiny
/// base model rolled out to all of them.
pub fn fleet(sizes: &[usize]) -> Fleet {
    fleet_with(sizes, &[])
}

/// Like [`fleet`], with more coordinator `serve` flags.
pub fn fleet_with(sizes: &[usize], serve_flags: &[&str]) -> Fleet {
    let root = tempfile::tempdir().unwrap();
    // Every request body the node service receives is kept, to look for training text.
    let wire = path(&root.path().join("coordinator/wire"));
    let mut flags = vec!["--wire-capture-dir", &wire];
    flags.extend_from_slice(serve_flags);
    let coordinator = Coordinator::start_with(root.path(), &flags);
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny-*");
    let trust = agent_trust_policy(root.path(), &public, "tiny-*");
    // Agents also trust the coordinator's adapter key for the federation's adapters.
    let adapter_key = coordinator.dir.join("adapter-signing.pub");
    ok(&coordinator.admin(&[
        "trust",
        "add-key",
        "--key",
        &path(&adapter_key),
        "--names",
        "valves-*",
    ]));
    let agent_trust_dir = trust.parent().unwrap();
    ok(
        &std::process::Command::new(crate::bin("nanofleet-coordinator"))
            .args([
                "--data-dir",
                &path(agent_trust_dir),
                "trust",
                "add-key",
                "--key",
                &path(&adapter_key),
                "--names",
                "valves-*",
            ])
            .output()
            .unwrap(),
    );
    let model = root.path().join("tiny.gguf");
    std::fs::write(&model, tiny_gguf(3)).unwrap();
    publish(&coordinator, &model, "tiny-llama", "1.0.0", &key, "65536");
    let mut agents = Vec::new();
    let mut data = Vec::new();
    for (site, &count) in sizes.iter().enumerate() {
        let file = write_site_data(&root.path().join("site-data"), site, count);
        let token = coordinator.create_token("10m", "site=plant-3");
        agents.push(Agent::start_with(
            root.path(),
            &format!("agent-{site}"),
            &coordinator,
            &token,
            &[
                "--trust-policy",
                &path(&trust),
                "--training-data",
                &path(&file),
            ],
        ));
        data.push(file);
    }
    for agent in &agents {
        agent.wait_enrolled();
    }
    let id = create_rollout(&coordinator, "tiny-llama@1.0.0", "100%");
    wait_state(&coordinator, &id, "completed", Duration::from_secs(60));
    Fleet {
        root,
        coordinator,
        agents,
        data,
    }
}

/// How a test federation trains.
pub struct Schedule<'a> {
    pub mode: &'a str,
    pub clients: usize,
    pub min: usize,
    pub rounds: u32,
    pub timeout: &'a str,
    /// More `federation create` flags (`--plaintext`, privacy options).
    pub extra: &'a [&'a str],
    pub clip_norm: &'a str,
}

/// A schedule with no extra flags and a loose clip bound.
pub fn schedule<'a>(
    mode: &'a str,
    clients: usize,
    min: usize,
    rounds: u32,
    timeout: &'a str,
) -> Schedule<'a> {
    Schedule {
        mode,
        clients,
        min,
        rounds,
        timeout,
        extra: &[],
        clip_norm: "100",
    }
}

/// Creates federation `name`, starts it and waits until it finished.
pub fn run_federation(
    coordinator: &Coordinator,
    name: &str,
    s: Schedule,
    timeout: Duration,
) -> Value {
    create_federation(coordinator, name, s);
    ok(&coordinator.cli(&["round", "start", name]));
    wait_federation(coordinator, name, "finished", timeout)
}

pub fn create_federation(coordinator: &Coordinator, name: &str, s: Schedule) {
    let rounds = s.rounds.to_string();
    let (min, clients) = (s.min.to_string(), s.clients.to_string());
    let mut args = vec![
        "federation",
        "create",
        name,
        "--base",
        "tiny-llama@1.0.0",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "q,v,o,up,down",
        "--mode",
        s.mode,
        "--seed",
        "7",
        "--min-clients",
        &min,
        "--max-clients",
        &clients,
        "--steps",
        "12",
        "--learning-rate",
        "0.02",
        "--batch-size",
        "4",
        "--max-seq-len",
        "96",
        "--clip-norm",
        s.clip_norm,
        "--rounds",
        &rounds,
        "--round-timeout",
        s.timeout,
    ];
    args.extend_from_slice(s.extra);
    ok(&coordinator.cli(&args));
}

pub fn federation(coordinator: &Coordinator, name: &str) -> Value {
    coordinator.cli_json(&["round", "status", name])
}

pub fn wait_federation(
    coordinator: &Coordinator,
    name: &str,
    state: &str,
    timeout: Duration,
) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(timeout, || {
        last = federation(coordinator, name);
        last["state"] == state || last["state"] == "failed"
    });
    assert!(
        reached && last["state"] == state,
        "federation never became {state}: {last:#}"
    );
    last
}
