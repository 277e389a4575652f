//! Open command streams, one or more per connected node: the coordinator's only way to
//! reach agents behind NAT. Revocation closes a node's streams here.

use std::collections::HashMap;
use std::sync::Mutex;

use nanofleet_proto::v1::Command;
use tokio::sync::mpsc;
use tonic::Status;

pub type CommandSender = mpsc::Sender<Result<Command, Status>>;

#[derive(Default)]
pub struct SessionHub {
    streams: Mutex<HashMap<String, Vec<CommandSender>>>,
}

impl SessionHub {
    pub fn register(&self, node_id: &str, sender: CommandSender) {
        let mut streams = self.streams.lock().expect("session lock");
        let entry = streams.entry(node_id.to_owned()).or_default();
        entry.retain(|s| !s.is_closed());
        entry.push(sender);
    }

    /// Ends every open stream of `node_id` with `status`.
    pub fn close(&self, node_id: &str, status: Status) {
        let senders = self
            .streams
            .lock()
            .expect("session lock")
            .remove(node_id)
            .unwrap_or_default();
        for sender in senders {
            // A full or closed stream ends anyway once its sender is dropped here.
            let _ = sender.try_send(Err(status.clone()));
        }
    }

    /// Sends `command` on every open stream of `node_id`; false when none is open (the
    /// node gets its desired state when it reconnects).
    pub fn send(&self, node_id: &str, command: Command) -> bool {
        let streams = self.streams.lock().expect("session lock");
        let mut delivered = false;
        for sender in streams.get(node_id).into_iter().flatten() {
            delivered |= sender.try_send(Ok(command.clone())).is_ok();
        }
        delivered
    }

    /// Whether `node_id` has an open stream now.
    pub fn is_connected(&self, node_id: &str) -> bool {
        let streams = self.streams.lock().expect("session lock");
        streams
            .get(node_id)
            .is_some_and(|senders| senders.iter().any(|s| !s.is_closed()))
    }

    /// Number of nodes with at least one open stream.
    pub fn connected(&self) -> usize {
        let mut streams = self.streams.lock().expect("session lock");
        streams.retain(|_, senders| {
            senders.retain(|s| !s.is_closed());
            !senders.is_empty()
        });
        streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_ends_the_stream_with_the_status() {
        let hub = SessionHub::default();
        let (tx, mut rx) = mpsc::channel(4);
        hub.register("n1", tx);
        assert_eq!(hub.connected(), 1);
        hub.close("n1", Status::permission_denied("revoked"));
        let first = rx.recv().await.unwrap();
        assert_eq!(first.unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(rx.recv().await.is_none(), "stream ends after the status");
        assert_eq!(hub.connected(), 0);
    }
}
