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
use nanofleet_agent::local_api::{self, ApiOptions};
use nanofleet_agent::models::{HostOptions, ModelHost};
use nanofleet_agent::session::{self, SessionOptions};
use nanofleet_agent::telemetry::{self, Telemetry};
use nanofleet_agent::training::{LocalData, TrainingContext};
use nanofleet_artifact::trust::TrustPolicy;
use serde::Serialize;
use tracing::Instrument;

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
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    serve_models: Option<bool>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_listen: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_max_concurrent: Option<usize>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_queue_depth: Option<usize>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    inference_threads: Option<usize>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    inference_device: Option<String>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    context_length: Option<usize>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    training_data: Option<PathBuf>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry_interval_secs: Option<u64>,
    #[arg(long, global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry_queue_max_records: Option<usize>,
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
    /// Generate text from a local GGUF, without the coordinator or the API: the text on
    /// stdout, load time and speed on stderr.
    Generate(GenerateArgs),
    /// Serve a local GGUF on the local API, without a coordinator (as `llama-server -m`
    /// would): proven with the smoke prompt first, like every model a rollout activates.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// The model id clients ask for (default: the file name without `.gguf`).
    #[arg(long)]
    name: Option<String>,
}

#[derive(Args)]
struct GenerateArgs {
    /// The GGUF model file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Forward-pass threads (default: --inference-threads, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep generating through end-of-generation tokens (for speed measurements).
    #[arg(long)]
    ignore_eos: bool,
}

fn generate(args: GenerateArgs, config: &AgentConfig) -> anyhow::Result<()> {
    use nanofleet_inference::{
        ChatMessage, Engine, EngineOptions, GenerateRequest, SamplingParams,
    };
    use std::io::Write;
    let engine = Engine::load(
        &args.model,
        EngineOptions {
            threads: args.threads.or(config.inference_threads),
            context_length: config.context_length,
            device: config.inference_device.open()?,
            lora: None,
        },
    )?;
    let info = engine.model_info();
    eprintln!(
        "loaded {} ({}, context {}) on {} in {:.3} s",
        args.model.display(),
        info.architecture.gguf_name(),
        info.context_length,
        info.device,
        info.load_time.as_secs_f64()
    );
    let prompt = if args.chat {
        engine.render_chat(&[ChatMessage::new("user", args.prompt)])?
    } else {
        args.prompt
    };
    let request = GenerateRequest {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            ..SamplingParams::default()
        },
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        ..GenerateRequest::greedy(prompt, args.max_tokens)
    };
    let mut stdout = std::io::stdout().lock();
    let completion = engine.generate(&request, |event| {
        // A closed stdout (e.g. `| head`) ends generation instead of failing it.
        match stdout
            .write_all(event.text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => std::ops::ControlFlow::Continue(()),
            Err(_) => std::ops::ControlFlow::Break(()),
        }
    })?;
    let _ = writeln!(stdout);
    let stats = &completion.stats;
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s; time to first token {:.3} s; finish: {:?}",
        stats.prompt_tokens,
        stats.prompt_tokens_per_second(),
        stats.completion_tokens,
        stats.generation_tokens_per_second(),
        stats.time_to_first_token.as_secs_f64(),
        stats.finish_reason
    );
    Ok(())
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
        token.expose(),
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
    let host = match config.serve_models {
        true => Some(model_host(&config)?),
        false => None,
    };
    let inference_device = host
        .as_ref()
        .map(|host| host.device_description())
        .unwrap_or_default();
    let api = match &host {
        Some(host) if !config.api_listen.is_empty() => {
            Some(start_api(&config, host.clone()).await?)
        }
        _ => None,
    };
    let telemetry = match config.telemetry_interval_secs {
        0 => None,
        secs => {
            let telemetry = Telemetry::open(&config.data_dir, config.telemetry_queue_max_records)
                .context("opening the telemetry queue")?;
            tokio::spawn(
                telemetry::run_sampler(telemetry.clone(), host.clone(), Duration::from_secs(secs))
                    .instrument(tracing::info_span!("telemetry_sampler")),
            );
            Some(telemetry)
        }
    };
    let mut artifacts =
        ArtifactManager::new(&config.data_dir, trust, config.download_limit_bytes_per_sec);
    if let Some(host) = host {
        artifacts = artifacts.serving(host);
    }
    let artifacts = Arc::new(artifacts);
    let training = match &config.training_data {
        Some(path) => {
            let data = LocalData::load(path, config.holdout_fraction)
                .with_context(|| format!("reading training data {}", path.display()))?;
            tracing::info!(
                train = data.train.len(),
                held_out = data.held_out.len(),
                "local training data loaded"
            );
            Some(Arc::new(TrainingContext::new(
                data,
                artifacts.clone(),
                config.training_memory_budget_mib.map(|m| m * 1024 * 1024),
                config.data_dir.join("training"),
            )))
        }
        None => None,
    };
    let session = session::run(
        identity,
        SessionOptions {
            labels: config.labels.clone(),
            inference_device,
            reconnect_max: Duration::from_millis(config.reconnect_max_ms),
            artifacts,
            training,
            telemetry,
        },
    );
    tokio::select! {
        refused = session => Err(refused.into()),
        stopped = async move {
            match api {
                Some(handle) => handle.await,
                None => std::future::pending().await,
            }
        } => Err(anyhow::anyhow!("the local API stopped: {stopped:?}")),
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// The host that loads, proves and serves models, on the configured device.
fn model_host(config: &AgentConfig) -> anyhow::Result<Arc<ModelHost>> {
    let device = config.inference_device.open()?;
    let host = ModelHost::new(HostOptions {
        threads: config.inference_threads,
        context_length: config.context_length,
        device,
        smoke_prompt: config.smoke_prompt.clone(),
        smoke_max_tokens: config.smoke_max_tokens,
    });
    tracing::info!(device = %host.device_description(), "models run on this device");
    Ok(Arc::new(host))
}

/// `serve`: one local model on the local API until a shutdown signal.
async fn serve(args: ServeArgs, config: &AgentConfig) -> anyhow::Result<()> {
    let host = model_host(config)?;
    let name = match args.name {
        Some(name) => name,
        None => args
            .model
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .context("--model has no file name")?,
    };
    let model = {
        let host = host.clone();
        let file = args.model.clone();
        tokio::task::spawn_blocking(move || host.prove(&name, "local", &file, None)).await?
    }
    .with_context(|| format!("serving {}", args.model.display()))?;
    tracing::info!(
        model = %model.name,
        device = %model.engine.model_info().device,
        "model proven with the smoke prompt"
    );
    host.activate(model);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let api = start_api(config, host).await?;
    tokio::select! {
        stopped = api => Err(anyhow::anyhow!("the local API stopped: {stopped:?}")),
        _ = shutdown_signal() => Ok(()),
    }
}

/// Binds the local API and serves it in the background.
async fn start_api(
    config: &AgentConfig,
    host: Arc<ModelHost>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(&config.api_listen)
        .await
        .with_context(|| format!("binding the local API to {}", config.api_listen))?;
    let address = listener.local_addr()?;
    local_api::write_bound_address(&config.data_dir, address)?;
    tracing::info!(%address, key_required = config.api_key.is_some(), "local API listening");
    let router = local_api::router(
        host,
        ApiOptions {
            api_key: config.api_key.as_ref().map(|key| key.expose().to_owned()),
            max_concurrent: config.api_max_concurrent,
            queue_depth: config.api_queue_depth,
        },
    );
    Ok(tokio::spawn(local_api::serve(listener, router)))
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
                let mut facts = nanofleet_agent::facts::collect(&config.labels);
                if config.serve_models {
                    facts.inference_device =
                        nanofleet_inference::device::describe(&config.inference_device.open()?);
                }
                println!("{facts:#?}");
                Ok(())
            }
            Command::Generate(args) => generate(args, &config),
            Command::Serve(args) => serve(args, &config).await,
        }
    });
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        // 3: the coordinator refused this device; restarting will not help.
        let refused = error.downcast_ref::<session::SessionError>().is_some();
        std::process::exit(if refused { 3 } else { 1 });
    }
}
