//! OTLP export over gRPC: the `tracing` spans as OpenTelemetry traces and a periodic
//! reader for the meter provider, sent to `otlp_endpoint`. Nothing here runs when the
//! endpoint is unset.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::metrics::PeriodicReader;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `service.name` of the coordinator's traces and metrics.
pub const SERVICE_NAME: &str = "nanofleet-coordinator";

/// How long one export may take; a dead collector costs the exporter threads at most
/// this, never a request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on flushing the last spans at shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("otlp_endpoint {0:?} is not an http:// URL with a host (OTLP over plaintext gRPC)")]
    Endpoint(String),
    #[error("OTLP exporter could not be built: {0}")]
    Build(#[from] opentelemetry_otlp::ExporterBuildError),
}

fn resource() -> Resource {
    Resource::builder().with_service_name(SERVICE_NAME).build()
}

/// Checks the endpoint's shape; whether anything listens there is only warned about.
fn validate(endpoint: &str) -> Result<http::Uri, OtlpError> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|_| OtlpError::Endpoint(endpoint.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(OtlpError::Endpoint(endpoint.to_owned()));
    }
    Ok(uri)
}

/// The trace pipeline: a batch exporter behind a `tracing` layer.
pub struct OtlpTraces {
    provider: SdkTracerProvider,
}

impl OtlpTraces {
    /// Must be called inside a Tokio runtime: the gRPC channel's worker is spawned there,
    /// and the batch processor's thread exports through it.
    pub fn new(endpoint: &str) -> Result<Self, OtlpError> {
        validate(endpoint)?;
        let exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?;
        // The batch processor queues spans and drops them when full, so a slow or absent
        // collector never blocks the span's owner.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource())
            .build();
        Ok(Self { provider })
    }

    /// A layer that turns nanofleet's spans into OpenTelemetry spans. Only nanofleet's
    /// own targets: the exporter's gRPC stack (h2, hyper, tonic) emits spans too, and
    /// exporting those would feed itself.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SERVICE_NAME))
            .with_filter(Targets::new().with_target("nanofleet", LevelFilter::TRACE))
    }

    /// Exports what is still queued; called once on the way out.
    pub fn shutdown(&self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(%error, "OTLP: the last spans could not be exported");
        }
    }
}

/// A reader that pushes the meter provider's metrics to the collector every
/// `OTEL_METRIC_EXPORT_INTERVAL` ms (60 s unless set). Must be called inside a Tokio
/// runtime, like [`OtlpTraces::new`].
pub fn metrics_reader(endpoint: &str) -> Result<PeriodicReader<MetricExporter>, OtlpError> {
    validate(endpoint)?;
    let exporter = MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    Ok(PeriodicReader::builder(exporter).build())
}

/// Logs a warning when nothing accepts connections at the endpoint. Export failures are
/// also logged by the SDK as they happen; this says so once, at startup.
pub async fn warn_if_unreachable(endpoint: String) {
    let Ok(uri) = validate(&endpoint) else { return };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(80);
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(EXPORT_TIMEOUT, connect).await {
        Ok(Ok(_)) => tracing::info!(%endpoint, "OTLP export on"),
        Ok(Err(error)) => {
            tracing::warn!(%endpoint, %error, "OTLP collector unreachable; telemetry export will keep retrying")
        }
        Err(_) => {
            tracing::warn!(%endpoint, "OTLP collector did not answer; telemetry export will keep retrying")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_be_plain_http_with_a_host() {
        assert!(validate("http://127.0.0.1:4317").is_ok());
        assert!(validate("http://collector:4317").is_ok());
        assert!(validate("https://collector:4317").is_err());
        assert!(validate("127.0.0.1:4317").is_err());
        assert!(validate("not a url").is_err());
    }
}
