//! Typed agent configuration, layered by `nanofleet_config`:
//! defaults < TOML file < `NANOFLEET_*` environment < command-line flags.
//! Each field is documented here once; deploy/agent.example.toml mirrors it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nanofleet_config::Secret;
use nanofleet_inference::DeviceChoice;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AgentConfig {
    /// Directory with the device key (0600), its certificate, the pinned CA and state.
    pub data_dir: PathBuf,
    /// Coordinator gRPC URL, e.g. `https://coordinator.example:7443`. Needed to enroll;
    /// afterwards the enrolled URL is used unless this overrides it.
    pub coordinator: Option<String>,
    /// Fleet CA certificate to trust while enrolling (PEM file).
    pub ca_cert: Option<PathBuf>,
    /// One-time bootstrap token; `run` enrolls with it when the device is not enrolled.
    pub token: Option<Secret>,
    /// Labels this device reports (the token's labels win on conflicts).
    pub labels: BTreeMap<String, String>,
    /// Upper bound of the jittered exponential reconnect delay, milliseconds.
    pub reconnect_max_ms: u64,
    /// Trust policy (JSON, as `nanofleet-coordinator trust` writes it) naming the keys
    /// whose signed artifacts this device accepts. Without one, nothing is activated.
    pub trust_policy: Option<PathBuf>,
    /// Download rate limit, bytes per second; 0 = none (the coordinator may limit too).
    pub download_limit_bytes_per_sec: u64,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax (`RUST_LOG` wins when set).
    pub log: String,
    /// Serve activated models: load each into the inference engine, prove it with the smoke
    /// prompt before it may serve, and answer the local API. `false` makes a store-only node
    /// that verifies and keeps artifacts but runs no model (its rollout health reports say
    /// so, and a gate that requires the smoke prompt fails it).
    pub serve_models: bool,
    /// Address of the local OpenAI-compatible API; loopback by default. Port 0 picks a free
    /// port (written to `<data_dir>/api.addr`). Empty disables the API.
    pub api_listen: String,
    /// Bearer key the local API requires (`Authorization: Bearer <key>`); none = open. Set it
    /// through `NANOFLEET_API_KEY` rather than the file where possible; it is never logged.
    pub api_key: Option<Secret>,
    /// Generations the local API runs at once.
    pub api_max_concurrent: usize,
    /// Requests that may wait for a generation slot; more are answered 429.
    pub api_queue_depth: usize,
    /// Threads for the forward pass; unset = one per core.
    pub inference_threads: Option<usize>,
    /// Where models run: `auto` (the first CUDA GPU when the agent is built with the `cuda`
    /// feature and one is usable, else the CPU), `cpu`, `cuda` or `cuda:N` (that GPU, or
    /// the agent does not start).
    pub inference_device: DeviceChoice,
    /// Cap on a model's context length, to bound KV-cache memory; unset = the model's own.
    pub context_length: Option<usize>,
    /// The user message every model must answer before it serves.
    pub smoke_prompt: String,
    /// Tokens generated for the smoke prompt.
    pub smoke_max_tokens: usize,
    /// Local training data for federated rounds: JSONL of {"prompt","response"} or
    /// {"messages": [...]} lines. It never leaves the device; only clipped adapter deltas
    /// and held-out metrics do. Unset: the node takes no part in training.
    pub training_data: Option<PathBuf>,
    /// Share of the examples kept out of training to evaluate adapters on (chosen by a
    /// hash of each example, so the split is stable across runs).
    pub holdout_fraction: f64,
    /// Memory the trainer may use, MiB; a round whose estimate exceeds it is declined.
    pub training_memory_budget_mib: Option<u64>,
    /// Seconds per telemetry record (served requests, tokens, speed, latency, errors,
    /// active versions, memory, CPU, power, events); 0 turns telemetry off. Records are
    /// queued in `<data_dir>/telemetry` and sent to the coordinator while it is reachable.
    pub telemetry_interval_secs: u64,
    /// Records the telemetry queue keeps while the coordinator is unreachable; when it is
    /// full the oldest are dropped, and their count is reported.
    pub telemetry_queue_max_records: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("nanofleet-agent-data"),
            coordinator: None,
            ca_cert: None,
            token: None,
            labels: BTreeMap::new(),
            reconnect_max_ms: 10_000,
            trust_policy: None,
            download_limit_bytes_per_sec: 0,
            log: "info".to_owned(),
            serve_models: true,
            api_listen: "127.0.0.1:8080".to_owned(),
            api_key: None,
            api_max_concurrent: 2,
            api_queue_depth: 16,
            inference_threads: None,
            inference_device: DeviceChoice::Auto,
            context_length: None,
            smoke_prompt: "Say hello.".to_owned(),
            smoke_max_tokens: 8,
            training_data: None,
            holdout_fraction: 0.2,
            training_memory_budget_mib: None,
            telemetry_interval_secs: 10,
            // A day at the default interval.
            telemetry_queue_max_records: 8640,
        }
    }
}

impl AgentConfig {
    /// Loads the layers; `flags` holds only the options given on the command line.
    pub fn load(
        file: Option<&Path>,
        flags: impl Serialize,
    ) -> Result<Self, nanofleet_config::Error> {
        nanofleet_config::load(
            file,
            &[
                "data_dir",
                "coordinator",
                "ca_cert",
                "token",
                "reconnect_max_ms",
                "log",
                "serve_models",
                "api_listen",
                "api_key",
                "api_max_concurrent",
                "api_queue_depth",
                "inference_threads",
                "inference_device",
                "context_length",
                "training_data",
                "holdout_fraction",
                "training_memory_budget_mib",
                "telemetry_interval_secs",
                "telemetry_queue_max_records",
            ],
            flags,
        )
    }
}
