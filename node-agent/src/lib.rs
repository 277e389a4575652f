//! nanofleet node agent: enrolls a device with the coordinator, keeps an
//! agent-initiated session to it (heartbeats with device facts, a command stream), and
//! keeps its identity in its own data directory. See ARCHITECTURE.md for the map.

pub mod artifacts;
pub mod backoff;
pub mod config;
pub mod enroll;
pub mod facts;
pub mod identity;
pub mod local_api;
pub mod models;
pub mod session;
pub mod telemetry;
pub mod training;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
