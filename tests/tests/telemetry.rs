//! End to end: agent telemetry. An agent cut off from its coordinator keeps serving and
//! keeps its telemetry on disk; once the coordinator is back, the coordinator's counts equal
//! what the agent recorded, and later reconnects (the coordinator killed again, then the
//! agent killed and restarted) count nothing twice. The fleet series appear at `/metrics`.

use std::path::Path;
use std::time::Duration;

use nanofleet_e2e::fleet::{
    agent_trust_policy, create_rollout, publish, start_agents, trusted_key, wait_state,
};
use nanofleet_e2e::{http, path, tiny_gguf, wait_until, Agent, Coordinator};
use serde_json::{json, Value};

const MODEL: &str = "tiny";

/// A coordinator and one agent serving `tiny@1.0.0`, sampling telemetry every second.
fn serving(root: &Path) -> (Coordinator, Agent) {
    let coordinator = Coordinator::start(root);
    let (key, public) = trusted_key(&coordinator, root, "publisher", MODEL);
    let trust = agent_trust_policy(root, &public, MODEL);
    let file = root.join("tiny.gguf");
    std::fs::write(&file, tiny_gguf(1)).unwrap();
    publish(&coordinator, &file, MODEL, "1.0.0", &key, "65536");
    let agent = start_agents(
        &coordinator,
        root,
        1,
        &[
            "--trust-policy",
            &path(&trust),
            "--telemetry-interval-secs",
            "1",
        ],
    )
    .remove(0);
    let rollout = create_rollout(&coordinator, &format!("{MODEL}@1.0.0"), "100%");
    wait_state(&coordinator, &rollout, "completed", Duration::from_secs(60));
    (coordinator, agent)
}

fn chat(address: &str, i: usize) {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("Count to {i}, please.")}],
        "max_tokens": 6 + i % 5,
        "temperature": 0,
    });
    let response = http(address, "POST", "/v1/chat/completions", &body.to_string());
    assert_eq!(response.status, 200, "{}", response.body);
}

/// (requests, generated tokens, prompt tokens) as the agent itself counted them.
fn agent_counts(address: &str) -> (u64, u64, u64) {
    let stats = http(address, "GET", "/v1/stats", "").json();
    stats["versions"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0, 0), |(r, c, p), v| {
            (
                r + v["requests"].as_u64().unwrap(),
                c + v["completion_tokens"].as_u64().unwrap(),
                p + v["prompt_tokens"].as_u64().unwrap(),
            )
        })
}

fn telemetry(coordinator: &Coordinator, node: &str) -> Value {
    coordinator.cli_json(&["nodes", "telemetry", node])
}

fn counts_of(telemetry: &Value) -> (u64, u64, u64) {
    (
        telemetry["requests"].as_u64().unwrap(),
        telemetry["completion_tokens"].as_u64().unwrap(),
        telemetry["prompt_tokens"].as_u64().unwrap(),
    )
}

/// Waits until the coordinator's totals for `node` are `expected`; returns its telemetry.
fn wait_counts(coordinator: &Coordinator, node: &str, expected: (u64, u64, u64)) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(Duration::from_secs(30), || {
        last = telemetry(coordinator, node);
        counts_of(&last) == expected
    });
    assert!(
        reached,
        "the coordinator never counted {expected:?}: {last:#}"
    );
    last
}

#[test]
fn telemetry_survives_a_coordinator_outage_and_is_counted_once() {
    let root = tempfile::tempdir().unwrap();
    let (mut coordinator, mut agent) = serving(root.path());
    let node = agent.node_id().unwrap();
    let address = agent.api_address();

    for i in 0..3 {
        chat(&address, i);
    }
    let before_outage = agent_counts(&address);
    assert_eq!(before_outage.0, 3);
    let seen = wait_counts(&coordinator, &node, before_outage);
    assert_eq!(seen["models"][0]["name"], MODEL);
    assert_eq!(seen["models"][0]["version"], "1.0.0");
    assert_eq!(seen["models"][0]["active"], true);
    assert!(
        seen["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "model.activated" && e["subject"] == "tiny@1.0.0"),
        "{seen:#}"
    );
    assert!(seen["system"]["memory_rss_bytes"].as_u64().unwrap() > 0);

    // The coordinator goes away; the agent keeps serving and queues its records on disk.
    coordinator.kill9();
    for i in 3..8 {
        chat(&address, i);
    }
    let recorded = agent_counts(&address);
    assert_eq!(recorded.0, 8);
    let queue = agent.dir.join("telemetry").join("queue.log");
    let queued = wait_until(Duration::from_secs(10), || {
        std::fs::metadata(&queue).is_ok_and(|m| m.len() > 0)
    });
    assert!(
        queued,
        "the agent kept no telemetry while the coordinator was down"
    );
    std::thread::sleep(Duration::from_secs(3));

    // Back: everything the agent recorded arrives, once.
    coordinator.restart();
    let after = wait_counts(&coordinator, &node, recorded);
    assert_eq!(after["records_missing"], 0, "{after:#}");
    assert_eq!(after["records_dropped"], 0, "{after:#}");
    let applied = after["applied_sequence"].as_u64().unwrap();

    // Killed again in the middle of things and restarted: whatever the agent resends
    // (its acks may have been lost) is not counted again.
    coordinator.kill9();
    coordinator.restart();
    let resumed = wait_until(Duration::from_secs(30), || {
        telemetry(&coordinator, &node)["applied_sequence"]
            .as_u64()
            .unwrap()
            >= applied + 3
    });
    assert!(resumed, "telemetry did not resume after the second restart");
    assert_eq!(counts_of(&telemetry(&coordinator, &node)), recorded);

    // The agent itself is killed and restarted: its numbering continues from disk, and
    // its new counts add to the old ones.
    agent.kill9();
    std::fs::remove_file(agent.dir.join("api.addr")).unwrap();
    agent.restart();
    let address = agent.api_address();
    let ready = wait_until(Duration::from_secs(30), || {
        http(&address, "GET", "/v1/models", "").json()["data"][0]["version"] == "1.0.0"
    });
    assert!(
        ready,
        "the restarted agent does not serve; see {}",
        agent.log()
    );
    for i in 0..2 {
        chat(&address, i);
    }
    let second_run = agent_counts(&address);
    assert_eq!(second_run.0, 2);
    let total = (
        recorded.0 + second_run.0,
        recorded.1 + second_run.1,
        recorded.2 + second_run.2,
    );
    let last = wait_counts(&coordinator, &node, total);
    assert!(last["applied_sequence"].as_u64().unwrap() > applied);
    assert_eq!(last["records_missing"], 0, "{last:#}");

    // Prometheus: the fleet series by model version, site and hardware class.
    let metrics = coordinator.http_get("/metrics").expect("metrics");
    let series = |name: &str| -> Option<u64> {
        metrics.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            let wanted = labels.contains("model_version=\"tiny@1.0.0\"")
                && labels.contains("site=\"plant-3\"")
                && labels.contains(&format!("hardware_class=\"{}-", std::env::consts::ARCH));
            wanted.then(|| value.trim().parse().ok()).flatten()
        })
    };
    assert_eq!(
        series("nanofleet_fleet_requests_total"),
        Some(total.0),
        "{metrics}"
    );
    assert_eq!(
        series("nanofleet_fleet_tokens_generated_total"),
        Some(total.1),
        "{metrics}"
    );
    assert_eq!(series("nanofleet_fleet_errors_total"), Some(0), "{metrics}");
    assert!(
        metrics.contains("nanofleet_fleet_tokens_per_second{"),
        "{metrics}"
    );
}

#[test]
fn telemetry_of_an_unknown_node_is_not_found() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let output = coordinator.cli(&["nodes", "telemetry", "no-such-node", "--json"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
}
