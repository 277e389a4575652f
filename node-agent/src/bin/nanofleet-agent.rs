//! `nanofleet-agent`: enroll this device and run its session with the coordinator.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::sync::Arc;

use nanofleet_agent::artifacts::ArtifactManager;
use nanofleet_agent::config::AgentConfig;
use nanofleet_agent::identity::Identity;
use nanofleet_agent::session::{self, SessionOptions};
use nanofleet_artifact::trust::TrustPolicy;
use serde::Serialize;

#[derive(Parser)]
#[command(name = "nanofleet-agent", version, about = "nanofleet device agent")]
struct Cli {
    /// TOML configuration file (defaults < file < NANOFLEET_* environment < flags).
    #[arg(long, global = true, env = "NANOFLEET_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Command,
}

/// Flags that override configuration keys of the same name.
#[derive(Args, Serialize)]
struct Flags {
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_cert: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// A label this device reports, key=value; repeatable.
    #[arg(long = "label", global = true, value_parser = parse_label)]
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "labels_map")]
    labels: Vec<(String, String)>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnect_max_ms: Option<u64>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trust_policy: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    download_limit_bytes_per_sec: Option<u64>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {text:?} is not key=value"))
}

fn labels_map<S: serde::Serializer>(labels: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    labels
        .iter()
        .cloned()
        .collect::<BTreeMap<_, _>>()
        .serialize(s)
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device: generate its key, send a CSR with the token, store the
    /// certificate. Needs --coordinator, --token and --ca-cert.
    Enroll,
    /// Run the agent (enrolling first when --token is given and the device is new).
    Run,
    /// Print the device facts this agent reports.
    Facts,
}

async fn enroll(config: &AgentConfig) -> anyhow::Result<Identity> {
    let (Some(coordinator), Some(token), Some(ca_cert)) =
        (&config.coordinator, &config.token, &config.ca_cert)
    else {
        bail!("enrolling needs --coordinator URL, --token TOKEN and --ca-cert FILE (or the same keys in the config)");
    };
    let ca_pem =
        std::fs::read(ca_cert).with_context(|| format!("reading {}", ca_cert.display()))?;
    let identity = nanofleet_agent::enroll::enroll(
        coordinator,
        ca_pem,
        token,
        nanofleet_agent::facts::collect(&config.labels),
    )
    .await?;
    identity.save(&config.data_dir)?;
    tracing::info!(node = %identity.node_id, data_dir = %config.data_dir.display(), "enrolled");
    Ok(identity)
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let mut identity = if Identity::exists(&config.data_dir) {
        Identity::load(&config.data_dir)?
    } else if config.token.is_some() {
        enroll(&config).await?
    } else {
        Identity::load(&config.data_dir)?
    };
    if let Some(coordinator) = &config.coordinator {
        identity.coordinator = coordinator.clone();
    }
    tracing::info!(node = %identity.node_id, coordinator = %identity.coordinator, "agent starting");
    let trust = match &config.trust_policy {
        Some(path) => Some(
            TrustPolicy::from_json(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("{} is not a trust policy", path.display()))?,
        ),
        None => {
            tracing::warn!(
                "no trust_policy configured: artifacts assigned to this device will be refused"
            );
            None
        }
    };
    let artifacts = Arc::new(ArtifactManager::new(
        &config.data_dir,
        trust,
        config.download_limit_bytes_per_sec,
    ));
    let session = session::run(
        identity,
        SessionOptions {
            labels: config.labels.clone(),
            reconnect_max: Duration::from_millis(config.reconnect_max_ms),
            artifacts,
        },
    );
    tokio::select! {
        refused = session => Err(refused.into()),
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    let config = match AgentConfig::load(cli.config.as_deref(), &cli.flags) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: loading configuration: {error}");
            std::process::exit(2);
        }
    };
    init_tracing(&config.log);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Enroll => {
                let identity = enroll(&config).await?;
                println!("enrolled as node {}", identity.node_id);
                Ok(())
            }
            Command::Run => run(config).await,
            Command::Facts => {
                let facts = nanofleet_agent::facts::collect(&config.labels);
                println!("{facts:#?}");
                Ok(())
            }
        }
    });
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        // 3: the coordinator refused this device; restarting will not help.
        let refused = error.downcast_ref::<session::SessionError>().is_some();
        std::process::exit(if refused { 3 } else { 1 });
    }
}
