//! End to end: enrollment, mutual TLS, the registry's durability, and the wire limits,
//! with a real coordinator and real agents as processes on loopback.

use std::time::Duration;

use nanofleet_e2e::{raw_unary, runtime, wait_until, Agent, Coordinator};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::{
    node_service_client::NodeServiceClient, operator_service_client::OperatorServiceClient,
};
use nanofleet_transport::{connect, error_chain, ClientTls};
use prost::Message;
use tonic::Code;

fn online_count(coordinator: &Coordinator) -> usize {
    coordinator
        .nodes()
        .iter()
        .filter(|n| n["online"] == true)
        .count()
}

#[test]
fn three_agents_enroll_and_report_their_facts() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let token = coordinator.create_token("10m", &format!("site=plant-{i}"));
            Agent::start(root.path(), &format!("agent-{i}"), &coordinator, &token)
        })
        .collect();
    let mut ids: Vec<String> = agents.iter().map(Agent::wait_enrolled).collect();
    ids.sort();

    assert!(
        wait_until(Duration::from_secs(20), || online_count(&coordinator) == 3),
        "3 nodes online: {:#?}",
        coordinator.nodes()
    );
    let nodes = coordinator.nodes();
    let mut listed: Vec<String> = nodes
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, ids);
    for node in &nodes {
        let facts = &node["facts"];
        assert_eq!(facts["arch"], nanofleet_e2e::agent_arch());
        assert!(facts["cpu_cores"].as_u64().unwrap() >= 1);
        assert!(facts["memory_total_bytes"].as_u64().unwrap() > 0);
        assert_eq!(facts["power_source"], "POWER_SOURCE_MAINS");
        assert!(!facts["os"].as_str().unwrap().is_empty());
        assert_eq!(facts["agent_version"], env!("CARGO_PKG_VERSION"));
        // The CPU build of the agent serves models on the CPU and says so.
        assert_eq!(facts["inference_device"], "cpu");
        // Token labels from the operator and device labels from the agent both arrive.
        assert!(node["labels"]["site"]
            .as_str()
            .unwrap()
            .starts_with("plant-"));
        assert!(node["labels"]["agent"]
            .as_str()
            .unwrap()
            .starts_with("agent-"));
        assert_eq!(node["status"], "NODE_STATUS_ACTIVE");
    }

    // The table view lists them as well, and the HTTP side reports them.
    let table = coordinator.cli(&["nodes", "list"]);
    assert!(table.status.success());
    assert_eq!(String::from_utf8_lossy(&table.stdout).lines().count(), 4);
    let metrics = coordinator.http_get("/metrics").expect("metrics");
    assert!(
        metrics.contains("nanofleet_nodes{state=\"online\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("nanofleet_enrollments_total{result=\"accepted\"} 3"));
}

fn enroll_once(
    coordinator: &Coordinator,
    dir: &std::path::Path,
    token: &str,
) -> std::process::Output {
    std::process::Command::new(nanofleet_e2e::bin("nanofleet-agent"))
        .args(["--data-dir", &dir.display().to_string()])
        .args(["--coordinator", &coordinator.url()])
        .args(["--ca-cert", &coordinator.ca_cert().display().to_string()])
        .args(["--token", token])
        .arg("enroll")
        .output()
        .unwrap()
}

#[test]
fn tokens_are_one_time_expire_and_must_be_known() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());

    let token = coordinator.create_token("10m", "");
    let first = enroll_once(&coordinator, &root.path().join("a"), &token);
    assert!(first.status.success(), "{first:?}");
    let reused = enroll_once(&coordinator, &root.path().join("b"), &token);
    assert!(!reused.status.success());
    let stderr = String::from_utf8_lossy(&reused.stderr);
    assert!(stderr.contains("already used"), "{stderr}");
    assert!(!root.path().join("b").join("identity.json").exists());

    let short = coordinator.create_token("1s", "");
    std::thread::sleep(Duration::from_millis(1500));
    let expired = enroll_once(&coordinator, &root.path().join("c"), &short);
    assert!(!expired.status.success());
    assert!(String::from_utf8_lossy(&expired.stderr).contains("expired"));

    let unknown = enroll_once(
        &coordinator,
        &root.path().join("d"),
        "nft_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    );
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not known"));

    // Over-long lifetimes are refused by the coordinator's policy.
    let long = coordinator.cli(&["token", "create", "--ttl", "400d"]);
    assert!(!long.status.success());
    assert!(String::from_utf8_lossy(&long.stderr).contains("exceeds"));
    assert_eq!(coordinator.nodes().len(), 1);
}

/// A certificate for `node_id` signed by a CA that is not the fleet's.
fn foreign_identity(node_id: &str) -> (Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![format!("urn:nanofleet:node:{node_id}")]).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("urn:nanofleet:node:{node_id}").try_into().unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

async fn heartbeat(url: &str, tls: &ClientTls) -> Result<(), String> {
    let channel = connect(url, tls).await.map_err(|e| error_chain(&e))?;
    NodeServiceClient::new(channel)
        .heartbeat(pb::HeartbeatRequest::default())
        .await
        .map(|_| ())
        .map_err(|status| format!("{:?}: {}", status.code(), error_chain(&status)))
}

#[test]
fn callers_without_a_valid_certificate_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let token = coordinator.create_token("10m", "");
    let mut agent = Agent::start(root.path(), "agent", &coordinator, &token);
    let node_id = agent.wait_enrolled();
    let ca_pem = std::fs::read(coordinator.ca_cert()).unwrap();
    let url = coordinator.url();

    runtime().block_on(async {
        // The agent's own certificate works.
        heartbeat(&url, &agent.tls(ca_pem.clone())).await.unwrap();

        // No certificate: the node API refuses, saying what is missing.
        let err = heartbeat(&url, &coordinator.anonymous_tls())
            .await
            .unwrap_err();
        assert!(
            err.starts_with("Unauthenticated") && err.contains("client certificate"),
            "{err}"
        );

        // A certificate from another CA, even naming a real node: the handshake fails.
        let err = heartbeat(
            &url,
            &ClientTls {
                ca_pem: ca_pem.clone(),
                identity: Some(foreign_identity(&node_id)),
            },
        )
        .await
        .unwrap_err();
        // rustls refuses the chain in the handshake, before any RPC runs; depending on
        // timing the client reads the UnknownCA alert itself or only the closed
        // connection that follows it. Either way it is a transport failure.
        assert!(err.contains("transport error"), "{err}");

        // A node certificate cannot call the operator API.
        let channel = connect(&url, &agent.tls(ca_pem.clone())).await.unwrap();
        let status = OperatorServiceClient::new(channel)
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status
            .message()
            .contains("node certificates cannot call the operator API"));

        // An operator certificate cannot pose as a node.
        let err = heartbeat(&url, &coordinator.operator_tls())
            .await
            .unwrap_err();
        assert!(err.starts_with("PermissionDenied"), "{err}");
    });

    // Revocation: the next call is refused and the open stream ends, so the running
    // agent stops with its "refused" exit code.
    let revoked = coordinator.cli_json(&["nodes", "revoke", &node_id, "--reason", "stolen"]);
    assert_eq!(revoked["status"], "NODE_STATUS_REVOKED");
    assert!(
        wait_until(Duration::from_secs(10), || agent.exit_code().is_some()),
        "agent kept running after revocation"
    );
    assert_eq!(agent.exit_code(), Some(3), "{}", agent.log());
    assert!(agent.log().contains("revoked"), "{}", agent.log());
    runtime().block_on(async {
        let err = heartbeat(&url, &agent.tls(ca_pem.clone()))
            .await
            .unwrap_err();
        assert!(
            err.starts_with("PermissionDenied") && err.contains("revoked (stolen)"),
            "{err}"
        );
    });
}

#[test]
fn state_survives_sigkill_and_agents_reconnect() {
    let root = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::start(root.path());
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let token = coordinator.create_token("10m", "site=plant-3");
            Agent::start(root.path(), &format!("agent-{i}"), &coordinator, &token)
        })
        .collect();
    let ids: Vec<String> = agents.iter().map(Agent::wait_enrolled).collect();
    assert!(wait_until(Duration::from_secs(20), || online_count(
        &coordinator
    ) == 3));
    coordinator.cli_json(&["nodes", "revoke", &ids[2], "--reason", "decommissioned"]);
    let spare_token = coordinator.create_token("10m", "site=spare");
    let before = coordinator.nodes();

    coordinator.kill9();
    assert!(!coordinator.is_running());
    std::thread::sleep(Duration::from_secs(2));
    let mut agents = agents;
    // Agents keep running while the coordinator is down.
    assert!(agents[..2].iter_mut().all(|a| a.exit_code().is_none()));

    coordinator.restart();
    let restarted_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let after = coordinator.nodes();
    assert_eq!(after.len(), 3);
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old["id"], new["id"]);
        assert_eq!(old["labels"], new["labels"]);
        assert_eq!(old["certificate_sha256"], new["certificate_sha256"]);
        assert_eq!(old["status"], new["status"]);
    }
    let revoked = after.iter().find(|n| n["id"] == ids[2].as_str()).unwrap();
    assert_eq!(revoked["status"], "NODE_STATUS_REVOKED");
    assert_eq!(revoked["revoked_reason"], "decommissioned");

    // The two active agents reconnect by themselves within seconds.
    let reconnected = wait_until(Duration::from_secs(15), || {
        coordinator
            .nodes()
            .iter()
            .filter(|n| n["status"] == "NODE_STATUS_ACTIVE")
            .all(|n| {
                n["last_seen_unix_ms"].as_i64().unwrap_or(0) >= restarted_at_ms
                    && n["online"] == true
            })
    });
    assert!(reconnected, "{:#?}", coordinator.nodes());

    // The unused token survived the crash and still enrolls exactly once.
    let fresh = enroll_once(&coordinator, &root.path().join("late"), &spare_token);
    assert!(fresh.status.success(), "{fresh:?}");
    let again = enroll_once(&coordinator, &root.path().join("late2"), &spare_token);
    assert!(!again.status.success());
    assert_eq!(coordinator.nodes().len(), 4);
}

#[test]
fn malformed_and_oversized_messages_get_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let token = coordinator.create_token("10m", "");
    let agent = Agent::start(root.path(), "agent", &coordinator, &token);
    agent.wait_enrolled();
    let ca_pem = std::fs::read(coordinator.ca_cert()).unwrap();
    let url = coordinator.url();

    runtime().block_on(async {
        let anonymous = connect(&url, &coordinator.anonymous_tls()).await.unwrap();

        // Bytes that are not a protobuf message.
        let status = raw_unary(
            anonymous.clone(),
            "/nanofleet.v1.Enrollment/Enroll",
            vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("decode"), "{}", status.message());

        // A well-formed message above the coordinator's 1 MiB limit.
        let huge = pb::EnrollRequest {
            token: "x".repeat(2 * 1024 * 1024),
            ..Default::default()
        }
        .encode_to_vec();
        let status = raw_unary(anonymous.clone(), "/nanofleet.v1.Enrollment/Enroll", huge)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(
            status.message().contains("too large"),
            "{}",
            status.message()
        );

        // A CSR that is not one: a clear INVALID_ARGUMENT, and the token is not spent.
        let token = coordinator.create_token("10m", "");
        let status = nanofleet_proto::v1::enrollment_client::EnrollmentClient::new(
            anonymous.clone(),
        )
        .enroll(pb::EnrollRequest {
            token: token.clone(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            facts: None,
        })
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("certificate signing request"),
            "{}",
            status.message()
        );

        // Facts beyond the limits from an enrolled node.
        let node = connect(&url, &agent.tls(ca_pem.clone())).await.unwrap();
        let mut facts = pb::DeviceFacts::default();
        for i in 0..100 {
            facts.labels.insert(format!("k{i}"), "v".into());
        }
        let status = NodeServiceClient::new(node.clone())
            .heartbeat(pb::HeartbeatRequest {
                facts: Some(facts),
                sequence: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("more than 64 labels"));

        // The coordinator keeps serving everyone else: health, reflection, the agent.
        let mut health = tonic_health::pb::health_client::HealthClient::new(anonymous.clone());
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "nanofleet.v1.NodeService".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            serving.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(anonymous)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("reflection did not list services");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for service in [
            "nanofleet.v1.Enrollment",
            "nanofleet.v1.NodeService",
            "nanofleet.v1.OperatorService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.contains(&service), "{names:?}");
        }

        NodeServiceClient::new(node)
            .heartbeat(pb::HeartbeatRequest::default())
            .await
            .unwrap();
    });
    assert!(wait_until(Duration::from_secs(10), || online_count(
        &coordinator
    ) == 1));
}
