//! nanofleet coordinator: the control plane of a fleet of node agents.
//!
//! The crate is layered like the request path: [`api`] is the gRPC edge (protocol types,
//! authentication, `Status` mapping), [`registry`] holds the fleet's domain logic,
//! [`store`] persists it behind a narrow key-value trait, and [`pki`] is the fleet CA.
//! [`server`] wires them together with the HTTP side ([`http`]), the operators' web page
//! ([`dashboard`]) and observability ([`telemetry`], OTLP export in [`otlp`]). See
//! ARCHITECTURE.md at the repository root for the whole map.

pub mod adapters;
pub mod api;
pub mod artifacts;
pub mod audit_log;
pub mod capture;
pub mod config;
pub mod dashboard;
pub mod federations;
pub mod fleet_telemetry;
pub mod http;
pub mod identity;
pub mod otlp;
pub mod pki;
pub mod registry;
pub mod rollouts;
pub mod server;
pub mod sessions;
pub mod signing_keys;
pub mod store;
pub mod telemetry;

/// Milliseconds since the Unix epoch, the time unit of every stored record.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
