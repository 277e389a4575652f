//! Rollouts as desired state: which artifact version each node should run, and the
//! engine that moves a rollout wave by wave, gating each wave on the health its nodes
//! report and rolling the wave back when the gate fails.
//!
//! State lives in the store: rollout records, each node's desired artifacts, and each
//! node's last report per artifact name. The engine is a loop over that state, so a
//! restarted coordinator carries on where it stopped, and a node that was offline
//! receives its desired state when it reconnects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::audit_log::AuditLog;
use crate::now_unix_ms;
use crate::registry::{NodeRecord, NodeStatus, Registry, RegistryError};
use crate::store::{
    decode, encode, get_record, put_record_durably, scan_records, Keyspace, KvStore, StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("selector term {0:?} is not key=value")]
    BadSelector(String),
    #[error("waves must be increasing percentages ending at 100, e.g. 5,50,100; got {0:?}")]
    BadWaves(Vec<u32>),
    #[error("artifact must be written name@version, got {0:?}")]
    BadArtifact(String),
    #[error("the selector matches no enrolled, active node")]
    NoNodes,
    #[error("no rollout {0}")]
    NotFound(String),
    #[error("rollout {id} is {state}; it cannot be {action}")]
    WrongState {
        id: String,
        state: String,
        action: &'static str,
    },
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] crate::audit_log::AuditError),
}

/// Which nodes a rollout targets: every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Selector {
    pub labels: BTreeMap<String, String>,
    pub arch: Option<String>,
    pub node_ids: Vec<String>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, RolloutError> {
        let mut selector = Selector::default();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, value) = term
                .split_once('=')
                .ok_or_else(|| RolloutError::BadSelector(term.to_owned()))?;
            let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
            match key.as_str() {
                "arch" => selector.arch = Some(value),
                "id" => selector.node_ids.push(value),
                _ => {
                    selector.labels.insert(key, value);
                }
            }
        }
        Ok(selector)
    }

    pub fn matches(&self, node: &NodeRecord) -> bool {
        let labels = node.labels();
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.arch.as_ref().is_none_or(|a| &node.facts.arch == a)
            && (self.node_ids.is_empty() || self.node_ids.contains(&node.id))
    }
}

/// Health requirements a wave's nodes must meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub require_smoke: bool,
    pub max_error_rate: f32,
    pub max_p95_latency_ms: f32,
    pub wave_timeout_secs: u32,
}

/// Cumulative node counts that end each wave: `percents` of `nodes`, at least one node
/// in the first wave, never shrinking.
pub fn wave_ends(nodes: usize, percents: &[u32]) -> Result<Vec<usize>, RolloutError> {
    let increasing = percents.windows(2).all(|w| w[0] < w[1]);
    if percents.is_empty() || !increasing || percents.last() != Some(&100) || percents[0] == 0 {
        return Err(RolloutError::BadWaves(percents.to_vec()));
    }
    let mut ends = Vec::with_capacity(percents.len());
    let mut previous = 0;
    for &percent in percents {
        let end = (nodes * percent as usize)
            .div_ceil(100)
            .max(previous)
            .max(1);
        ends.push(end.min(nodes));
        previous = end;
    }
    Ok(ends)
}

/// What a node told the coordinator about one artifact name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ArtifactReport {
    pub rollout_id: String,
    pub version: String,
    /// "downloading", "active" or "failed".
    pub state: String,
    pub reason: String,
    pub loaded: bool,
    pub smoke_ok: bool,
    /// The node runs no model; see `ModelHealth.store_only`.
    #[serde(default)]
    pub store_only: bool,
    pub error_rate: f32,
    pub p95_latency_ms: f32,
    pub bytes_fetched: u64,
    pub previous_version: String,
    pub at_ms: i64,
}

/// A node's desired version of one artifact name; `version` empty = none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub name: String,
    pub version: String,
    pub rollout_id: String,
    /// Set by an operator's pin: rollouts of this name leave the node alone.
    #[serde(default)]
    pub pinned: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    Halted,
    Completed,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub name: String,
    pub version: String,
    pub selector_text: String,
    pub selector: Selector,
    pub percents: Vec<u32>,
    pub gate: Gate,
    /// Targeted node ids, in wave order.
    pub targets: Vec<String>,
    /// Cumulative counts: wave `i` is `targets[ends[i-1]..ends[i]]`.
    pub ends: Vec<usize>,
    pub current_wave: usize,
    pub wave_started_ms: i64,
    pub state: RolloutState,
    pub reason: String,
    /// The version each node had before this rollout touched it ("" = none).
    pub previous: BTreeMap<String, String>,
    /// Nodes this rollout moved back to their previous version.
    pub rolled_back: Vec<String>,
    pub created_at_ms: i64,
    pub created_by: String,
    /// The pace: at most this many nodes assigned per second; 0 = a wave at once.
    #[serde(default)]
    pub max_per_second: u32,
    /// Nodes of the current wave assigned so far (the wave's first nodes).
    #[serde(default)]
    pub wave_assigned: usize,
    /// When the pace was last started (a wave start or a resume), and `wave_assigned`
    /// then: the pace counts from there.
    #[serde(default)]
    pub paced_from_ms: i64,
    #[serde(default)]
    pub paced_from_count: usize,
}

/// How many nodes a pace of `max_per_second` allows `elapsed_ms` after it started: one
/// at once, then evenly spread, with no burst at a wave's start (a burst of a second's
/// worth is what pacing exists to avoid).
pub fn paced_allowance(max_per_second: u32, elapsed_ms: i64) -> usize {
    let elapsed_ms = u64::try_from(elapsed_ms).unwrap_or(0);
    let allowed = (u64::from(max_per_second) * elapsed_ms / 1000).max(1);
    usize::try_from(allowed).unwrap_or(usize::MAX)
}

impl Rollout {
    pub fn artifact(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn wave_nodes(&self, wave: usize) -> &[String] {
        let start = if wave == 0 { 0 } else { self.ends[wave - 1] };
        &self.targets[start..self.ends[wave]]
    }

    /// Nodes that have been assigned so far (earlier waves and the current one's first).
    fn assigned(&self) -> &[String] {
        if self.current_wave >= self.ends.len() {
            return &self.targets;
        }
        let start = if self.current_wave == 0 {
            0
        } else {
            self.ends[self.current_wave - 1]
        };
        &self.targets[..start + self.wave_assigned]
    }

    /// Restarts the pace from `now` (a wave start or a resume).
    fn restart_pace(&mut self, now: i64) {
        self.paced_from_ms = now;
        self.paced_from_count = self.wave_assigned;
    }

    /// Nodes of the current wave that the pace lets the engine assign at `now`.
    fn due(&self, now: i64) -> std::ops::Range<usize> {
        let len = self.wave_nodes(self.current_wave).len();
        let end = if self.max_per_second == 0 {
            len
        } else {
            let allowed = paced_allowance(self.max_per_second, now - self.paced_from_ms);
            self.paced_from_count.saturating_add(allowed).min(len)
        };
        self.wave_assigned..end.max(self.wave_assigned)
    }
}

/// How one node of a wave stands against the gate.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeVerdict {
    Pending(&'static str),
    Healthy,
    Failed(String),
}

/// Judges a node's report for `version` against `gate`.
pub fn judge(report: Option<&ArtifactReport>, version: &str, gate: &Gate) -> NodeVerdict {
    let Some(report) = report.filter(|r| r.version == version) else {
        return NodeVerdict::Pending("pending");
    };
    match report.state.as_str() {
        "failed" => NodeVerdict::Failed(report.reason.clone()),
        "active" if report.store_only => {
            if gate.require_smoke {
                NodeVerdict::Failed(
                    "the node serves no models (serve_models = false) and the gate requires the smoke prompt"
                        .to_owned(),
                )
            } else {
                NodeVerdict::Healthy
            }
        }
        "active" => {
            if !report.loaded {
                NodeVerdict::Failed("the model does not load".to_owned())
            } else if gate.require_smoke && !report.smoke_ok {
                NodeVerdict::Failed(format!("the smoke prompt failed: {}", report.reason))
            } else if gate.max_error_rate > 0.0 && report.error_rate > gate.max_error_rate {
                NodeVerdict::Failed(format!(
                    "error rate {:.3} above {:.3}",
                    report.error_rate, gate.max_error_rate
                ))
            } else if gate.max_p95_latency_ms > 0.0
                && report.p95_latency_ms > gate.max_p95_latency_ms
            {
                NodeVerdict::Failed(format!(
                    "p95 latency {:.0} ms above {:.0} ms",
                    report.p95_latency_ms, gate.max_p95_latency_ms
                ))
            } else {
                NodeVerdict::Healthy
            }
        }
        _ => NodeVerdict::Pending("downloading"),
    }
}

/// A change to a node's desired state that must reach the node.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub node_id: String,
    pub desired: Desired,
}

/// Desired state and reports per node; cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    store: Arc<dyn KvStore>,
}

fn node_key(node_id: &str, name: &str) -> Vec<u8> {
    format!("{node_id}/{name}").into_bytes()
}

impl Deployments {
    pub fn new(store: Arc<dyn KvStore>) -> Self {
        Self { store }
    }

    pub fn set_desired(&self, node_id: &str, desired: &Desired) -> Result<(), StoreError> {
        self.store.put(
            Keyspace::Desired,
            &node_key(node_id, &desired.name),
            &encode(desired),
        )
    }

    /// Every desired artifact of a node.
    pub fn desired_of(&self, node_id: &str) -> Result<Vec<Desired>, StoreError> {
        let prefix = format!("{node_id}/");
        self.store
            .scan(Keyspace::Desired)?
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix.as_bytes()))
            .map(|(k, v)| decode(Keyspace::Desired, &k, &v))
            .collect()
    }

    pub fn desired(&self, node_id: &str, name: &str) -> Result<Option<Desired>, StoreError> {
        get_record(&*self.store, Keyspace::Desired, &node_key(node_id, name))
    }

    pub fn record_report(
        &self,
        node_id: &str,
        name: &str,
        report: &ArtifactReport,
    ) -> Result<(), StoreError> {
        self.store.put(
            Keyspace::NodeArtifacts,
            &node_key(node_id, name),
            &encode(report),
        )
    }

    pub fn report(&self, node_id: &str, name: &str) -> Result<Option<ArtifactReport>, StoreError> {
        get_record(
            &*self.store,
            Keyspace::NodeArtifacts,
            &node_key(node_id, name),
        )
    }
}

/// The rollout engine's state and rules; the caller delivers the assignments it returns.
#[derive(Clone)]
pub struct Rollouts {
    store: Arc<dyn KvStore>,
    registry: Registry,
    artifacts: ArtifactStore,
    deployments: Deployments,
    events: AuditLog,
    default_wave_timeout: Duration,
    heartbeat_interval_secs: u32,
}

impl Rollouts {
    pub fn new(
        store: Arc<dyn KvStore>,
        registry: Registry,
        artifacts: ArtifactStore,
        events: AuditLog,
        default_wave_timeout: Duration,
        heartbeat_interval_secs: u32,
    ) -> Self {
        Self {
            deployments: Deployments::new(store.clone()),
            store,
            registry,
            artifacts,
            events,
            default_wave_timeout,
            heartbeat_interval_secs,
        }
    }

    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    fn save(&self, rollout: &Rollout) -> Result<(), StoreError> {
        put_record_durably(
            &*self.store,
            Keyspace::Rollouts,
            rollout.id.as_bytes(),
            rollout,
        )
    }

    pub fn get(&self, id: &str) -> Result<Rollout, RolloutError> {
        get_record(&*self.store, Keyspace::Rollouts, id.as_bytes())?
            .ok_or_else(|| RolloutError::NotFound(id.to_owned()))
    }

    pub fn list(&self) -> Result<Vec<Rollout>, RolloutError> {
        let mut rollouts: Vec<Rollout> = scan_records(&*self.store, Keyspace::Rollouts)?;
        rollouts.sort_by_key(|r| r.created_at_ms);
        Ok(rollouts)
    }

    /// Creates a rollout and assigns its first wave.
    pub fn create(
        &self,
        artifact: &str,
        selector_text: &str,
        percents: &[u32],
        mut gate: Gate,
        max_per_second: u32,
        operator: &str,
    ) -> Result<(Rollout, Vec<Assignment>), RolloutError> {
        let (name, version) = artifact
            .split_once('@')
            .ok_or_else(|| RolloutError::BadArtifact(artifact.to_owned()))?;
        self.artifacts.get(name, version)?;
        let selector = Selector::parse(selector_text)?;
        let mut targets: Vec<String> = self
            .registry
            .nodes()?
            .into_iter()
            .filter(|n| n.status == NodeStatus::Active && selector.matches(n))
            .map(|n| n.id)
            .collect();
        let mut pinned = Vec::new();
        for id in &targets {
            if self
                .deployments
                .desired(id, name)?
                .is_some_and(|d| d.pinned)
            {
                pinned.push(id.clone());
            }
        }
        targets.retain(|id| !pinned.contains(id));
        if targets.is_empty() {
            return Err(RolloutError::NoNodes);
        }
        targets.sort();
        let ends = wave_ends(targets.len(), percents)?;
        let now = now_unix_ms();
        if gate.wave_timeout_secs == 0 {
            gate.wave_timeout_secs = self.default_wave_timeout.as_secs() as u32;
        }
        let mut rollout = Rollout {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_owned(),
            version: version.to_owned(),
            selector_text: selector_text.to_owned(),
            selector,
            percents: percents.to_vec(),
            gate,
            targets,
            ends,
            current_wave: 0,
            wave_started_ms: now,
            state: RolloutState::Running,
            reason: String::new(),
            previous: BTreeMap::new(),
            rolled_back: Vec::new(),
            created_at_ms: now,
            created_by: operator.to_owned(),
            max_per_second,
            wave_assigned: 0,
            paced_from_ms: now,
            paced_from_count: 0,
        };
        self.record_wave_start(&rollout)?;
        let assignments = self.assign_due(&mut rollout, now)?;
        self.save(&rollout)?;
        self.events.append(
            &format!("operator:{operator}"),
            "rollout.create",
            &rollout.artifact(),
            &format!(
                "rollout {} to {} nodes in waves {:?}",
                rollout.id,
                rollout.targets.len(),
                rollout.percents
            ),
        )?;
        Ok((rollout, assignments))
    }

    /// Points the current wave's nodes that are due (all of them, or as many as the
    /// pace allows by `now`) at the rollout's version, remembering what they had.
    fn assign_due(&self, rollout: &mut Rollout, now: i64) -> Result<Vec<Assignment>, RolloutError> {
        let due = rollout.due(now);
        let nodes = rollout.wave_nodes(rollout.current_wave)[due.clone()].to_vec();
        let mut assignments = Vec::with_capacity(nodes.len());
        for node_id in nodes {
            // What the node had before this rollout first touched it: a record written
            // before paced waves existed may assign its wave's nodes a second time.
            if !rollout.previous.contains_key(&node_id) {
                let previous = self
                    .deployments
                    .desired(&node_id, &rollout.name)?
                    .map(|d| d.version)
                    .unwrap_or_default();
                rollout.previous.insert(node_id.clone(), previous);
            }
            let desired = Desired {
                name: rollout.name.clone(),
                version: rollout.version.clone(),
                rollout_id: rollout.id.clone(),
                pinned: false,
            };
            self.deployments.set_desired(&node_id, &desired)?;
            assignments.push(Assignment { node_id, desired });
        }
        rollout.wave_assigned = due.end;
        Ok(assignments)
    }

    fn record_wave_start(&self, rollout: &Rollout) -> Result<(), RolloutError> {
        let wave = rollout.current_wave;
        let pace = match rollout.max_per_second {
            0 => String::new(),
            rate => format!(", at most {rate} nodes a second"),
        };
        self.events.append(
            "coordinator",
            "rollout.wave_start",
            &rollout.artifact(),
            &format!(
                "rollout {} wave {} ({}%){pace}",
                rollout.id,
                wave + 1,
                rollout.percents[wave]
            ),
        )?;
        Ok(())
    }

    /// Moves `nodes` back to the versions they had before the rollout.
    fn roll_back(
        &self,
        rollout: &mut Rollout,
        nodes: &[String],
    ) -> Result<Vec<Assignment>, RolloutError> {
        let mut assignments = Vec::new();
        for node_id in nodes {
            let Some(previous) = rollout.previous.get(node_id).cloned() else {
                continue;
            };
            let desired = Desired {
                name: rollout.name.clone(),
                version: previous.clone(),
                rollout_id: rollout.id.clone(),
                pinned: false,
            };
            self.deployments.set_desired(node_id, &desired)?;
            rollout.rolled_back.push(node_id.clone());
            let to = if previous.is_empty() {
                "no version".to_owned()
            } else {
                previous
            };
            self.events.append(
                "coordinator",
                "rollout.rollback",
                &rollout.artifact(),
                &format!("node {node_id} back to {to} (rollout {})", rollout.id),
            )?;
            assignments.push(Assignment {
                node_id: node_id.clone(),
                desired,
            });
        }
        Ok(assignments)
    }

    /// How each node of a wave stands, with its last report, for status views.
    pub fn wave_status(
        &self,
        rollout: &Rollout,
        wave: usize,
    ) -> Result<Vec<(String, NodeVerdict, Option<ArtifactReport>)>, RolloutError> {
        rollout
            .wave_nodes(wave)
            .iter()
            .map(|node_id| {
                let report = self.deployments.report(node_id, &rollout.name)?;
                let verdict = judge(report.as_ref(), &rollout.version, &rollout.gate);
                Ok((node_id.clone(), verdict, report))
            })
            .collect()
    }

    /// One step of the engine for every running rollout; returns what must be sent.
    pub fn tick(&self) -> Result<Vec<Assignment>, RolloutError> {
        let mut assignments = Vec::new();
        for mut rollout in self.list()? {
            if rollout.state == RolloutState::Running {
                assignments.extend(self.advance(&mut rollout)?);
            }
        }
        Ok(assignments)
    }

    fn advance(&self, rollout: &mut Rollout) -> Result<Vec<Assignment>, RolloutError> {
        let now = now_unix_ms();
        let wave = rollout.current_wave;
        // A paced wave: the nodes whose turn has come, before the gate is judged (the
        // others count as pending, so the wave cannot pass without them).
        let mut assignments = self.assign_due(rollout, now)?;
        if !assignments.is_empty() {
            self.save(rollout)?;
        }
        let verdicts: Vec<(String, NodeVerdict)> = self
            .wave_status(rollout, wave)?
            .into_iter()
            .map(|(node, verdict, _)| (node, verdict))
            .collect();
        let failed: Vec<String> = verdicts
            .iter()
            .filter_map(|(id, v)| match v {
                NodeVerdict::Failed(reason) => Some(format!("node {id}: {reason}")),
                _ => None,
            })
            .collect();
        let timed_out =
            now - rollout.wave_started_ms > i64::from(rollout.gate.wave_timeout_secs) * 1000;
        let online_pending = verdicts.iter().any(|(id, v)| {
            matches!(v, NodeVerdict::Pending(_))
                && self
                    .registry
                    .node(id)
                    .map(|n| n.is_online(now, self.heartbeat_interval_secs))
                    .unwrap_or(false)
        });
        let healthy = verdicts
            .iter()
            .filter(|(_, v)| *v == NodeVerdict::Healthy)
            .count();

        if !failed.is_empty() || (timed_out && healthy == 0) {
            let reason = if failed.is_empty() {
                format!(
                    "wave {} was not healthy within {} s",
                    wave + 1,
                    rollout.gate.wave_timeout_secs
                )
            } else {
                format!("wave {} failed its gate: {}", wave + 1, failed.join("; "))
            };
            rollout.state = RolloutState::Halted;
            rollout.reason = reason.clone();
            let nodes = rollout.wave_nodes(wave).to_vec();
            assignments.extend(self.roll_back(rollout, &nodes)?);
            self.events
                .append("coordinator", "rollout.halt", &rollout.artifact(), &reason)?;
            self.save(rollout)?;
            return Ok(assignments);
        }
        // A wave passes when all its nodes are assigned and every one that is online is
        // healthy; offline nodes converge when they return.
        let all_assigned = rollout.wave_assigned == rollout.wave_nodes(wave).len();
        if all_assigned && healthy > 0 && !online_pending {
            self.events.append(
                "coordinator",
                "rollout.wave_passed",
                &rollout.artifact(),
                &format!(
                    "rollout {} wave {}: {healthy} nodes healthy",
                    rollout.id,
                    wave + 1
                ),
            )?;
            if wave + 1 == rollout.ends.len() {
                rollout.state = RolloutState::Completed;
                rollout.current_wave = wave + 1;
                self.events.append(
                    "coordinator",
                    "rollout.complete",
                    &rollout.artifact(),
                    &format!("rollout {}", rollout.id),
                )?;
                self.save(rollout)?;
                return Ok(assignments);
            }
            rollout.current_wave = wave + 1;
            rollout.wave_started_ms = now;
            rollout.wave_assigned = 0;
            rollout.restart_pace(now);
            self.record_wave_start(rollout)?;
            assignments.extend(self.assign_due(rollout, now)?);
            self.save(rollout)?;
        }
        Ok(assignments)
    }

    /// Pause, resume or abort at an operator's request.
    pub fn control(
        &self,
        id: &str,
        action: Control,
        operator: &str,
    ) -> Result<(Rollout, Vec<Assignment>), RolloutError> {
        let mut rollout = self.get(id)?;
        let allowed = match action {
            Control::Pause => rollout.state == RolloutState::Running,
            Control::Resume => rollout.state == RolloutState::Paused,
            Control::Abort => matches!(
                rollout.state,
                RolloutState::Running | RolloutState::Paused | RolloutState::Halted
            ),
        };
        if !allowed {
            return Err(RolloutError::WrongState {
                id: id.to_owned(),
                state: rollout.state.as_str().to_owned(),
                action: action.past_tense(),
            });
        }
        let mut assignments = Vec::new();
        match action {
            Control::Pause => rollout.state = RolloutState::Paused,
            Control::Resume => {
                let now = now_unix_ms();
                rollout.state = RolloutState::Running;
                rollout.wave_started_ms = now;
                rollout.restart_pace(now);
            }
            Control::Abort => {
                let touched: Vec<String> = rollout
                    .assigned()
                    .iter()
                    .filter(|n| !rollout.rolled_back.contains(n))
                    .cloned()
                    .collect();
                assignments = self.roll_back(&mut rollout, &touched)?;
                rollout.state = RolloutState::Aborted;
                rollout.reason = format!("aborted by {operator}");
            }
        }
        self.save(&rollout)?;
        self.events.append(
            &format!("operator:{operator}"),
            &format!("rollout.{}", action.past_tense()),
            &rollout.artifact(),
            &format!("rollout {}", rollout.id),
        )?;
        Ok((rollout, assignments))
    }
}

impl Rollouts {
    /// Pins (`version` = Some) or unpins the nodes `selector_text` picks; returns them.
    pub fn pin(
        &self,
        selector_text: &str,
        name: &str,
        version: Option<&str>,
        operator: &str,
    ) -> Result<Vec<Assignment>, RolloutError> {
        if let Some(version) = version {
            self.artifacts.get(name, version)?;
        }
        let selector = Selector::parse(selector_text)?;
        let mut assignments = Vec::new();
        for node in self.registry.nodes()? {
            if node.status != NodeStatus::Active || !selector.matches(&node) {
                continue;
            }
            let current = self.deployments.desired(&node.id, name)?;
            let desired = match version {
                Some(version) => Desired {
                    name: name.to_owned(),
                    version: version.to_owned(),
                    rollout_id: String::new(),
                    pinned: true,
                },
                // Unpinned, the node keeps the version it has until a rollout moves it.
                None => match current {
                    Some(current) if current.pinned => Desired {
                        pinned: false,
                        ..current
                    },
                    _ => continue,
                },
            };
            self.deployments.set_desired(&node.id, &desired)?;
            assignments.push(Assignment {
                node_id: node.id,
                desired,
            });
        }
        if assignments.is_empty() {
            return Err(RolloutError::NoNodes);
        }
        self.store.flush()?;
        let (action, subject) = match version {
            Some(version) => ("node.pin", format!("{name}@{version}")),
            None => ("node.unpin", name.to_owned()),
        };
        let nodes: Vec<&str> = assignments.iter().map(|a| a.node_id.as_str()).collect();
        self.events.append(
            &format!("operator:{operator}"),
            action,
            &subject,
            &format!("nodes {}", nodes.join(", ")),
        )?;
        Ok(assignments)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

impl Control {
    fn past_tense(self) -> &'static str {
        match self {
            Control::Pause => "paused",
            Control::Resume => "resumed",
            Control::Abort => "aborted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_split_cumulatively_with_at_least_one_node_first() {
        assert_eq!(wave_ends(3, &[50, 100]).unwrap(), vec![2, 3]);
        assert_eq!(wave_ends(20, &[5, 50, 100]).unwrap(), vec![1, 10, 20]);
        assert_eq!(wave_ends(3, &[1, 10, 100]).unwrap(), vec![1, 1, 3]);
        assert_eq!(wave_ends(1000, &[1, 10, 100]).unwrap(), vec![10, 100, 1000]);
        assert!(wave_ends(3, &[50, 40, 100]).is_err());
        assert!(wave_ends(3, &[50]).is_err());
        assert!(wave_ends(3, &[]).is_err());
    }

    #[test]
    fn a_pace_spreads_a_wave_evenly_with_no_burst_at_its_start() {
        assert_eq!(paced_allowance(400, 0), 1);
        assert_eq!(paced_allowance(400, 100), 40);
        assert_eq!(paced_allowance(400, 1000), 400);
        assert_eq!(paced_allowance(1, 1999), 1);
        assert_eq!(paced_allowance(1, 2000), 2);
        // A clock that stepped back allows no more than the start.
        assert_eq!(paced_allowance(400, -5000), 1);
    }

    fn paced_rollout(max_per_second: u32) -> Rollout {
        Rollout {
            id: "r".into(),
            name: "m".into(),
            version: "2".into(),
            selector_text: String::new(),
            selector: Selector::default(),
            percents: vec![50, 100],
            gate: Gate {
                require_smoke: false,
                max_error_rate: 0.0,
                max_p95_latency_ms: 0.0,
                wave_timeout_secs: 60,
            },
            targets: (0..10).map(|i| format!("n{i}")).collect(),
            ends: vec![5, 10],
            current_wave: 0,
            wave_started_ms: 0,
            state: RolloutState::Running,
            reason: String::new(),
            previous: BTreeMap::new(),
            rolled_back: Vec::new(),
            created_at_ms: 0,
            created_by: "op".into(),
            max_per_second,
            wave_assigned: 0,
            paced_from_ms: 0,
            paced_from_count: 0,
        }
    }

    #[test]
    fn a_paced_wave_comes_due_a_node_at_a_time_and_resumes_where_it_stopped() {
        let mut rollout = paced_rollout(2);
        assert_eq!(rollout.due(0), 0..1);
        rollout.wave_assigned = 1;
        assert_eq!(rollout.due(400), 1..1);
        assert_eq!(rollout.due(1500), 1..3);
        rollout.wave_assigned = 3;
        assert_eq!(rollout.assigned().len(), 3);
        // Paused for a minute, then resumed: the pace counts from the resume, not from
        // the wave's start, so the rest does not come due at once.
        rollout.restart_pace(61_000);
        assert_eq!(rollout.due(61_000), 3..4);
        assert_eq!(rollout.due(70_000), 3..5);
        // The second wave of an unpaced rollout comes due whole.
        let mut unpaced = paced_rollout(0);
        unpaced.current_wave = 1;
        assert_eq!(unpaced.due(0), 0..5);
        unpaced.wave_assigned = 5;
        assert_eq!(unpaced.assigned().len(), 10);
    }

    #[test]
    fn selector_terms_all_hold() {
        let selector = Selector::parse("site=plant-3, arch=aarch64").unwrap();
        let mut node = NodeRecord {
            id: "n1".into(),
            status: NodeStatus::Active,
            token_labels: [("site".to_owned(), "plant-3".to_owned())].into(),
            facts: Default::default(),
            enrolled_at_ms: 0,
            last_seen_ms: 0,
            cert_sha256: String::new(),
            revoked_at_ms: 0,
            revoked_reason: String::new(),
        };
        assert!(!selector.matches(&node));
        node.facts.arch = "aarch64".into();
        assert!(selector.matches(&node));
        assert!(!Selector::parse("id=n2").unwrap().matches(&node));
        assert!(Selector::parse("").unwrap().matches(&node));
        assert!(Selector::parse("oops").is_err());
    }

    #[test]
    fn the_gate_judges_reports() {
        let gate = Gate {
            require_smoke: true,
            max_error_rate: 0.1,
            max_p95_latency_ms: 0.0,
            wave_timeout_secs: 60,
        };
        let healthy = ArtifactReport {
            version: "2".into(),
            state: "active".into(),
            loaded: true,
            smoke_ok: true,
            ..Default::default()
        };
        assert_eq!(judge(Some(&healthy), "2", &gate), NodeVerdict::Healthy);
        assert!(matches!(
            judge(Some(&healthy), "3", &gate),
            NodeVerdict::Pending(_)
        ));
        assert!(matches!(judge(None, "2", &gate), NodeVerdict::Pending(_)));
        let no_smoke = ArtifactReport {
            smoke_ok: false,
            ..healthy.clone()
        };
        assert!(matches!(
            judge(Some(&no_smoke), "2", &gate),
            NodeVerdict::Failed(_)
        ));
        let store_only = ArtifactReport {
            loaded: false,
            smoke_ok: false,
            store_only: true,
            ..healthy.clone()
        };
        assert!(matches!(
            judge(Some(&store_only), "2", &gate),
            NodeVerdict::Failed(_)
        ));
        let no_smoke_gate = Gate {
            require_smoke: false,
            ..gate.clone()
        };
        assert_eq!(
            judge(Some(&store_only), "2", &no_smoke_gate),
            NodeVerdict::Healthy
        );
        let errors = ArtifactReport {
            error_rate: 0.5,
            ..healthy.clone()
        };
        assert!(matches!(
            judge(Some(&errors), "2", &gate),
            NodeVerdict::Failed(_)
        ));
        let failed = ArtifactReport {
            state: "failed".into(),
            reason: "bad signature".into(),
            ..healthy
        };
        assert_eq!(
            judge(Some(&failed), "2", &gate),
            NodeVerdict::Failed("bad signature".into())
        );
    }
}
