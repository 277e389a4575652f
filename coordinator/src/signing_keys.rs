//! The coordinator's own ed25519 keys, one per purpose (adapter artifacts, audit tree
//! heads): `<data_dir>/<name>.key` (PEM, 0600) with `<name>.pub` beside it, made on first
//! start. A key per purpose lets an operator trust or rotate one without the other.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use nanofleet_artifact::signing::{
    key_id, signing_key_from_pem, signing_key_to_pem, verifying_key_to_pem,
};

#[derive(Debug, thiserror::Error)]
#[error("the {purpose} key {path}: {reason}")]
pub struct KeyError {
    purpose: &'static str,
    path: PathBuf,
    reason: String,
}

/// Reads the key `<data_dir>/<name>.key`, creating it (0600) with its public half on first use.
pub fn load_or_create(
    data_dir: &Path,
    name: &str,
    purpose: &'static str,
) -> Result<SigningKey, KeyError> {
    let path = data_dir.join(format!("{name}.key"));
    let public = data_dir.join(format!("{name}.pub"));
    let fail = |reason: String| KeyError {
        purpose,
        path: path.clone(),
        reason,
    };
    if path.exists() {
        let pem = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
        return signing_key_from_pem(&pem).map_err(|e| fail(e.to_string()));
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    nanofleet_transport::write_private_file(&path, signing_key_to_pem(&key).as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    std::fs::write(&public, verifying_key_to_pem(&key.verifying_key()))
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(
        key_id = %key_id(&key.verifying_key()),
        public_key = %public.display(),
        "created the {purpose} key"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create(dir.path(), "audit-signing", "audit").unwrap();
        let mode = std::fs::metadata(dir.path().join("audit-signing.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(dir.path().join("audit-signing.pub").exists());
        let again = load_or_create(dir.path(), "audit-signing", "audit").unwrap();
        assert_eq!(key.to_bytes(), again.to_bytes());
        std::fs::write(dir.path().join("audit-signing.key"), "not a key").unwrap();
        let error = load_or_create(dir.path(), "audit-signing", "audit").unwrap_err();
        assert!(error.to_string().contains("the audit key"), "{error}");
    }
}
