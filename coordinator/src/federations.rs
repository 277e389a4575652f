//! Federated LoRA training: federations (base model, adapter, who may train, schedule),
//! their rounds, and the engine that runs them. A round selects eligible online nodes,
//! sends each the plan, collects their clipped deltas until every node answered or the
//! deadline passed, and aggregates when enough survived; otherwise it fails cleanly and
//! the next round runs. After the last training round one evaluation round measures the
//! final adapter on the nodes' held-out data.
//!
//! Records live in the store (a restarted coordinator carries on); adapter and update
//! bytes live in files under `<data_dir>/federations/<name>/`: `global-<round>.safetensors`
//! (the global adapter after that round; 0 = the seeded initial one) and
//! `updates/<round id>/<node id>.safetensors` until their round closes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nanofleet_federated::{
    initial_adapter, AdapterSpec, AdapterTensors, AggregateError, Aggregator, SpecError,
    TensorError, TrainingPlan,
};
use serde::{Deserialize, Serialize};

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::events::EventLog;
use crate::now_unix_ms;
use crate::registry::{NodeRecord, NodeStatus, PowerSource, Registry, RegistryError};
use crate::store::{decode, encode, Keyspace, KvStore, StoreError};

/// Largest update a node may send (bytes of safetensors).
pub const MAX_UPDATE_BYTES: usize = 64 * 1024 * 1024;
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
    #[error("the update is {0} bytes; at most {MAX_UPDATE_BYTES} are accepted")]
    TooLarge(usize),
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
    /// Node ids whose update is waiting in `updates/<id>/`, with their example counts.
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
}

impl FederationRecord {
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
    events: EventLog,
    dir: PathBuf,
    /// Serializes read-modify-write of federation records (engine and submissions).
    lock: Arc<Mutex<()>>,
}

impl Federations {
    pub fn open(
        store: Arc<dyn KvStore>,
        registry: Registry,
        artifacts: ArtifactStore,
        events: EventLog,
        data_dir: &Path,
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
        })
    }

    fn save(&self, fed: &FederationRecord) -> Result<(), StoreError> {
        self.store
            .put(Keyspace::Federations, fed.name.as_bytes(), &encode(fed))?;
        self.store.flush()
    }

    pub fn get(&self, name: &str) -> Result<FederationRecord, FederationError> {
        let bytes = self
            .store
            .get(Keyspace::Federations, name.as_bytes())?
            .ok_or_else(|| FederationError::NotFound(name.to_owned()))?;
        Ok(decode(Keyspace::Federations, name.as_bytes(), &bytes)?)
    }

    pub fn list(&self) -> Result<Vec<FederationRecord>, FederationError> {
        let mut feds: Vec<FederationRecord> = self
            .store
            .scan(Keyspace::Federations)?
            .into_iter()
            .map(|(k, v)| decode(Keyspace::Federations, &k, &v))
            .collect::<Result<_, _>>()?;
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
        };
        self.save(&fed)?;
        self.events.append(
            &format!("operator:{operator}"),
            "federation.create",
            &fed.name,
            &format!(
                "base {}@{}, rank {}, {:?} aggregation, {} rounds",
                fed.base_name, fed.base_version, fed.adapter.rank, fed.adapter.mode, fed.rounds
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

    /// The round work still owed by `node_id` (sent again when the node reconnects).
    pub fn pending_for(&self, node_id: &str) -> Result<Vec<Dispatch>, FederationError> {
        let mut out = Vec::new();
        for fed in self.list()? {
            if let Some(round) = fed.history.last().filter(|r| {
                r.state == RoundState::Collecting
                    && r.selected.iter().any(|n| n == node_id)
                    && !r.reported.iter().any(|n| n == node_id)
            }) {
                let global = Arc::new(self.global_bytes(&fed.name, round.from_global_round)?);
                out.push(self.dispatch(&fed, round, node_id, global));
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
        }
    }

    /// Accepts one node's answer to an open round. A refused update changes nothing.
    pub fn submit(&self, node_id: &str, sub: Submission) -> Result<(), FederationError> {
        if sub.delta.len() > MAX_UPDATE_BYTES {
            return Err(FederationError::TooLarge(sub.delta.len()));
        }
        let _guard = self.lock.lock().expect("federation lock");
        let mut fed = self
            .list()?
            .into_iter()
            .find(|f| f.history.iter().any(|r| r.id == sub.round_id))
            .ok_or_else(|| FederationError::UnknownRound(sub.round_id.clone()))?;
        let name = fed.name.clone();
        let mode = fed.adapter.mode;
        let seed = fed.adapter.init_seed;
        let from_global = fed.history.last().map(|r| r.from_global_round);
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
        if contributes {
            let delta = AdapterTensors::from_safetensors(&sub.delta)?;
            let global_round = from_global.unwrap_or(0);
            let global_path = self.global_path(&name, global_round);
            let fresh = !global_path.exists();
            let global = if fresh {
                // Round 1: derive the seeded initial adapter from the node's layout, as the
                // node did; later nodes must match it.
                let initial = initial_adapter(&sub.layout, seed)?;
                if initial.is_empty() {
                    return Err(FederationError::BadUpdate(
                        "the first update of a federation must carry the adapter layout".into(),
                    ));
                }
                initial
            } else {
                AdapterTensors::from_safetensors(&std::fs::read(&global_path)?)?
            };
            Aggregator::new(mode, &global).add(sub.examples, &delta)?;
            if fresh {
                write_durably(&global_path, &global.to_safetensors(None))?;
            }
            write_durably(
                &self
                    .updates_dir(&name, &round.id)
                    .join(format!("{node_id}.safetensors")),
                &sub.delta,
            )?;
            round.contributors.insert(node_id.to_owned(), sub.examples);
            round.examples += sub.examples;
            round
                .train_first
                .add(sub.examples, sub.train_loss_first, 0.0);
            round.train_last.add(sub.examples, sub.train_loss_last, 0.0);
        } else if !sub.declined_reason.is_empty() {
            round.declined += 1;
            tracing::info!(node = node_id, reason = %truncate(&sub.declined_reason), "node declined the round");
        }
        round
            .eval
            .add(sub.eval_examples, sub.eval_loss, sub.eval_exact_match);
        round.reported.push(node_id.to_owned());
        self.save(&fed)?;
        Ok(())
    }

    /// One step of the engine for every running federation; returns what must be sent.
    pub fn tick(&self, online: &dyn Fn(&str) -> bool) -> Result<Vec<Dispatch>, FederationError> {
        let mut dispatches = Vec::new();
        let _guard = self.lock.lock().expect("federation lock");
        for mut fed in self.list()? {
            if fed.state != FederationState::Running {
                continue;
            }
            let before = fed.clone();
            let now = now_unix_ms();
            let close = fed
                .open_round_mut()
                .map(|r| r.reported.len() == r.selected.len() || now > r.deadline_ms);
            match close {
                Some(true) => self.close_round(&mut fed)?,
                Some(false) => {}
                None => dispatches.extend(self.open_round(&mut fed, online)?),
            }
            if fed != before {
                self.save(&fed)?;
            }
        }
        Ok(dispatches)
    }

    fn open_round(
        &self,
        fed: &mut FederationRecord,
        online: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Dispatch>, FederationError> {
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
        // Rotate through the fleet so that every eligible node takes turns.
        eligible.sort_by(|a, b| a.id.cmp(&b.id));
        let offset = fed.history.len() % eligible.len();
        eligible.rotate_left(offset);
        eligible.truncate(fed.selection.max_clients as usize);
        let number = fed.history.len() as u32 + 1;
        let now = now_unix_ms();
        let round = RoundRecord {
            number,
            id: uuid::Uuid::new_v4().to_string(),
            evaluation: training_done,
            state: RoundState::Collecting,
            selected: eligible.into_iter().map(|n| n.id).collect(),
            reported: Vec::new(),
            contributors: BTreeMap::new(),
            declined: 0,
            examples: 0,
            started_ms: now,
            deadline_ms: now + i64::from(fed.round_timeout_secs) * 1000,
            finished_ms: 0,
            reason: String::new(),
            eval: MetricSums::default(),
            train_first: MetricSums::default(),
            train_last: MetricSums::default(),
            from_global_round: fed.global_round,
        };
        let global = Arc::new(self.global_bytes(&fed.name, fed.global_round)?);
        let dispatches = round
            .selected
            .iter()
            .map(|node| self.dispatch(fed, &round, node, global.clone()))
            .collect();
        self.events.append(
            "coordinator",
            "federation.round_start",
            &fed.name,
            &format!(
                "{} round {number}: {} nodes selected",
                if round.evaluation {
                    "evaluation"
                } else {
                    "training"
                },
                round.selected.len()
            ),
        )?;
        fed.reason = String::new();
        fed.history.push(round);
        Ok(dispatches)
    }

    fn close_round(&self, fed: &mut FederationRecord) -> Result<(), FederationError> {
        let name = fed.name.clone();
        let mode = fed.adapter.mode;
        let min = fed.selection.min_clients as usize;
        let global_round = fed.global_round;
        let round = fed
            .open_round_mut()
            .expect("close_round is called on an open round");
        round.finished_ms = now_unix_ms();
        let updates = self.updates_dir(&name, &round.id);
        if round.evaluation {
            if round.reported.is_empty() {
                round.state = RoundState::Failed;
                round.reason = "no node reported its evaluation before the deadline".into();
            } else {
                round.state = RoundState::Evaluated;
            }
        } else if round.contributors.len() < min {
            round.state = RoundState::Failed;
            round.reason = format!(
                "{} of {} selected nodes sent an update before the deadline; the minimum is {min}",
                round.contributors.len(),
                round.selected.len()
            );
        } else {
            let global = AdapterTensors::from_safetensors(&std::fs::read(
                self.global_path(&name, global_round),
            )?)?;
            let mut aggregator = Aggregator::new(mode, &global);
            for (node, examples) in &round.contributors {
                let bytes = std::fs::read(updates.join(format!("{node}.safetensors")))?;
                aggregator.add(*examples, &AdapterTensors::from_safetensors(&bytes)?)?;
            }
            let next = aggregator.finish(&global)?;
            let metadata = BTreeMap::from([
                ("federation".to_owned(), name.clone()),
                ("round".to_owned(), round.number.to_string()),
                (
                    "contributors".to_owned(),
                    aggregator.contributors().to_string(),
                ),
            ]);
            write_durably(
                &self.global_path(&name, round.number),
                &next.to_safetensors(Some(metadata)),
            )?;
            round.state = RoundState::Aggregated;
        }
        let (state, number, contributors, examples, reason) = (
            round.state,
            round.number,
            round.contributors.len(),
            round.examples,
            round.reason.clone(),
        );
        match std::fs::remove_dir_all(&updates) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
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

    fn b_update(value: f32) -> Vec<u8> {
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
        t.to_safetensors(None)
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
        let events = EventLog::open(store.clone()).unwrap();
        let feds = Federations::open(store, registry, artifacts, events, dir.path()).unwrap();
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
            }],
            global_round: 0,
            reason: String::new(),
            created_at_ms: now,
            created_by: "test".into(),
        };
        feds.save(&fed).unwrap();
        Setup { _dir: dir, feds }
    }

    fn update(value: f32, examples: u64) -> Submission {
        Submission {
            round_id: "r1".into(),
            delta: b_update(value),
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
                    delta: vec![0; MAX_UPDATE_BYTES + 1],
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
        assert!(!updates.exists(), "a failed round's updates are deleted");
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
