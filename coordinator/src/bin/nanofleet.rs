//! `nanofleet`: the operator CLI. Talks to the coordinator's operator API with an
//! operator client certificate; human tables by default, `--json` for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
}

#[derive(Subcommand)]
enum NodesCommand {
    List,
    Show {
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
    // Transport failures (a refused handshake, say) keep their reason in the source chain.
    anyhow::anyhow!("{:?}: {}", status.code(), error_chain(&status))
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
    let mut client = client(&cli).await?;
    match &cli.command {
        Command::Nodes { command } => match command {
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
        },
        Command::Token { command } => match command {
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
        },
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
