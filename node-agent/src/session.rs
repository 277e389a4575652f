//! The agent's session with the coordinator: it opens the command stream, heartbeats
//! with fresh device facts, and reconnects with jittered backoff after any drop, so the
//! agent keeps running while the coordinator is away. Only a refusal of the device's
//! identity (revoked, replaced, unknown) ends it.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use nanofleet_proto::v1::{
    command, node_service_client::NodeServiceClient, ArtifactReport, ArtifactState, AssignArtifact,
    Command, HeartbeatRequest, SubscribeRequest,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::artifacts::{ApplyError, ArtifactManager};
use crate::training::{training_worker, TrainingContext, TrainingJob};
use nanofleet_transport::error_chain;
use tonic::Code;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator no longer accepts this device; retrying cannot help.
    #[error("the coordinator refused this device: {0}")]
    Refused(String),
    /// Anything else: the connection dropped, the coordinator is down, a timeout.
    #[error("{0}")]
    Transient(String),
}

fn classify(status: tonic::Status) -> SessionError {
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated | Code::NotFound => {
            SessionError::Refused(status.message().to_owned())
        }
        _ => SessionError::Transient(format!("{:?}: {}", status.code(), error_chain(&status))),
    }
}

pub struct SessionOptions {
    pub labels: BTreeMap<String, String>,
    /// Where this agent runs models, reported in its facts; empty when it serves none.
    pub inference_device: String,
    pub reconnect_max: Duration,
    pub artifacts: Arc<ArtifactManager>,
    /// Local training data and trainer settings; `None`: the node declines every round.
    pub training: Option<Arc<TrainingContext>>,
    /// The telemetry queue this session sends from; `None`: telemetry is off.
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

/// Where the session hands its commands: artifact assignments and round work.
struct Workers {
    artifacts: mpsc::Sender<ArtifactJob>,
    rounds: mpsc::Sender<TrainingJob>,
}

/// How long a session must last before the reconnect delays start over.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// An assignment and the connection to fetch it over.
pub type ArtifactJob = (AssignArtifact, NodeServiceClient<Channel>);

/// Applies assignments one at a time and reports the outcome. An interrupted download
/// is retried a few times; after that, the next reconnect brings the assignment again.
/// The agent runs one per session; the fleet simulator one per simulated agent.
pub async fn artifact_worker(
    artifacts: Arc<ArtifactManager>,
    mut jobs: mpsc::Receiver<ArtifactJob>,
) {
    // What was active at the last run serves before the coordinator is reached.
    artifacts.serve_active().await;
    while let Some((assign, mut client)) = jobs.recv().await {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = artifacts.apply(&mut client, &assign).await;
            let report = match result {
                Ok(Some(report)) => report,
                Ok(None) => break,
                Err(ApplyError::Interrupted(reason)) if attempt < 5 => {
                    tracing::warn!(%reason, attempt, "download interrupted; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, name = %assign.name, "artifact refused");
                    ArtifactReport {
                        rollout_id: assign.rollout_id.clone(),
                        name: assign.name.clone(),
                        version: version_of(&assign),
                        state: ArtifactState::Failed as i32,
                        reason: error.to_string(),
                        ..Default::default()
                    }
                }
            };
            if let Err(status) = client.report_artifact(report).await {
                tracing::warn!(status = %status.message(), "could not report the artifact's state");
            }
            break;
        }
    }
}

/// The version an assignment names, read without trusting it (for failure reports).
fn version_of(assign: &AssignArtifact) -> String {
    nanofleet_artifact::signing::SignedManifest::from_json(&assign.signed_manifest)
        .map(|s| s.manifest.version)
        .unwrap_or_default()
}

/// Runs until the device is refused; returns that refusal.
pub async fn run(identity: Identity, options: SessionOptions) -> SessionError {
    let mut backoff = Backoff::new(Duration::from_millis(250), options.reconnect_max);
    let (artifact_jobs, queue) = mpsc::channel(16);
    tokio::spawn(
        artifact_worker(options.artifacts.clone(), queue)
            .instrument(tracing::info_span!("artifacts", node = %identity.node_id)),
    );
    let (round_jobs, mut round_queue) = mpsc::channel::<TrainingJob>(4);
    match options.training.clone() {
        Some(training) => {
            tokio::spawn(
                training_worker(training, round_queue)
                    .instrument(tracing::info_span!("training", node = %identity.node_id)),
            );
        }
        // Without local data every round is declined at once, so it need not wait for us.
        None => {
            tokio::spawn(async move {
                while let Some((round, mut client)) = round_queue.recv().await {
                    let update = nanofleet_proto::v1::RoundUpdate {
                        round_id: round.round_id,
                        declined_reason: "this node has no training_data configured".into(),
                        ..Default::default()
                    };
                    let _ = client.submit_update(update).await;
                }
            });
        }
    }
    let jobs = Workers {
        artifacts: artifact_jobs,
        rounds: round_jobs,
    };
    let mut sequence = 0u64;
    loop {
        let span = tracing::info_span!("session", node = %identity.node_id);
        let started = tokio::time::Instant::now();
        let result = connect_once(&identity, &options, &jobs, &mut sequence)
            .instrument(span)
            .await;
        // Only a session that lasted starts the delays over: one that connects and fails at
        // once (a command it cannot take, say) must not turn into a reconnect storm.
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        match result {
            SessionError::Refused(reason) => return SessionError::Refused(reason),
            SessionError::Transient(reason) => {
                let delay = backoff.next_delay();
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "coordinator unreachable");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One connection: returns when it ends, with why.
async fn connect_once(
    identity: &Identity,
    options: &SessionOptions,
    jobs: &Workers,
    sequence: &mut u64,
) -> SessionError {
    let channel =
        match nanofleet_transport::connect(&identity.coordinator, &identity.client_tls()).await {
            Ok(channel) => channel,
            Err(e) => return SessionError::Transient(error_chain(&e)),
        };
    let mut client = NodeServiceClient::new(channel)
        .max_decoding_message_size(nanofleet_transport::MAX_COMMAND_BYTES);
    let mut stream = match client.subscribe(SubscribeRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => return classify(status),
    };
    let mut interval = Duration::from_secs(10);
    match stream.message().await {
        Ok(Some(command)) => {
            if let Some(command::Body::Welcome(welcome)) = command.body {
                interval = Duration::from_secs(u64::from(welcome.heartbeat_interval_secs.max(1)));
            }
        }
        Ok(None) => return SessionError::Transient("command stream closed at once".into()),
        Err(status) => return classify(status),
    }
    tracing::info!(
        heartbeat_secs = interval.as_secs(),
        "connected to the coordinator"
    );
    // Sends queued telemetry beside the heartbeats; stops when this connection ends.
    let _telemetry = options
        .telemetry
        .clone()
        .map(|telemetry| crate::telemetry::start_sender(telemetry, client.clone()));

    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                *sequence += 1;
                let mut facts = crate::facts::collect(&options.labels);
                facts.training_examples = options
                    .training
                    .as_ref()
                    .map_or(0, |t| t.data.len() as u64);
                facts.inference_device.clone_from(&options.inference_device);
                let request = HeartbeatRequest {
                    facts: Some(facts),
                    sequence: *sequence,
                };
                match client.heartbeat(request).await {
                    Ok(response) => {
                        let wanted = response.into_inner().heartbeat_interval_secs.max(1);
                        let wanted = Duration::from_secs(u64::from(wanted));
                        if wanted != interval {
                            interval = wanted;
                            ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                        }
                    }
                    Err(status) => return classify(status),
                }
            }
            message = stream.message() => match message {
                Ok(Some(Command { body: Some(command::Body::Assign(assign)) })) => {
                    tracing::info!(name = %assign.name, rollout = %assign.rollout_id, "assignment received");
                    if jobs.artifacts.send((assign, client.clone())).await.is_err() {
                        return SessionError::Transient("artifact worker stopped".into());
                    }
                }
                Ok(Some(Command { body: Some(command::Body::Secagg(step)) })) => {
                    match &options.training {
                        Some(training) => {
                            tokio::spawn(crate::training::secure_step(training.clone(), step, client.clone()));
                        }
                        None => tracing::warn!("a secure-aggregation step for a node without training data"),
                    }
                }
                Ok(Some(Command { body: Some(command::Body::Train(round)) })) => {
                    tracing::info!(federation = %round.federation, round = round.round, "round work received");
                    if jobs.rounds.try_send((round, client.clone())).is_err() {
                        tracing::warn!("the trainer is busy with earlier rounds; this one comes again on reconnect");
                    }
                }
                Ok(Some(command)) => tracing::debug!(?command, "command received"),
                Ok(None) => return SessionError::Transient("command stream ended".into()),
                Err(status) => return classify(status),
            },
        }
    }
}
