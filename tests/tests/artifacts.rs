//! End to end: publishing signed artifacts. The coordinator accepts only what a trusted
//! key signed, whose every chunk, whole digest and GGUF header match the manifest; each
//! refusal is reported to the publisher and recorded as an event with its reason.

use std::path::Path;

use nanofleet_e2e::{connect_node_operator_client, ok, path, tiny_gguf, Agent, Coordinator};

fn refused(output: &std::process::Output, expected: &str) {
    assert!(!output.status.success(), "should have been refused");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

#[test]
fn only_trusted_intact_artifacts_are_published() {
    let root = tempfile::tempdir().unwrap();
    let mut coordinator = Coordinator::start(root.path());
    let dir = root.path();
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, tiny_gguf(1)).unwrap();
    let key = dir.join("keys/publisher.key");
    let pubkey = dir.join("keys/publisher.pub");
    ok(&coordinator.cli(&["model", "keygen", "--out", &path(&dir.join("keys"))]));
    ok(&coordinator.cli(&["model", "keygen", "--out", &path(&dir.join("other"))]));

    // Without a trust policy nothing can be published.
    refused(
        &coordinator.cli(&[
            "model",
            "publish",
            &path(&model),
            "--name",
            "tiny",
            "--version",
            "1.0.0",
            "--key",
            &path(&key),
        ]),
        "no trust policy",
    );
    ok(&coordinator.admin(&[
        "trust",
        "add-key",
        "--key",
        &path(&pubkey),
        "--names",
        "tiny*",
    ]));

    let published = coordinator.cli_json(&[
        "model",
        "publish",
        &path(&model),
        "--name",
        "tiny",
        "--version",
        "1.0.0",
        "--key",
        &path(&key),
        "--chunk-size",
        "1024",
    ]);
    let bytes = std::fs::read(&model).unwrap();
    assert_eq!(
        published["sha256"],
        nanofleet_artifact::ids::Sha256Digest::of(&bytes).to_string()
    );
    assert_eq!(published["architecture"], "llama");
    assert_eq!(published["quantization"], "Q8_0");
    assert_eq!(published["chunks"], bytes.len().div_ceil(1024) as u64);

    // A signed manifest made offline, then uploads that must all be refused.
    let manifest = dir.join("manifest.json");
    let signed = dir.join("signed.json");
    std::fs::write(
        &manifest,
        ok(&coordinator.cli(&[
            "model",
            "manifest",
            &path(&model),
            "--name",
            "tiny",
            "--version",
            "2.0.0",
            "--chunk-size",
            "1024",
        ])),
    )
    .unwrap();
    std::fs::write(
        &signed,
        ok(&coordinator.cli(&["model", "sign", &path(&manifest), "--key", &path(&key)])),
    )
    .unwrap();
    let publish_signed = |file: &Path, signed: &Path| {
        coordinator.cli(&[
            "model",
            "publish",
            &path(file),
            "--signed-manifest",
            &path(signed),
        ])
    };

    // Signed by a key the policy does not list.
    refused(
        &coordinator.cli(&[
            "model",
            "publish",
            &path(&model),
            "--name",
            "tiny",
            "--version",
            "9.0.0",
            "--key",
            &path(&dir.join("other/publisher.key")),
        ]),
        "trust policy does not list",
    );
    // A name the key may not sign.
    refused(
        &coordinator.cli(&[
            "model",
            "publish",
            &path(&model),
            "--name",
            "other-model",
            "--version",
            "1.0.0",
            "--key",
            &path(&key),
        ]),
        "other-model",
    );
    // The manifest edited after signing.
    let edited = dir.join("edited.json");
    std::fs::write(
        &edited,
        std::fs::read_to_string(&signed)
            .unwrap()
            .replace("apache-2.0", "mit"),
    )
    .unwrap();
    refused(&publish_signed(&model, &edited), "altered after signing");
    // One flipped byte among the weights (past the header, which is checked on its own).
    let flipped = dir.join("flipped.gguf");
    let mut corrupt = bytes.clone();
    let at = bytes.len() - 3000;
    corrupt[at] ^= 0xff;
    std::fs::write(&flipped, &corrupt).unwrap();
    let flipped_chunk = format!("chunk {} does not match", at / 1024);
    refused(&publish_signed(&flipped, &signed), &flipped_chunk);
    // A truncated file.
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    refused(&publish_signed(&truncated, &signed), "ended after");
    // A valid signature over a manifest whose GGUF facts lie about the file.
    let lying = dir.join("lying.json");
    std::fs::write(
        &lying,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replace("\"llama\"", "\"qwen2\""),
    )
    .unwrap();
    let lying_signed = dir.join("lying-signed.json");
    std::fs::write(
        &lying_signed,
        ok(&coordinator.cli(&["model", "sign", &path(&lying), "--key", &path(&key)])),
    )
    .unwrap();
    refused(
        &publish_signed(&model, &lying_signed),
        "GGUF header says architecture is \"llama\"",
    );
    // Not a GGUF at all: refused before anything is sent.
    let text = dir.join("notes.gguf");
    std::fs::write(&text, "not a model").unwrap();
    refused(
        &coordinator.cli(&[
            "model",
            "manifest",
            &path(&text),
            "--name",
            "tiny",
            "--version",
            "3.0.0",
        ]),
        "is not a GGUF model",
    );

    // The intact upload of the same signed manifest is accepted; a second one is not.
    ok(&publish_signed(&model, &signed));
    refused(&publish_signed(&model, &signed), "already published");

    // A node certificate cannot publish.
    let token = coordinator.create_token("10m", "");
    let agent = Agent::start(dir, "agent", &coordinator, &token);
    agent.wait_enrolled();
    let status = nanofleet_e2e::runtime().block_on(async {
        let ca = std::fs::read(coordinator.ca_cert()).unwrap();
        let mut client = connect_node_operator_client(&coordinator, agent.tls(ca)).await;
        client
            .list_artifacts(nanofleet_proto::v1::ListArtifactsRequest {})
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // A revoked publisher key signs nothing more.
    let key_id = ok(&coordinator.cli(&["model", "keygen", "--out", &path(&dir.join("keys2"))]));
    let key_id = key_id
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("key id ")
        .to_owned();
    ok(&coordinator.admin(&[
        "trust",
        "add-key",
        "--key",
        &path(&dir.join("keys2/publisher.pub")),
        "--names",
        "tiny",
    ]));
    ok(&coordinator.admin(&["trust", "revoke-key", &key_id, "--reason", "laptop stolen"]));
    refused(
        &coordinator.cli(&[
            "model",
            "publish",
            &path(&model),
            "--name",
            "tiny",
            "--version",
            "4.0.0",
            "--key",
            &path(&dir.join("keys2/publisher.key")),
        ]),
        "revoked",
    );

    // Every refusal is on record with its reason, and everything survives SIGKILL.
    coordinator.kill9();
    coordinator.restart();
    let listed = coordinator.cli_json(&["model", "list"]);
    let names: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}@{}",
                a["name"].as_str().unwrap(),
                a["version"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["tiny@1.0.0", "tiny@2.0.0"]);
    let events = coordinator.cli_json(&["events", "--action", "artifact.refused"]);
    let reasons: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    for expected in [
        "does not list",
        "altered after signing",
        flipped_chunk.as_str(),
        "ended after",
        "GGUF header",
        "already published",
        "revoked",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected} missing from {reasons:#?}"
        );
    }
    assert_eq!(
        coordinator
            .cli_json(&["events", "--action", "artifact.publish"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Nothing of the refused uploads is left behind.
    let staging = std::fs::read_dir(coordinator.dir.join("artifacts/staging"))
        .unwrap()
        .count();
    assert_eq!(staging, 0);
}

#[test]
fn openssf_model_signing_bundles_are_verified() {
    let root = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(root.path());
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../artifact/testdata/openssf");
    let bundle = path(&testdata.join("weights.bin.sig"));
    let key = path(&testdata.join("signing_key.pub"));
    let file = testdata.join("model/weights.bin");
    let verified = ok(&coordinator.cli(&[
        "model",
        "verify-openssf",
        &path(&file),
        "--openssf-bundle",
        &bundle,
        "--openssf-key",
        &key,
    ]));
    assert!(
        verified.starts_with("verified: OpenSSF model_signing bundle"),
        "{verified}"
    );

    let tampered = root.path().join("weights.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&tampered, bytes).unwrap();
    refused(
        &coordinator.cli(&[
            "model",
            "verify-openssf",
            &path(&tampered),
            "--openssf-bundle",
            &bundle,
            "--openssf-key",
            &key,
        ]),
        "does not verify for this file",
    );
}
