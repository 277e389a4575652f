//! The device's identity on disk: its private key (generated here, never sent, 0600),
//! the certificate the coordinator issued, the pinned fleet CA and the node id.

use std::path::{Path, PathBuf};

use nanofleet_transport::ClientTls;
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const CA_FILE: &str = "ca.crt";
const META_FILE: &str = "identity.json";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this device is not enrolled (no identity in {0}); run `nanofleet-agent enroll --coordinator URL --token T --ca-cert FILE`")]
    NotEnrolled(String),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("identity metadata in {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Meta {
    node_id: String,
    coordinator: String,
}

/// An enrolled device.
#[derive(Clone)]
pub struct Identity {
    pub node_id: String,
    pub coordinator: String,
    pub cert_pem: String,
    key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    // The private key never goes to logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Identity {
    pub fn new(
        node_id: String,
        coordinator: String,
        cert_pem: String,
        key_pem: String,
        ca_pem: String,
    ) -> Self {
        Self {
            node_id,
            coordinator,
            cert_pem,
            key_pem,
            ca_pem,
        }
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join(META_FILE).exists()
    }

    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.exists() {
            return Err(IdentityError::NotEnrolled(dir.display().to_string()));
        }
        let read = |name: &str| -> Result<String, IdentityError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io_error(&path))
        };
        let meta: Meta =
            serde_json::from_str(&read(META_FILE)?).map_err(|e| IdentityError::Corrupt {
                path: meta_path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            node_id: meta.node_id,
            coordinator: meta.coordinator,
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
            ca_pem: read(CA_FILE)?,
        })
    }

    /// Writes the identity; the metadata file goes last, so that a crash midway leaves
    /// the device "not enrolled" rather than half enrolled.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, IdentityError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error(dir))?;
        let key_path = dir.join(KEY_FILE);
        nanofleet_transport::write_private_file(&key_path, self.key_pem.as_bytes())
            .map_err(io_error(&key_path))?;
        for (name, contents) in [(CERT_FILE, &self.cert_pem), (CA_FILE, &self.ca_pem)] {
            let path = dir.join(name);
            std::fs::write(&path, contents).map_err(io_error(&path))?;
        }
        let meta = serde_json::to_string_pretty(&Meta {
            node_id: self.node_id.clone(),
            coordinator: self.coordinator.clone(),
        })
        .expect("metadata serializes");
        let meta_path = dir.join(META_FILE);
        std::fs::write(&meta_path, meta).map_err(io_error(&meta_path))?;
        Ok(dir.to_path_buf())
    }

    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca_pem: self.ca_pem.clone().into_bytes(),
            identity: Some((
                self.cert_pem.clone().into_bytes(),
                self.key_pem.clone().into_bytes(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn save_load_round_trip_with_private_key_0600() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::new(
            "n1".into(),
            "https://c:1".into(),
            "CERT".into(),
            "KEY".into(),
            "CA".into(),
        );
        assert!(!Identity::exists(dir.path()));
        identity.save(dir.path()).unwrap();
        let loaded = Identity::load(dir.path()).unwrap();
        assert_eq!(loaded.node_id, "n1");
        assert_eq!(loaded.key_pem, "KEY");
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{loaded:?}").contains("KEY"));
    }

    #[test]
    fn missing_identity_says_how_to_enroll() {
        let dir = tempfile::tempdir().unwrap();
        let err = Identity::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("nanofleet-agent enroll"));
    }
}
