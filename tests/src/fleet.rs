//! Steps most rollout tests take: trusting a publisher key, publishing, starting agents
//! that trust it, creating a rollout and waiting for its state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{ok, path, wait_until, Agent, Coordinator};

/// A publisher key trusted by the coordinator for `pattern`; returns the key's paths.
pub fn trusted_key(
    coordinator: &Coordinator,
    root: &Path,
    name: &str,
    pattern: &str,
) -> (PathBuf, PathBuf) {
    let dir = root.join(name);
    ok(&coordinator.cli(&["model", "keygen", "--out", &path(&dir)]));
    let public = dir.join("publisher.pub");
    ok(&coordinator.admin(&[
        "trust",
        "add-key",
        "--key",
        &path(&public),
        "--names",
        pattern,
    ]));
    (dir.join("publisher.key"), public)
}

/// A trust policy file for agents that lists only `public_key`.
pub fn agent_trust_policy(root: &Path, public_key: &Path, pattern: &str) -> PathBuf {
    let dir = root.join("agent-trust");
    let output = std::process::Command::new(crate::bin("nanofleet-coordinator"))
        .args([
            "--data-dir",
            &path(&dir),
            "trust",
            "add-key",
            "--key",
            &path(public_key),
            "--names",
            pattern,
        ])
        .output()
        .unwrap();
    ok(&output);
    dir.join("trust.json")
}

pub fn publish(
    coordinator: &Coordinator,
    file: &Path,
    name: &str,
    version: &str,
    key: &Path,
    chunk_size: &str,
) {
    ok(&coordinator.cli(&[
        "model",
        "publish",
        &path(file),
        "--name",
        name,
        "--version",
        version,
        "--key",
        &path(key),
        "--chunk-size",
        chunk_size,
    ]));
}

pub fn start_agents(
    coordinator: &Coordinator,
    root: &Path,
    count: usize,
    extra: &[&str],
) -> Vec<Agent> {
    let agents: Vec<Agent> = (0..count)
        .map(|i| {
            let token = coordinator.create_token("10m", "site=plant-3");
            Agent::start_with(root, &format!("agent-{i}"), coordinator, &token, extra)
        })
        .collect();
    for agent in &agents {
        agent.wait_enrolled();
    }
    agents
}

pub fn create_rollout(coordinator: &Coordinator, artifact: &str, waves: &str) -> String {
    let rollout = coordinator.cli_json(&[
        "rollout",
        "create",
        "--artifact",
        artifact,
        "--selector",
        "site=plant-3",
        "--waves",
        waves,
        "--wave-timeout",
        "60s",
    ]);
    rollout["id"].as_str().unwrap().to_owned()
}

pub fn status(coordinator: &Coordinator, id: &str) -> Value {
    coordinator.cli_json(&["rollout", "status", id])
}

pub fn wait_state(coordinator: &Coordinator, id: &str, state: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(timeout, || {
        last = status(coordinator, id);
        last["state"] == state
    });
    assert!(reached, "rollout never became {state}: {last:#}");
    last
}

/// The active version of `name` on an agent, read from its disk.
pub fn active(agent: &Agent, name: &str) -> Option<String> {
    let text =
        std::fs::read_to_string(agent.dir.join("artifacts").join(name).join("state.json")).ok()?;
    let state: Value = serde_json::from_str(&text).ok()?;
    state["active"].as_str().map(str::to_owned)
}

pub fn sha256_file(file: &Path) -> String {
    nanofleet_artifact::ids::Sha256Digest::of(&std::fs::read(file).unwrap()).to_string()
}
