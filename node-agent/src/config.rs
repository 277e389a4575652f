//! Typed agent configuration, layered by `nanofleet_config`:
//! defaults < TOML file < `NANOFLEET_*` environment < command-line flags.
//! Each field is documented here once; deploy/agent.example.toml mirrors it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    pub token: Option<String>,
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
            ],
            flags,
        )
    }
}
