//! Operator accounts of the dashboard (argon2id password hashes in a 0600 file in the data
//! directory, edited on the coordinator's host only), login sessions (random 256-bit
//! tokens kept in memory), and the per-name limit on failed logins.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The accounts file inside the data directory.
pub const USERS_FILE: &str = "dashboard-users.json";
/// Shortest password `dashboard-user add` accepts.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password checked; argon2 hashes anything, this bounds the request.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Failed logins per name within [`FAILURE_WINDOW`] before the name is locked for the
/// rest of the window.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("user name {0:?} must be 1-64 characters of [a-z0-9._-]")]
    BadName(String),
    #[error("the password must have at least {MIN_PASSWORD_CHARS} characters and at most {MAX_PASSWORD_BYTES} bytes")]
    BadPassword,
    #[error("no dashboard user {0:?}")]
    NoSuchUser(String),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid accounts file: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// One operator account: the PHC string of an argon2id hash, never the password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Account {
    pub password_hash: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AccountsFile {
    users: BTreeMap<String, Account>,
}

/// The accounts file of one data directory. Read at each login, so users added with
/// `nanofleet-coordinator dashboard-user add` can log in without a restart.
#[derive(Debug, Clone)]
pub struct Accounts {
    path: PathBuf,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

impl Accounts {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(USERS_FILE),
        }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> AccountError + '_ {
        |source| AccountError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn read(&self) -> Result<AccountsFile, AccountError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| AccountError::Parse {
                path: self.path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AccountsFile::default()),
            Err(e) => Err(self.io()(e)),
        }
    }

    fn write(&self, file: &AccountsFile) -> Result<(), AccountError> {
        let json = serde_json::to_vec_pretty(file).expect("accounts serialize");
        let tmp = self.path.with_extension("json.tmp");
        nanofleet_transport::write_private_file(&tmp, &json).map_err(self.io())?;
        std::fs::rename(&tmp, &self.path).map_err(self.io())
    }

    /// Adds or replaces `name` with an argon2id hash of `password`.
    pub fn set(&self, name: &str, password: &str) -> Result<(), AccountError> {
        if !valid_name(name) {
            return Err(AccountError::BadName(name.to_owned()));
        }
        if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
            return Err(AccountError::BadPassword);
        }
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .map_err(|e| AccountError::Hash(e.to_string()))?;
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| AccountError::Hash(e.to_string()))?
            .to_string();
        let mut file = self.read()?;
        file.users.insert(
            name.to_owned(),
            Account {
                password_hash: hash,
                created_at_ms: crate::now_unix_ms(),
            },
        );
        self.write(&file)
    }

    pub fn remove(&self, name: &str) -> Result<(), AccountError> {
        let mut file = self.read()?;
        if file.users.remove(name).is_none() {
            return Err(AccountError::NoSuchUser(name.to_owned()));
        }
        self.write(&file)
    }

    /// Whether `name` still has an account; a removed user's sessions stop working.
    pub fn exists(&self, name: &str) -> Result<bool, AccountError> {
        Ok(self.read()?.users.contains_key(name))
    }

    pub fn list(&self) -> Result<Vec<(String, Account)>, AccountError> {
        Ok(self.read()?.users.into_iter().collect())
    }

    /// Whether `password` is `name`'s. Slow on purpose (argon2id); an unknown name costs
    /// the same as a known one, so timing does not tell which names exist.
    pub fn verify(&self, name: &str, password: &str) -> Result<bool, AccountError> {
        let file = self.read()?;
        let known = file.users.get(name);
        let stored = known.map(|a| a.password_hash.clone()).unwrap_or_else(|| {
            // A hash of nothing anyone knows, made on the spot: same work, never a match.
            let salt = SaltString::encode_b64(&[0u8; 16]).expect("fixed salt encodes");
            Argon2::default()
                .hash_password(&rand::random::<[u8; 32]>(), &salt)
                .map(|h| h.to_string())
                .unwrap_or_default()
        });
        let parsed = PasswordHash::new(&stored).map_err(|e| AccountError::Hash(e.to_string()))?;
        let matches = password.len() <= MAX_PASSWORD_BYTES
            && Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok();
        Ok(known.is_some() && matches)
    }
}

/// A logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    expires: Instant,
}

/// Login sessions and failed-login counts; in memory, so a restart logs everyone out.
#[derive(Default)]
pub struct Sessions {
    /// By SHA-256 of the token: the map is never searched with the secret itself.
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Sessions {
    /// Starts a session for `user`; returns the token for the cookie (256 random bits).
    pub fn create(&self, user: &str) -> String {
        use base64::Engine;
        let token =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            token_key(&token),
            Session {
                user: user.to_owned(),
                expires: now + SESSION_TTL,
            },
        );
        token
    }

    pub fn get(&self, token: &str) -> Option<Session> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .get(&token_key(token))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    pub fn end(&self, token: &str) {
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(&token_key(token));
    }

    /// Seconds until `name` may try again, if too many logins failed lately.
    pub fn locked_for(&self, name: &str) -> Option<u64> {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("failures lock");
        let list = failures.get_mut(name)?;
        list.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
        if list.len() < MAX_FAILURES {
            return None;
        }
        let oldest = list.first().copied()?;
        Some((FAILURE_WINDOW - now.duration_since(oldest)).as_secs() + 1)
    }

    pub fn record_failure(&self, name: &str) {
        let mut failures = self.failures.lock().expect("failures lock");
        // Bounds memory under a spray of made-up names: forget everything at a limit.
        if failures.len() > 10_000 {
            failures.clear();
        }
        failures
            .entry(name.to_owned())
            .or_default()
            .push(Instant::now());
    }

    pub fn clear_failures(&self, name: &str) {
        self.failures.lock().expect("failures lock").remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn passwords_are_hashed_in_a_private_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::new(dir.path());
        assert!(matches!(
            accounts.set("alice", "short"),
            Err(AccountError::BadPassword)
        ));
        assert!(matches!(
            accounts.set("Alice!", "long enough password"),
            Err(AccountError::BadName(_))
        ));
        accounts.set("alice", "long enough password").unwrap();
        let text = std::fs::read_to_string(dir.path().join(USERS_FILE)).unwrap();
        assert!(text.contains("$argon2id$"), "{text}");
        assert!(!text.contains("long enough password"));
        let mode = std::fs::metadata(dir.path().join(USERS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(accounts.verify("alice", "long enough password").unwrap());
        assert!(!accounts.verify("alice", "long enough passwort").unwrap());
        assert!(!accounts.verify("bob", "long enough password").unwrap());
        accounts.remove("alice").unwrap();
        assert!(!accounts.verify("alice", "long enough password").unwrap());
    }

    #[test]
    fn sessions_end_and_failures_lock_a_name() {
        let sessions = Sessions::default();
        let token = sessions.create("alice");
        assert_eq!(sessions.get(&token).unwrap().user, "alice");
        assert!(sessions.get("forged").is_none());
        sessions.end(&token);
        assert!(sessions.get(&token).is_none());
        for _ in 0..MAX_FAILURES {
            assert!(sessions.locked_for("alice").is_none());
            sessions.record_failure("alice");
        }
        assert!(sessions.locked_for("alice").is_some());
        assert!(sessions.locked_for("bob").is_none());
        sessions.clear_failures("alice");
        assert!(sessions.locked_for("alice").is_none());
    }
}
