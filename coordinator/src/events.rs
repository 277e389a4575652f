//! The coordinator's record of security-relevant facts (publishes, refusals and their
//! reasons), appended in order and kept in the store. The tamper-evident audit log will
//! be built over these entries.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::now_unix_ms;
use crate::store::{decode, encode, Keyspace, KvStore, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: i64,
    /// "operator:<name>", "node:<id>" or "coordinator".
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub reason: String,
}

/// Append-only event log; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    store: Arc<dyn KvStore>,
    /// Next sequence number; the lock also orders concurrent appends.
    next: Arc<Mutex<u64>>,
}

impl EventLog {
    pub fn open(store: Arc<dyn KvStore>) -> Result<Self, StoreError> {
        let next = store
            .scan(Keyspace::Events)?
            .last()
            .and_then(|(key, _)| key.as_slice().try_into().ok())
            .map(|bytes: [u8; 8]| u64::from_be_bytes(bytes) + 1)
            .unwrap_or(0);
        Ok(Self {
            store,
            next: Arc::new(Mutex::new(next)),
        })
    }

    /// Appends and flushes: an acknowledged event survives a crash.
    pub fn append(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let event = Event {
            time_ms: now_unix_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            reason: reason.to_owned(),
        };
        let mut next = self.next.lock().expect("event lock");
        let value = encode(&event);
        self.store
            .put(Keyspace::Events, &next.to_be_bytes(), &value)?;
        self.store.flush()?;
        *next += 1;
        Ok(())
    }

    /// Events whose action starts with `action_prefix`, oldest first.
    pub fn list(&self, action_prefix: &str) -> Result<Vec<Event>, StoreError> {
        let mut events = Vec::new();
        for (key, value) in self.store.scan(Keyspace::Events)? {
            let event: Event = decode(Keyspace::Events, &key, &value)?;
            if event.action.starts_with(action_prefix) {
                events.push(event);
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn appends_in_order_and_continues_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EventLog::open(Arc::new(SledStore::open(dir.path()).unwrap())).unwrap();
            log.append("operator:admin", "artifact.publish", "m@1", "")
                .unwrap();
            log.append("operator:admin", "artifact.refused", "m@2", "bad signature")
                .unwrap();
        }
        let log = EventLog::open(Arc::new(SledStore::open(dir.path()).unwrap())).unwrap();
        log.append("coordinator", "artifact.refused", "m@3", "truncated")
            .unwrap();
        let refused = log.list("artifact.refused").unwrap();
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0].subject, "m@2");
        assert_eq!(refused[1].subject, "m@3");
        assert_eq!(log.list("").unwrap().len(), 3);
    }
}
