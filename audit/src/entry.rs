//! One audit log entry: who did what to which subject when, its limits, and its canonical
//! bytes, which are the Merkle leaf data and so must never change for a stored entry.
//!
//! Canonical form (all integers big-endian, each text a `u32` byte length then UTF-8):
//! version byte `1`, `time_ms` as `i64`, actor tag (`0` coordinator, `1` node, `2`
//! operator) followed by the node id or operator name for the last two, then action,
//! subject, details. Length prefixes make the encoding unambiguous for any text, and the
//! decoder accepts exactly what the encoder writes, so bytes and entries map one to one.

use serde::{Deserialize, Serialize};

use crate::merkle::{leaf_hash, Hash};

/// Version byte of the canonical form; a new form gets a new byte, old leaves stay valid.
const ENCODING_VERSION: u8 = 1;

/// Longest node id or operator name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest action, in bytes (`node.revoke`, `artifact.publish`, ...).
pub const MAX_ACTION_LEN: usize = 64;
/// Longest subject (a node id, `name@version`, a rollout id), in bytes.
pub const MAX_SUBJECT_LEN: usize = 512;
/// Longest details text, in bytes: reasons and small JSON documents, not payloads.
pub const MAX_DETAILS_LEN: usize = 16 * 1024;

const TAG_COORDINATOR: u8 = 0;
const TAG_NODE: u8 = 1;
const TAG_OPERATOR: u8 = 2;

/// Who acted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Actor {
    /// A node, by the node id of its certificate.
    Node(String),
    /// An operator, by the name in their operator certificate.
    Operator(String),
    /// The coordinator itself (the rollout engine, the federation engine).
    Coordinator,
}

/// The text form of an actor, as logs and exports show it: `coordinator`, `node:<id>`,
/// `operator:<name>`.
impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Node(id) => write!(f, "node:{id}"),
            Actor::Operator(name) => write!(f, "operator:{name}"),
            Actor::Coordinator => f.write_str("coordinator"),
        }
    }
}

impl std::str::FromStr for Actor {
    type Err = EntryError;

    /// Parses the text form; the name is checked like an entry's.
    fn from_str(text: &str) -> Result<Self, EntryError> {
        let actor = if text == "coordinator" {
            Actor::Coordinator
        } else if let Some(id) = text.strip_prefix("node:") {
            check_name("node id", id)?;
            Actor::Node(id.to_owned())
        } else if let Some(name) = text.strip_prefix("operator:") {
            check_name("operator name", name)?;
            Actor::Operator(name.to_owned())
        } else {
            return Err(EntryError::UnknownActorText(
                text.chars().take(64).collect(),
            ));
        };
        Ok(actor)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("{field} is {len} bytes, at most {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("action {0:?} may only hold lowercase ASCII letters, digits, '.', '_' and '-'")]
    ActionCharacters(String),
    #[error("canonical entry bytes end early")]
    Truncated,
    #[error("canonical entry bytes have {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("unknown canonical entry version {0}")]
    UnknownVersion(u8),
    #[error("actor {0:?} is none of coordinator, node:<id>, operator:<name>")]
    UnknownActorText(String),
    #[error("unknown actor tag {0}")]
    UnknownActor(u8),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// One audit log entry. Fields are private so every entry that exists is within limits:
/// build one with [`AuditEntry::new`], [`AuditEntry::from_canonical_bytes`] or serde.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawEntry", into = "RawEntry")]
pub struct AuditEntry {
    time_ms: i64,
    actor: Actor,
    action: String,
    subject: String,
    details: String,
}

/// The serde shape of an entry, checked on the way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    time_ms: i64,
    actor: Actor,
    action: String,
    subject: String,
    details: String,
}

impl TryFrom<RawEntry> for AuditEntry {
    type Error = EntryError;
    fn try_from(raw: RawEntry) -> Result<Self, EntryError> {
        AuditEntry::new(raw.time_ms, raw.actor, raw.action, raw.subject, raw.details)
    }
}

impl From<AuditEntry> for RawEntry {
    fn from(e: AuditEntry) -> Self {
        RawEntry {
            time_ms: e.time_ms,
            actor: e.actor,
            action: e.action,
            subject: e.subject,
            details: e.details,
        }
    }
}

fn check_len(field: &'static str, text: &str, max: usize) -> Result<(), EntryError> {
    if text.len() > max {
        return Err(EntryError::TooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

fn check_name(field: &'static str, text: &str) -> Result<(), EntryError> {
    if text.is_empty() {
        return Err(EntryError::Empty { field });
    }
    check_len(field, text, MAX_NAME_LEN)
}

impl AuditEntry {
    /// An entry, refused when a text is over its limit, a name or the action is empty, or
    /// the action has characters other than `[a-z0-9._-]` (actions are matched by tools).
    pub fn new(
        time_ms: i64,
        actor: Actor,
        action: impl Into<String>,
        subject: impl Into<String>,
        details: impl Into<String>,
    ) -> Result<Self, EntryError> {
        let (action, subject, details) = (action.into(), subject.into(), details.into());
        match &actor {
            Actor::Node(id) => check_name("node id", id)?,
            Actor::Operator(name) => check_name("operator name", name)?,
            Actor::Coordinator => {}
        }
        if action.is_empty() {
            return Err(EntryError::Empty { field: "action" });
        }
        check_len("action", &action, MAX_ACTION_LEN)?;
        let allowed = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c);
        if !action.bytes().all(allowed) {
            return Err(EntryError::ActionCharacters(action));
        }
        check_len("subject", &subject, MAX_SUBJECT_LEN)?;
        check_len("details", &details, MAX_DETAILS_LEN)?;
        Ok(Self {
            time_ms,
            actor,
            action,
            subject,
            details,
        })
    }

    /// Milliseconds since the Unix epoch, as the coordinator's clock read them.
    pub fn time_ms(&self) -> i64 {
        self.time_ms
    }

    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    pub fn action(&self) -> &str {
        &self.action
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn details(&self) -> &str {
        &self.details
    }

    /// The canonical bytes: the Merkle leaf data of this entry.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(32 + self.action.len() + self.subject.len() + self.details.len());
        out.push(ENCODING_VERSION);
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        match &self.actor {
            Actor::Coordinator => out.push(TAG_COORDINATOR),
            Actor::Node(id) => {
                out.push(TAG_NODE);
                put_text(&mut out, id);
            }
            Actor::Operator(name) => {
                out.push(TAG_OPERATOR);
                put_text(&mut out, name);
            }
        }
        put_text(&mut out, &self.action);
        put_text(&mut out, &self.subject);
        put_text(&mut out, &self.details);
        out
    }

    /// The RFC 6962 leaf hash of [`Self::canonical_bytes`].
    pub fn leaf_hash(&self) -> Hash {
        leaf_hash(&self.canonical_bytes())
    }

    /// Decodes canonical bytes, with the same limits as [`AuditEntry::new`]; refuses
    /// anything the encoder would not have written, trailing bytes included.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self, EntryError> {
        let mut r = Reader(bytes);
        let version = r.byte()?;
        if version != ENCODING_VERSION {
            return Err(EntryError::UnknownVersion(version));
        }
        let time_ms = i64::from_be_bytes(r.array()?);
        let actor = match r.byte()? {
            TAG_COORDINATOR => Actor::Coordinator,
            TAG_NODE => Actor::Node(r.text("node id", MAX_NAME_LEN)?),
            TAG_OPERATOR => Actor::Operator(r.text("operator name", MAX_NAME_LEN)?),
            tag => return Err(EntryError::UnknownActor(tag)),
        };
        let action = r.text("action", MAX_ACTION_LEN)?;
        let subject = r.text("subject", MAX_SUBJECT_LEN)?;
        let details = r.text("details", MAX_DETAILS_LEN)?;
        if !r.0.is_empty() {
            return Err(EntryError::TrailingBytes(r.0.len()));
        }
        Self::new(time_ms, actor, action, subject, details)
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    // Every text is within its limit (checked at construction), far below u32::MAX.
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A cursor over canonical bytes that never reads past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], EntryError> {
        if self.0.len() < n {
            return Err(EntryError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, EntryError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EntryError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A length-prefixed text, its length checked before anything is copied.
    fn text(&mut self, field: &'static str, max: usize) -> Result<String, EntryError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        if len > max {
            return Err(EntryError::TooLong { field, len, max });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| EntryError::NotUtf8(field))
    }
}
