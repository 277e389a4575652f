//! Wires the coordinator together: loads the CA and the store, builds the gRPC server
//! (TLS with optional client certificates, message limits, a span per RPC, health and
//! reflection) and the HTTP side, and runs both until SIGTERM or Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use nanofleet_proto::v1::{
    enrollment_server::EnrollmentServer, node_service_server::NodeServiceServer,
    operator_service_server::OperatorServiceServer, FILE_DESCRIPTOR_SET,
};
use tokio::sync::{watch, Notify};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::{deliver, dispatch_rounds, EnrollmentApi, NodeApi, OperatorApi};
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::audit_log::AuditLog;
use crate::config::CoordinatorConfig;
use crate::federations::{FederationError, Federations};
use crate::pki::{Pki, PkiError};
use crate::registry::Registry;
use crate::rollouts::Rollouts;
use crate::sessions::SessionHub;
use crate::store::{KvStore, SledStore, StoreError};
use crate::telemetry::{Telemetry, TelemetryError};
use tracing::Instrument;

/// Shortest time between two steps of an engine.
const MIN_STEP_GAP: Duration = Duration::from_millis(20);

/// An engine pauses at least this many times as long as its last step took, so that it
/// uses at most a fifth of one core however large the fleet: a step reads the state of
/// every node in a wave or round, and back-to-back steps during a 10,000-node wave would
/// take CPU from the calls of the nodes themselves (heartbeats among them).
const STEP_PAUSE_FACTOR: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot open the state database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error("cannot open the artifact store: {0}")]
    Artifacts(#[from] ArtifactError),
    #[error("cannot open the federation store: {0}")]
    Federations(#[from] FederationError),
    #[error(transparent)]
    Key(#[from] crate::signing_keys::KeyError),
    #[error("cannot open the audit log: {0}")]
    Audit(#[from] crate::audit_log::AuditError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Dashboard(#[from] crate::dashboard::DashboardError),
    #[error("reflection service could not be built: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Path of the sled database inside the data directory.
pub fn state_path(config: &CoordinatorConfig) -> std::path::PathBuf {
    config.data_dir.join("state")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// Runs `step` (blocking work: one step of an engine, delivering what it decided) twice
/// a second and soon after `wake`, until shutdown.
async fn run_engine(
    step: impl Fn() + Clone + Send + 'static,
    wake: Arc<Notify>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticker.tick() => {}
            _ = wake.notified() => {}
        }
        let started = tokio::time::Instant::now();
        if let Err(error) = tokio::task::spawn_blocking(step.clone()).await {
            tracing::error!(%error, "engine step panicked");
        }
        // Reports come in bursts; a wake while stepping is kept for after this pause,
        // so a large fleet costs at most one step per pause, not one per report.
        tokio::time::sleep(MIN_STEP_GAP.max(started.elapsed() * STEP_PAUSE_FACTOR)).await;
    }
}

/// Runs the coordinator until a shutdown signal arrives.
pub async fn run(config: CoordinatorConfig) -> Result<(), ServerError> {
    nanofleet_transport::raise_open_file_limit();
    let pki = Arc::new(Pki::load(&config.data_dir)?);
    let store = Arc::new(SledStore::open(&state_path(&config))?);
    let registry = Registry::new(store.clone());
    let artifacts = ArtifactStore::open(store.clone(), &config.data_dir)?;
    let events = AuditLog::open(store.clone(), &config.data_dir)?;
    // Each start records the configuration it runs with, so a change shows as the
    // difference between two starts (the options hold no secrets).
    events.append(
        "coordinator",
        "coordinator.start",
        "configuration",
        &serde_json::to_string(&config).unwrap_or_default(),
    )?;
    if let Some(text) = artifacts.trust_policy_text() {
        events.record_if_changed("trust.policy", crate::artifacts::TRUST_POLICY_FILE, &text)?;
    }
    let federations = Federations::open(
        store.clone(),
        registry.clone(),
        artifacts.clone(),
        events.clone(),
        &config.data_dir,
        config.max_update_bytes,
    )?;
    let rollouts = Rollouts::new(
        store.clone(),
        registry.clone(),
        artifacts.clone(),
        events.clone(),
        Duration::from_secs(u64::from(config.rollout_wave_timeout_secs)),
        config.heartbeat_interval_secs,
    );
    let adapter_key = Arc::new(crate::adapters::load_or_create_key(&config.data_dir)?);
    let sessions = Arc::new(SessionHub::default());
    let telemetry = Arc::new(Telemetry::new(
        registry.clone(),
        sessions.clone(),
        config.heartbeat_interval_secs,
        config.otlp_endpoint.as_deref(),
    )?);
    if let Some(endpoint) = &config.otlp_endpoint {
        tokio::spawn(crate::otlp::warn_if_unreachable(endpoint.clone()));
    }
    let fleet_telemetry = crate::fleet_telemetry::FleetTelemetry::new(store.clone());
    let _fleet_metrics = crate::fleet_telemetry::register_metrics(
        &telemetry.meter(),
        fleet_telemetry.clone(),
        registry.clone(),
        artifacts.clone(),
    );

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.grpc_listen,
            source,
        })?;
    let http_listener = crate::http::bind(config.http_listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.http_listen,
            source,
        })?;

    let dashboard_listener = match config.dashboard_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?,
        ),
        None => None,
    };

    let (cert_pem, key_pem) = pki.server_identity();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(pki.ca_pem()))
        // Enrollment has no certificate yet; every other service checks for one itself.
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<EnrollmentServer<EnrollmentApi>>()
        .await;
    health_reporter
        .set_serving::<NodeServiceServer<NodeApi>>()
        .await;
    health_reporter
        .set_serving::<OperatorServiceServer<OperatorApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let limit = config.max_message_bytes;
    let interval = config.heartbeat_interval_secs;
    let engine_wake = Arc::new(Notify::new());
    let federation_wake = Arc::new(Notify::new());
    let enrollment = EnrollmentServer::new(EnrollmentApi {
        registry: registry.clone(),
        pki: pki.clone(),
        heartbeat_interval_secs: interval,
        metrics: telemetry.metrics.clone(),
        events: events.clone(),
    })
    .max_decoding_message_size(limit);
    let node = NodeServiceServer::new(NodeApi {
        registry: registry.clone(),
        sessions: sessions.clone(),
        artifacts: artifacts.clone(),
        rollouts: rollouts.clone(),
        events: events.clone(),
        heartbeat_interval_secs: interval,
        download_bytes_per_sec: config.download_bytes_per_sec,
        metrics: telemetry.metrics.clone(),
        rollout_engine: engine_wake.clone(),
        federations: federations.clone(),
        federation_engine: federation_wake.clone(),
        telemetry: fleet_telemetry.clone(),
    })
    .max_decoding_message_size(limit.max(config.max_update_bytes));
    let dashboard = crate::dashboard::Dashboard {
        registry: registry.clone(),
        rollouts: rollouts.clone(),
        federations: federations.clone(),
        artifacts: artifacts.clone(),
        audit: events.clone(),
        accounts: crate::dashboard::auth::Accounts::new(&config.data_dir),
        sessions: Default::default(),
        heartbeat_interval_secs: interval,
    };
    let operator = OperatorServiceServer::new(OperatorApi {
        registry,
        pki: pki.clone(),
        sessions: sessions.clone(),
        artifacts: artifacts.clone(),
        events,
        rollouts: rollouts.clone(),
        federations: federations.clone(),
        adapter_key,
        federation_engine: federation_wake.clone(),
        heartbeat_interval_secs: interval,
        max_token_ttl_secs: config.max_token_ttl_secs,
        telemetry: fleet_telemetry,
    })
    .max_decoding_message_size(limit);

    let sessions_for_engine = sessions;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    tracing::info!(
        grpc = %config.grpc_listen,
        http = %config.http_listen,
        ca_sha256 = %pki.ca_sha256(),
        data_dir = %config.data_dir.display(),
        "coordinator listening"
    );

    let capture = crate::capture::CaptureLayer::new(
        config.wire_capture_dir.clone(),
        limit.max(config.max_update_bytes),
    )
    .map_err(ServerError::Http)?;
    let grpc = Server::builder()
        .layer(capture)
        .tls_config(tls)?
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .trace_fn(|request| {
            tracing::info_span!(
                "rpc",
                method = %request.uri().path(),
                principal = tracing::field::Empty
            )
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(enrollment)
        .add_service(node)
        .add_service(operator)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(grpc_listener),
            stopped(stop_rx.clone()),
        );
    let http = crate::http::serve(http_listener, telemetry.clone(), stopped(stop_rx.clone()));
    if let Some(listener) = dashboard_listener {
        let tls = crate::dashboard::tls_config(&pki)?;
        tracing::info!(dashboard = %listener.local_addr().map_err(ServerError::Http)?, "dashboard listening");
        let serving =
            crate::dashboard::serve(listener, tls, Arc::new(dashboard), stopped(stop_rx.clone()));
        tokio::spawn(async move {
            if let Err(error) = serving.await {
                tracing::error!(%error, "dashboard server failed");
            }
        });
    }

    let rollout_step = {
        let sessions = sessions_for_engine.clone();
        move || match rollouts.tick() {
            Ok(assignments) => deliver(&artifacts, &sessions, assignments),
            Err(error) => tracing::error!(%error, "rollout step failed"),
        }
    };
    tokio::spawn(
        run_engine(rollout_step, engine_wake, stopped(stop_rx.clone()))
            .instrument(tracing::info_span!("rollout_engine")),
    );
    let federation_step = move || {
        let sessions = &sessions_for_engine;
        match federations.tick(&|node| sessions.is_connected(node)) {
            Ok(dispatches) => dispatch_rounds(sessions, dispatches),
            Err(error) => tracing::error!(%error, "federation step failed"),
        }
    };
    tokio::spawn(
        run_engine(federation_step, federation_wake, stopped(stop_rx))
            .instrument(tracing::info_span!("federation_engine")),
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let result = tokio::try_join!(async { grpc.await.map_err(ServerError::Grpc) }, async {
        http.await.map_err(ServerError::Http)
    },);
    store.flush()?;
    telemetry.shutdown();
    result?;
    Ok(())
}
