//! Observability: `tracing` for logs and spans, OpenTelemetry metrics exported in the
//! Prometheus text format at `/metrics`.

use std::sync::Arc;

use opentelemetry::metrics::{Counter, MeterProvider, ObservableGauge};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::registry::{NodeStatus, Registry};
use crate::sessions::SessionHub;

/// Installs the global `tracing` subscriber; `RUST_LOG` overrides `filter`. With `otlp`,
/// spans are also exported as OpenTelemetry traces.
pub fn init_tracing(filter: &str, otlp: Option<&crate::otlp::OtlpTraces>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(otlp.map(|otlp| otlp.layer()))
        .try_init();
}

/// Counters the services bump; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    enrollments: Counter<u64>,
    heartbeats: Counter<u64>,
}

impl Metrics {
    pub fn enrollment(&self, accepted: bool) {
        let result = if accepted { "accepted" } else { "refused" };
        self.enrollments.add(1, &[KeyValue::new("result", result)]);
    }

    pub fn heartbeat(&self) {
        self.heartbeats.add(1, &[]);
    }
}

/// The meter provider and the Prometheus registry it exports into.
pub struct Telemetry {
    pub metrics: Metrics,
    prometheus: prometheus::Registry,
    provider: SdkMeterProvider,
    _gauges: Vec<ObservableGauge<u64>>,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics exporter could not start: {0}")]
pub struct TelemetryError(String);

impl Telemetry {
    pub fn new(
        registry: Registry,
        sessions: Arc<SessionHub>,
        heartbeat_interval_secs: u32,
        otlp_endpoint: Option<&str>,
    ) -> Result<Self, TelemetryError> {
        let prometheus = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(prometheus.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let mut provider = SdkMeterProvider::builder().with_reader(exporter);
        if let Some(endpoint) = otlp_endpoint {
            let reader =
                crate::otlp::metrics_reader(endpoint).map_err(|e| TelemetryError(e.to_string()))?;
            provider = provider.with_reader(reader);
        }
        let provider = provider
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("nanofleet-coordinator")
                    .build(),
            )
            .build();
        let meter = provider.meter("nanofleet-coordinator");

        let nodes = meter
            .u64_observable_gauge("nanofleet_nodes")
            .with_description("Enrolled nodes by state")
            .with_callback(move |observer| {
                let Ok(nodes) = registry.nodes() else { return };
                let now = crate::now_unix_ms();
                let (mut online, mut offline, mut revoked) = (0, 0, 0);
                for node in &nodes {
                    if node.status == NodeStatus::Revoked {
                        revoked += 1;
                    } else if node.is_online(now, heartbeat_interval_secs) {
                        online += 1;
                    } else {
                        offline += 1;
                    }
                }
                for (state, count) in [
                    ("online", online),
                    ("offline", offline),
                    ("revoked", revoked),
                ] {
                    observer.observe(count, &[KeyValue::new("state", state)]);
                }
            })
            .build();
        let streams = meter
            .u64_observable_gauge("nanofleet_connected_nodes")
            .with_description("Nodes with an open command stream")
            .with_callback(move |observer| observer.observe(sessions.connected() as u64, &[]))
            .build();

        let metrics = Metrics {
            enrollments: meter
                .u64_counter("nanofleet_enrollments")
                .with_description("Enrollment attempts by result")
                .build(),
            heartbeats: meter
                .u64_counter("nanofleet_heartbeats")
                .with_description("Heartbeats accepted")
                .build(),
        };
        Ok(Self {
            metrics,
            prometheus,
            provider,
            _gauges: vec![nodes, streams],
        })
    }

    /// Pushes the last metrics to the OTLP collector, if any; called once on the way out.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "metrics provider shutdown failed");
        }
    }

    /// The current metrics in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.prometheus.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
