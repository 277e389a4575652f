//! Typed coordinator configuration, layered by `nanofleet_config`:
//! defaults < TOML file < `NANOFLEET_*` environment < command-line flags.
//! Each field is documented here once; deploy/coordinator.example.toml mirrors it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CoordinatorConfig {
    /// Directory with the CA, the server certificate, the signing key and the sled
    /// database. Created by `nanofleet-coordinator init`.
    pub data_dir: PathBuf,
    /// Address of the gRPC port (TLS; enrollment, node and operator services, health,
    /// reflection).
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP port (`/healthz`, `/metrics`).
    pub http_listen: SocketAddr,
    /// How often agents are told to heartbeat; a node is online while its last
    /// heartbeat is younger than three intervals.
    pub heartbeat_interval_secs: u32,
    /// Largest gRPC request the coordinator decodes; larger ones get OUT_OF_RANGE.
    pub max_message_bytes: usize,
    /// Largest round update (an adapter delta) or secure-aggregation message an enrolled
    /// node may send. The node service decodes up to this; its other calls keep their own
    /// field limits.
    pub max_update_bytes: usize,
    /// Upper bound for the lifetime of a bootstrap token.
    pub max_token_ttl_secs: u64,
    /// Download rate limit per agent stream, bytes per second; 0 = none.
    pub download_bytes_per_sec: u64,
    /// How long a rollout wave may take to become healthy unless the rollout says.
    pub rollout_wave_timeout_secs: u32,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax (`RUST_LOG` wins when set).
    pub log: String,
    /// Writes the body of every request the node service receives to a file here (one
    /// per call), for audits of what devices sent. Off by default; the files hold what
    /// nodes sent, so keep the directory as private as the data directory.
    pub wire_capture_dir: Option<PathBuf>,
    /// Address of the dashboard (HTTPS with the server certificate; operators log in with
    /// accounts made by `nanofleet-coordinator dashboard-user add`). Off by default: set
    /// it to serve the page, e.g. 127.0.0.1:7444.
    pub dashboard_listen: Option<SocketAddr>,
    /// OTLP collector (gRPC, plaintext), e.g. `http://127.0.0.1:4317`: spans and metrics
    /// are exported there besides `/metrics`. Unset: no export. An unreachable collector
    /// is logged, never fatal; `OTEL_METRIC_EXPORT_INTERVAL` (ms) sets the metrics period.
    pub otlp_endpoint: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("nanofleet-data"),
            grpc_listen: "127.0.0.1:7443".parse().expect("valid default address"),
            http_listen: "127.0.0.1:7480".parse().expect("valid default address"),
            heartbeat_interval_secs: 10,
            max_message_bytes: 1024 * 1024,
            max_update_bytes: 64 * 1024 * 1024,
            max_token_ttl_secs: 7 * 24 * 3600,
            download_bytes_per_sec: 0,
            rollout_wave_timeout_secs: 600,
            log: "info".to_owned(),
            wire_capture_dir: None,
            dashboard_listen: None,
            otlp_endpoint: None,
        }
    }
}

impl CoordinatorConfig {
    /// Loads the layers; `flags` holds only the options given on the command line.
    pub fn load(
        file: Option<&Path>,
        flags: impl Serialize,
    ) -> Result<Self, nanofleet_config::Error> {
        nanofleet_config::load(
            file,
            &[
                "data_dir",
                "grpc_listen",
                "http_listen",
                "heartbeat_interval_secs",
                "max_message_bytes",
                "max_update_bytes",
                "max_token_ttl_secs",
                "download_bytes_per_sec",
                "rollout_wave_timeout_secs",
                "log",
                "wire_capture_dir",
                "dashboard_listen",
                "otlp_endpoint",
            ],
            flags,
        )
    }
}
