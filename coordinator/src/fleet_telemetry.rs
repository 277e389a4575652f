//! The nodes' telemetry as the coordinator applied it: checks a node's batch, applies each
//! record at most once (the highest applied sequence and the totals are one stored record,
//! replaced by compare-and-swap), and serves the totals to operators and, aggregated over
//! nodes by model version, site and hardware class, to Prometheus.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nanofleet_proto::v1 as pb;
use opentelemetry::metrics::Meter;
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};

use crate::artifacts::ArtifactStore;
use crate::registry::{NodeRecord, PowerSource, Registry};
use crate::store::{decode, encode, Keyspace, KvStore, StoreError};

/// Limits of one batch; the agent stays within them (node-agent/src/telemetry.rs).
pub const MAX_BATCH_RECORDS: usize = 64;
pub const MAX_MODELS_PER_RECORD: usize = 32;
pub const MAX_EVENTS_PER_RECORD: usize = 16;
const MAX_NAME: usize = 128;
const MAX_EVENT_KIND: usize = 64;
const MAX_EVENT_TEXT: usize = 256;
/// Model versions kept per node; the least recently reported inactive one is folded into
/// `retired` beyond this, so a node cannot grow its record without bound.
const MAX_MODELS_PER_NODE: usize = 128;
/// Latest events kept per node.
const MAX_KEPT_EVENTS: usize = 64;
/// Gauges (speed, time to first token, latency) count only nodes heard from this recently.
const GAUGE_FRESHNESS_MS: i64 = 5 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid telemetry batch: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(reason: impl Into<String>) -> TelemetryError {
    TelemetryError::Invalid(reason.into())
}

/// Totals of one model version on one node, with the gauges of the latest record that
/// named it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelTotals {
    pub name: String,
    pub version: String,
    pub active: bool,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens_per_second: f64,
    pub time_to_first_token_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    /// End of the latest record that named this version.
    pub last_record_ms: i64,
}

impl ModelTotals {
    fn add_counts(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemGauges {
    pub memory_rss_bytes: u64,
    pub cpu_percent: f32,
    pub memory_available_bytes: u64,
    pub power_source: PowerSource,
    pub battery_percent: Option<f32>,
    pub charging: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeEvent {
    pub time_unix_ms: i64,
    pub kind: String,
    pub subject: String,
    pub detail: String,
}

/// Everything applied of one node's telemetry: one stored record, so that the totals and
/// the sequence they include change together.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeTelemetry {
    pub node_id: String,
    /// Every record up to this sequence is in the totals (or was never received).
    pub applied_sequence: u64,
    pub records: u64,
    /// Sequences skipped over: records the agent dropped before sending them.
    pub records_missing: u64,
    /// The agent's own running count of records it dropped unsent.
    pub records_dropped: u64,
    pub first_record_ms: i64,
    pub last_record_ms: i64,
    /// By `name@version`.
    pub models: BTreeMap<String, ModelTotals>,
    /// Counts of versions folded away beyond [`MAX_MODELS_PER_NODE`].
    pub retired: ModelTotals,
    pub system: Option<SystemGauges>,
    pub events: VecDeque<NodeEvent>,
}

impl NodeTelemetry {
    /// Sums over every model version, retired ones included.
    pub fn totals(&self) -> ModelTotals {
        let mut sum = self.retired.clone();
        for model in self.models.values() {
            sum.add_counts(model);
        }
        sum
    }

    /// Applies the records of a batch (one that passed [`validate`]) that are newer than
    /// the applied sequence.
    pub fn apply_batch(&mut self, batch: &pb::TelemetryBatch) {
        for record in &batch.records {
            if record.sequence > self.applied_sequence {
                self.apply(record);
            }
        }
        self.records_dropped = self.records_dropped.max(batch.dropped_total);
    }

    fn apply(&mut self, record: &pb::TelemetryRecord) {
        let gap = record.sequence - self.applied_sequence - 1;
        self.records_missing = self.records_missing.saturating_add(gap);
        self.applied_sequence = record.sequence;
        self.records = self.records.saturating_add(1);
        if self.first_record_ms == 0 {
            self.first_record_ms = record.start_unix_ms;
        }
        self.last_record_ms = self.last_record_ms.max(record.end_unix_ms);
        // Each record names every version served when it was taken.
        for model in self.models.values_mut() {
            model.active = false;
        }
        for sample in &record.models {
            let key = format!("{}@{}", sample.name, sample.version);
            let totals = self.models.entry(key).or_insert_with(|| ModelTotals {
                name: sample.name.clone(),
                version: sample.version.clone(),
                ..ModelTotals::default()
            });
            totals.add_counts(&ModelTotals {
                requests: sample.requests,
                errors: sample.errors,
                prompt_tokens: sample.prompt_tokens,
                completion_tokens: sample.completion_tokens,
                ..ModelTotals::default()
            });
            totals.active = sample.active;
            totals.last_record_ms = record.end_unix_ms;
            if sample.requests > 0 {
                totals.tokens_per_second = sample.tokens_per_second;
                totals.time_to_first_token_ms = sample.time_to_first_token_ms;
                totals.latency_p50_ms = sample.latency_p50_ms;
                totals.latency_p95_ms = sample.latency_p95_ms;
            }
        }
        while self.models.len() > MAX_MODELS_PER_NODE {
            let Some(oldest) = self
                .models
                .iter()
                .filter(|(_, m)| !m.active)
                .min_by_key(|(_, m)| m.last_record_ms)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            if let Some(model) = self.models.remove(&oldest) {
                self.retired.add_counts(&model);
            }
        }
        if let Some(system) = &record.system {
            self.system = Some(SystemGauges {
                memory_rss_bytes: system.memory_rss_bytes,
                cpu_percent: system.cpu_percent,
                memory_available_bytes: system.memory_available_bytes,
                power_source: match pb::PowerSource::try_from(system.power_source) {
                    Ok(pb::PowerSource::Mains) => PowerSource::Mains,
                    Ok(pb::PowerSource::Battery) => PowerSource::Battery,
                    _ => PowerSource::Unknown,
                },
                battery_percent: system.battery_percent,
                charging: system.charging,
            });
        }
        for event in &record.events {
            if self.events.len() == MAX_KEPT_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(NodeEvent {
                time_unix_ms: event.time_unix_ms,
                kind: event.kind.clone(),
                subject: event.subject.clone(),
                detail: event.detail.clone(),
            });
        }
        if record.events_dropped > 0 {
            if self.events.len() == MAX_KEPT_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(NodeEvent {
                time_unix_ms: record.end_unix_ms,
                kind: "telemetry.events_dropped".to_owned(),
                subject: String::new(),
                detail: format!(
                    "{} events of this period were not kept",
                    record.events_dropped
                ),
            });
        }
    }
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), TelemetryError> {
    if text.len() > max {
        return Err(invalid(format!("{field} is longer than {max} bytes")));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(format!("{field} holds control characters")));
    }
    Ok(())
}

fn check_gauge(field: &str, value: f64) -> Result<(), TelemetryError> {
    if !value.is_finite() || value < 0.0 {
        return Err(invalid(format!(
            "{field} must be a finite, non-negative number"
        )));
    }
    Ok(())
}

/// Checks a whole batch before anything is applied, so that a refused batch changes
/// nothing.
pub fn validate(batch: &pb::TelemetryBatch) -> Result<(), TelemetryError> {
    if batch.records.len() > MAX_BATCH_RECORDS {
        return Err(invalid(format!(
            "a batch holds at most {MAX_BATCH_RECORDS} records; this one has {}",
            batch.records.len()
        )));
    }
    let mut previous = 0;
    for record in &batch.records {
        let at = format!("record {}", record.sequence);
        if record.sequence <= previous {
            return Err(invalid(format!(
                "sequences must start at 1 and increase within a batch ({at} follows {previous})"
            )));
        }
        previous = record.sequence;
        if record.models.len() > MAX_MODELS_PER_RECORD {
            return Err(invalid(format!(
                "{at} names more than {MAX_MODELS_PER_RECORD} model versions"
            )));
        }
        if record.events.len() > MAX_EVENTS_PER_RECORD {
            return Err(invalid(format!(
                "{at} holds more than {MAX_EVENTS_PER_RECORD} events"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for model in &record.models {
            if model.name.is_empty() || model.version.is_empty() {
                return Err(invalid(format!(
                    "{at} names a model without name or version"
                )));
            }
            check_text(&format!("{at}: model name"), &model.name, MAX_NAME)?;
            check_text(&format!("{at}: model version"), &model.version, MAX_NAME)?;
            if !seen.insert((&model.name, &model.version)) {
                return Err(invalid(format!(
                    "{at} names {}@{} twice",
                    model.name, model.version
                )));
            }
            if model.errors > model.requests {
                return Err(invalid(format!(
                    "{at}: {}@{} has more errors than requests",
                    model.name, model.version
                )));
            }
            for (field, value) in [
                ("tokens_per_second", model.tokens_per_second),
                ("time_to_first_token_ms", model.time_to_first_token_ms),
                ("latency_p50_ms", model.latency_p50_ms),
                ("latency_p95_ms", model.latency_p95_ms),
            ] {
                check_gauge(&format!("{at}: {field}"), value)?;
            }
        }
        if let Some(system) = &record.system {
            check_gauge(&format!("{at}: cpu_percent"), f64::from(system.cpu_percent))?;
            if let Some(battery) = system.battery_percent {
                if !(0.0..=100.0).contains(&battery) {
                    return Err(invalid(format!(
                        "{at}: battery_percent must be within 0..=100"
                    )));
                }
            }
        }
        for event in &record.events {
            check_text(&format!("{at}: event kind"), &event.kind, MAX_EVENT_KIND)?;
            check_text(
                &format!("{at}: event subject"),
                &event.subject,
                MAX_EVENT_TEXT,
            )?;
            check_text(
                &format!("{at}: event detail"),
                &event.detail,
                MAX_EVENT_TEXT,
            )?;
        }
    }
    Ok(())
}

/// The nodes' applied telemetry over the store; cheap to clone.
#[derive(Clone)]
pub struct FleetTelemetry {
    store: Arc<dyn KvStore>,
}

impl FleetTelemetry {
    pub fn new(store: Arc<dyn KvStore>) -> Self {
        Self { store }
    }

    /// Applies the records of `batch` that are newer than what `node_id` already applied,
    /// and returns the highest applied sequence once it is on disk. Records at or below it
    /// are skipped (a batch sent again after a lost ack); a gap counts as missing records.
    pub fn apply(&self, node_id: &str, batch: &pb::TelemetryBatch) -> Result<u64, TelemetryError> {
        validate(batch)?;
        let key = node_id.as_bytes();
        loop {
            let current = self.store.get(Keyspace::Telemetry, key)?;
            let before: NodeTelemetry = match &current {
                Some(bytes) => decode(Keyspace::Telemetry, key, bytes)?,
                None => NodeTelemetry {
                    node_id: node_id.to_owned(),
                    ..NodeTelemetry::default()
                },
            };
            let mut after = before.clone();
            after.apply_batch(batch);
            if after == before {
                return Ok(before.applied_sequence);
            }
            let swapped = self.store.compare_and_swap(
                Keyspace::Telemetry,
                key,
                current.as_deref(),
                Some(&encode(&after)),
            )?;
            if swapped {
                // Acknowledged records are forgotten by the agent: they must be on disk.
                self.store.flush()?;
                return Ok(after.applied_sequence);
            }
            // Another call for this node won the race: apply to what it wrote.
        }
    }

    /// What `node_id` has reported; empty when it never sent telemetry.
    pub fn get(&self, node_id: &str) -> Result<NodeTelemetry, TelemetryError> {
        let key = node_id.as_bytes();
        Ok(match self.store.get(Keyspace::Telemetry, key)? {
            Some(bytes) => decode(Keyspace::Telemetry, key, &bytes)?,
            None => NodeTelemetry {
                node_id: node_id.to_owned(),
                ..NodeTelemetry::default()
            },
        })
    }

    pub fn all(&self) -> Result<Vec<NodeTelemetry>, TelemetryError> {
        Ok(crate::store::scan_records(
            self.store.as_ref(),
            Keyspace::Telemetry,
        )?)
    }
}

fn model_to_proto(model: &ModelTotals) -> pb::ModelSample {
    pb::ModelSample {
        name: model.name.clone(),
        version: model.version.clone(),
        active: model.active,
        requests: model.requests,
        errors: model.errors,
        prompt_tokens: model.prompt_tokens,
        completion_tokens: model.completion_tokens,
        tokens_per_second: model.tokens_per_second,
        time_to_first_token_ms: model.time_to_first_token_ms,
        latency_p50_ms: model.latency_p50_ms,
        latency_p95_ms: model.latency_p95_ms,
    }
}

/// The operator API's view of a node's telemetry.
pub fn to_proto(telemetry: &NodeTelemetry) -> pb::NodeTelemetry {
    let totals = telemetry.totals();
    pb::NodeTelemetry {
        node_id: telemetry.node_id.clone(),
        applied_sequence: telemetry.applied_sequence,
        records: telemetry.records,
        records_missing: telemetry.records_missing,
        records_dropped: telemetry.records_dropped,
        first_record_unix_ms: telemetry.first_record_ms,
        last_record_unix_ms: telemetry.last_record_ms,
        models: telemetry.models.values().map(model_to_proto).collect(),
        system: telemetry.system.as_ref().map(|s| pb::SystemSample {
            memory_rss_bytes: s.memory_rss_bytes,
            cpu_percent: s.cpu_percent,
            memory_available_bytes: s.memory_available_bytes,
            power_source: match s.power_source {
                PowerSource::Unknown => pb::PowerSource::Unspecified,
                PowerSource::Mains => pb::PowerSource::Mains,
                PowerSource::Battery => pb::PowerSource::Battery,
            } as i32,
            battery_percent: s.battery_percent,
            charging: s.charging,
        }),
        events: telemetry
            .events
            .iter()
            .map(|e| pb::TelemetryEvent {
                time_unix_ms: e.time_unix_ms,
                kind: e.kind.clone(),
                subject: e.subject.clone(),
                detail: e.detail.clone(),
            })
            .collect(),
        requests: totals.requests,
        errors: totals.errors,
        prompt_tokens: totals.prompt_tokens,
        completion_tokens: totals.completion_tokens,
    }
}

/// "x86_64-cpu", "aarch64-cuda", ...: the architecture and the first accelerator's kind.
pub fn hardware_class(node: &NodeRecord) -> String {
    let arch = if node.facts.arch.is_empty() {
        "unknown"
    } else {
        node.facts.arch.as_str()
    };
    let accelerator = node
        .facts
        .accelerators
        .first()
        .map_or("cpu", |a| a.kind.as_str());
    format!("{arch}-{accelerator}")
}

/// One Prometheus series: the fleet's sums for a model version at a site on a class of
/// hardware.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSeries {
    pub model_version: String,
    pub site: String,
    pub hardware_class: String,
    pub requests: u64,
    pub errors: u64,
    pub completion_tokens: u64,
    pub prompt_tokens: u64,
    /// Means over the nodes heard from lately, weighted by their generated tokens
    /// (speed) or requests (time to first token); the worst node's p95 latency.
    pub tokens_per_second: f64,
    pub time_to_first_token_ms: f64,
    pub latency_p95_ms: f64,
    weight_tokens: f64,
    weight_requests: f64,
}

/// Sums the nodes' telemetry by (model version, site, hardware class). Model versions
/// the coordinator never published are labelled "unpublished", so that what nodes send
/// cannot grow the number of series.
pub fn aggregate(
    nodes: &[NodeRecord],
    telemetry: &[NodeTelemetry],
    published: impl Fn(&str, &str) -> bool,
    now_ms: i64,
) -> Vec<FleetSeries> {
    let by_id: HashMap<&str, &NodeRecord> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let mut series: BTreeMap<(String, String, String), FleetSeries> = BTreeMap::new();
    for node_telemetry in telemetry {
        let (site, class) = match by_id.get(node_telemetry.node_id.as_str()) {
            Some(node) => (
                node.labels()
                    .get("site")
                    .cloned()
                    .unwrap_or_else(|| "unknown".to_owned()),
                hardware_class(node),
            ),
            None => ("unknown".to_owned(), "unknown".to_owned()),
        };
        let mut models: Vec<(String, &ModelTotals)> = node_telemetry
            .models
            .values()
            .map(|model| {
                let label = if published(&model.name, &model.version) {
                    format!("{}@{}", model.name, model.version)
                } else {
                    "unpublished".to_owned()
                };
                (label, model)
            })
            .collect();
        if node_telemetry.retired.requests > 0 {
            models.push(("retired".to_owned(), &node_telemetry.retired));
        }
        for (label, model) in models {
            let entry = series
                .entry((label.clone(), site.clone(), class.clone()))
                .or_insert_with(|| FleetSeries {
                    model_version: label,
                    site: site.clone(),
                    hardware_class: class.clone(),
                    ..FleetSeries::default()
                });
            entry.requests = entry.requests.saturating_add(model.requests);
            entry.errors = entry.errors.saturating_add(model.errors);
            entry.completion_tokens = entry
                .completion_tokens
                .saturating_add(model.completion_tokens);
            entry.prompt_tokens = entry.prompt_tokens.saturating_add(model.prompt_tokens);
            let fresh = now_ms.saturating_sub(model.last_record_ms) <= GAUGE_FRESHNESS_MS;
            if fresh && model.requests > 0 {
                let tokens = model.completion_tokens as f64;
                let requests = model.requests as f64;
                entry.tokens_per_second += model.tokens_per_second * tokens;
                entry.weight_tokens += tokens;
                entry.time_to_first_token_ms += model.time_to_first_token_ms * requests;
                entry.weight_requests += requests;
                entry.latency_p95_ms = entry.latency_p95_ms.max(model.latency_p95_ms);
            }
        }
    }
    series
        .into_values()
        .map(|mut s| {
            if s.weight_tokens > 0.0 {
                s.tokens_per_second /= s.weight_tokens;
            }
            if s.weight_requests > 0.0 {
                s.time_to_first_token_ms /= s.weight_requests;
            }
            s
        })
        .collect()
}

/// The fleet series, computed at most once a second however many instruments ask.
struct SeriesCache {
    telemetry: FleetTelemetry,
    registry: Registry,
    artifacts: ArtifactStore,
    last: Mutex<Option<(Instant, Arc<Vec<FleetSeries>>)>>,
}

impl SeriesCache {
    fn series(&self) -> Arc<Vec<FleetSeries>> {
        let mut last = self.last.lock().expect("series cache lock");
        if let Some((at, series)) = &*last {
            if at.elapsed() < Duration::from_secs(1) {
                return series.clone();
            }
        }
        let computed = match (self.registry.nodes(), self.telemetry.all()) {
            (Ok(nodes), Ok(telemetry)) => aggregate(
                &nodes,
                &telemetry,
                |name, version| self.artifacts.get(name, version).is_ok(),
                crate::now_unix_ms(),
            ),
            (Err(error), _) => {
                tracing::error!(%error, "fleet metrics: cannot read the nodes");
                Vec::new()
            }
            (_, Err(error)) => {
                tracing::error!(%error, "fleet metrics: cannot read the telemetry");
                Vec::new()
            }
        };
        let computed = Arc::new(computed);
        *last = Some((Instant::now(), computed.clone()));
        computed
    }
}

fn labels(series: &FleetSeries) -> [KeyValue; 3] {
    [
        KeyValue::new("model_version", series.model_version.clone()),
        KeyValue::new("site", series.site.clone()),
        KeyValue::new("hardware_class", series.hardware_class.clone()),
    ]
}

/// Registers the `nanofleet_fleet_*` instruments on `meter`; keep the returned handles as
/// long as the meter.
pub fn register_metrics(
    meter: &Meter,
    telemetry: FleetTelemetry,
    registry: Registry,
    artifacts: ArtifactStore,
) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    let cache = Arc::new(SeriesCache {
        telemetry,
        registry,
        artifacts,
        last: Mutex::new(None),
    });
    let counter =
        |name: &'static str, description: &'static str, value: fn(&FleetSeries) -> u64| {
            let cache = cache.clone();
            let instrument = meter
                .u64_observable_counter(name)
                .with_description(description)
                .with_callback(move |observer| {
                    for series in cache.series().iter() {
                        observer.observe(value(series), &labels(series));
                    }
                })
                .build();
            Box::new(instrument) as Box<dyn std::any::Any + Send + Sync>
        };
    let gauge = |name: &'static str, description: &'static str, value: fn(&FleetSeries) -> f64| {
        let cache = cache.clone();
        let instrument = meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| {
                for series in cache.series().iter() {
                    observer.observe(value(series), &labels(series));
                }
            })
            .build();
        Box::new(instrument) as Box<dyn std::any::Any + Send + Sync>
    };
    vec![
        counter(
            "nanofleet_fleet_requests",
            "Requests the nodes served, by model version, site and hardware class",
            |s| s.requests,
        ),
        counter(
            "nanofleet_fleet_errors",
            "Requests that failed on the nodes",
            |s| s.errors,
        ),
        counter(
            "nanofleet_fleet_tokens_generated",
            "Tokens the nodes generated",
            |s| s.completion_tokens,
        ),
        counter(
            "nanofleet_fleet_prompt_tokens",
            "Prompt tokens the nodes read",
            |s| s.prompt_tokens,
        ),
        gauge(
            "nanofleet_fleet_tokens_per_second",
            "Decode speed, mean over recently reporting nodes weighted by tokens",
            |s| s.tokens_per_second,
        ),
        gauge(
            "nanofleet_fleet_time_to_first_token_ms",
            "Time to first token, mean over recently reporting nodes weighted by requests",
            |s| s.time_to_first_token_ms,
        ),
        gauge(
            "nanofleet_fleet_latency_p95_ms",
            "The highest p95 request latency among recently reporting nodes",
            |s| s.latency_p95_ms,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn record(sequence: u64, requests: u64, tokens: u64) -> pb::TelemetryRecord {
        pb::TelemetryRecord {
            sequence,
            start_unix_ms: 1_000 * sequence as i64,
            end_unix_ms: 1_000 * (sequence as i64 + 1),
            models: vec![pb::ModelSample {
                name: "tiny".into(),
                version: "1.0.0".into(),
                active: true,
                requests,
                completion_tokens: tokens,
                tokens_per_second: 12.5,
                ..pb::ModelSample::default()
            }],
            ..pb::TelemetryRecord::default()
        }
    }

    fn batch(records: Vec<pb::TelemetryRecord>) -> pb::TelemetryBatch {
        pb::TelemetryBatch {
            records,
            dropped_total: 0,
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<SledStore>, FleetTelemetry) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let telemetry = FleetTelemetry::new(store.clone());
        (dir, store, telemetry)
    }

    #[test]
    fn a_batch_sent_again_is_not_counted_twice() {
        let (_dir, _store, telemetry) = setup();
        let first = batch(vec![record(1, 2, 20), record(2, 3, 30)]);
        assert_eq!(telemetry.apply("n1", &first).unwrap(), 2);
        // The ack was lost: the agent sends the same records, and a new one.
        assert_eq!(telemetry.apply("n1", &first).unwrap(), 2);
        let again = batch(vec![record(2, 3, 30), record(3, 1, 10)]);
        assert_eq!(telemetry.apply("n1", &again).unwrap(), 3);
        let node = telemetry.get("n1").unwrap();
        assert_eq!(node.records, 3);
        let totals = node.totals();
        assert_eq!((totals.requests, totals.completion_tokens), (6, 60));
        assert_eq!(node.records_missing, 0);
        // Other nodes keep their own sequences.
        assert_eq!(
            telemetry
                .apply("n2", &batch(vec![record(1, 1, 1)]))
                .unwrap(),
            1
        );
        assert_eq!(telemetry.get("n1").unwrap(), node);
    }

    #[test]
    fn a_gap_counts_as_missing_and_the_dropped_total_is_kept_once() {
        let (_dir, _store, telemetry) = setup();
        telemetry.apply("n", &batch(vec![record(1, 1, 1)])).unwrap();
        let after_drops = pb::TelemetryBatch {
            records: vec![record(5, 1, 1)],
            dropped_total: 3,
        };
        assert_eq!(telemetry.apply("n", &after_drops).unwrap(), 5);
        assert_eq!(telemetry.apply("n", &after_drops).unwrap(), 5);
        let node = telemetry.get("n").unwrap();
        assert_eq!(
            (node.records, node.records_missing, node.records_dropped),
            (2, 3, 3)
        );
    }

    #[test]
    fn a_malformed_batch_is_refused_and_changes_nothing() {
        let (_dir, store, telemetry) = setup();
        telemetry
            .apply("n", &batch(vec![record(1, 2, 20)]))
            .unwrap();
        let before = store.get(Keyspace::Telemetry, b"n").unwrap();

        let mut bad_speed = record(3, 1, 1);
        bad_speed.models[0].tokens_per_second = f64::NAN;
        let mut long_event = record(4, 1, 1);
        long_event.events.push(pb::TelemetryEvent {
            kind: "request.error".into(),
            detail: "x".repeat(MAX_EVENT_TEXT + 1),
            ..pb::TelemetryEvent::default()
        });
        let mut twice = record(5, 1, 1);
        twice.models.push(twice.models[0].clone());
        let cases = [
            (batch(vec![record(2, 1, 1), bad_speed]), "tokens_per_second"),
            (batch(vec![long_event]), "longer than 256 bytes"),
            (batch(vec![record(3, 1, 1), record(3, 1, 1)]), "increase"),
            (batch(vec![record(0, 1, 1)]), "start at 1"),
            (batch(vec![twice]), "twice"),
            (
                batch(
                    (1..=(MAX_BATCH_RECORDS as u64 + 1))
                        .map(|s| record(s, 1, 1))
                        .collect(),
                ),
                "at most 64 records",
            ),
        ];
        for (bad, expected) in cases {
            let error = telemetry.apply("n", &bad).unwrap_err();
            assert!(matches!(error, TelemetryError::Invalid(_)), "{error}");
            assert!(error.to_string().contains(expected), "{error}");
            // Not even the valid first record of a refused batch was applied.
            assert_eq!(store.get(Keyspace::Telemetry, b"n").unwrap(), before);
        }
    }

    #[test]
    fn fleet_series_are_labelled_and_bounded() {
        use crate::registry::{Accelerator, DeviceFacts, NodeStatus};
        let node = |id: &str, site: Option<&str>, gpu: bool| NodeRecord {
            id: id.into(),
            status: NodeStatus::Active,
            token_labels: site
                .map(|s| BTreeMap::from([("site".to_owned(), s.to_owned())]))
                .unwrap_or_default(),
            facts: DeviceFacts {
                arch: "x86_64".into(),
                accelerators: if gpu {
                    vec![Accelerator {
                        kind: "cuda".into(),
                        ..Accelerator::default()
                    }]
                } else {
                    Vec::new()
                },
                ..DeviceFacts::default()
            },
            enrolled_at_ms: 0,
            last_seen_ms: 0,
            cert_sha256: String::new(),
            revoked_at_ms: 0,
            revoked_reason: String::new(),
        };
        let nodes = [
            node("a", Some("plant-3"), false),
            node("b", Some("plant-3"), false),
            node("c", None, true),
        ];
        let (_dir, _store, telemetry) = setup();
        for (id, requests) in [("a", 2), ("b", 3), ("c", 4)] {
            let mut rogue = record(1, requests, requests * 10);
            rogue.models.push(pb::ModelSample {
                name: "made-up".into(),
                version: id.into(),
                requests: 1,
                ..pb::ModelSample::default()
            });
            telemetry.apply(id, &batch(vec![rogue])).unwrap();
        }
        let series = aggregate(
            &nodes,
            &telemetry.all().unwrap(),
            |name, _| name == "tiny",
            3_000,
        );
        let find = |model: &str, site: &str, class: &str| {
            series
                .iter()
                .find(|s| s.model_version == model && s.site == site && s.hardware_class == class)
                .cloned()
                .unwrap_or_else(|| panic!("{model} {site} {class}: {series:#?}"))
        };
        let plant = find("tiny@1.0.0", "plant-3", "x86_64-cpu");
        assert_eq!((plant.requests, plant.completion_tokens), (5, 50));
        assert_eq!(plant.tokens_per_second, 12.5);
        assert_eq!(find("tiny@1.0.0", "unknown", "x86_64-cuda").requests, 4);
        // Three made-up versions fold into one series per site and class.
        assert_eq!(find("unpublished", "plant-3", "x86_64-cpu").requests, 2);
        assert_eq!(series.len(), 4, "{series:#?}");
    }
}
