//! End to end: federated LoRA rounds. A tiny random llama is published and rolled out as
//! the base model; agents, each with its own local JSONL, train adapters on top of it;
//! the coordinator aggregates only their clipped deltas.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nanofleet_e2e::federation::{
    create_federation, federation, fleet, run_federation, schedule, wait_federation, Schedule,
    ANSWER,
};
use nanofleet_e2e::fleet::{agent_trust_policy, create_rollout, publish, trusted_key, wait_state};
use nanofleet_e2e::{http, ok, path, wait_until, Agent, Coordinator};
use nanofleet_federated::tensors::{parse_peft_name, Half};
use nanofleet_federated::AdapterTensors;
use serde_json::Value;

/// Hangs `agent` (SIGSTOP: selected, connected, silent), starts federation `name` and waits
/// until the other three of four nodes reported.
fn start_with_one_node_hung(coordinator: &Coordinator, agent: &Agent, name: &str, s: Schedule) {
    agent.pause();
    create_federation(coordinator, name, s);
    ok(&coordinator.cli(&["round", "start", name]));
    wait_round(coordinator, name, "three of four report", |r| {
        r["selected"] == 4 && r["reported"] == 3
    });
}

fn export(coordinator: &Coordinator, adapter: &str, dir: &Path) -> AdapterTensors {
    ok(&coordinator.cli(&["adapter", "export", adapter, "--format", "peft", &path(dir)]));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    AdapterTensors::from_safetensors(&std::fs::read(dir.join("adapter_model.safetensors")).unwrap())
        .unwrap()
}

/// (out, in) product B·A for every adapted layer of `b_source`, with A from `a_source`.
fn products(b_source: &AdapterTensors, a_source: &AdapterTensors) -> Vec<Vec<f64>> {
    let mut out = Vec::new();
    for (name, b) in &b_source.matrices {
        let Some((_, _, Half::B)) = parse_peft_name(name) else {
            continue;
        };
        let a = &a_source.matrices[&name.replace("lora_B", "lora_A")];
        let mut p = vec![0.0; b.rows * a.cols];
        for i in 0..b.rows {
            for k in 0..b.cols {
                let bik = f64::from(b.data[i * b.cols + k]);
                for j in 0..a.cols {
                    p[i * a.cols + j] += bik * f64::from(a.data[k * a.cols + j]);
                }
            }
        }
        out.push(p);
    }
    out
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn three_agents_three_exact_rounds_loss_falls_and_the_aggregate_is_the_average() {
    let fleet = fleet(&[40, 48, 56]);
    let c = &fleet.coordinator;
    let done = run_federation(
        c,
        "valves",
        Schedule {
            // The control for the exact-average check: the coordinator sees each update.
            extra: &["--plaintext"],
            ..schedule("exact", 3, 3, 3, "300s")
        },
        Duration::from_secs(600),
    );
    let history = done["history"].as_array().unwrap();
    assert_eq!(
        history.len(),
        4,
        "3 training rounds and 1 evaluation: {done:#}"
    );
    for round in &history[..3] {
        assert_eq!(round["state"], "aggregated", "{done:#}");
        assert_eq!(round["contributors"], 3, "{done:#}");
    }
    assert_eq!(history[3]["state"], "evaluated");
    assert_eq!(history[3]["evaluation"], true);
    // Held-out loss of the global adapter entering each round: the base (B = 0), then
    // after rounds 1, 2 and 3.
    let losses: Vec<f64> = history
        .iter()
        .map(|r| r["eval"]["loss"].as_f64().unwrap())
        .collect();
    for pair in losses.windows(2) {
        assert!(
            pair[1] < pair[0],
            "held-out loss must fall every round: {losses:?}"
        );
    }
    eprintln!("held-out loss by round: {losses:?}");

    // Exact mode: the aggregate of round 2 is the example-weighted average of the nodes'
    // updates, also as low-rank products (A is frozen and shared).
    let dir = fleet.root.path().join("export");
    let before = export(c, "valves@1", &dir.join("1"));
    let after = export(c, "valves@2", &dir.join("2"));
    let aggregate = after.minus(&before).unwrap();
    let mut weighted: Option<Vec<Vec<f64>>> = None;
    let mut total = 0.0;
    for (agent, data) in fleet.agents.iter().zip(&fleet.data) {
        let examples =
            nanofleet_train::split_holdout(nanofleet_train::load_jsonl(data).unwrap(), 0.2)
                .0
                .len() as f64;
        let update = AdapterTensors::from_safetensors(
            &std::fs::read(agent.dir.join("training/valves-round-2.safetensors")).unwrap(),
        )
        .unwrap();
        assert!(
            update.matrices.keys().all(|n| n.contains("lora_B")),
            "exact mode sends B only"
        );
        let p = products(&update, &before);
        let acc = weighted.get_or_insert_with(|| p.iter().map(|m| vec![0.0; m.len()]).collect());
        for (acc_m, m) in acc.iter_mut().zip(&p) {
            for (a, v) in acc_m.iter_mut().zip(m) {
                *a += examples * v;
            }
        }
        total += examples;
    }
    let expected = weighted.unwrap();
    let got = products(&aggregate, &before);
    let mut worst = 0.0f64;
    for (g, e) in got.iter().zip(&expected) {
        for (gv, ev) in g.iter().zip(e) {
            worst = worst.max((gv - ev / total).abs());
        }
    }
    assert!(
        worst < 1e-5,
        "aggregate differs from the average of updates by {worst}"
    );
    // A never moved.
    for (name, m) in &after.matrices {
        if name.contains("lora_A") {
            assert_eq!(m, &before.matrices[name]);
        }
    }

    // The final adapter becomes an artifact signed by the coordinator, gated on the nodes'
    // evaluation, and serves through the agents' local API.
    let final_loss = losses[3];
    let refused = c.cli(&[
        "adapter",
        "publish",
        "valves",
        "--name",
        "valves-adapter",
        "--version",
        "1.0.0",
        "--max-eval-loss",
        &format!("{}", final_loss / 2.0),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("promotion gate"),
        "{refused:?}"
    );
    let published = c.cli_json(&[
        "adapter",
        "publish",
        "valves",
        "--name",
        "valves-adapter",
        "--version",
        "1.0.0",
        "--max-eval-loss",
        &format!("{}", final_loss + 0.01),
    ]);
    eprintln!("published adapter: {published:#}");
    let id = create_rollout(c, "valves-adapter@1.0.0", "100%");
    wait_state(c, &id, "completed", Duration::from_secs(60));
    let exact = history[3]["eval"]["exact_match"].as_f64().unwrap();
    let prompt = |model: &str| {
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "site-0-secret-record 3: state of line 3?"}],
            "max_tokens": 32,
            "temperature": 0,
        });
        let response = http(
            &fleet.agents[0].api_address(),
            "POST",
            "/v1/chat/completions",
            &body.to_string(),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (base_answer, adapted_answer) = (prompt("tiny-llama"), prompt("valves-adapter"));
    eprintln!(
        "exact match {exact}; base answers {base_answer:?}, adapter answers {adapted_answer:?}"
    );
    assert_ne!(base_answer, adapted_answer);
    if exact == 1.0 {
        // Every node's held-out answers were exact: the served adapter answers the same.
        assert_eq!(adapted_answer, ANSWER);
    }

    // No training text reached the coordinator: not in any request body it received (the
    // wire capture), its database, adapter files or logs.
    let captured = files_under(&c.dir.join("wire"));
    assert!(
        captured
            .iter()
            .any(|f| f.to_string_lossy().contains("SubmitUpdate")),
        "the capture holds the round updates"
    );
    let mut markers: Vec<String> = (0..3).map(|s| format!("site-{s}-secret-record")).collect();
    markers.push(ANSWER.to_owned());
    for file in files_under(&c.dir) {
        let bytes = std::fs::read(&file).unwrap();
        for marker in &markers {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{marker:?} found in {}",
                file.display()
            );
        }
    }
}

/// Waits until the federation's newest round satisfies `check`.
fn wait_round(
    coordinator: &Coordinator,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let reached = wait_until(Duration::from_secs(120), || {
        last = federation(coordinator, name);
        last["history"]
            .as_array()
            .and_then(|h| h.last())
            .is_some_and(&check)
    });
    assert!(reached, "{what}: {last:#}");
    last
}

fn wait_online(coordinator: &Coordinator, count: usize) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            coordinator
                .nodes()
                .iter()
                .filter(|n| n["online"] == true)
                .count()
                == count
        }),
        "{count} nodes never came online"
    );
}

#[test]
fn agents_killed_mid_round_and_a_coordinator_restart_leave_rounds_correct() {
    let mut fleet = fleet(&[24, 24, 24, 24]);
    let root = fleet.root.path().to_path_buf();

    // 1. A selected node dies mid-round; the minimum (3) allows: the round completes
    //    with the other three at its deadline.
    start_with_one_node_hung(
        &fleet.coordinator,
        &fleet.agents[0],
        "min3",
        schedule("fedavg", 4, 3, 1, "15s"),
    );
    fleet.agents[0].kill9();
    let done = wait_federation(
        &fleet.coordinator,
        "min3",
        "finished",
        Duration::from_secs(120),
    );
    let first = &done["history"][0];
    assert_eq!(first["state"], "aggregated", "{done:#}");
    assert_eq!(first["contributors"], 3);
    assert_eq!(first["selected"], 4);

    // 2. With a minimum of 4 the same loss fails the round cleanly, and the next round
    //    runs once the node is back.
    fleet.agents[0].restart();
    wait_online(&fleet.coordinator, 4);
    start_with_one_node_hung(
        &fleet.coordinator,
        &fleet.agents[0],
        "min4",
        schedule("fedavg", 4, 4, 1, "15s"),
    );
    fleet.agents[0].kill9();
    let failed = wait_round(&fleet.coordinator, "min4", "round 1 fails", |r| {
        r["state"] == "failed"
    });
    let reason = failed["history"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("the minimum is 4"), "{reason}");
    fleet.agents[0].restart();
    let done = wait_federation(
        &fleet.coordinator,
        "min4",
        "finished",
        Duration::from_secs(120),
    );
    let history = done["history"].as_array().unwrap();
    assert_eq!(history[1]["state"], "aggregated", "{done:#}");
    assert_eq!(history[1]["contributors"], 4);
    assert_eq!(done["global_round"], 2);

    // 3. The coordinator dies while a round collects; after its restart the round carries
    //    on with the updates it had, and the late node's update completes it.
    wait_online(&fleet.coordinator, 4);
    start_with_one_node_hung(
        &fleet.coordinator,
        &fleet.agents[3],
        "restart",
        schedule("exact", 4, 4, 1, "120s"),
    );
    fleet.coordinator.kill9();
    fleet.coordinator.restart();
    let after = federation(&fleet.coordinator, "restart");
    assert_eq!(after["history"][0]["state"], "collecting", "{after:#}");
    assert_eq!(after["history"][0]["reported"], 3);
    fleet.agents[3].resume();
    let done = wait_federation(
        &fleet.coordinator,
        "restart",
        "finished",
        Duration::from_secs(180),
    );
    assert_eq!(done["history"][0]["state"], "aggregated", "{done:#}");
    assert_eq!(done["history"][0]["contributors"], 4);
    drop(root);
}

/// The real SmolLM2-135M learns a made-up answer format over two federated rounds on two
/// agents. Minutes on two cores: run with `tests/federated-smollm2.sh` (or `--ignored`).
#[test]
#[ignore = "trains the real model for minutes; run by tests/federated-smollm2.sh"]
fn smollm2_two_agents_two_rounds_exact_match_rises() {
    let model = nanofleet_e2e::reference_model();
    let root = tempfile::tempdir().unwrap();
    let c = Coordinator::start(root.path());
    let (key, public) = trusted_key(&c, root.path(), "publisher", "smollm2-*");
    let trust = agent_trust_policy(root.path(), &public, "smollm2-*");
    publish(
        &c,
        &model,
        "smollm2-135m-instruct",
        "1.0.0",
        &key,
        "4194304",
    );
    // The task: plant codes are "ZX-" and the unit number, a format the base model
    // does not know.
    let mut agents = Vec::new();
    for site in 0..2 {
        let dir = root.path().join("site-data");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("site-{site}.jsonl"));
        let lines: Vec<String> = (0..30)
            .map(|k| {
                let unit = 100 + site * 300 + k * 7;
                serde_json::json!({
                    "prompt": format!("What is the plant code of unit {unit}?"),
                    "response": format!("ZX-{unit}"),
                })
                .to_string()
            })
            .collect();
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let token = c.create_token("10m", "site=plant-3");
        agents.push(Agent::start_with(
            root.path(),
            &format!("agent-{site}"),
            &c,
            &token,
            &[
                "--trust-policy",
                &path(&trust),
                "--training-data",
                &path(&file),
            ],
        ));
    }
    for agent in &agents {
        agent.wait_enrolled();
    }
    let id = create_rollout(&c, "smollm2-135m-instruct@1.0.0", "100%");
    wait_state(&c, &id, "completed", Duration::from_secs(300));
    ok(&c.cli(&[
        "federation",
        "create",
        "codes",
        "--base",
        "smollm2-135m-instruct@1.0.0",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--targets",
        "q,k,v,o,gate,up,down",
        "--mode",
        "fedavg",
        "--seed",
        "11",
        "--min-clients",
        "2",
        "--max-clients",
        "2",
        "--steps",
        "12",
        "--learning-rate",
        "0.002",
        "--batch-size",
        "4",
        "--max-seq-len",
        "96",
        "--clip-norm",
        "100",
        "--rounds",
        "2",
        "--round-timeout",
        "30m",
    ]));
    ok(&c.cli(&["round", "start", "codes"]));
    let done = wait_federation(&c, "codes", "finished", Duration::from_secs(3600));
    println!(
        "{}",
        String::from_utf8_lossy(&c.cli(&["round", "status", "codes"]).stdout)
    );
    let history = done["history"].as_array().unwrap();
    let exact: Vec<f64> = history
        .iter()
        .map(|r| r["eval"]["exact_match"].as_f64().unwrap())
        .collect();
    let loss: Vec<f64> = history
        .iter()
        .map(|r| r["eval"]["loss"].as_f64().unwrap())
        .collect();
    println!("held-out exact match by round: {exact:?}; loss: {loss:?}");
    assert!(exact[2] > exact[0], "exact match must rise: {exact:?}");
    assert!(loss[2] < loss[0], "held-out loss must fall: {loss:?}");
}

/// Issue 6 end to end: SecAgg+ (the default) gives the adapter of a plaintext control run
/// within the quantization error, and what the coordinator received and kept of the
/// secure round is masked vectors only; with differential privacy every round's epsilon
/// is recorded and audited, and the federation stops at its budget.
#[test]
fn secure_aggregation_matches_plaintext_and_privacy_is_accounted() {
    let fleet = fleet(&[24, 32, 40]);
    let c = &fleet.coordinator;
    for (name, extra) in [("plain", &["--plaintext"][..]), ("secure", &[][..])] {
        let done = run_federation(
            c,
            name,
            Schedule {
                extra,
                ..schedule("fedavg", 3, 3, 1, "120s")
            },
            Duration::from_secs(300),
        );
        assert_eq!(done["history"][0]["state"], "aggregated", "{done:#}");
        assert_eq!(done["history"][0]["contributors"], 3);
    }
    let dir = fleet.root.path().join("export");
    let plain = export(c, "plain@1", &dir.join("plain"));
    let secure = export(c, "secure@1", &dir.join("secure"));
    // Same seed, same data, same plan: the nodes' updates are the same in both runs, so
    // the adapters differ only by the fixed-point quantization of SecAgg+.
    let worst = plain
        .flatten()
        .iter()
        .zip(secure.flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("largest difference secure vs plaintext: {worst:e}");
    assert!(
        worst < 1e-5,
        "secure and plaintext adapters differ by {worst}"
    );
    assert!(plain != AdapterTensors::default());

    // What the coordinator kept of the secure round: masked messages only, no update.
    let fed_dir = c.dir.join("federations/secure");
    let mut masked = 0;
    for file in files_under(&fed_dir) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !(file.starts_with(fed_dir.join("updates")) && name.ends_with(".safetensors")),
            "a plaintext update is stored: {}",
            file.display()
        );
        if name.starts_with("2-") {
            let message =
                nanofleet_secagg::codec::decode_client_message(&std::fs::read(&file).unwrap())
                    .unwrap();
            let nanofleet_secagg::ClientMessage::MaskedInput(m) = message else {
                panic!("stage 3 holds masked inputs");
            };
            // A node's encoded update sits in a narrow band around the ring's midpoint;
            // masked, it is spread over the whole ring.
            let mean = m.values.iter().map(|v| *v as f64).sum::<f64>() / m.values.len() as f64;
            let var = m
                .values
                .iter()
                .map(|v| (*v as f64 - mean).powi(2))
                .sum::<f64>()
                / m.values.len() as f64;
            let spread = var.sqrt() / 2f64.powi(32);
            assert!(
                spread > 0.25,
                "masked values are not uniform over the ring: {spread}"
            );
            masked += 1;
        }
    }
    assert_eq!(
        masked, 3,
        "the coordinator kept the three masked inputs it received"
    );

    // Central DP with a budget: each round's epsilon is recorded and audited; the
    // federation stops before the round that would overspend.
    let done = run_federation(
        c,
        "private",
        Schedule {
            // Weights near 1 (examples / cap), so that noise of std z·C on the sum is
            // of the order of the mean update rather than far above it.
            extra: &[
                "--noise-multiplier",
                "1.0",
                "--epsilon-budget",
                "12",
                "--delta",
                "1e-5",
                "--weight-cap",
                "30",
            ],
            clip_norm: "1",
            ..schedule("fedavg", 3, 3, 10, "120s")
        },
        Duration::from_secs(600),
    );
    let history = done["history"].as_array().unwrap();
    let training: Vec<&Value> = history
        .iter()
        .filter(|r| r["evaluation"] == false)
        .collect();
    assert!(
        training.len() < 10,
        "the budget stopped the federation: {done:#}"
    );
    let mut last_total = 0.0;
    for round in &training {
        let epsilon = round["epsilon"].as_f64().unwrap();
        let total = round["epsilon_total"].as_f64().unwrap();
        assert!(
            epsilon > 0.0 && total > last_total && total <= 12.0,
            "{done:#}"
        );
        last_total = total;
    }
    assert!(
        done["reason"].as_str().unwrap().contains("privacy budget"),
        "{done:#}"
    );
    let events = c.cli_json(&["events", "--action", "federation.privacy_spent"]);
    assert_eq!(events.as_array().unwrap().len(), training.len());
    eprintln!(
        "{} private rounds, epsilon total {last_total:.3}",
        training.len()
    );

    // Distributed DP: the nodes add the noise in shares inside SecAgg+; the round is
    // accounted with the noise that reached the sum (all three shares here).
    let done = run_federation(
        c,
        "shared-noise",
        Schedule {
            extra: &[
                "--noise-multiplier",
                "1.0",
                "--distributed-noise",
                "--weight-cap",
                "30",
            ],
            clip_norm: "1",
            ..schedule("fedavg", 3, 3, 1, "120s")
        },
        Duration::from_secs(300),
    );
    let first = &done["history"][0];
    assert_eq!(first["state"], "aggregated", "{done:#}");
    // One round at sampling rate 1 and z = 1 costs what the central round above did.
    let central_first = training[0]["epsilon"].as_f64().unwrap();
    assert!(
        (first["epsilon"].as_f64().unwrap() - central_first).abs() < 1e-9,
        "{done:#}"
    );
}
