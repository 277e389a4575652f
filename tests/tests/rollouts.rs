//! End to end: rolling signed artifacts out to agents in waves. Agents verify the
//! signature against their own trust policy, every chunk, the whole file and the GGUF
//! header before activating; a failing wave halts the rollout and rolls its nodes back;
//! an interrupted download resumes from the last verified chunk.

use std::time::Duration;

use nanofleet_artifact::gguf::sample_gguf;
use nanofleet_e2e::fleet::{
    active, agent_trust_policy, create_rollout, publish, sha256_file, start_agents, status,
    trusted_key, wait_state,
};
use nanofleet_e2e::{broken_tiny_gguf, path, reference_model, tiny_gguf, wait_until, Coordinator};

#[test]
fn the_real_model_rolls_out_to_three_agents_in_two_waves() {
    let model = reference_model();
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "smollm2-*");
    let trust = agent_trust_policy(root.path(), &public, "smollm2-*");
    publish(
        &coordinator,
        &model,
        "smollm2-135m-instruct",
        "1.0.0",
        &key,
        "4194304",
    );
    let agents = start_agents(
        &coordinator,
        root.path(),
        3,
        &["--trust-policy", &path(&trust)],
    );

    let id = create_rollout(&coordinator, "smollm2-135m-instruct@1.0.0", "50%,100%");
    let first = status(&coordinator, &id);
    assert_eq!(first["waves"][0]["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(first["waves"][1]["nodes"].as_array().unwrap().len(), 1);
    // `status --wait` returns once the rollout ends (the 60 s wave timeout bounds it).
    let done = coordinator.cli_json(&["rollout", "status", &id, "--wait"]);
    assert_eq!(done["state"], "completed", "{done:#}");
    for wave in done["waves"].as_array().unwrap() {
        assert_eq!(wave["state"], "passed");
        for node in wave["nodes"].as_array().unwrap() {
            assert_eq!(node["state"], "healthy", "{done:#}");
        }
    }
    let published = sha256_file(&model);
    for agent in &agents {
        assert_eq!(
            active(agent, "smollm2-135m-instruct").as_deref(),
            Some("1.0.0")
        );
        let file = agent
            .dir
            .join("artifacts/smollm2-135m-instruct/1.0.0/model.gguf");
        assert_eq!(sha256_file(&file), published);
    }
    let events = coordinator.cli_json(&["events", "--action", "artifact.activated"]);
    assert_eq!(events.as_array().unwrap().len(), 3);
}

#[test]
fn a_model_that_fails_the_smoke_prompt_halts_after_wave_one_and_never_reaches_the_rest() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny");
    let trust = agent_trust_policy(root.path(), &public, "tiny");
    let file_v1 = root.path().join("v1.gguf");
    std::fs::write(&file_v1, tiny_gguf(1)).unwrap();
    // Signed by the trusted key and well-formed: only running it shows it is broken.
    let file_v2 = root.path().join("v2.gguf");
    std::fs::write(&file_v2, broken_tiny_gguf(2)).unwrap();
    publish(&coordinator, &file_v1, "tiny", "1.0.0", &key, "16384");
    publish(&coordinator, &file_v2, "tiny", "2.0.0", &key, "16384");
    let agents = start_agents(
        &coordinator,
        root.path(),
        3,
        &["--trust-policy", &path(&trust)],
    );
    let v1 = create_rollout(&coordinator, "tiny@1.0.0", "100%");
    wait_state(&coordinator, &v1, "completed", Duration::from_secs(60));
    for agent in &agents {
        let models = nanofleet_e2e::http(&agent.api_address(), "GET", "/v1/models", "").json();
        assert_eq!(models["data"][0]["version"], "1.0.0", "{models:#}");
    }

    let v2 = create_rollout(&coordinator, "tiny@2.0.0", "33%,100%");
    let halted = wait_state(&coordinator, &v2, "halted", Duration::from_secs(60));
    let waited = coordinator.cli(&["rollout", "status", &v2, "--wait"]);
    assert!(
        !waited.status.success(),
        "a halted rollout fails `status --wait`"
    );
    let said = String::from_utf8_lossy(&waited.stderr);
    assert!(said.contains("is halted: wave 1 failed its gate"), "{said}");
    let reason = halted["reason"].as_str().unwrap();
    assert!(
        reason.contains("wave 1 failed its gate") && reason.contains("smoke prompt failed"),
        "{halted:#}"
    );
    assert_eq!(halted["waves"][1]["state"], "waiting");
    let wave1: Vec<&str> = halted["waves"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert_eq!(wave1.len(), 1);
    for agent in &agents {
        // Every node still serves 1.0.0, through the API, and records it as active.
        assert_eq!(active(agent, "tiny").as_deref(), Some("1.0.0"));
        let answer = nanofleet_e2e::http(
            &agent.api_address(),
            "POST",
            "/v1/completions",
            r#"{"model":"tiny","prompt":"the cat","max_tokens":3}"#,
        );
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()["system_fingerprint"], "1.0.0");
        let in_wave1 = wave1.contains(&agent.node_id().unwrap().as_str());
        // The broken file was deleted where it was tried, and never sent anywhere else.
        assert!(!agent.dir.join("artifacts/tiny/2.0.0").exists());
        if !in_wave1 {
            assert!(!agent.log().contains("2.0.0"), "{}", agent.log());
        }
    }
    let failures = coordinator.cli_json(&["events", "--action", "artifact.failed"]);
    let failures = failures.as_array().unwrap();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(
        failures[0].to_string().contains("weights are broken"),
        "{failures:#?}"
    );
}

#[test]
fn a_failing_wave_halts_the_rollout_and_rolls_its_nodes_back() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny");
    // A second key the coordinator accepts but the agents do not: its artifacts fail
    // on every node that receives them.
    let (rogue_key, _) = trusted_key(&coordinator, root.path(), "rogue", "tiny");
    let trust = agent_trust_policy(root.path(), &public, "tiny");
    let file_v1 = root.path().join("v1.gguf");
    std::fs::write(&file_v1, tiny_gguf(1)).unwrap();
    let file_v2 = root.path().join("v2.gguf");
    std::fs::write(&file_v2, tiny_gguf(2)).unwrap();
    publish(&coordinator, &file_v1, "tiny", "1.0.0", &key, "1024");
    publish(&coordinator, &file_v2, "tiny", "2.0.0", &rogue_key, "1024");
    let agents = start_agents(
        &coordinator,
        root.path(),
        3,
        &["--trust-policy", &path(&trust)],
    );

    let v1 = create_rollout(&coordinator, "tiny@1.0.0", "100%");
    wait_state(&coordinator, &v1, "completed", Duration::from_secs(30));

    let v2 = create_rollout(&coordinator, "tiny@2.0.0", "33%,100%");
    let halted = wait_state(&coordinator, &v2, "halted", Duration::from_secs(30));
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("wave 1 failed its gate")
            && halted["reason"]
                .as_str()
                .unwrap()
                .contains("signature refused"),
        "{halted:#}"
    );
    let wave1 = halted["waves"][0]["nodes"].as_array().unwrap();
    assert_eq!(wave1.len(), 1);
    assert_eq!(wave1[0]["state"], "rolled_back");
    assert_eq!(halted["waves"][1]["state"], "waiting");

    // Every node still runs 1.0.0; only the first wave's node ever saw 2.0.0.
    for agent in &agents {
        assert_eq!(active(agent, "tiny").as_deref(), Some("1.0.0"));
        assert!(!agent.dir.join("artifacts/tiny/2.0.0/model.gguf").exists());
    }
    let failures = coordinator.cli_json(&["events", "--action", "artifact.failed"]);
    assert_eq!(failures.as_array().unwrap().len(), 1, "{failures:#}");
    let rollbacks = coordinator.cli_json(&["events", "--action", "rollout.rollback"]);
    assert_eq!(rollbacks.as_array().unwrap().len(), 1);
    // The halted rollout cannot be resumed, only aborted.
    assert!(!coordinator
        .cli(&["rollout", "resume", &v2])
        .status
        .success());
}

#[test]
fn tampered_chunks_are_refused_and_the_previous_version_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny");
    let trust = agent_trust_policy(root.path(), &public, "tiny");
    let agents = start_agents(
        &coordinator,
        root.path(),
        1,
        &["--trust-policy", &path(&trust)],
    );
    for (version, seed) in [("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3), ("4.0.0", 4)] {
        let file = root.path().join(format!("{version}.gguf"));
        std::fs::write(&file, tiny_gguf(seed)).unwrap();
        publish(&coordinator, &file, "tiny", version, &key, "1024");
    }
    let v1 = create_rollout(&coordinator, "tiny@1.0.0", "100%");
    wait_state(&coordinator, &v1, "completed", Duration::from_secs(30));

    let record =
        |version: &str| coordinator.cli_json(&["model", "show", &format!("tiny@{version}")]);
    let chunk_file = |version: &str, index: usize| {
        let digest = record(version)["manifest"]["chunks"][index]["sha256"]
            .as_str()
            .unwrap()
            .to_owned();
        coordinator.dir.join("artifacts/chunks").join(digest)
    };
    // One flipped byte in a chunk stored on the coordinator.
    let flipped = chunk_file("2.0.0", 3);
    let mut bytes = std::fs::read(&flipped).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&flipped, bytes).unwrap();
    let v2 = create_rollout(&coordinator, "tiny@2.0.0", "100%");
    let halted = wait_state(&coordinator, &v2, "halted", Duration::from_secs(30));
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("chunk 3 does not match the signed manifest"),
        "{halted:#}"
    );
    assert_eq!(active(&agents[0], "tiny").as_deref(), Some("1.0.0"));

    // A chunk cut short on the coordinator.
    let cut = chunk_file("3.0.0", 2);
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let v3 = create_rollout(&coordinator, "tiny@3.0.0", "100%");
    let halted = wait_state(&coordinator, &v3, "halted", Duration::from_secs(30));
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("chunk 2 ended after 1014"),
        "{halted:#}"
    );
    assert_eq!(active(&agents[0], "tiny").as_deref(), Some("1.0.0"));
    assert!(!agents[0]
        .dir
        .join("artifacts/tiny/3.0.0/model.gguf")
        .exists());

    // A manifest edited after signing, as a compromised coordinator store would hold it:
    // the agent checks the signature itself and refuses.
    let mut coordinator = coordinator;
    coordinator.kill9();
    {
        use nanofleet_coordinator::store::{Keyspace, KvStore, SledStore};
        let store = SledStore::open(&coordinator.dir.join("state")).unwrap();
        let key = b"tiny@4.0.0";
        let mut record: serde_json::Value =
            serde_json::from_slice(&store.get(Keyspace::Artifacts, key).unwrap().unwrap()).unwrap();
        record["signed"]["manifest"]["license"] = "all-rights-reserved".into();
        store
            .put(
                Keyspace::Artifacts,
                key,
                &serde_json::to_vec(&record).unwrap(),
            )
            .unwrap();
        store.flush().unwrap();
    }
    coordinator.restart();
    let v4 = create_rollout(&coordinator, "tiny@4.0.0", "100%");
    let halted = wait_state(&coordinator, &v4, "halted", Duration::from_secs(30));
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("signature refused"),
        "{halted:#}"
    );
    assert_eq!(active(&agents[0], "tiny").as_deref(), Some("1.0.0"));
    assert!(!agents[0].dir.join("artifacts/tiny/4.0.0").exists());

    let failures = coordinator.cli_json(&["events", "--action", "artifact.failed"]);
    assert_eq!(failures.as_array().unwrap().len(), 3, "{failures:#}");
}

#[test]
fn an_interrupted_download_resumes_from_the_last_verified_chunk() {
    let root = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::start(root.path());
    // Slow downloads down so that the agent can be killed in the middle of one.
    coordinator.kill9();
    coordinator.serve_flags = vec!["--download-bytes-per-sec".into(), "400000".into()];
    coordinator.restart();
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny");
    let trust = agent_trust_policy(root.path(), &public, "tiny");
    let file = root.path().join("big.gguf");
    std::fs::write(&file, sample_gguf("llama", 7, 30_000)).unwrap(); // about 2 MB
    let total = std::fs::metadata(&file).unwrap().len();
    let chunk_size = 131_072u64;
    publish(
        &coordinator,
        &file,
        "tiny",
        "1.0.0",
        &key,
        &chunk_size.to_string(),
    );
    // A header-only GGUF: the agent keeps it but runs no model.
    let mut agents = start_agents(
        &coordinator,
        root.path(),
        1,
        &["--trust-policy", &path(&trust), "--serve-models", "false"],
    );
    let id = create_rollout(&coordinator, "tiny@1.0.0", "100%");

    let partial = agents[0]
        .dir
        .join("artifacts/tiny/1.0.0/model.gguf.partial");
    let midway = wait_until(Duration::from_secs(30), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > total / 3)
    });
    assert!(midway, "download never got going");
    agents[0].kill9();
    let on_disk = std::fs::metadata(&partial).unwrap().len();
    assert!(on_disk < total, "the download finished before the kill");

    agents[0].restart();
    let done = wait_state(&coordinator, &id, "completed", Duration::from_secs(60));
    let fetched_after_restart = done["waves"][0]["nodes"][0]["bytes_fetched"]
        .as_u64()
        .unwrap();
    let verified_before = on_disk / chunk_size * chunk_size;
    assert_eq!(fetched_after_restart, total - verified_before, "{done:#}");
    let fetched_twice = on_disk + fetched_after_restart - total;
    assert!(
        fetched_twice < chunk_size,
        "{fetched_twice} bytes fetched twice"
    );
    assert_eq!(
        sha256_file(&agents[0].dir.join("artifacts/tiny/1.0.0/model.gguf")),
        sha256_file(&file)
    );
}

#[test]
fn pinned_nodes_are_skipped_and_offline_nodes_converge_when_they_return() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny");
    let trust = agent_trust_policy(root.path(), &public, "tiny");
    for (version, seed) in [("1.0.0", 1), ("2.0.0", 2)] {
        let file = root.path().join(format!("{version}.gguf"));
        std::fs::write(&file, tiny_gguf(seed)).unwrap();
        publish(&coordinator, &file, "tiny", version, &key, "1024");
    }
    let mut agents = start_agents(
        &coordinator,
        root.path(),
        3,
        &["--trust-policy", &path(&trust)],
    );
    let ids: Vec<String> = agents.iter().map(|a| a.node_id().unwrap()).collect();
    let v1 = create_rollout(&coordinator, "tiny@1.0.0", "100%");
    wait_state(&coordinator, &v1, "completed", Duration::from_secs(30));

    let pinned = coordinator.cli_json(&[
        "nodes",
        "pin",
        "--selector",
        &format!("id={}", ids[0]),
        "--artifact",
        "tiny@1.0.0",
    ]);
    assert_eq!(pinned["pinned"], serde_json::json!([ids[0]]));

    // agent-1 goes offline before the next rollout.
    agents[1].kill9();
    let offline = wait_until(Duration::from_secs(15), || {
        coordinator
            .nodes()
            .iter()
            .any(|n| n["id"] == ids[1].as_str() && n["online"] == false)
    });
    assert!(offline);

    let v2 = create_rollout(&coordinator, "tiny@2.0.0", "100%");
    let done = wait_state(&coordinator, &v2, "completed", Duration::from_secs(30));
    let targeted: Vec<&str> = done["waves"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap())
        .collect();
    assert!(
        !targeted.contains(&ids[0].as_str()),
        "a pinned node was targeted"
    );
    assert_eq!(active(&agents[2], "tiny").as_deref(), Some("2.0.0"));
    assert_eq!(active(&agents[0], "tiny").as_deref(), Some("1.0.0"));
    assert_eq!(active(&agents[1], "tiny").as_deref(), Some("1.0.0"));

    // Back online, agent-1 converges to its desired version by itself.
    agents[1].restart();
    assert!(wait_until(Duration::from_secs(20), || active(
        &agents[1], "tiny"
    )
    .as_deref()
        == Some("2.0.0")));
    // The pinned node stays put; unpinned, it is free for the next rollout.
    assert_eq!(active(&agents[0], "tiny").as_deref(), Some("1.0.0"));
    let unpinned = coordinator.cli_json(&[
        "nodes",
        "unpin",
        "--selector",
        &format!("id={}", ids[0]),
        "--name",
        "tiny",
    ]);
    assert_eq!(unpinned["unpinned"], serde_json::json!([ids[0]]));
    let v2_again = coordinator.cli_json(&[
        "rollout",
        "create",
        "--artifact",
        "tiny@2.0.0",
        "--selector",
        &format!("id={}", ids[0]),
    ]);
    wait_state(
        &coordinator,
        v2_again["id"].as_str().unwrap(),
        "completed",
        Duration::from_secs(30),
    );
    assert_eq!(active(&agents[0], "tiny").as_deref(), Some("2.0.0"));
}

#[test]
fn a_paced_rollout_assigns_its_wave_a_node_at_a_time() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let (key, public) = trusted_key(&coordinator, root.path(), "publisher", "tiny");
    let trust = agent_trust_policy(root.path(), &public, "tiny");
    let file = root.path().join("v1.gguf");
    std::fs::write(&file, tiny_gguf(1)).unwrap();
    publish(&coordinator, &file, "tiny", "1.0.0", &key, "1024");
    let agents = start_agents(
        &coordinator,
        root.path(),
        3,
        &["--trust-policy", &path(&trust)],
    );

    let created = coordinator.cli_json(&[
        "rollout",
        "create",
        "--artifact",
        "tiny@1.0.0",
        "--selector",
        "site=plant-3",
        "--waves",
        "100%",
        "--max-per-second",
        "1",
    ]);
    assert_eq!(created["max_per_second"], 1);
    // One node at the start; the pace has not reached the other two.
    let states: Vec<&str> = created["waves"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "waiting").count(),
        2,
        "{created:#}"
    );
    let id = created["id"].as_str().unwrap();
    let done = wait_state(&coordinator, id, "completed", Duration::from_secs(30));
    for node in done["waves"][0]["nodes"].as_array().unwrap() {
        assert_eq!(node["state"], "healthy", "{done:#}");
    }
    for agent in &agents {
        assert_eq!(active(agent, "tiny").as_deref(), Some("1.0.0"));
    }
    let starts = coordinator.cli_json(&["events", "--action", "rollout.wave_start"]);
    assert!(
        starts[0]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 1 nodes a second"),
        "{starts:#}"
    );
}
