//! `nanofleet-coordinator`: initialize a data directory, issue operator credentials and
//! dashboard accounts, serve the fleet, and check a serving coordinator's gRPC health.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use nanofleet_artifact::signing::verifying_key_from_pem;
use nanofleet_artifact::trust::{NamePattern, Revocation, TrustPolicy, TrustedKey};
use nanofleet_coordinator::artifacts::TRUST_POLICY_FILE;
use nanofleet_coordinator::config::CoordinatorConfig;
use nanofleet_coordinator::dashboard::auth::Accounts;
use nanofleet_coordinator::otlp::OtlpTraces;
use nanofleet_coordinator::pki::Pki;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "nanofleet-coordinator",
    version,
    about = "nanofleet control plane"
)]
struct Cli {
    /// TOML configuration file (defaults < file < NANOFLEET_* environment < flags).
    #[arg(long, global = true, env = "NANOFLEET_CONFIG")]
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
    grpc_listen: Option<std::net::SocketAddr>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_listen: Option<std::net::SocketAddr>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval_secs: Option<u32>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_message_bytes: Option<usize>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    download_bytes_per_sec: Option<u64>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    wire_capture_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dashboard_listen: Option<std::net::SocketAddr>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Create the CA, server certificate, signing key and an operator credential in the
    /// data directory (files with keys are 0600). Does nothing if already initialized.
    Init {
        /// DNS names and IP addresses agents use to reach this coordinator.
        #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1", "::1"])]
        server_names: Vec<String>,
        /// Use this CA certificate (PEM) instead of creating one; needs --ca-key.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Private key (PEM) of the CA given with --ca-cert.
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
    },
    /// Issue operator credentials (ca.crt, operator.crt, operator.key) into a directory.
    OperatorCredentials {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve the node, enrollment and operator APIs and the HTTP side.
    Serve,
    /// The trust policy: which publisher keys may sign which artifacts. It lives on the
    /// coordinator's disk and is changed here, not over the network API.
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Operator accounts of the dashboard (argon2id hashes in
    /// <data_dir>/dashboard-users.json, 0600), changed here on the coordinator's host.
    DashboardUser {
        #[command(subcommand)]
        command: DashboardUserCommand,
    },
    /// Ask a serving coordinator for its gRPC health (grpc.health.v1 `Check`) over TLS,
    /// trusting the fleet CA. Prints the status; exits 0 only when it is SERVING. Meant
    /// for exec probes: the gRPC port is TLS-only, so plain gRPC probes cannot reach it.
    Health(HealthArgs),
}

#[derive(Subcommand)]
enum DashboardUserCommand {
    /// Add a user or set a new password. The password is read from standard input (one
    /// line; asked for twice without echo on a terminal), never from the command line.
    Add {
        name: String,
    },
    Remove {
        name: String,
    },
    List,
}

#[derive(Args)]
struct HealthArgs {
    /// Coordinator URL. Default: `https://` and the configured `grpc_listen`, with
    /// loopback in place of an unspecified address (0.0.0.0 or ::).
    #[arg(long)]
    url: Option<String>,
    /// Service to ask about, e.g. `nanofleet.v1.NodeService`; empty = the whole server.
    #[arg(long, default_value = "")]
    service: String,
    /// Fleet CA certificate (PEM) the server certificate must chain to.
    /// Default: `<data_dir>/ca.crt`.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the URL's host.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Give up after this long (connecting and the call together), e.g. 5s.
    #[arg(long, default_value = "5s")]
    timeout: humantime::Duration,
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Trust a publisher's ed25519 public key (PEM) for artifact names.
    AddKey {
        #[arg(long)]
        key: PathBuf,
        /// Artifact names it may sign: exact, or a prefix ending in `*`. Repeatable.
        #[arg(long = "names", required = true)]
        names: Vec<String>,
        /// Accept its signatures only this long from now (key rotation), e.g. 365d.
        #[arg(long)]
        valid_for: Option<humantime::Duration>,
    },
    /// Withdraw a key: manifests it signed are refused from now on.
    RevokeKey {
        key_id: String,
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
    },
    List,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn trust(config: &CoordinatorConfig, command: TrustCommand) -> anyhow::Result<()> {
    let path = config.data_dir.join(TRUST_POLICY_FILE);
    let policy = if path.exists() {
        TrustPolicy::from_json(&std::fs::read(&path)?)
            .with_context(|| format!("reading {}", path.display()))?
    } else {
        TrustPolicy::default()
    };
    let mut keys = policy.keys().to_vec();
    match command {
        TrustCommand::AddKey {
            key,
            names,
            valid_for,
        } => {
            let pem = std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            let public = verifying_key_from_pem(&pem)
                .with_context(|| format!("{} is not an ed25519 public key", key.display()))?;
            let patterns = names
                .iter()
                .map(|n| NamePattern::new(n))
                .collect::<Result<Vec<_>, _>>()?;
            let mut trusted = TrustedKey::new(public, patterns);
            trusted.not_after_ms = valid_for.map(|d| now_ms() + d.as_millis() as u64);
            keys.retain(|k| k.key_id != trusted.key_id);
            println!("trusting key {} for {}", trusted.key_id, names.join(", "));
            keys.push(trusted);
        }
        TrustCommand::RevokeKey { key_id, reason } => {
            let key = keys
                .iter_mut()
                .find(|k| k.key_id.to_string() == key_id)
                .with_context(|| format!("no key {key_id} in {}", path.display()))?;
            key.revoked = Some(Revocation {
                at_ms: now_ms(),
                reason,
            });
            println!("revoked key {key_id}");
        }
        TrustCommand::List => {
            for key in &keys {
                let names: Vec<_> = key.allowed_names.iter().map(|n| n.as_str()).collect();
                let state = match &key.revoked {
                    Some(r) => format!("revoked: {}", r.reason),
                    None => "trusted".to_owned(),
                };
                println!("{}  {:<30}  {}", key.key_id, names.join(","), state);
            }
            return Ok(());
        }
    }
    let policy = TrustPolicy::new(keys)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, policy.to_json_pretty())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Reads one line from standard input: on a terminal with echo off and a prompt (and
/// asked twice), from a pipe as it comes, so scripts can feed it.
fn read_password() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let read_line = || -> anyhow::Result<String> {
        let mut line = String::new();
        stdin.lock().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    if !stdin.is_terminal() {
        return read_line();
    }
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal we checked is one.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        anyhow::bail!("cannot read the terminal settings");
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    let ask = |prompt: &str| -> anyhow::Result<String> {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        // SAFETY: settings for our own terminal, restored below on every path.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
        let line = read_line();
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        eprintln!();
        line
    };
    let first = ask("password: ")?;
    if ask("again: ")? != first {
        anyhow::bail!("the passwords differ; nothing changed");
    }
    Ok(first)
}

fn dashboard_user(config: &CoordinatorConfig, command: DashboardUserCommand) -> anyhow::Result<()> {
    let accounts = Accounts::new(&config.data_dir);
    match command {
        DashboardUserCommand::Add { name } => {
            let password = read_password()?;
            accounts.set(&name, &password)?;
            println!("dashboard user {name} can log in");
        }
        DashboardUserCommand::Remove { name } => {
            accounts.remove(&name)?;
            println!("removed dashboard user {name} (their open sessions end now)");
        }
        DashboardUserCommand::List => {
            for (name, _) in accounts.list()? {
                println!("{name}");
            }
        }
    }
    Ok(())
}

/// Writes `cli.toml` beside the operator credentials, so that
/// `NANOFLEET_CLI_CONFIG=<dir>/cli.toml nanofleet nodes list` works at once.
fn write_cli_config(
    config: &CoordinatorConfig,
    operator_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let dir = std::fs::canonicalize(operator_dir)?;
    let listen = config.grpc_listen;
    let host = if listen.ip().is_unspecified() {
        "localhost".to_owned()
    } else if listen.is_ipv6() {
        format!("[{}]", listen.ip())
    } else {
        listen.ip().to_string()
    };
    let text = format!(
        "coordinator = \"https://{host}:{port}\"\nca_cert = {ca:?}\noperator_cert = {cert:?}\noperator_key = {key:?}\n",
        port = listen.port(),
        ca = dir.join("ca.crt"),
        cert = dir.join("operator.crt"),
        key = dir.join("operator.key"),
    );
    std::fs::write(dir.join("cli.toml"), text)?;
    Ok(())
}

fn serve(config: CoordinatorConfig) -> anyhow::Result<()> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Runtime::new()?;
    // The OTLP exporter's gRPC channel lives on this runtime.
    let otlp = {
        let _runtime = runtime.enter();
        config
            .otlp_endpoint
            .as_deref()
            .map(OtlpTraces::new)
            .transpose()?
    };
    nanofleet_coordinator::telemetry::init_tracing(&config.log, otlp.as_ref());
    let result = runtime.block_on(nanofleet_coordinator::server::run(config));
    // After the servers stopped, with the runtime still up: the exporter needs it.
    if let Some(otlp) = &otlp {
        otlp.shutdown();
    }
    Ok(result?)
}

/// `https://` URL of the gRPC port as seen from this host: loopback in place of an
/// unspecified listen address (the default server certificate names 127.0.0.1 and ::1).
fn local_grpc_url(listen: std::net::SocketAddr) -> String {
    let host = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("https://{host}:{}", listen.port())
}

async fn health(config: &CoordinatorConfig, args: HealthArgs) -> anyhow::Result<()> {
    use nanofleet_transport::error_chain;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let url = args
        .url
        .unwrap_or_else(|| local_grpc_url(config.grpc_listen));
    let ca_path = args
        .ca_cert
        .unwrap_or_else(|| config.data_dir.join("ca.crt"));
    let ca_pem =
        std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some(name) = args.tls_server_name {
        tls = tls.domain_name(name);
    }
    let timeout: std::time::Duration = args.timeout.into();
    let endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("{url:?} is not a valid URL"))?
        .tls_config(tls)
        .with_context(|| format!("TLS configuration for {url} was refused"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let check = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {url}: {}", error_chain(&e)))?;
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|status| {
                anyhow::anyhow!(
                    "health check of {url} failed: {:?}: {}",
                    status.code(),
                    status.message()
                )
            })
    };
    let response = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| anyhow::anyhow!("no health answer from {url} within {}", args.timeout))??;
    let status =
        ServingStatus::try_from(response.into_inner().status).unwrap_or(ServingStatus::Unknown);
    println!("{}", status.as_str_name());
    anyhow::ensure!(
        status == ServingStatus::Serving,
        "{url} is not serving ({})",
        status.as_str_name()
    );
    Ok(())
}

/// Caps glibc's malloc arenas at one per core (at least two), unless `MALLOC_ARENA_MAX`
/// says otherwise. By default glibc gives threads up to eight arenas per core, and memory
/// freed in one stays there: streaming a model to 20 agents from the runtime's and the
/// blocking pool's threads, the coordinator's peak RSS grew from 104 to 143 MiB over five
/// rollouts; capped on 2 cores it stayed at 81-86 MiB, rollouts no slower.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only changes an allocator setting; called before the runtime
        // starts its threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = CoordinatorConfig::load(cli.config.as_deref(), &cli.flags)
        .context("loading configuration")?;
    // `serve` installs its own subscriber, with OTLP export when configured.
    if !matches!(cli.command, Command::Serve) {
        nanofleet_coordinator::telemetry::init_tracing(&config.log, None);
    }
    match cli.command {
        Command::Init {
            server_names,
            ca_cert,
            ca_key,
        } => {
            let ca = match (ca_cert, ca_key) {
                (Some(cert), Some(key)) => Some((
                    std::fs::read_to_string(&cert)
                        .with_context(|| format!("reading {}", cert.display()))?,
                    std::fs::read_to_string(&key)
                        .with_context(|| format!("reading {}", key.display()))?,
                )),
                _ => None,
            };
            let report = Pki::init(&config.data_dir, &server_names, ca)?;
            write_cli_config(&config, &report.operator_dir)?;
            if report.created {
                println!("initialized {}", config.data_dir.display());
            } else {
                println!(
                    "{} is already initialized; nothing changed",
                    config.data_dir.display()
                );
            }
            println!("CA sha256: {}", report.ca_sha256);
            println!("operator credentials: {}", report.operator_dir.display());
        }
        Command::OperatorCredentials { name, out } => {
            let pki = Pki::load(&config.data_dir)?;
            pki.write_operator_credentials(&out, &name)?;
            println!(
                "wrote operator credentials for {name:?} to {}",
                out.display()
            );
        }
        Command::Trust { command } => trust(&config, command)?,
        Command::DashboardUser { command } => dashboard_user(&config, command)?,
        Command::Serve => serve(config)?,
        Command::Health(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(health(&config, args))?;
        }
    }
    Ok(())
}
