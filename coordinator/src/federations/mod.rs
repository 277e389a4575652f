//! Federated LoRA training: federations (base model, adapter, who may train, schedule),
//! their rounds, and the engine that runs them. A round selects eligible online nodes,
//! sends each the plan, collects their clipped deltas until every node answered or the
//! deadline passed, and aggregates when enough survived; otherwise it fails cleanly and
//! the next round runs. After the last training round one evaluation round measures the
//! final adapter on the nodes' held-out data.
//!
//! Aggregation is by SecAgg+ unless a federation asks for plaintext ([`secure`]): the
//! coordinator then learns only the sum of the nodes' weighted updates. Differential
//! privacy (clipping on the node; Gaussian noise added once to the sum by the
//! coordinator, or in shares by the nodes) is accounted per round with an RDP ledger, and
//! a federation stops before a round that would exceed its epsilon budget.
//!
//! Records live in the store (a restarted coordinator carries on); adapter and update
//! bytes live in files under `<data_dir>/federations/<name>/`: `global-<round>.safetensors`
//! (the global adapter after that round; 0 = the seeded initial one),
//! `updates/<round id>/<node id>.safetensors` (plaintext rounds, until the round closes)
//! and `updates/<round id>/secagg/` (the masked messages of the latest secure round).

pub mod secure;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nanofleet_federated::{
    apply_delta, initial_adapter, mean_from_weighted_sum, update_element_count, update_layout,
    AdapterSpec, AdapterTensors, AggregateError, Aggregator, SpecError, TensorError, TrainingPlan,
};
use nanofleet_privacy::{GaussianSampler, PrivacyLedger, RoundEvent};
use nanofleet_secagg::Server;
use secure::{ClientSetup, MessageFiles, SecureOptions, SecureRound, SecureStage, StageOutcome};
use serde::{Deserialize, Serialize};

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::audit_log::AuditLog;
use crate::now_unix_ms;
use crate::registry::{NodeRecord, NodeStatus, PowerSource, Registry, RegistryError};
use crate::store::{get_record, put_record_durably, scan_records, Keyspace, KvStore, StoreError};

const MAX_REASON: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("federation name {0:?} is not valid: use 1 to 64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit")]
    BadName(String),
    #[error("federation {0} already exists")]
    Exists(String),
    #[error("no federation {0}")]
    NotFound(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    BadSchedule(String),
    #[error("federation {name} is {state}; {action}")]
    WrongState {
        name: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("no open round has id {0}")]
    UnknownRound(String),
    #[error("this node was not selected for round {0}")]
    NotSelected(String),
    #[error("this node already sent its update for round {0}")]
    AlreadyReported(String),
    #[error("round {0} is closed (its deadline passed or it was aggregated)")]
    RoundClosed(String),
    #[error("the update is {got} bytes; at most {limit} are accepted (max_update_bytes)")]
    TooLarge { got: usize, limit: usize },
    #[error("the update is not usable: {0}")]
    BadUpdate(String),
    #[error("no global adapter after round {round} of {name}")]
    NoAdapter { name: String, round: u32 },
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] crate::audit_log::AuditError),
    #[error("federation files: {0}")]
    Io(#[from] std::io::Error),
}

impl From<TensorError> for FederationError {
    fn from(e: TensorError) -> Self {
        FederationError::BadUpdate(e.to_string())
    }
}

impl From<AggregateError> for FederationError {
    fn from(e: AggregateError) -> Self {
        FederationError::BadUpdate(e.to_string())
    }
}

/// Which nodes may train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    pub min_clients: u32,
    pub max_clients: u32,
    pub min_free_memory_bytes: u64,
    /// Battery nodes train only while charging at or above this level.
    pub min_battery_percent: f32,
}

impl Selection {
    /// Whether `node` may be selected now (online is checked by the caller).
    pub fn admits(&self, node: &NodeRecord) -> bool {
        let f = &node.facts;
        let power_ok = match f.power_source {
            PowerSource::Battery => {
                f.charging && f.battery_percent.unwrap_or(0.0) >= self.min_battery_percent
            }
            // Servers and controllers often cannot tell; they are not on a battery.
            PowerSource::Mains | PowerSource::Unknown => true,
        };
        node.status == NodeStatus::Active
            && f.training_examples > 0
            && f.memory_available_bytes >= self.min_free_memory_bytes
            && power_ok
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FederationState {
    Idle,
    Running,
    Finished,
    Failed,
}

impl FederationState {
    pub fn as_str(self) -> &'static str {
        match self {
            FederationState::Idle => "idle",
            FederationState::Running => "running",
            FederationState::Finished => "finished",
            FederationState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundState {
    Collecting,
    Aggregated,
    /// An evaluation round that closed with at least one report.
    Evaluated,
    Failed,
}

/// Example-weighted sums of what nodes reported; means are taken when shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricSums {
    pub examples: u64,
    pub loss: f64,
    pub exact_match: f64,
}

impl MetricSums {
    fn add(&mut self, examples: u64, loss: f64, exact_match: f64) {
        if examples == 0 || !loss.is_finite() || !exact_match.is_finite() {
            return;
        }
        let w = examples as f64;
        self.examples += examples;
        self.loss += w * loss;
        self.exact_match += w * exact_match;
    }

    /// (mean loss, mean exact match); NaN-free zeros when nothing was reported.
    pub fn means(&self) -> (f64, f64) {
        if self.examples == 0 {
            return (0.0, 0.0);
        }
        let w = self.examples as f64;
        (self.loss / w, self.exact_match / w)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub number: u32,
    pub id: String,
    /// Evaluation only (steps 0): measures the current global adapter.
    pub evaluation: bool,
    pub state: RoundState,
    /// Selected node ids (kept by the coordinator; never in an adapter's manifest).
    pub selected: Vec<String>,
    /// Node ids that answered, with or without an update.
    pub reported: Vec<String>,
    /// Node ids whose update is in the aggregate (plaintext: waiting in `updates/<id>/`
    /// until the round closes), with their example counts (0 in secure rounds, where the
    /// coordinator does not learn them).
    pub contributors: BTreeMap<String, u64>,
    pub declined: u32,
    /// Examples behind the accepted updates.
    pub examples: u64,
    pub started_ms: i64,
    pub deadline_ms: i64,
    pub finished_ms: i64,
    pub reason: String,
    /// The nodes' held-out evaluation of the global adapter this round started from.
    pub eval: MetricSums,
    /// Training loss at the first and last step, weighted by examples.
    pub train_first: MetricSums,
    pub train_last: MetricSums,
    /// The global round the plan carried.
    pub from_global_round: u32,
    /// Secure aggregation state; `None` for plaintext rounds.
    #[serde(default)]
    pub secure: Option<SecureRound>,
    /// Eligible nodes when the round was opened (for the sampling rate).
    #[serde(default)]
    pub eligible: u32,
    /// Epsilon spent by this round, and by the federation up to it (0: no DP).
    #[serde(default)]
    pub epsilon: f64,
    #[serde(default)]
    pub epsilon_total: f64,
}

/// A federation as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationRecord {
    pub name: String,
    pub base_name: String,
    pub base_version: String,
    pub base_sha256: String,
    pub adapter: AdapterSpec,
    pub selection: Selection,
    pub plan: TrainingPlan,
    /// Successful training rounds to run.
    pub rounds: u32,
    pub round_timeout_secs: u32,
    pub max_failed_rounds: u32,
    pub state: FederationState,
    pub history: Vec<RoundRecord>,
    /// The round whose aggregate is the global adapter (0 = the initial one).
    pub global_round: u32,
    /// Why the federation waits, failed or finished.
    pub reason: String,
    pub created_at_ms: i64,
    pub created_by: String,
    /// SecAgg+ settings; `None` aggregates in the clear.
    #[serde(default)]
    pub secure: Option<SecureOptions>,
    #[serde(default)]
    pub privacy: PrivacyOptions,
    /// Privacy spent so far (rounds with noise only).
    #[serde(default)]
    pub ledger: Option<PrivacyLedger>,
}

/// Differential privacy of a federation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyOptions {
    /// Noise std on the sum = noise_multiplier × clip_norm (in weight units); 0: no DP.
    pub noise_multiplier: f64,
    /// Noise added in shares by the nodes instead of once by the coordinator.
    pub distributed: bool,
    /// Stop before a round that would bring the total epsilon above this; 0: no budget.
    pub epsilon_budget: f64,
    pub delta: f64,
}

impl FederationRecord {
    fn epsilon_spent(&self) -> f64 {
        self.ledger.as_ref().map_or(0.0, |l| l.spent().epsilon)
    }

    fn aggregated_rounds(&self) -> u32 {
        self.history
            .iter()
            .filter(|r| r.state == RoundState::Aggregated)
            .count() as u32
    }

    fn failed_rounds(&self) -> u32 {
        self.history
            .iter()
            .filter(|r| r.state == RoundState::Failed)
            .count() as u32
    }

    fn open_round_mut(&mut self) -> Option<&mut RoundRecord> {
        self.history
            .last_mut()
            .filter(|r| r.state == RoundState::Collecting)
    }
}

/// What a federation is created with.
#[derive(Debug, Clone)]
pub struct NewFederation {
    pub name: String,
    pub base_name: String,
    pub base_version: String,
    pub adapter: AdapterSpec,
    pub selection: Selection,
    pub plan: TrainingPlan,
    pub rounds: u32,
    pub round_timeout_secs: u32,
    pub max_failed_rounds: u32,
    pub secure: Option<SecureOptions>,
    pub privacy: PrivacyOptions,
}

/// One node's answer to a round.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub round_id: String,
    /// safetensors of the clipped delta; empty when declined or evaluating.
    pub delta: Vec<u8>,
    /// Names and shapes of the node's whole adapter, so the coordinator can derive the
    /// seeded initial adapter without holding the model.
    pub layout: Vec<(String, (usize, usize))>,
    pub examples: u64,
    pub declined_reason: String,
    pub eval_examples: u64,
    pub eval_loss: f64,
    pub eval_exact_match: f64,
    pub train_loss_first: f64,
    pub train_loss_last: f64,
    /// Secure rounds: the node's AdvertiseKeys message instead of a delta.
    pub secagg_advertise: Vec<u8>,
}

/// What the engine sends to nodes.
#[derive(Debug, Clone)]
pub enum Outbound {
    Train(Box<Dispatch>),
    /// The next secure-aggregation message of a node (keys, shares or unmask request).
    SecAgg {
        node_id: String,
        round_id: String,
        payload: Vec<u8>,
        deadline_ms: i64,
    },
}

/// A round's work for one node, for the edge to turn into a `TrainRound` command.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub node_id: String,
    pub round_id: String,
    pub federation: String,
    pub round: u32,
    pub base_name: String,
    pub base_version: String,
    pub base_sha256: String,
    pub adapter: AdapterSpec,
    pub global_adapter: Arc<Vec<u8>>,
    pub plan: TrainingPlan,
    pub deadline_ms: i64,
    pub secagg: Option<ClientSetup>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().expect("federation files live in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn truncate(text: &str) -> String {
    let mut end = text.len().min(MAX_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Federations, their rounds and the engine; cheap to clone.
#[derive(Clone)]
pub struct Federations {
    store: Arc<dyn KvStore>,
    registry: Registry,
    artifacts: ArtifactStore,
    events: AuditLog,
    dir: PathBuf,
    /// Serializes read-modify-write of federation records (engine and submissions).
    lock: Arc<Mutex<()>>,
    max_update_bytes: usize,
    /// SecAgg+ servers of open secure rounds by round id; rebuilt from the stored
    /// messages when missing (after a restart).
    servers: Arc<Mutex<HashMap<String, Server>>>,
}

/// A secure round's outcome: the decoded sum of the weighted vectors and the nodes in it.
type SecureSum = (Vec<f32>, Vec<String>);

/// Default delta for the privacy accountant.
const DEFAULT_DELTA: f64 = 1e-5;
/// Default cap of a node's weight in examples (secure rounds and rounds with DP).
pub const DEFAULT_WEIGHT_CAP: u64 = 1000;

impl Federations {
    pub fn open(
        store: Arc<dyn KvStore>,
        registry: Registry,
        artifacts: ArtifactStore,
        events: AuditLog,
        data_dir: &Path,
        max_update_bytes: usize,
    ) -> Result<Self, FederationError> {
        let dir = data_dir.join("federations");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            store,
            registry,
            artifacts,
            events,
            dir,
            lock: Arc::new(Mutex::new(())),
            max_update_bytes,
            servers: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn save(&self, fed: &FederationRecord) -> Result<(), StoreError> {
        put_record_durably(
            &*self.store,
            Keyspace::Federations,
            fed.name.as_bytes(),
            fed,
        )
    }

    pub fn get(&self, name: &str) -> Result<FederationRecord, FederationError> {
        get_record(&*self.store, Keyspace::Federations, name.as_bytes())?
            .ok_or_else(|| FederationError::NotFound(name.to_owned()))
    }

    pub fn list(&self) -> Result<Vec<FederationRecord>, FederationError> {
        let mut feds: Vec<FederationRecord> = scan_records(&*self.store, Keyspace::Federations)?;
        feds.sort_by_key(|f| f.created_at_ms);
        Ok(feds)
    }

    fn global_path(&self, name: &str, round: u32) -> PathBuf {
        self.dir
            .join(name)
            .join(format!("global-{round}.safetensors"))
    }

    fn updates_dir(&self, name: &str, round_id: &str) -> PathBuf {
        self.dir.join(name).join("updates").join(round_id)
    }

    pub fn create(
        &self,
        new: NewFederation,
        operator: &str,
    ) -> Result<FederationRecord, FederationError> {
        if !valid_name(&new.name) {
            return Err(FederationError::BadName(new.name));
        }
        new.adapter.validate()?;
        new.plan.validate()?;
        if new.plan.steps == 0 {
            return Err(FederationError::BadSchedule(
                "plan steps must be at least 1".into(),
            ));
        }
        let s = &new.selection;
        if s.min_clients == 0 || s.max_clients < s.min_clients {
            return Err(FederationError::BadSchedule(format!(
                "min_clients {} and max_clients {}: need 1 <= min <= max",
                s.min_clients, s.max_clients
            )));
        }
        if new.rounds == 0 || new.rounds > 10_000 || new.round_timeout_secs == 0 {
            return Err(FederationError::BadSchedule(
                "rounds must be 1..=10000 and the round timeout positive".into(),
            ));
        }
        if new.secure.is_some() && s.min_clients < 2 {
            return Err(FederationError::BadSchedule(
                "secure aggregation needs min_clients >= 2 (a sum of one is that node's update); use plaintext for single-node tests".into(),
            ));
        }
        let mut privacy = new.privacy.clone();
        let z = privacy.noise_multiplier;
        let budget = privacy.epsilon_budget;
        let valid = z.is_finite() && z >= 0.0 && budget.is_finite() && budget >= 0.0;
        if !valid {
            return Err(FederationError::BadSchedule(
                "noise_multiplier and epsilon_budget must be finite and not negative".into(),
            ));
        }
        if privacy.distributed && new.secure.is_none() {
            return Err(FederationError::BadSchedule(
                "distributed noise needs secure aggregation: in the clear each node's share would be seen alone".into(),
            ));
        }
        if privacy.epsilon_budget > 0.0 && z == 0.0 {
            return Err(FederationError::BadSchedule(
                "an epsilon budget needs noise (noise_multiplier > 0)".into(),
            ));
        }
        if privacy.delta == 0.0 {
            privacy.delta = DEFAULT_DELTA;
        }
        let ledger =
            if z > 0.0 {
                Some(PrivacyLedger::new(privacy.delta).map_err(|e| {
                    FederationError::BadSchedule(format!("privacy accounting: {e}"))
                })?)
            } else {
                None
            };
        let base = self.artifacts.get(&new.base_name, &new.base_version)?;
        let _guard = self.lock.lock().expect("federation lock");
        if self
            .store
            .get(Keyspace::Federations, new.name.as_bytes())?
            .is_some()
        {
            return Err(FederationError::Exists(new.name));
        }
        let fed = FederationRecord {
            base_sha256: base.manifest().sha256.to_string(),
            name: new.name,
            base_name: new.base_name,
            base_version: new.base_version,
            adapter: new.adapter,
            selection: new.selection,
            plan: new.plan,
            rounds: new.rounds,
            round_timeout_secs: new.round_timeout_secs,
            max_failed_rounds: new.max_failed_rounds,
            state: FederationState::Idle,
            history: Vec::new(),
            global_round: 0,
            reason: String::new(),
            created_at_ms: now_unix_ms(),
            created_by: operator.to_owned(),
            secure: new.secure,
            privacy,
            ledger,
        };
        self.save(&fed)?;
        self.events.append(
            &format!("operator:{operator}"),
            "federation.create",
            &fed.name,
            &format!(
                "base {}@{}, rank {}, {:?} aggregation, {}, noise multiplier {}{}, {} rounds",
                fed.base_name,
                fed.base_version,
                fed.adapter.rank,
                fed.adapter.mode,
                if fed.secure.is_some() {
                    "SecAgg+"
                } else {
                    "plaintext"
                },
                fed.privacy.noise_multiplier,
                if fed.privacy.distributed {
                    " (distributed)"
                } else {
                    ""
                },
                fed.rounds
            ),
        )?;
        Ok(fed)
    }

    /// Starts (or restarts, after it finished or failed) the federation's rounds; the
    /// engine opens the first at its next step.
    pub fn start(&self, name: &str, operator: &str) -> Result<FederationRecord, FederationError> {
        let _guard = self.lock.lock().expect("federation lock");
        let mut fed = self.get(name)?;
        if fed.state == FederationState::Running {
            return Err(FederationError::WrongState {
                name: fed.name,
                state: "running",
                action: "its rounds are already running",
            });
        }
        fed.state = FederationState::Running;
        // Counts start again from here: `rounds` more successful rounds.
        fed.rounds += fed.aggregated_rounds();
        fed.reason = String::new();
        self.save(&fed)?;
        self.events.append(
            &format!("operator:{operator}"),
            "federation.start",
            &fed.name,
            "",
        )?;
        Ok(fed)
    }

    /// The global adapter after `round` (0: the latest) as safetensors bytes.
    pub fn adapter(&self, name: &str, round: u32) -> Result<(u32, Vec<u8>), FederationError> {
        let fed = self.get(name)?;
        let round = if round == 0 { fed.global_round } else { round };
        let path = self.global_path(name, round);
        match std::fs::read(&path) {
            Ok(bytes) => Ok((round, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FederationError::NoAdapter {
                name: name.to_owned(),
                round,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The round work still owed by `node_id` (sent again when the node reconnects): the
    /// round's plan, or the secure-aggregation message of the stage it is in.
    pub fn pending_for(&self, node_id: &str) -> Result<Vec<Outbound>, FederationError> {
        let _guard = self.lock.lock().expect("federation lock");
        let mut out = Vec::new();
        for fed in self.list()? {
            let Some(round) = fed.history.last().filter(|r| {
                r.state == RoundState::Collecting && r.selected.iter().any(|n| n == node_id)
            }) else {
                continue;
            };
            match &round.secure {
                Some(secure) if secure.stage != SecureStage::AdvertiseKeys => {
                    if secure.received.iter().any(|n| n == node_id) {
                        continue;
                    }
                    let updates = self.updates_dir(&fed.name, &round.id);
                    let servers = self.servers.lock().expect("server lock");
                    let payload = match servers.get(&round.id) {
                        Some(server) => secure::payload_for_node(secure, server, node_id),
                        None => {
                            drop(servers);
                            let server = secure::rebuild(secure, &MessageFiles::new(&updates))
                                .map_err(FederationError::BadUpdate)?;
                            let payload = secure::payload_for_node(secure, &server, node_id);
                            self.servers
                                .lock()
                                .expect("server lock")
                                .insert(round.id.clone(), server);
                            payload
                        }
                    };
                    if let Some(payload) = payload {
                        out.push(Outbound::SecAgg {
                            node_id: node_id.to_owned(),
                            round_id: round.id.clone(),
                            payload,
                            deadline_ms: secure.stage_deadline_ms,
                        });
                    }
                }
                _ if !round.reported.iter().any(|n| n == node_id) => {
                    let global = Arc::new(self.global_bytes(&fed.name, round.from_global_round)?);
                    out.push(Outbound::Train(Box::new(
                        self.dispatch(&fed, round, node_id, global),
                    )));
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn global_bytes(&self, name: &str, round: u32) -> Result<Vec<u8>, FederationError> {
        match std::fs::read(self.global_path(name, round)) {
            Ok(bytes) => Ok(bytes),
            // Before the first update arrives there is no file: nodes derive it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && round == 0 => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    fn dispatch(
        &self,
        fed: &FederationRecord,
        round: &RoundRecord,
        node_id: &str,
        global: Arc<Vec<u8>>,
    ) -> Dispatch {
        let mut plan = fed.plan.clone();
        if round.evaluation {
            plan.steps = 0;
        }
        Dispatch {
            node_id: node_id.to_owned(),
            round_id: round.id.clone(),
            federation: fed.name.clone(),
            round: round.number,
            base_name: fed.base_name.clone(),
            base_version: fed.base_version.clone(),
            base_sha256: fed.base_sha256.clone(),
            adapter: fed.adapter.clone(),
            global_adapter: global,
            plan,
            deadline_ms: round.deadline_ms,
            secagg: round.secure.as_ref().and_then(|s| s.client_setup(node_id)),
        }
    }

    /// The global adapter a round started from; in round 1, before any file exists, the
    /// seeded initial adapter of `layout` (`true`: it still has to be written).
    fn round_global(
        &self,
        fed: &FederationRecord,
        from_global: u32,
        layout: &[(String, (usize, usize))],
    ) -> Result<(AdapterTensors, bool), FederationError> {
        let path = self.global_path(&fed.name, from_global);
        if path.exists() {
            return Ok((
                AdapterTensors::from_safetensors(&std::fs::read(&path)?)?,
                false,
            ));
        }
        // Round 1: derive the seeded initial adapter from the node's layout, as the node
        // did; later nodes must match it.
        let initial = initial_adapter(layout, fed.adapter.init_seed)?;
        if initial.is_empty() {
            return Err(FederationError::BadUpdate(
                "the first update of a federation must carry the adapter layout".into(),
            ));
        }
        Ok((initial, true))
    }

    /// Accepts one node's answer to an open round. A refused update changes nothing.
    pub fn submit(&self, node_id: &str, sub: Submission) -> Result<(), FederationError> {
        let size = sub.delta.len().max(sub.secagg_advertise.len());
        if size > self.max_update_bytes {
            return Err(FederationError::TooLarge {
                got: size,
                limit: self.max_update_bytes,
            });
        }
        let _guard = self.lock.lock().expect("federation lock");
        let mut fed = self.fed_of_round(&sub.round_id)?;
        let snapshot = fed.clone();
        let round = fed
            .open_round_mut()
            .filter(|r| r.id == sub.round_id)
            .ok_or_else(|| FederationError::RoundClosed(sub.round_id.clone()))?;
        if now_unix_ms() > round.deadline_ms {
            return Err(FederationError::RoundClosed(sub.round_id));
        }
        if !round.selected.iter().any(|n| n == node_id) {
            return Err(FederationError::NotSelected(sub.round_id));
        }
        if round.reported.iter().any(|n| n == node_id) {
            return Err(FederationError::AlreadyReported(sub.round_id));
        }
        let contributes = sub.declined_reason.is_empty() && !round.evaluation;
        let from_global = round.from_global_round;
        let round_id = round.id.clone();
        let updates = self.updates_dir(&fed.name, &round_id);
        if contributes {
            let (global, fresh) = self.round_global(&snapshot, from_global, &sub.layout)?;
            let expected = update_layout(snapshot.adapter.mode, &global);
            let round = fed.open_round_mut().expect("checked above");
            match &mut round.secure {
                Some(secure) => {
                    if secure.stage != SecureStage::AdvertiseKeys {
                        return Err(FederationError::RoundClosed(sub.round_id));
                    }
                    let message = secure
                        .check_message(node_id, &sub.secagg_advertise)
                        .map_err(FederationError::BadUpdate)?;
                    // The node's vector: its update's values and its weight.
                    let layout_len = update_element_count(snapshot.adapter.mode, &sub.layout) + 1;
                    let want = expected.element_count() + 1;
                    if layout_len != want || (secure.vector_len != 0 && secure.vector_len != want) {
                        return Err(FederationError::BadUpdate(format!(
                            "the node's adapter has {layout_len} values to aggregate; the round has {want}"
                        )));
                    }
                    secure.vector_len = want;
                    MessageFiles::new(&updates).write(&message)?;
                    secure.received.push(node_id.to_owned());
                }
                None => {
                    let delta = AdapterTensors::from_safetensors(&sub.delta)?;
                    Aggregator::new(snapshot.adapter.mode, &global).add(sub.examples, &delta)?;
                    write_durably(&updates.join(format!("{node_id}.safetensors")), &sub.delta)?;
                    round.contributors.insert(node_id.to_owned(), sub.examples);
                    round.examples += sub.examples;
                }
            }
            if fresh {
                write_durably(
                    &self.global_path(&snapshot.name, from_global),
                    &global.to_safetensors(None),
                )?;
            }
            let round = fed.open_round_mut().expect("checked above");
            round
                .train_first
                .add(sub.examples.max(1), sub.train_loss_first, 0.0);
            round
                .train_last
                .add(sub.examples.max(1), sub.train_loss_last, 0.0);
        } else if !sub.declined_reason.is_empty() {
            let round = fed.open_round_mut().expect("checked above");
            round.declined += 1;
            tracing::info!(node = node_id, reason = %truncate(&sub.declined_reason), "node declined the round");
        }
        let round = fed.open_round_mut().expect("checked above");
        round
            .eval
            .add(sub.eval_examples, sub.eval_loss, sub.eval_exact_match);
        round.reported.push(node_id.to_owned());
        self.save(&fed)?;
        Ok(())
    }

    fn fed_of_round(&self, round_id: &str) -> Result<FederationRecord, FederationError> {
        self.list()?
            .into_iter()
            .find(|f| f.history.iter().any(|r| r.id == round_id))
            .ok_or_else(|| FederationError::UnknownRound(round_id.to_owned()))
    }

    /// Accepts one node's secure-aggregation message for the open stage of its round. A
    /// refused message changes nothing; the round goes on without it.
    pub fn submit_secagg(
        &self,
        node_id: &str,
        round_id: &str,
        payload: &[u8],
    ) -> Result<(), FederationError> {
        if payload.len() > self.max_update_bytes {
            return Err(FederationError::TooLarge {
                got: payload.len(),
                limit: self.max_update_bytes,
            });
        }
        let _guard = self.lock.lock().expect("federation lock");
        let mut fed = self.fed_of_round(round_id)?;
        let name = fed.name.clone();
        let round = fed
            .open_round_mut()
            .filter(|r| r.id == round_id)
            .ok_or_else(|| FederationError::RoundClosed(round_id.to_owned()))?;
        let Some(secure) = &mut round.secure else {
            return Err(FederationError::BadUpdate(
                "this round aggregates in the clear".into(),
            ));
        };
        if now_unix_ms() > secure.stage_deadline_ms {
            return Err(FederationError::RoundClosed(round_id.to_owned()));
        }
        let message = secure
            .check_message(node_id, payload)
            .map_err(FederationError::BadUpdate)?;
        let files = MessageFiles::new(&self.updates_dir(&name, round_id));
        let mut servers = self.servers.lock().expect("server lock");
        if !servers.contains_key(round_id) {
            let server = secure::rebuild(secure, &files).map_err(FederationError::BadUpdate)?;
            servers.insert(round_id.to_owned(), server);
        }
        let server = servers.get_mut(round_id).expect("inserted above");
        server
            .receive(message.clone())
            .map_err(|e| FederationError::BadUpdate(e.to_string()))?;
        files.write(&message)?;
        secure.received.push(node_id.to_owned());
        drop(servers);
        self.save(&fed)?;
        Ok(())
    }

    /// One step of the engine for every running federation; returns what must be sent.
    pub fn tick(&self, online: &dyn Fn(&str) -> bool) -> Result<Vec<Outbound>, FederationError> {
        let mut outbound = Vec::new();
        let _guard = self.lock.lock().expect("federation lock");
        for mut fed in self.list()? {
            if fed.state != FederationState::Running {
                continue;
            }
            let before = fed.clone();
            let now = now_unix_ms();
            let step = fed.open_round_mut().map(|r| match &r.secure {
                Some(s) if s.stage != SecureStage::AdvertiseKeys => {
                    s.stage_complete() || now > s.stage_deadline_ms
                }
                _ => r.reported.len() == r.selected.len() || now > r.deadline_ms,
            });
            match step {
                Some(true) => outbound.extend(self.advance_round(&mut fed)?),
                Some(false) => {}
                None => outbound.extend(self.open_round(&mut fed, online)?),
            }
            if fed != before {
                self.save(&fed)?;
            }
        }
        Ok(outbound)
    }

    fn open_round(
        &self,
        fed: &mut FederationRecord,
        online: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Outbound>, FederationError> {
        let training_done = fed.aggregated_rounds() >= fed.rounds;
        let evaluated = fed.history.last().is_some_and(|r| r.evaluation);
        if training_done && evaluated {
            fed.state = FederationState::Finished;
            fed.reason = format!(
                "{} rounds aggregated and evaluated",
                fed.aggregated_rounds()
            );
            self.events
                .append("coordinator", "federation.finished", &fed.name, &fed.reason)?;
            return Ok(Vec::new());
        }
        let mut eligible: Vec<NodeRecord> = self
            .registry
            .nodes()?
            .into_iter()
            .filter(|n| fed.selection.admits(n) && online(&n.id))
            .collect();
        let min = fed.selection.min_clients as usize;
        if eligible.len() < min {
            fed.reason = format!(
                "waiting for eligible nodes: {} of the {min} needed are online with training data, memory and power",
                eligible.len()
            );
            return Ok(Vec::new());
        }
        let eligible_count = eligible.len() as u32;
        if !training_done {
            if let Some(reason) = self.over_budget(fed, eligible_count) {
                fed.state = FederationState::Finished;
                fed.reason = reason;
                self.events.append(
                    "coordinator",
                    "federation.budget_spent",
                    &fed.name,
                    &fed.reason,
                )?;
                return Ok(Vec::new());
            }
        }
        // Rotate through the fleet so that every eligible node takes turns.
        eligible.sort_by(|a, b| a.id.cmp(&b.id));
        let offset = fed.history.len() % eligible.len();
        eligible.rotate_left(offset);
        eligible.truncate(fed.selection.max_clients as usize);
        let number = fed.history.len() as u32 + 1;
        let now = now_unix_ms();
        let selected: Vec<String> = eligible.into_iter().map(|n| n.id).collect();
        let deadline_ms = now + i64::from(fed.round_timeout_secs) * 1000;
        let secure = match (&fed.secure, training_done) {
            (Some(options), false) => {
                let share_std = if fed.privacy.distributed {
                    nanofleet_privacy::distributed_share_std(
                        fed.privacy.noise_multiplier * fed.plan.clip_norm,
                        selected.len() as u32,
                    )
                    .map_err(|e| FederationError::BadSchedule(e.to_string()))?
                } else {
                    0.0
                };
                Some(SecureRound::new(
                    &selected,
                    options,
                    fed.plan.clip_norm,
                    share_std,
                    deadline_ms,
                ))
            }
            _ => None,
        };
        let round = RoundRecord {
            number,
            id: uuid::Uuid::new_v4().to_string(),
            evaluation: training_done,
            state: RoundState::Collecting,
            selected,
            reported: Vec::new(),
            contributors: BTreeMap::new(),
            declined: 0,
            examples: 0,
            started_ms: now,
            deadline_ms,
            finished_ms: 0,
            reason: String::new(),
            eval: MetricSums::default(),
            train_first: MetricSums::default(),
            train_last: MetricSums::default(),
            from_global_round: fed.global_round,
            secure,
            eligible: eligible_count,
            epsilon: 0.0,
            epsilon_total: fed.epsilon_spent(),
        };
        let global = Arc::new(self.global_bytes(&fed.name, fed.global_round)?);
        let outbound = round
            .selected
            .iter()
            .map(|node| Outbound::Train(Box::new(self.dispatch(fed, &round, node, global.clone()))))
            .collect();
        self.events.append(
            "coordinator",
            "federation.round_start",
            &fed.name,
            &format!(
                "{} round {number}: {} nodes selected of {eligible_count} eligible{}",
                if round.evaluation {
                    "evaluation"
                } else {
                    "training"
                },
                round.selected.len(),
                if round.secure.is_some() {
                    ", SecAgg+"
                } else {
                    ""
                }
            ),
        )?;
        // Only the latest secure round's masked messages are kept.
        if round.secure.is_some() {
            let updates_root = self.dir.join(&fed.name).join("updates");
            if let Ok(entries) = std::fs::read_dir(&updates_root) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        fed.reason = String::new();
        fed.history.push(round);
        Ok(outbound)
    }

    /// The reason the next round may not run, when it would overspend the budget.
    fn over_budget(&self, fed: &FederationRecord, eligible: u32) -> Option<String> {
        let (ledger, budget) = (fed.ledger.as_ref()?, fed.privacy.epsilon_budget);
        if budget <= 0.0 {
            return None;
        }
        let selected = fed.selection.max_clients.min(eligible);
        let q = f64::from(selected) / f64::from(eligible.max(1));
        let event = RoundEvent::one_round(q, fed.privacy.noise_multiplier).ok()?;
        let mut next = ledger.clone();
        let after = next.record(event).ok()?.epsilon;
        (after > budget).then(|| {
            format!(
                "privacy budget: another round would bring epsilon to {after:.3} (delta {}), above the budget {budget}; spent {:.3}",
                fed.privacy.delta,
                ledger.spent().epsilon
            )
        })
    }

    /// Moves an open round on: closes a secure stage, or closes the round.
    fn advance_round(&self, fed: &mut FederationRecord) -> Result<Vec<Outbound>, FederationError> {
        let min = fed.selection.min_clients as usize;
        let round = fed
            .open_round_mut()
            .expect("advance_round is called on an open round");
        let Some(secure) = round.secure.clone() else {
            return self.close_round(fed, None).map(|()| Vec::new());
        };
        let round_id = round.id.clone();
        if secure.stage == SecureStage::AdvertiseKeys && secure.received.len() < min {
            let reason = format!(
                "{} of {} selected nodes sent their update before the deadline ({} declined); the minimum is {min}",
                secure.received.len(),
                secure.client_ids.len(),
                round.declined
            );
            self.close_round(fed, Some(Err(reason)))?;
            return Ok(Vec::new());
        }
        let files = MessageFiles::new(&self.updates_dir(&fed.name, &round_id));
        let mut servers = self.servers.lock().expect("server lock");
        let server = match servers.remove(&round_id) {
            Some(server) => Ok(server),
            None => secure::rebuild(&secure, &files),
        };
        let stage_timeout = i64::from(
            fed.secure
                .as_ref()
                .map_or(60, |s| s.stage_timeout_secs.max(1)),
        ) * 1000;
        let outcome = server.and_then(|mut server| {
            let mut next = secure.clone();
            secure::close_stage(&mut next, &mut server, stage_timeout, now_unix_ms())
                .map(|outcome| (outcome, next, server))
                .map_err(|e| e.to_string())
        });
        match outcome {
            Err(reason) => {
                drop(servers);
                let reason = format!(
                    "secure aggregation failed at the {:?} stage: {reason}",
                    secure.stage
                );
                self.close_round(fed, Some(Err(reason)))?;
                Ok(Vec::new())
            }
            Ok((StageOutcome::Sum(sum, contributors), _, _)) => {
                drop(servers);
                self.close_round(fed, Some(Ok((sum, contributors))))?;
                Ok(Vec::new())
            }
            Ok((StageOutcome::Next(payloads), next, server)) => {
                servers.insert(round_id.clone(), server);
                let round = fed.open_round_mut().expect("still open");
                let deadline_ms = next.stage_deadline_ms;
                round.secure = Some(next);
                Ok(payloads
                    .into_iter()
                    .map(|(node_id, payload)| Outbound::SecAgg {
                        node_id,
                        round_id: round_id.clone(),
                        payload,
                        deadline_ms,
                    })
                    .collect())
            }
        }
    }

    /// Closes the open round. `secure` carries a secure round's outcome: the decoded sum
    /// of the weighted vectors and the nodes in it, or why it failed.
    fn close_round(
        &self,
        fed: &mut FederationRecord,
        secure: Option<Result<SecureSum, String>>,
    ) -> Result<(), FederationError> {
        let name = fed.name.clone();
        let mode = fed.adapter.mode;
        let min = fed.selection.min_clients as usize;
        let global_round = fed.global_round;
        let privacy = fed.privacy.clone();
        let clip = fed.plan.clip_norm;
        let weight_cap = fed
            .secure
            .as_ref()
            .map_or(DEFAULT_WEIGHT_CAP, |s| s.weight_cap.max(1));
        let round = fed
            .open_round_mut()
            .expect("close_round is called on an open round");
        round.finished_ms = now_unix_ms();
        let updates = self.updates_dir(&name, &round.id);
        let mut noise_reached = 0.0;
        if round.evaluation {
            if round.reported.is_empty() {
                round.state = RoundState::Failed;
                round.reason = "no node reported its evaluation before the deadline".into();
            } else {
                round.state = RoundState::Evaluated;
            }
        } else {
            let global_path = self.global_path(&name, global_round);
            let outcome: Result<AdapterTensors, String> = match secure {
                Some(Err(reason)) => Err(reason),
                Some(Ok((_, contributors))) if contributors.len() < min => Err(format!(
                    "{} of {} selected nodes completed secure aggregation; the minimum is {min}",
                    contributors.len(),
                    round.selected.len()
                )),
                Some(Ok((mut sum, contributors))) => {
                    // Who is in the sum is known; what each sent and how many examples it
                    // had are not (the weights travel inside the masked vectors).
                    let count = contributors.len();
                    round.contributors = contributors.into_iter().map(|node| (node, 0)).collect();
                    let global = AdapterTensors::from_safetensors(&std::fs::read(&global_path)?)?;
                    let layout = update_layout(mode, &global);
                    noise_reached = match (privacy.noise_multiplier > 0.0, privacy.distributed) {
                        (false, _) => 0.0,
                        (true, true) => nanofleet_privacy::effective_noise_multiplier(
                            privacy.noise_multiplier,
                            round.selected.len() as u32,
                            count as u32,
                        )
                        .unwrap_or(0.0),
                        (true, false) => {
                            // Central DP: once on the sum of weighted updates (not on the total weight).
                            let last = sum.len() - 1;
                            let mut sampler = GaussianSampler::from_rng(&mut rand::rngs::OsRng);
                            nanofleet_privacy::central_noise(&mut sum[..last], privacy.noise_multiplier * clip, &mut sampler)
                                .map_err(|e| FederationError::BadUpdate(e.to_string()))?;
                            privacy.noise_multiplier
                        }
                    };
                    round.examples = (sum.last().copied().unwrap_or(0.0).max(0.0) as f64 * weight_cap as f64).round() as u64;
                    mean_from_weighted_sum(&layout, &sum)
                        .and_then(|mean| apply_delta(&global, &mean))
                        .map_err(|e| e.to_string())
                }
                None if round.contributors.len() < min => Err(format!(
                    "{} of {} selected nodes sent an update before the deadline; the minimum is {min}",
                    round.contributors.len(),
                    round.selected.len()
                )),
                None => {
                    let global = AdapterTensors::from_safetensors(&std::fs::read(&global_path)?)?;
                    let mut aggregator = Aggregator::new(mode, &global);
                    let dp = privacy.noise_multiplier > 0.0;
                    for (node, examples) in &round.contributors {
                        let bytes = std::fs::read(updates.join(format!("{node}.safetensors")))?;
                        // With DP a node's weight is capped, so that its influence on the
                        // sum is bounded by weight_cap × clip_norm.
                        let weight = if dp { (*examples).min(weight_cap) } else { *examples };
                        aggregator.add(weight, &AdapterTensors::from_safetensors(&bytes)?)?;
                    }
                    if dp {
                        let std = privacy.noise_multiplier * clip * weight_cap as f64;
                        let mut sampler = GaussianSampler::from_rng(&mut rand::rngs::OsRng);
                        aggregator.add_noise(|| sampler.normal(std).unwrap_or(0.0));
                        noise_reached = privacy.noise_multiplier;
                    }
                    aggregator.finish(&global).map_err(|e| e.to_string())
                }
            };
            match outcome {
                Ok(next) => {
                    let metadata = BTreeMap::from([
                        ("federation".to_owned(), name.clone()),
                        ("round".to_owned(), round.number.to_string()),
                        (
                            "contributors".to_owned(),
                            round.contributors.len().to_string(),
                        ),
                    ]);
                    write_durably(
                        &self.global_path(&name, round.number),
                        &next.to_safetensors(Some(metadata)),
                    )?;
                    round.state = RoundState::Aggregated;
                }
                Err(reason) => {
                    round.state = RoundState::Failed;
                    round.reason = reason;
                }
            }
        }
        let (state, number, contributors, examples, reason, round_id, selected, eligible) = (
            round.state,
            round.number,
            round.contributors.len(),
            round.examples,
            round.reason.clone(),
            round.id.clone(),
            round.selected.len(),
            round.eligible,
        );
        self.servers.lock().expect("server lock").remove(&round_id);
        // Plaintext updates go at once; a secure round's masked messages stay until the
        // next round opens.
        if let Ok(entries) = std::fs::read_dir(&updates) {
            for entry in entries.flatten() {
                if entry.path().is_file() {
                    std::fs::remove_file(entry.path())?;
                }
            }
        }
        match state {
            RoundState::Aggregated => {
                fed.global_round = number;
                self.events.append(
                    "coordinator",
                    "federation.round_aggregated",
                    &name,
                    &format!("round {number}: {contributors} contributors, {examples} examples"),
                )?;
                if noise_reached > 0.0 {
                    self.account(fed, number, selected, eligible, noise_reached)?;
                }
            }
            RoundState::Failed => {
                self.events
                    .append("coordinator", "federation.round_failed", &name, &reason)?;
                if fed.failed_rounds() > fed.max_failed_rounds {
                    fed.state = FederationState::Failed;
                    fed.reason = format!(
                        "{} rounds failed, more than max_failed_rounds = {}",
                        fed.failed_rounds(),
                        fed.max_failed_rounds
                    );
                    self.events
                        .append("coordinator", "federation.failed", &name, &fed.reason)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Records the privacy a round spent in the ledger, the round and the event log.
    fn account(
        &self,
        fed: &mut FederationRecord,
        number: u32,
        selected: usize,
        eligible: u32,
        noise_multiplier: f64,
    ) -> Result<(), FederationError> {
        let Some(ledger) = fed.ledger.as_mut() else {
            return Ok(());
        };
        let q = (selected as f64 / f64::from(eligible.max(1))).min(1.0);
        let spent = RoundEvent::one_round(q, noise_multiplier).and_then(|event| {
            let alone = ledger.event_epsilon(&event)?;
            ledger.record(event).map(|total| (alone, total))
        });
        let (epsilon, total) =
            spent.map_err(|e| FederationError::BadSchedule(format!("privacy accounting: {e}")))?;
        let delta = ledger.target_delta();
        if let Some(round) = fed.history.iter_mut().find(|r| r.number == number) {
            round.epsilon = epsilon;
            round.epsilon_total = total.epsilon;
        }
        self.events.append(
            "coordinator",
            "federation.privacy_spent",
            &fed.name,
            &format!(
                "round {number}: epsilon {epsilon:.4} (sampling rate {q:.3}, noise multiplier {noise_multiplier:.3}); total epsilon {:.4} at delta {delta}",
                total.epsilon
            ),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use nanofleet_federated::tensors::{peft_name, Half};
    use nanofleet_federated::{AggregationMode, Matrix, Target};

    fn layout() -> Vec<(String, (usize, usize))> {
        vec![
            (peft_name(0, Target::Q, Half::A), (2, 6)),
            (peft_name(0, Target::Q, Half::B), (6, 2)),
        ]
    }

    /// An exact-mode update: the q B matrix of layer 0, every value `value`.
    fn b_delta(value: f32) -> AdapterTensors {
        let mut t = AdapterTensors::default();
        t.insert(
            peft_name(0, Target::Q, Half::B),
            Matrix {
                rows: 6,
                cols: 2,
                data: vec![value; 12],
            },
        )
        .unwrap();
        t
    }

    struct Setup {
        _dir: tempfile::TempDir,
        feds: Federations,
    }

    /// A federation "f" (exact mode, min `min` clients) with round 1 open for n1 and n2.
    fn setup(min: u32) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KvStore> = Arc::new(SledStore::open(&dir.path().join("state")).unwrap());
        let registry = Registry::new(store.clone());
        let artifacts = ArtifactStore::open(store.clone(), dir.path()).unwrap();
        let events = AuditLog::open(store.clone(), dir.path()).unwrap();
        let feds =
            Federations::open(store, registry, artifacts, events, dir.path(), 1 << 20).unwrap();
        let now = now_unix_ms();
        let fed = FederationRecord {
            name: "f".into(),
            base_name: "tiny".into(),
            base_version: "1".into(),
            base_sha256: "00".repeat(32),
            adapter: AdapterSpec {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: vec![Target::Q],
                mode: AggregationMode::Exact,
                init_seed: 7,
            },
            selection: Selection {
                min_clients: min,
                max_clients: 2,
                min_free_memory_bytes: 0,
                min_battery_percent: 50.0,
            },
            plan: TrainingPlan {
                steps: 1,
                learning_rate: 0.01,
                batch_size: 1,
                max_seq_len: 16,
                clip_norm: 1.0,
            },
            rounds: 1,
            round_timeout_secs: 60,
            max_failed_rounds: 3,
            state: FederationState::Running,
            history: vec![RoundRecord {
                number: 1,
                id: "r1".into(),
                evaluation: false,
                state: RoundState::Collecting,
                selected: vec!["n1".into(), "n2".into()],
                reported: vec![],
                contributors: BTreeMap::new(),
                declined: 0,
                examples: 0,
                started_ms: now,
                deadline_ms: now + 60_000,
                finished_ms: 0,
                reason: String::new(),
                eval: MetricSums::default(),
                train_first: MetricSums::default(),
                train_last: MetricSums::default(),
                from_global_round: 0,
                secure: None,
                eligible: 2,
                epsilon: 0.0,
                epsilon_total: 0.0,
            }],
            global_round: 0,
            reason: String::new(),
            created_at_ms: now,
            created_by: "test".into(),
            secure: None,
            privacy: PrivacyOptions::default(),
            ledger: None,
        };
        feds.save(&fed).unwrap();
        Setup { _dir: dir, feds }
    }

    fn update(value: f32, examples: u64) -> Submission {
        Submission {
            round_id: "r1".into(),
            delta: b_delta(value).to_safetensors(None),
            layout: layout(),
            examples,
            eval_examples: 4,
            eval_loss: 2.0,
            ..Default::default()
        }
    }

    fn expire(feds: &Federations) {
        let mut fed = feds.get("f").unwrap();
        fed.history[0].deadline_ms = now_unix_ms() - 1;
        feds.save(&fed).unwrap();
    }

    #[test]
    fn refused_updates_leave_the_round_unchanged() {
        let Setup { feds, .. } = setup(1);
        let before = feds.get("f").unwrap();
        let refusals = [
            ("n3", update(0.1, 3)),
            (
                "n1",
                Submission {
                    delta: b"junk".to_vec(),
                    ..update(0.1, 3)
                },
            ),
            (
                "n1",
                Submission {
                    // Exact mode trains B only: an A delta is refused.
                    delta: initial_adapter(&layout(), 7).unwrap().to_safetensors(None),
                    ..update(0.1, 3)
                },
            ),
            ("n1", update(0.1, 0)),
            (
                "n1",
                Submission {
                    round_id: "nope".into(),
                    ..update(0.1, 3)
                },
            ),
            (
                "n1",
                Submission {
                    delta: vec![0; (1 << 20) + 1],
                    ..update(0.1, 3)
                },
            ),
        ];
        for (node, submission) in refusals {
            let error = feds.submit(node, submission).unwrap_err();
            assert!(!error.to_string().is_empty());
            assert_eq!(feds.get("f").unwrap(), before, "{error} changed the round");
        }
        feds.submit("n1", update(0.1, 3)).unwrap();
        assert!(matches!(
            feds.submit("n1", update(0.1, 3)),
            Err(FederationError::AlreadyReported(_))
        ));
        expire(&feds);
        assert!(matches!(
            feds.submit("n2", update(0.1, 3)),
            Err(FederationError::RoundClosed(_))
        ));
    }

    #[test]
    fn a_round_aggregates_the_weighted_mean_at_the_deadline() {
        let Setup { feds, .. } = setup(1);
        feds.submit("n1", update(1.0, 3)).unwrap();
        feds.submit(
            "n2",
            Submission {
                round_id: "r1".into(),
                declined_reason: "no base model".into(),
                ..Default::default()
            },
        )
        .unwrap();
        // Everyone answered: the next step closes the round.
        feds.tick(&|_| false).unwrap();
        let fed = feds.get("f").unwrap();
        let round = &fed.history[0];
        assert_eq!(round.state, RoundState::Aggregated);
        assert_eq!((round.contributors.len(), round.declined), (1, 1));
        assert_eq!(fed.global_round, 1);
        let (_, bytes) = feds.adapter("f", 1).unwrap();
        let global = AdapterTensors::from_safetensors(&bytes).unwrap();
        let initial = initial_adapter(&layout(), 7).unwrap();
        let delta = global.minus(&initial).unwrap();
        let b = &delta.matrices[&peft_name(0, Target::Q, Half::B)];
        assert!(b.data.iter().all(|v| (*v - 1.0).abs() < 1e-6));
        // No online node: the next round waits and says why.
        feds.tick(&|_| false).unwrap();
        let fed = feds.get("f").unwrap();
        assert_eq!(fed.history.len(), 1);
        assert!(
            fed.reason.contains("waiting for eligible nodes"),
            "{}",
            fed.reason
        );
    }

    #[test]
    fn too_few_survivors_fail_the_round_cleanly() {
        let Setup { feds, .. } = setup(2);
        feds.submit("n1", update(1.0, 3)).unwrap();
        let updates = feds.updates_dir("f", "r1");
        assert!(updates.join("n1.safetensors").exists());
        feds.tick(&|_| false).unwrap();
        assert_eq!(
            feds.get("f").unwrap().history[0].state,
            RoundState::Collecting
        );
        expire(&feds);
        feds.tick(&|_| false).unwrap();
        let fed = feds.get("f").unwrap();
        assert_eq!(fed.history[0].state, RoundState::Failed);
        assert!(fed.history[0].reason.contains("the minimum is 2"));
        assert_eq!(fed.global_round, 0);
        assert_eq!(
            fed.state,
            FederationState::Running,
            "the next round may still run"
        );
        assert!(
            !updates.join("n1.safetensors").exists(),
            "a failed round's updates are deleted"
        );
    }

    /// A node of a secure round, simulated with the real SecAgg+ client.
    struct SecureNode {
        id: String,
        client: nanofleet_secagg::Client,
        vector: Vec<f32>,
    }

    fn answer(node: &mut SecureNode, payload: &[u8]) -> Vec<u8> {
        use nanofleet_secagg::codec::*;
        use nanofleet_secagg::ClientMessage;
        let message = if let Ok(keys) = decode_keys(payload) {
            ClientMessage::ShareKeys(node.client.share_keys(&keys).unwrap())
        } else if let Ok(shares) = decode_shares(payload) {
            ClientMessage::MaskedInput(node.client.masked_input(&shares, &node.vector).unwrap())
        } else {
            let request = decode_unmask_request(payload).unwrap();
            ClientMessage::Unmask(node.client.unmask(&request).unwrap())
        };
        encode_client_message(&message)
    }

    #[test]
    fn a_secure_round_yields_the_weighted_mean_and_keeps_only_masked_vectors() {
        let Setup { feds, _dir } = setup(2);
        let mut fed = feds.get("f").unwrap();
        let selected = vec!["n1".to_owned(), "n2".to_owned(), "n3".to_owned()];
        fed.history[0].selected = selected.clone();
        let options = SecureOptions {
            group_size: 0,
            stage_timeout_secs: 60,
            weight_cap: 100,
        };
        fed.history[0].secure = Some(SecureRound::new(
            &selected,
            &options,
            1.0,
            0.0,
            now_unix_ms() + 60_000,
        ));
        fed.secure = Some(options);
        feds.save(&fed).unwrap();
        let secure = fed.history[0].secure.clone().unwrap();
        // Updates: B deltas of 0.1, 0.2, 0.3 with 10, 20, 30 examples (weights /100).
        let mut nodes: Vec<SecureNode> = selected
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let setup = secure.client_setup(id).unwrap();
                let delta = b_delta(0.1 * (i + 1) as f32);
                let weight = (10 * (i + 1)) as f32 / 100.0;
                let vector = nanofleet_federated::weighted_vector(&delta, weight);
                let config = nanofleet_secagg::Config {
                    round: setup.round_tag,
                    num_clients: setup.num_clients,
                    group_size: setup.group_size,
                    threshold: setup.threshold,
                    graph_seed: setup.graph_seed,
                    vector_len: vector.len(),
                    clipping_range: setup.clipping_range,
                    quantization_range: setup.quantization_range,
                    modulus_bits: setup.modulus_bits,
                };
                let params = nanofleet_secagg::Params::new(config).unwrap();
                let client =
                    nanofleet_secagg::Client::new(setup.client_id, params, &mut rand::rngs::OsRng)
                        .unwrap();
                SecureNode {
                    id: id.clone(),
                    client,
                    vector,
                }
            })
            .collect();
        for node in &mut nodes {
            let advertise = nanofleet_secagg::codec::encode_client_message(
                &nanofleet_secagg::ClientMessage::AdvertiseKeys(node.client.advertise().unwrap()),
            );
            let submission = Submission {
                secagg_advertise: advertise,
                delta: Vec::new(),
                examples: 0,
                ..update(0.0, 0)
            };
            feds.submit(&node.id, submission).unwrap();
        }
        // Stages 2 to 4: each tick opens the next stage; nodes answer.
        for _ in 0..3 {
            let outbound = feds.tick(&|_| false).unwrap();
            assert_eq!(outbound.len(), 3, "every node gets its next message");
            for o in outbound {
                let Outbound::SecAgg {
                    node_id,
                    round_id,
                    payload,
                    ..
                } = o
                else {
                    panic!("a secure stage sends SecAgg steps");
                };
                let node = nodes.iter_mut().find(|n| n.id == node_id).unwrap();
                let reply = answer(node, &payload);
                // A replay of the same message is refused and changes nothing.
                feds.submit_secagg(&node_id, &round_id, &reply).unwrap();
                assert!(feds.submit_secagg(&node_id, &round_id, &reply).is_err());
            }
        }
        feds.tick(&|_| false).unwrap();
        let fed = feds.get("f").unwrap();
        assert_eq!(
            fed.history[0].state,
            RoundState::Aggregated,
            "{:?}",
            fed.history[0].reason
        );
        assert_eq!(fed.history[0].contributors.len(), 3);
        let (_, bytes) = feds.adapter("f", 1).unwrap();
        let global = AdapterTensors::from_safetensors(&bytes).unwrap();
        let delta = global
            .minus(&initial_adapter(&layout(), 7).unwrap())
            .unwrap();
        // (0.1·0.1 + 0.2·0.2 + 0.3·0.3) / 0.6 = 0.2333…
        let want = (0.01 + 0.04 + 0.09) / 0.6;
        for v in &delta.matrices[&peft_name(0, Target::Q, Half::B)].data {
            assert!((v - want).abs() < 1e-4, "{v} vs {want}");
        }
        // What the coordinator kept is masked: no stored vector is a node's input.
        let files = secure::MessageFiles::new(&feds.updates_dir("f", "r1"));
        let masked = files.read_stage(SecureStage::MaskedInput).unwrap();
        assert_eq!(masked.len(), 3);
        for message in masked {
            let nanofleet_secagg::ClientMessage::MaskedInput(m) = message else {
                panic!()
            };
            let spread = m
                .values
                .iter()
                .map(|v| *v as f64)
                .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            assert!(
                spread.1 - spread.0 > (1u64 << 30) as f64,
                "masked values span the ring"
            );
        }
    }

    #[test]
    fn selection_follows_memory_data_and_power() {
        let selection = Selection {
            min_clients: 1,
            max_clients: 1,
            min_free_memory_bytes: 1000,
            min_battery_percent: 50.0,
        };
        let mut node = NodeRecord {
            id: "n".into(),
            status: NodeStatus::Active,
            token_labels: Default::default(),
            facts: crate::registry::DeviceFacts {
                memory_available_bytes: 2000,
                training_examples: 10,
                power_source: PowerSource::Mains,
                ..Default::default()
            },
            enrolled_at_ms: 0,
            last_seen_ms: 0,
            cert_sha256: String::new(),
            revoked_at_ms: 0,
            revoked_reason: String::new(),
        };
        assert!(selection.admits(&node));
        node.facts.power_source = PowerSource::Battery;
        node.facts.battery_percent = Some(80.0);
        assert!(!selection.admits(&node), "on battery and not charging");
        node.facts.charging = true;
        assert!(selection.admits(&node));
        node.facts.battery_percent = Some(20.0);
        assert!(!selection.admits(&node), "charging, but below the level");
        node.facts.battery_percent = Some(80.0);
        node.facts.memory_available_bytes = 10;
        assert!(!selection.admits(&node));
        node.facts.memory_available_bytes = 2000;
        node.facts.training_examples = 0;
        assert!(!selection.admits(&node));
        node.facts.training_examples = 10;
        node.status = NodeStatus::Revoked;
        assert!(!selection.admits(&node));
    }
}
