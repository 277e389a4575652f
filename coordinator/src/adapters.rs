//! Federations' global adapters as artifacts: the coordinator signs each with its own
//! adapter key (`<data_dir>/adapter-signing.key`, ed25519, 0600, made on first start) and
//! publishes it through the same checks as any upload, so the trust policy must name that
//! key for the adapter's name, and rollouts carry it like a model. The manifest names the
//! base model and the federation, round and number of contributors, never who they were.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::SigningKey;
use nanofleet_artifact::manifest::{
    ArtifactFormat, ArtifactKind, Chunker, FederatedRecord, Manifest, ManifestError, Provenance,
};
use nanofleet_artifact::signing::SignedManifest;
use nanofleet_federated::AdapterTensors;

use crate::artifacts::{ArtifactError, ArtifactRecord, ArtifactStore};
use crate::audit_log::AuditLog;
use crate::federations::{FederationError, Federations, RoundState};
use crate::signing_keys::KeyError;

/// `<data_dir>/adapter-signing.key` and `.pub`.
pub const ADAPTER_KEY_NAME: &str = "adapter-signing";
/// Chunk size of adapter artifacts.
const CHUNK_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Federation(#[from] FederationError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Audit(#[from] crate::audit_log::AuditError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("the adapter manifest is not valid: {0}")]
    Manifest(#[from] ManifestError),
    #[error("round {round} of {federation} did not aggregate; publish an aggregated round")]
    NotAggregated { federation: String, round: u32 },
    #[error("promotion gate: {0}")]
    Gate(String),
}

/// Reads the coordinator's adapter key, creating it (0600) with its public half on first use;
/// trust it for adapter names with `nanofleet-coordinator trust add-key`.
pub fn load_or_create_key(data_dir: &Path) -> Result<SigningKey, KeyError> {
    crate::signing_keys::load_or_create(data_dir, ADAPTER_KEY_NAME, "adapter signing")
}

/// What to publish and the promotion gate it must pass.
#[derive(Debug, Clone)]
pub struct AdapterRelease {
    pub federation: String,
    /// 0: the current global adapter.
    pub round: u32,
    pub name: String,
    pub version: String,
    pub license: String,
    /// Refuse unless the federated evaluation of this adapter is at or below this loss.
    pub max_eval_loss: Option<f64>,
    /// Refuse unless its exact match on the nodes' held-out data is at least this.
    pub min_exact_match: Option<f64>,
}

/// Signs and publishes a federation's global adapter.
pub fn publish(
    federations: &Federations,
    artifacts: &ArtifactStore,
    events: &AuditLog,
    key: &SigningKey,
    release: &AdapterRelease,
    operator: &str,
) -> Result<ArtifactRecord, AdapterError> {
    let fed = federations.get(&release.federation)?;
    let (round, bytes) = federations.adapter(&release.federation, release.round)?;
    let trained = fed
        .history
        .iter()
        .find(|r| r.number == round && r.state == RoundState::Aggregated)
        .ok_or_else(|| AdapterError::NotAggregated {
            federation: fed.name.clone(),
            round,
        })?;
    // The federated evaluation of this adapter is the next round's look at its global.
    let evaluation = fed
        .history
        .iter()
        .find(|r| r.from_global_round == round && r.eval.examples > 0)
        .map(|r| r.eval.means());
    if release.max_eval_loss.is_some() || release.min_exact_match.is_some() {
        let Some((loss, exact)) = evaluation else {
            return Err(AdapterError::Gate(format!(
                "round {round}'s adapter has not been evaluated by the nodes yet"
            )));
        };
        if let Some(max) = release.max_eval_loss.filter(|max| loss > *max) {
            return Err(AdapterError::Gate(format!(
                "held-out loss {loss:.4} is above {max}"
            )));
        }
        if let Some(min) = release.min_exact_match.filter(|min| exact < *min) {
            return Err(AdapterError::Gate(format!(
                "held-out exact match {exact:.3} is below {min}"
            )));
        }
    }
    // The artifact carries its LoRA configuration in the safetensors header, so a node
    // can serve it without anything else.
    let tensors = AdapterTensors::from_safetensors(&bytes).map_err(FederationError::from)?;
    let targets: Vec<&str> = fed
        .adapter
        .targets
        .iter()
        .map(|t| t.peft_module())
        .collect();
    let metadata = BTreeMap::from([
        ("lora_r".to_owned(), fed.adapter.rank.to_string()),
        ("lora_alpha".to_owned(), fed.adapter.alpha.to_string()),
        ("target_modules".to_owned(), targets.join(",")),
        (
            "base_model".to_owned(),
            format!("{}@{}", fed.base_name, fed.base_version),
        ),
    ]);
    let content_bytes = tensors.to_safetensors(Some(metadata));
    let mut chunker = Chunker::new(CHUNK_BYTES)?;
    chunker.update(&content_bytes);
    let content = chunker.finish();
    let base = artifacts.get(&fed.base_name, &fed.base_version)?;
    let manifest = Manifest {
        name: release.name.clone(),
        version: release.version.clone(),
        kind: ArtifactKind::LoraAdapter,
        format: ArtifactFormat::Safetensors,
        architecture: base.manifest().architecture.clone(),
        quantization: "f32".to_owned(),
        size: content.size,
        sha256: content.sha256,
        chunk_size: content.chunk_size,
        chunks: content.chunks,
        base_model: Some(format!("{}@{}", fed.base_name, fed.base_version)),
        license: release.license.clone(),
        provenance: Provenance {
            sources: Vec::new(),
            federated: Some(FederatedRecord {
                federation: fed.name.clone(),
                round: u64::from(round),
                contributors: trained.contributors.len() as u32,
            }),
        },
        created_at_ms: crate::now_unix_ms().max(0) as u64,
    };
    manifest.validate()?;
    let signed = SignedManifest::sign(manifest, key).map_err(ArtifactError::from)?;
    let mut upload = artifacts.begin(signed.to_json_pretty().as_bytes(), "coordinator")?;
    upload.write(&content_bytes)?;
    let record = artifacts.finish(upload)?;
    events.append(
        &format!("operator:{operator}"),
        "adapter.publish",
        &format!("{}@{}", release.name, release.version),
        &format!(
            "federation {} round {round}, {} contributors, signed by the coordinator's adapter key",
            fed.name,
            trained.contributors.len()
        ),
    )?;
    Ok(record)
}
