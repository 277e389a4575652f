//! `nanofleet`: the operator CLI. Talks to the coordinator's operator API with an
//! operator client certificate; human tables by default, `--json` for scripts.

mod audit;
mod federation;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use nanofleet_artifact::gguf::{GgufHeader, Limits};
use nanofleet_artifact::ids::Sha256Digest;
use nanofleet_artifact::manifest::{
    ArtifactFormat, ArtifactKind, Chunker, Manifest, Provenance, ProvenanceSource,
};
use nanofleet_artifact::openssf;
use nanofleet_artifact::signing::{
    key_id, signing_key_from_pem, signing_key_to_pem, verifying_key_to_pem, SignedManifest,
};
use nanofleet_proto::v1 as pb;
use nanofleet_proto::v1::operator_service_client::OperatorServiceClient;
use nanofleet_transport::{error_chain, ClientTls};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Parser)]
#[command(name = "nanofleet", version, about = "Operate a nanofleet fleet")]
struct Cli {
    /// CLI configuration file (TOML); `nanofleet-coordinator init` writes one into the
    /// operator credentials directory.
    #[arg(long, global = true, env = "NANOFLEET_CLI_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    connection: ConnectionFlags,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the coordinator is and which credentials to present. Layered:
/// file < NANOFLEET_* environment < flags.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug)]
struct ConnectionFlags {
    /// Coordinator gRPC URL, e.g. https://127.0.0.1:7443 (NANOFLEET_COORDINATOR).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator: Option<String>,
    /// Fleet CA certificate (NANOFLEET_CA_CERT).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_cert: Option<PathBuf>,
    /// Operator certificate (NANOFLEET_OPERATOR_CERT).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    operator_cert: Option<PathBuf>,
    /// Operator private key (NANOFLEET_OPERATOR_KEY).
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    operator_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Enrolled nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// One-time bootstrap tokens for enrolling devices.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Signed model artifacts: keys, manifests, signatures, publishing.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Roll an artifact out to the nodes a selector picks, in health-gated waves.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Federated LoRA training: define federations.
    Federation {
        #[command(subcommand)]
        command: federation::FederationCommand,
    },
    /// Run a federation's rounds and watch them.
    Round {
        #[command(subcommand)]
        command: federation::RoundCommand,
    },
    /// Global adapters of federations.
    Adapter {
        #[command(subcommand)]
        command: federation::AdapterCommand,
    },
    /// The tamper-evident audit log: signed heads, exports, proofs, offline checks.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Recorded facts (publishes, refusals), oldest first.
    Events {
        /// Only actions starting with this, e.g. `artifact.refused`.
        #[arg(long, default_value = "")]
        action: String,
    },
}

/// What goes into a manifest besides the file's own bytes and header.
#[derive(clap::Args, Clone)]
struct ManifestFlags {
    /// Artifact name (needed unless a signed manifest is given).
    #[arg(long)]
    name: Option<String>,
    /// Artifact version (needed unless a signed manifest is given).
    #[arg(long)]
    version: Option<String>,
    #[arg(long, default_value = "apache-2.0")]
    license: String,
    /// JSON file with training-data provenance: {"sources": [{"uri", "sha256", "description"}], "federated": null}.
    #[arg(long)]
    provenance: Option<PathBuf>,
    /// Chunk size in bytes; downloads resume and verify per chunk.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    chunk_size: u64,
    #[command(flatten)]
    openssf: OpenSsfFlags,
}

/// An OpenSSF model-signing bundle (`model_signing sign key`) for the file: verified
/// here, then recorded in the manifest's provenance, so the nanofleet signature covers it.
#[derive(clap::Args, Clone)]
struct OpenSsfFlags {
    #[arg(long, requires = "openssf_key")]
    openssf_bundle: Option<PathBuf>,
    /// The bundle signer's ECDSA P-256 public key (SPKI PEM).
    #[arg(long, requires = "openssf_bundle")]
    openssf_key: Option<PathBuf>,
}

impl OpenSsfFlags {
    /// Verifies the bundle against a single file with `sha256`; returns the provenance
    /// entry that records it, or `None` when no bundle was given.
    fn verify(&self, sha256: Sha256Digest) -> anyhow::Result<Option<ProvenanceSource>> {
        let (Some(bundle_path), Some(key_path)) = (&self.openssf_bundle, &self.openssf_key) else {
            return Ok(None);
        };
        let bundle = std::fs::read(bundle_path)
            .with_context(|| format!("reading {}", bundle_path.display()))?;
        let key = read_text(key_path)?;
        // model_signing names a single signed file "." in its statement.
        openssf::verify_bundle(&bundle, &key, &[(".", sha256)]).with_context(|| {
            format!(
                "OpenSSF bundle {} does not verify for this file",
                bundle_path.display()
            )
        })?;
        Ok(Some(ProvenanceSource {
            uri: format!("openssf-model-signing:{}", bundle_path.file_name().unwrap_or_default().to_string_lossy()),
            sha256: Some(Sha256Digest::of(&bundle)),
            description: format!(
                "OpenSSF model_signing bundle verified for this file with the ECDSA P-256 key sha256:{}",
                Sha256Digest::of(key.as_bytes())
            ),
        }))
    }
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Create an ed25519 publisher key pair: DIR/publisher.key (0600) and DIR/publisher.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Compute the manifest of a GGUF file (chunk digests, header facts) and print it.
    Manifest {
        file: PathBuf,
        #[command(flatten)]
        manifest: ManifestFlags,
    },
    /// Verify an OpenSSF model-signing bundle (`model_signing sign key`) for a file.
    VerifyOpenssf {
        file: PathBuf,
        #[command(flatten)]
        openssf: OpenSsfFlags,
    },
    /// Sign a manifest offline with a publisher key; prints the signed manifest. A
    /// signed manifest given as input gets one more signature.
    Sign {
        manifest: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Publish a file: with --key, build and sign its manifest here; with
    /// --signed-manifest, upload one signed offline.
    Publish {
        file: PathBuf,
        #[arg(long, conflicts_with = "signed_manifest")]
        key: Option<PathBuf>,
        #[arg(long)]
        signed_manifest: Option<PathBuf>,
        #[command(flatten)]
        manifest: ManifestFlags,
    },
    List,
    /// Print an artifact's signed manifest: NAME@VERSION.
    Show {
        reference: String,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    Create {
        /// A published artifact, NAME@VERSION.
        #[arg(long)]
        artifact: String,
        /// key=value terms that must all hold: labels, arch=, id= (repeatable). Empty: all nodes.
        #[arg(long, default_value = "")]
        selector: String,
        /// Cumulative wave sizes, e.g. 5%,50%,100%.
        #[arg(long, default_value = "100%")]
        waves: String,
        /// Each node of a wave must answer a smoke prompt.
        #[arg(long)]
        require_smoke: bool,
        /// Highest error rate (0..1) a node may report.
        #[arg(long, default_value_t = 0.0)]
        max_error_rate: f32,
        /// Highest p95 latency a node may report, milliseconds.
        #[arg(long, default_value_t = 0.0)]
        max_p95_latency_ms: f32,
        /// How long a wave may take to become healthy, e.g. 10m (default: the coordinator's).
        #[arg(long)]
        wave_timeout: Option<humantime::Duration>,
        /// Assign at most this many nodes of a wave per second (0: a whole wave at once),
        /// so that a large wave's downloads and reports do not all come at once.
        #[arg(long, default_value_t = 0)]
        max_per_second: u32,
    },
    Status {
        id: String,
        /// Wait while the rollout runs (as `kubectl rollout status` does), then print it;
        /// exits non-zero unless it completed.
        #[arg(long)]
        wait: bool,
    },
    List,
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop, and roll every node the rollout moved back to its previous version.
    Abort {
        id: String,
    },
}

fn parse_waves(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(',')
        .map(|w| {
            let w = w.trim().trim_end_matches('%');
            w.parse::<u32>()
                .with_context(|| format!("wave {w:?} is not a percentage"))
        })
        .collect()
}

fn print_rollout(rollout: &pb::Rollout, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        let waves: Vec<_> = rollout
            .waves
            .iter()
            .map(|w| {
                json!({"percent": w.percent, "state": w.state, "nodes": w.nodes.iter().map(|n| json!({"node_id": n.node_id, "state": n.state, "reason": n.reason, "bytes_fetched": n.bytes_fetched})).collect::<Vec<_>>()})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "id": rollout.id, "artifact": rollout.artifact, "selector": rollout.selector,
                "state": rollout.state, "reason": rollout.reason, "current_wave": rollout.current_wave,
                "created_at": time_text(rollout.created_at_unix_ms), "created_by": rollout.created_by,
                "max_per_second": rollout.max_per_second, "waves": waves,
            }))?
        );
        return Ok(());
    }
    println!(
        "rollout {}  {}  {}",
        rollout.id, rollout.artifact, rollout.state
    );
    if !rollout.reason.is_empty() {
        println!("  reason: {}", rollout.reason);
    }
    for (i, wave) in rollout.waves.iter().enumerate() {
        println!("  wave {} ({}%): {}", i + 1, wave.percent, wave.state);
        for node in &wave.nodes {
            let reason = if node.reason.is_empty() {
                String::new()
            } else {
                format!("  ({})", node.reason)
            };
            println!("    {}  {}{}", node.node_id, node.state, reason);
        }
    }
    Ok(())
}

async fn rollout(cli: &Cli, command: &RolloutCommand) -> anyhow::Result<()> {
    let mut client = client(cli).await?;
    let by_id = |id: &String| pb::RolloutRef { id: id.clone() };
    let rollout = match command {
        RolloutCommand::Create {
            artifact,
            selector,
            waves,
            require_smoke,
            max_error_rate,
            max_p95_latency_ms,
            wave_timeout,
            max_per_second,
        } => {
            client
                .create_rollout(pb::CreateRolloutRequest {
                    artifact: artifact.clone(),
                    selector: selector.clone(),
                    waves: parse_waves(waves)?,
                    gate: Some(pb::Gate {
                        require_smoke: *require_smoke,
                        max_error_rate: *max_error_rate,
                        max_p95_latency_ms: *max_p95_latency_ms,
                        wave_timeout_secs: wave_timeout.map(|d| d.as_secs() as u32).unwrap_or(0),
                    }),
                    max_per_second: *max_per_second,
                })
                .await
        }
        RolloutCommand::Status { id, wait: false } => client.get_rollout(by_id(id)).await,
        RolloutCommand::Status { id, wait: true } => {
            let rollout = loop {
                let rollout = client
                    .get_rollout(by_id(id))
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if rollout.state != "running" {
                    break rollout;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            };
            print_rollout(&rollout, cli.json)?;
            anyhow::ensure!(
                rollout.state == "completed",
                "rollout {id} is {}{}",
                rollout.state,
                if rollout.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", rollout.reason)
                }
            );
            return Ok(());
        }
        RolloutCommand::Pause { id } => client.pause_rollout(by_id(id)).await,
        RolloutCommand::Resume { id } => client.resume_rollout(by_id(id)).await,
        RolloutCommand::Abort { id } => client.abort_rollout(by_id(id)).await,
        RolloutCommand::List => {
            let rollouts = client
                .list_rollouts(pb::ListRolloutsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .rollouts;
            for rollout in &rollouts {
                print_rollout(rollout, cli.json)?;
            }
            return Ok(());
        }
    };
    print_rollout(&rollout.map_err(status_error)?.into_inner(), cli.json)
}

#[derive(Subcommand)]
enum NodesCommand {
    List,
    Show {
        id: String,
    },
    /// Pin the nodes a selector picks (e.g. id=<node id>, site=plant-3) to one
    /// artifact version; rollouts of that name skip them.
    Pin {
        #[arg(long)]
        selector: String,
        /// NAME@VERSION
        #[arg(long)]
        artifact: String,
    },
    /// Lift the pin of an artifact name from the nodes a selector picks.
    Unpin {
        #[arg(long)]
        selector: String,
        #[arg(long)]
        name: String,
    },
    /// What the coordinator applied of a node's telemetry: totals per model version,
    /// the latest gauges and events, and records that never arrived.
    Telemetry {
        id: String,
    },
    /// Revoke a node: its next call is refused and its open stream ends.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    Create {
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// Labels for every node enrolled with the token: k=v,k=v.
        #[arg(long, default_value = "")]
        labels: String,
    },
}

fn parse_labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("label {pair:?} is not key=value"))?;
            Ok((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}

async fn client(cli: &Cli) -> anyhow::Result<OperatorServiceClient<tonic::transport::Channel>> {
    let connection: ConnectionFlags = nanofleet_config::load(
        cli.config.as_deref(),
        &["coordinator", "ca_cert", "operator_cert", "operator_key"],
        &cli.connection,
    )
    .context("reading CLI configuration")?;
    let missing = |what: &str| {
        anyhow::anyhow!(
            "no {what} configured: pass --{what}, set NANOFLEET_{}, or point --config / \
             NANOFLEET_CLI_CONFIG at the cli.toml that `nanofleet-coordinator init` wrote",
            what.to_uppercase().replace('-', "_")
        )
    };
    let url = connection
        .coordinator
        .ok_or_else(|| missing("coordinator"))?;
    let read = |path: Option<PathBuf>, what: &str| -> anyhow::Result<Vec<u8>> {
        let path = path.ok_or_else(|| missing(what))?;
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let tls = ClientTls {
        ca_pem: read(connection.ca_cert, "ca-cert")?,
        identity: Some((
            read(connection.operator_cert, "operator-cert")?,
            read(connection.operator_key, "operator-key")?,
        )),
    };
    let channel = nanofleet_transport::connect(&url, &tls)
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    Ok(OperatorServiceClient::new(channel))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    use std::error::Error;
    // Transport failures (a refused handshake, say) keep their reason in the source chain.
    let message = match status.source() {
        Some(_) => error_chain(&status),
        None => status.message().to_owned(),
    };
    anyhow::anyhow!("{:?}: {message}", status.code())
}

fn time_text(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".to_owned();
    }
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn node_json(node: &pb::Node) -> serde_json::Value {
    let facts = node.facts.clone().unwrap_or_default();
    json!({
        "id": node.id,
        "status": pb::NodeStatus::try_from(node.status).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "online": node.online,
        "labels": node.labels,
        "enrolled_at": time_text(node.enrolled_at_unix_ms),
        "last_seen": time_text(node.last_seen_unix_ms),
        "last_seen_unix_ms": node.last_seen_unix_ms,
        "certificate_sha256": node.certificate_sha256,
        "revoked_at": if node.revoked_at_unix_ms > 0 { Some(time_text(node.revoked_at_unix_ms)) } else { None },
        "revoked_reason": node.revoked_reason,
        "facts": {
            "arch": facts.arch,
            "cpu_cores": facts.cpu_cores,
            "memory_total_bytes": facts.memory_total_bytes,
            "memory_available_bytes": facts.memory_available_bytes,
            "accelerators": facts.accelerators.iter().map(|a| json!({"kind": a.kind, "name": a.name, "memory_bytes": a.memory_bytes})).collect::<Vec<_>>(),
            "power_source": pb::PowerSource::try_from(facts.power_source).map(|p| p.as_str_name()).unwrap_or("UNKNOWN"),
            "battery_percent": facts.battery_percent,
            "charging": facts.charging,
            "os": facts.os,
            "os_version": facts.os_version,
            "agent_version": facts.agent_version,
            "hostname": facts.hostname,
            "inference_device": facts.inference_device,
        },
    })
}

fn print_node_table(nodes: &[pb::Node]) {
    println!(
        "{:<36}  {:<7}  {:<7}  {:<8}  {:>5}  {:>8}  {:<20}  LABELS",
        "ID", "STATUS", "ONLINE", "ARCH", "CORES", "RAM MiB", "LAST SEEN"
    );
    for node in nodes {
        let facts = node.facts.clone().unwrap_or_default();
        let labels = node
            .labels
            .iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let status = match pb::NodeStatus::try_from(node.status) {
            Ok(pb::NodeStatus::Revoked) => "revoked",
            _ => "active",
        };
        println!(
            "{:<36}  {:<7}  {:<7}  {:<8}  {:>5}  {:>8}  {:<20}  {}",
            node.id,
            status,
            if node.online { "yes" } else { "no" },
            facts.arch,
            facts.cpu_cores,
            facts.memory_total_bytes / (1024 * 1024),
            time_text(node.last_seen_unix_ms),
            labels
        );
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Model { command } => model(&cli, command).await?,
        Command::Nodes { command } => nodes(&cli, command).await?,
        Command::Token { command } => token(&cli, command).await?,
        Command::Events { action } => events(&cli, action).await?,
        Command::Rollout { command } => rollout(&cli, command).await?,
        Command::Federation { command } => federation::federation(&cli, command).await?,
        Command::Round { command } => federation::round(&cli, command).await?,
        Command::Adapter { command } => federation::adapter(&cli, command).await?,
        Command::Audit { command } => audit::audit(&cli, command).await?,
    }
    Ok(())
}

async fn nodes(cli: &Cli, command: &NodesCommand) -> anyhow::Result<()> {
    let mut client = client(cli).await?;
    match command {
        NodesCommand::Pin { selector, artifact } => {
            let pinned = client
                .pin_artifact(pb::PinArtifactRequest {
                    selector: selector.clone(),
                    artifact: artifact.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_node_ids(cli, "pinned", &pinned.node_ids)?;
        }
        NodesCommand::Unpin { selector, name } => {
            let unpinned = client
                .unpin_artifact(pb::UnpinArtifactRequest {
                    selector: selector.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_node_ids(cli, "unpinned", &unpinned.node_ids)?;
        }
        NodesCommand::List => {
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .nodes;
            if cli.json {
                let list: Vec<_> = nodes.iter().map(node_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_node_table(&nodes);
            }
        }
        NodesCommand::Show { id } => {
            let node = client
                .get_node(pb::GetNodeRequest { id: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", serde_json::to_string_pretty(&node_json(&node))?);
        }
        NodesCommand::Telemetry { id } => {
            let telemetry = client
                .get_node_telemetry(pb::GetNodeTelemetryRequest { id: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            print_telemetry(&telemetry, cli.json)?;
        }
        NodesCommand::Revoke { id, reason } => {
            let node = client
                .revoke_node(pb::RevokeNodeRequest {
                    id: id.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&node_json(&node))?);
            } else {
                println!("revoked node {} ({})", node.id, node.revoked_reason);
            }
        }
    }
    Ok(())
}

fn print_telemetry(t: &pb::NodeTelemetry, json_output: bool) -> anyhow::Result<()> {
    let system = t.system;
    if json_output {
        let models: Vec<_> = t
            .models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name, "version": m.version, "active": m.active,
                    "requests": m.requests, "errors": m.errors,
                    "prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
                    "tokens_per_second": m.tokens_per_second,
                    "time_to_first_token_ms": m.time_to_first_token_ms,
                    "latency_p50_ms": m.latency_p50_ms, "latency_p95_ms": m.latency_p95_ms,
                })
            })
            .collect();
        let events: Vec<_> = t
            .events
            .iter()
            .map(|e| json!({"time": time_text(e.time_unix_ms), "kind": e.kind, "subject": e.subject, "detail": e.detail}))
            .collect();
        let system = system.map(|s| {
            json!({
                "memory_rss_bytes": s.memory_rss_bytes, "cpu_percent": s.cpu_percent,
                "memory_available_bytes": s.memory_available_bytes,
                "power_source": pb::PowerSource::try_from(s.power_source).map(|p| p.as_str_name()).unwrap_or("UNKNOWN"),
                "battery_percent": s.battery_percent, "charging": s.charging,
            })
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "node_id": t.node_id, "applied_sequence": t.applied_sequence,
                "records": t.records, "records_missing": t.records_missing,
                "records_dropped": t.records_dropped,
                "first_record": time_text(t.first_record_unix_ms),
                "last_record": time_text(t.last_record_unix_ms),
                "requests": t.requests, "errors": t.errors,
                "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                "models": models, "system": system, "events": events,
            }))?
        );
        return Ok(());
    }
    println!(
        "node {}: {} records up to #{} ({} missing, {} dropped by the agent), last {}",
        t.node_id,
        t.records,
        t.applied_sequence,
        t.records_missing,
        t.records_dropped,
        time_text(t.last_record_unix_ms)
    );
    println!(
        "  requests {}  errors {}  prompt tokens {}  generated tokens {}",
        t.requests, t.errors, t.prompt_tokens, t.completion_tokens
    );
    if let Some(s) = system {
        println!(
            "  agent memory {} MiB  cpu {:.1}%  available memory {} MiB",
            s.memory_rss_bytes / (1024 * 1024),
            s.cpu_percent,
            s.memory_available_bytes / (1024 * 1024)
        );
    }
    println!(
        "  {:<40}  {:<6}  {:>8}  {:>6}  {:>10}  {:>7}  {:>9}  {:>9}",
        "MODEL", "ACTIVE", "REQUESTS", "ERRORS", "GENERATED", "TOK/S", "TTFT MS", "P95 MS"
    );
    for m in &t.models {
        println!(
            "  {:<40}  {:<6}  {:>8}  {:>6}  {:>10}  {:>7.1}  {:>9.1}  {:>9.1}",
            format!("{}@{}", m.name, m.version),
            if m.active { "yes" } else { "no" },
            m.requests,
            m.errors,
            m.completion_tokens,
            m.tokens_per_second,
            m.time_to_first_token_ms,
            m.latency_p95_ms
        );
    }
    for e in &t.events {
        println!(
            "  {}  {}  {}  {}",
            time_text(e.time_unix_ms),
            e.kind,
            e.subject,
            e.detail
        );
    }
    Ok(())
}

fn print_node_ids(cli: &Cli, what: &str, ids: &[String]) -> anyhow::Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&json!({ what: ids }))?);
    } else {
        println!("{what} {} nodes: {}", ids.len(), ids.join(", "));
    }
    Ok(())
}

async fn token(cli: &Cli, command: &TokenCommand) -> anyhow::Result<()> {
    let mut client = client(cli).await?;
    match command {
        TokenCommand::Create { ttl, labels } => {
            let created = client
                .create_token(pb::CreateTokenRequest {
                    ttl_secs: ttl.as_secs(),
                    labels: parse_labels(labels)?.into_iter().collect(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "token": created.token,
                        "expires_at": time_text(created.expires_at_unix_ms),
                        "ca_sha256": created.ca_sha256,
                    }))?
                );
            } else {
                println!("token:      {}", created.token);
                println!("expires at: {}", time_text(created.expires_at_unix_ms));
                println!("CA sha256:  {}", created.ca_sha256);
                println!("(shown once; it enrolls exactly one device)");
            }
        }
    }
    Ok(())
}

async fn events(cli: &Cli, action: &str) -> anyhow::Result<()> {
    let events = client(cli)
        .await?
        .list_events(pb::ListEventsRequest {
            action_prefix: action.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .events;
    if cli.json {
        let list: Vec<_> = events
            .iter()
            .map(|e| {
                json!({"time": time_text(e.time_unix_ms), "actor": e.actor,
                               "action": e.action, "subject": e.subject, "reason": e.reason})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for e in &events {
            println!(
                "{}  {:<20}  {:<18}  {:<36}  {}",
                time_text(e.time_unix_ms),
                e.actor,
                e.action,
                e.subject,
                e.reason
            );
        }
    }
    Ok(())
}

fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Builds the manifest of `file`: its chunks and digest, and what its GGUF header says.
fn build_manifest(file: &std::path::Path, flags: &ManifestFlags) -> anyhow::Result<Manifest> {
    let (Some(name), Some(version)) = (&flags.name, &flags.version) else {
        bail!("building a manifest needs --name and --version");
    };
    let open = || std::fs::File::open(file).with_context(|| format!("opening {}", file.display()));
    let header = GgufHeader::read_from(std::io::BufReader::new(open()?), &Limits::default())
        .with_context(|| format!("{} is not a GGUF model", file.display()))?;
    let summary = header.summary();
    let content = Chunker::digest_reader(flags.chunk_size, std::io::BufReader::new(open()?))?;
    header
        .validate_against_size(content.size)
        .with_context(|| {
            format!(
                "{} does not hold the tensors its header lists",
                file.display()
            )
        })?;
    let mut provenance: Provenance = match &flags.provenance {
        Some(path) => serde_json::from_str(&read_text(path)?)
            .with_context(|| format!("{} is not a provenance JSON document", path.display()))?,
        None => Provenance::default(),
    };
    provenance
        .sources
        .extend(flags.openssf.verify(content.sha256)?);
    let manifest = Manifest {
        name: name.clone(),
        version: version.clone(),
        kind: ArtifactKind::Model,
        format: ArtifactFormat::Gguf,
        architecture: summary.architecture.unwrap_or_default(),
        quantization: summary.quantization.unwrap_or_default(),
        size: content.size,
        sha256: content.sha256,
        chunk_size: content.chunk_size,
        chunks: content.chunks,
        base_model: None,
        license: flags.license.clone(),
        provenance,
        created_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64,
    };
    manifest.validate()?;
    Ok(manifest)
}

fn sign(manifest_json: &[u8], key_path: &std::path::Path) -> anyhow::Result<SignedManifest> {
    let key = signing_key_from_pem(&read_text(key_path)?)
        .with_context(|| format!("{} is not an ed25519 private key", key_path.display()))?;
    // A signed manifest gets one more signature; a bare one gets its first.
    Ok(match SignedManifest::from_json(manifest_json) {
        Ok(mut signed) => {
            signed.add_signature(&key);
            signed
        }
        Err(_) => SignedManifest::sign(Manifest::from_json(manifest_json)?, &key)?,
    })
}

async fn model(cli: &Cli, command: &ModelCommand) -> anyhow::Result<()> {
    let json_output = cli.json;
    match command {
        ModelCommand::Keygen { out } => {
            std::fs::create_dir_all(out)?;
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let private = out.join("publisher.key");
            nanofleet_transport::write_private_file(&private, signing_key_to_pem(&key).as_bytes())
                .with_context(|| format!("writing {}", private.display()))?;
            let public = out.join("publisher.pub");
            std::fs::write(&public, verifying_key_to_pem(&key.verifying_key()))?;
            println!(
                "key id {}\nprivate key {} (0600; keep it off the coordinator)\npublic key  {} (add it to trust policies)",
                key_id(&key.verifying_key()),
                private.display(),
                public.display()
            );
        }
        ModelCommand::VerifyOpenssf { file, openssf } => {
            let sha256 = Chunker::digest_reader(
                4 << 20,
                std::io::BufReader::new(
                    std::fs::File::open(file)
                        .with_context(|| format!("opening {}", file.display()))?,
                ),
            )?
            .sha256;
            let source = openssf
                .verify(sha256)?
                .context("give --openssf-bundle and --openssf-key")?;
            println!("verified: {}", source.description);
        }
        ModelCommand::Manifest { file, manifest } => {
            println!("{}", build_manifest(file, manifest)?.to_json_pretty());
        }
        ModelCommand::Sign { manifest, key } => {
            let bytes = std::fs::read(manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            println!("{}", sign(&bytes, key)?.to_json_pretty());
        }
        ModelCommand::Publish {
            file,
            key,
            signed_manifest,
            manifest,
        } => {
            let signed = match (signed_manifest, key) {
                (Some(path), _) => {
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, Some(key)) => {
                    let manifest = build_manifest(file, manifest)?;
                    sign(manifest.to_json_pretty().as_bytes(), key)?
                        .to_json_pretty()
                        .into_bytes()
                }
                (None, None) => {
                    bail!("publish needs --key (sign here) or --signed-manifest (signed offline)")
                }
            };
            let file = file.clone();
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            // Read the file on a blocking thread, frame by frame: memory stays bounded.
            let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                use std::io::Read;
                let send =
                    |part| sender.blocking_send(pb::PublishArtifactRequest { part: Some(part) });
                if send(pb::publish_artifact_request::Part::SignedManifest(signed)).is_err() {
                    return Ok(0);
                }
                let mut input = std::fs::File::open(&file)
                    .with_context(|| format!("opening {}", file.display()))?;
                let mut sent = 0u64;
                loop {
                    let mut frame = vec![0u8; UPLOAD_FRAME_BYTES];
                    let n = input.read(&mut frame)?;
                    if n == 0 {
                        return Ok(sent);
                    }
                    frame.truncate(n);
                    sent += n as u64;
                    if send(pb::publish_artifact_request::Part::Data(frame)).is_err() {
                        return Ok(sent);
                    }
                }
            });
            let response = client(cli)
                .await?
                .publish_artifact(tokio_stream::wrappers::ReceiverStream::new(receiver))
                .await;
            reader.await??;
            let artifact = response.map_err(status_error)?.into_inner();
            print_artifact(&artifact, json_output)?;
        }
        ModelCommand::List => {
            let artifacts = client(cli)
                .await?
                .list_artifacts(pb::ListArtifactsRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .artifacts;
            if json_output {
                let list: Vec<_> = artifacts.iter().map(artifact_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<40}  {:<10}  {:<8}  {:>10}  {:<16}  SHA256",
                    "ARTIFACT", "ARCH", "QUANT", "MiB", "SIGNER"
                );
                for a in &artifacts {
                    println!(
                        "{:<40}  {:<10}  {:<8}  {:>10.1}  {:<16}  {}",
                        format!("{}@{}", a.name, a.version),
                        a.architecture,
                        a.quantization,
                        a.size as f64 / (1024.0 * 1024.0),
                        a.signer_key_ids.join(","),
                        a.sha256
                    );
                }
            }
        }
        ModelCommand::Show { reference } => {
            let (name, version) = reference
                .split_once('@')
                .context("give the artifact as NAME@VERSION")?;
            let artifact = client(cli)
                .await?
                .get_artifact(pb::GetArtifactRequest {
                    name: name.to_owned(),
                    version: version.to_owned(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", String::from_utf8_lossy(&artifact.signed_manifest));
        }
    }
    Ok(())
}

/// Size of the data frames of an upload: well under the coordinator's message limit.
const UPLOAD_FRAME_BYTES: usize = 256 * 1024;

fn artifact_json(a: &pb::Artifact) -> serde_json::Value {
    json!({
        "name": a.name, "version": a.version, "kind": a.kind, "format": a.format,
        "architecture": a.architecture, "quantization": a.quantization, "size": a.size,
        "sha256": a.sha256, "chunks": a.chunk_count, "license": a.license,
        "signer_key_ids": a.signer_key_ids, "published_at": time_text(a.published_at_unix_ms),
        "published_by": a.published_by,
    })
}

fn print_artifact(a: &pb::Artifact, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        println!("{}", serde_json::to_string_pretty(&artifact_json(a))?);
    } else {
        println!(
            "published {}@{} ({} {}, {} bytes in {} chunks, sha256 {}, signed by {})",
            a.name,
            a.version,
            a.architecture,
            a.quantization,
            a.size,
            a.chunk_count,
            a.sha256,
            a.signer_key_ids.join(",")
        );
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    if let Err(error) = runtime.block_on(run(cli)) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let labels = parse_labels("site=plant-3, line=2").unwrap();
        assert_eq!(labels["site"], "plant-3");
        assert_eq!(labels["line"], "2");
        assert!(parse_labels("oops").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }
}
