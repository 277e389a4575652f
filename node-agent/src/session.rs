//! The agent's session with the coordinator: it opens the command stream, heartbeats
//! with fresh device facts, and reconnects with jittered backoff after any drop, so the
//! agent keeps running while the coordinator is away. Only a refusal of the device's
//! identity (revoked, replaced, unknown) ends it.

use std::collections::BTreeMap;
use std::time::Duration;

use nanofleet_proto::v1::{
    command, node_service_client::NodeServiceClient, HeartbeatRequest, SubscribeRequest,
};
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
    pub reconnect_max: Duration,
}

/// Runs until the device is refused; returns that refusal.
pub async fn run(identity: Identity, options: SessionOptions) -> SessionError {
    let mut backoff = Backoff::new(Duration::from_millis(250), options.reconnect_max);
    let mut sequence = 0u64;
    loop {
        let span = tracing::info_span!("session", node = %identity.node_id);
        let result = connect_once(&identity, &options, &mut sequence, &mut backoff)
            .instrument(span)
            .await;
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
    sequence: &mut u64,
    backoff: &mut Backoff,
) -> SessionError {
    let channel =
        match nanofleet_transport::connect(&identity.coordinator, &identity.client_tls()).await {
            Ok(channel) => channel,
            Err(e) => return SessionError::Transient(error_chain(&e)),
        };
    let mut client = NodeServiceClient::new(channel)
        .max_decoding_message_size(nanofleet_transport::MAX_MESSAGE_BYTES);
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
    backoff.reset();

    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                *sequence += 1;
                let request = HeartbeatRequest {
                    facts: Some(crate::facts::collect(&options.labels)),
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
                Ok(Some(command)) => tracing::debug!(?command, "command received"),
                Ok(None) => return SessionError::Transient("command stream ended".into()),
                Err(status) => return classify(status),
            },
        }
    }
}
