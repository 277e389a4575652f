//! The agent's telemetry: a sampler that turns the served models' counters, the process's
//! memory and CPU, the power state and the model events into one numbered record per
//! period; a crash-safe, bounded on-disk queue of those records (the oldest are dropped and
//! counted when it is full); and the sender that ships them to the coordinator in batches
//! while a session is open and forgets them only once the coordinator acknowledged them.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nanofleet_proto::v1::{
    node_service_client::NodeServiceClient, ModelSample, SystemSample, TelemetryBatch,
    TelemetryEvent, TelemetryRecord,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::models::{HostEvent, ModelHost};

/// Records per batch; well inside the coordinator's limit of 64.
pub const MAX_BATCH_RECORDS: usize = 32;
/// Limits the coordinator enforces on each record (see its `fleet_telemetry` module).
const MAX_MODELS_PER_RECORD: usize = 32;
const MAX_EVENTS_PER_RECORD: usize = 16;
const MAX_EVENT_KIND: usize = 64;
const MAX_EVENT_TEXT: usize = 256;
/// A stored record larger than this is corruption, not a record.
const MAX_RECORD_BYTES: usize = 256 * 1024;
/// Length (u32 LE), then the first 8 bytes of the payload's SHA-256.
const FRAME_HEADER: usize = 12;

const LOG_FILE: &str = "queue.log";
const META_FILE: &str = "queue.json";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("telemetry queue {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |source| QueueError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the log alone cannot say: where it logically starts, and what was dropped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct Meta {
    /// Every sequence below this was acknowledged or dropped.
    first_kept: u64,
    /// Records dropped unsent (queue full, or refused by the coordinator), ever.
    dropped_total: u64,
}

impl Default for Meta {
    fn default() -> Self {
        Self {
            first_kept: 1,
            dropped_total: 0,
        }
    }
}

/// The records not yet acknowledged, in an append-only file of checksummed frames
/// (`queue.log`) with a small state file (`queue.json`, replaced atomically). An append is
/// on disk when `append` returns; a torn or corrupt tail (a crash mid-append) is cut off
/// when the queue is opened. Acknowledged and dropped records are skipped on open and
/// compacted away.
pub struct TelemetryQueue {
    dir: PathBuf,
    log: File,
    log_len: u64,
    live: VecDeque<TelemetryRecord>,
    /// Frames in the log that are acknowledged or dropped.
    dead: usize,
    meta: Meta,
    next_sequence: u64,
    max_records: usize,
}

fn frame(record: &TelemetryRecord) -> Vec<u8> {
    let payload = record.encode_to_vec();
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload)[..8]);
    out.extend_from_slice(&payload);
    out
}

/// The whole frames at the start of `bytes` and where they end; parsing stops at the
/// first frame that is cut short, fails its checksum or does not decode, or whose
/// sequence does not increase.
fn parse_frames(bytes: &[u8]) -> (Vec<TelemetryRecord>, usize) {
    let mut records: Vec<TelemetryRecord> = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= FRAME_HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD_BYTES || bytes.len() - at - FRAME_HEADER < len {
            break;
        }
        let payload = &bytes[at + FRAME_HEADER..at + FRAME_HEADER + len];
        if Sha256::digest(payload)[..8] != bytes[at + 4..at + FRAME_HEADER] {
            break;
        }
        let Ok(record) = TelemetryRecord::decode(payload) else {
            break;
        };
        if records
            .last()
            .is_some_and(|r| r.sequence >= record.sequence)
            || record.sequence == 0
        {
            break;
        }
        records.push(record);
        at += FRAME_HEADER + len;
    }
    (records, at)
}

/// Flushes a directory entry change (a rename) to disk.
fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, so that a
/// crash leaves the old file or the new one, never a mix.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), QueueError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
    sync_dir(dir)
}

impl TelemetryQueue {
    /// Opens (or creates) the queue in `dir`, holding at most `max_records` records.
    pub fn open(dir: &Path, max_records: usize) -> Result<Self, QueueError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let meta_path = dir.join(META_FILE);
        let meta = match std::fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                // Starting over only resends records the coordinator skips as applied.
                tracing::warn!(%error, path = %meta_path.display(), "telemetry queue state unreadable; starting it over");
                Meta::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(io_error(&meta_path)(e)),
        };
        let log_path = dir.join(LOG_FILE);
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(io_error(&log_path))?;
        let mut bytes = Vec::new();
        log.read_to_end(&mut bytes).map_err(io_error(&log_path))?;
        let (records, good) = parse_frames(&bytes);
        if good < bytes.len() {
            tracing::warn!(
                discarded_bytes = bytes.len() - good,
                "telemetry queue ends in a torn or corrupt record (a crash while writing); cut it off"
            );
            log.set_len(good as u64).map_err(io_error(&log_path))?;
            log.sync_all().map_err(io_error(&log_path))?;
        }
        let last = records.last().map_or(0, |r| r.sequence);
        let (gone, live): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|r| r.sequence < meta.first_kept);
        let mut queue = Self {
            dir: dir.to_path_buf(),
            log,
            log_len: good as u64,
            live: live.into(),
            dead: gone.len(),
            next_sequence: meta.first_kept.max(last + 1),
            meta,
            max_records: max_records.max(1),
        };
        // A smaller limit than the last run's: drop the oldest now.
        let excess = queue.live.len().saturating_sub(queue.max_records);
        if excess > 0 {
            let through = queue.live[excess - 1].sequence;
            queue.drop_through(through)?;
        }
        queue.compact()?;
        Ok(queue)
    }

    /// Numbers `record`, writes it to disk and returns its sequence. When the queue is
    /// full the oldest record is dropped first, and counted.
    pub fn append(&mut self, mut record: TelemetryRecord) -> Result<u64, QueueError> {
        if self.live.len() >= self.max_records {
            let oldest = self.live[0].sequence;
            self.drop_through(oldest)?;
        }
        record.sequence = self.next_sequence;
        let bytes = frame(&record);
        let path = self.dir.join(LOG_FILE);
        let written = self
            .log
            .write_all(&bytes)
            .and_then(|()| self.log.sync_data());
        if let Err(error) = written {
            // Cut a partial write off, so that later appends do not land behind it.
            let _ = self.log.set_len(self.log_len);
            return Err(io_error(&path)(error));
        }
        self.log_len += bytes.len() as u64;
        self.next_sequence += 1;
        self.live.push_back(record);
        Ok(self.next_sequence - 1)
    }

    /// The oldest `max` records not yet acknowledged.
    pub fn pending(&self, max: usize) -> Vec<TelemetryRecord> {
        self.live.iter().take(max).cloned().collect()
    }

    /// Forgets every record up to `applied`, which the coordinator has applied. An
    /// `applied` beyond what this queue numbered (its state was lost) moves the numbering
    /// past it, so that new records are not taken for ones already applied.
    pub fn ack(&mut self, applied: u64) -> Result<(), QueueError> {
        if applied < self.meta.first_kept {
            return Ok(());
        }
        let forgotten = self.forget_through(applied);
        self.meta.first_kept = applied + 1;
        self.next_sequence = self.next_sequence.max(applied + 1);
        replace_file(&self.dir, META_FILE, &meta_bytes(&self.meta))?;
        self.dead += forgotten;
        self.compact()
    }

    /// Drops unsent records up to `through` (oldest first, or refused by the coordinator)
    /// and counts them.
    pub fn drop_through(&mut self, through: u64) -> Result<(), QueueError> {
        if through < self.meta.first_kept {
            return Ok(());
        }
        let dropped = self.forget_through(through);
        self.meta.first_kept = through + 1;
        self.meta.dropped_total += dropped as u64;
        replace_file(&self.dir, META_FILE, &meta_bytes(&self.meta))?;
        self.dead += dropped;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                dropped_total = self.meta.dropped_total,
                "telemetry records dropped unsent"
            );
        }
        self.compact()
    }

    fn forget_through(&mut self, through: u64) -> usize {
        let count = self
            .live
            .iter()
            .take_while(|r| r.sequence <= through)
            .count();
        self.live.drain(..count);
        count
    }

    /// Rewrites the log once mostly dead frames are in it. The state file already says
    /// what is dead, so a crash during this loses nothing.
    fn compact(&mut self) -> Result<(), QueueError> {
        let path = self.dir.join(LOG_FILE);
        if self.live.is_empty() && self.log_len > 0 {
            self.log.set_len(0).map_err(io_error(&path))?;
            self.log.sync_all().map_err(io_error(&path))?;
            self.log_len = 0;
            self.dead = 0;
        } else if self.dead >= 64 && self.dead > self.live.len() {
            let bytes: Vec<u8> = self.live.iter().flat_map(frame).collect();
            replace_file(&self.dir, LOG_FILE, &bytes)?;
            self.log = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(io_error(&path))?;
            self.log_len = bytes.len() as u64;
            self.dead = 0;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn dropped_total(&self) -> u64 {
        self.meta.dropped_total
    }

    /// The sequence the next record gets.
    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }
}

fn meta_bytes(meta: &Meta) -> Vec<u8> {
    serde_json::to_vec(meta).expect("the queue state serializes")
}

/// The queue shared by the sampler and the session's sender.
pub struct Telemetry {
    queue: Mutex<TelemetryQueue>,
    /// Wakes the sender when a record was appended.
    appended: Notify,
}

impl Telemetry {
    /// Opens the queue in `<data_dir>/telemetry`.
    pub fn open(data_dir: &Path, max_records: usize) -> Result<Arc<Self>, QueueError> {
        let queue = TelemetryQueue::open(&data_dir.join("telemetry"), max_records)?;
        tracing::info!(
            queued = queue.len(),
            next_sequence = queue.next_sequence(),
            dropped_total = queue.dropped_total(),
            "telemetry queue opened"
        );
        Ok(Arc::new(Self {
            queue: Mutex::new(queue),
            appended: Notify::new(),
        }))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, TelemetryQueue> {
        self.queue.lock().expect("telemetry queue lock")
    }

    /// Appends on a blocking thread (the append waits for the disk).
    async fn append(self: &Arc<Self>, record: TelemetryRecord) -> Result<u64, QueueError> {
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.queue().append(record))
            .await
            .unwrap_or_else(|e| Err(io_error(Path::new(LOG_FILE))(std::io::Error::other(e))));
        self.appended.notify_one();
        result
    }

    async fn with_queue(
        self: &Arc<Self>,
        work: impl FnOnce(&mut TelemetryQueue) -> Result<(), QueueError> + Send + 'static,
    ) -> Result<(), QueueError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(&mut this.queue()))
            .await
            .unwrap_or_else(|e| Err(io_error(Path::new(LOG_FILE))(std::io::Error::other(e))))
    }
}

/// Running sums of one model version at the previous sample.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    decoded_tokens: u64,
    generation_secs: f64,
    ttft_ms_total: f64,
}

/// Turns cumulative counters into one record per period.
pub struct Sampler {
    host: Option<Arc<ModelHost>>,
    last: BTreeMap<(String, String), Sums>,
    period_start_ms: i64,
    system: sysinfo::System,
    pid: Option<sysinfo::Pid>,
}

fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn event_of(event: HostEvent) -> TelemetryEvent {
    TelemetryEvent {
        time_unix_ms: event.time_unix_ms,
        kind: truncated(event.kind, MAX_EVENT_KIND),
        subject: truncated(&event.subject, MAX_EVENT_TEXT),
        detail: truncated(&event.detail, MAX_EVENT_TEXT),
    }
}

impl Sampler {
    pub fn new(host: Option<Arc<ModelHost>>) -> Self {
        Self {
            host,
            last: BTreeMap::new(),
            period_start_ms: crate::now_unix_ms(),
            system: sysinfo::System::new(),
            pid: sysinfo::get_current_pid().ok(),
        }
    }

    /// The record of the period since the previous call (its sequence is set by the queue).
    pub fn sample(&mut self) -> TelemetryRecord {
        let end = crate::now_unix_ms();
        let mut record = TelemetryRecord {
            start_unix_ms: self.period_start_ms,
            end_unix_ms: end,
            system: Some(self.system_sample()),
            ..TelemetryRecord::default()
        };
        self.period_start_ms = end;
        let Some(host) = &self.host else {
            return record;
        };
        let mut active: BTreeMap<String, String> = host
            .list()
            .iter()
            .map(|m| (m.name.clone(), m.version.clone()))
            .collect();
        for stats in host.stats() {
            let key = (stats.name.clone(), stats.version.clone());
            let now = Sums {
                requests: stats.requests,
                errors: stats.errors,
                prompt_tokens: stats.prompt_tokens,
                completion_tokens: stats.completion_tokens,
                decoded_tokens: stats.decoded_tokens,
                generation_secs: stats.generation_secs,
                ttft_ms_total: stats.ttft_ms_total,
            };
            let before = self.last.insert(key, now).unwrap_or_default();
            let is_active = active.get(&stats.name) == Some(&stats.version);
            if is_active {
                active.remove(&stats.name);
            }
            let requests = now.requests - before.requests;
            if requests == 0 && !is_active {
                continue;
            }
            let errors = now.errors - before.errors;
            let seconds = now.generation_secs - before.generation_secs;
            let answered = requests - errors;
            record.models.push(ModelSample {
                name: stats.name.clone(),
                version: stats.version.clone(),
                active: is_active,
                requests,
                errors,
                prompt_tokens: now.prompt_tokens - before.prompt_tokens,
                completion_tokens: now.completion_tokens - before.completion_tokens,
                tokens_per_second: if seconds > 0.0 {
                    (now.decoded_tokens - before.decoded_tokens) as f64 / seconds
                } else {
                    0.0
                },
                time_to_first_token_ms: if answered > 0 {
                    (now.ttft_ms_total - before.ttft_ms_total).max(0.0) / answered as f64
                } else {
                    0.0
                },
                latency_p50_ms: stats.p50_latency_ms,
                latency_p95_ms: stats.p95_latency_ms,
            });
        }
        // Served versions that have not answered anything yet.
        for (name, version) in active {
            record.models.push(ModelSample {
                name,
                version,
                active: true,
                ..ModelSample::default()
            });
        }
        // A device serves a handful of models; keep the busiest if it ever serves more.
        if record.models.len() > MAX_MODELS_PER_RECORD {
            record
                .models
                .sort_by_key(|m| std::cmp::Reverse((m.active, m.requests)));
            record.models.truncate(MAX_MODELS_PER_RECORD);
        }
        let (events, mut dropped) = host.take_events();
        dropped += events.len().saturating_sub(MAX_EVENTS_PER_RECORD) as u64;
        record.events = events
            .into_iter()
            .take(MAX_EVENTS_PER_RECORD)
            .map(event_of)
            .collect();
        record.events_dropped = u32::try_from(dropped).unwrap_or(u32::MAX);
        record
    }

    fn system_sample(&mut self) -> SystemSample {
        self.system.refresh_memory();
        let (memory_rss_bytes, cpu_percent) = match self.pid {
            Some(pid) => {
                self.system.refresh_processes_specifics(
                    sysinfo::ProcessesToUpdate::Some(&[pid]),
                    true,
                    sysinfo::ProcessRefreshKind::nothing()
                        .with_memory()
                        .with_cpu(),
                );
                self.system
                    .process(pid)
                    .map_or((0, 0.0), |p| (p.memory(), p.cpu_usage()))
            }
            None => (0, 0.0),
        };
        let (power_source, battery_percent, charging) =
            crate::facts::power(Path::new("/sys/class/power_supply"));
        SystemSample {
            memory_rss_bytes,
            cpu_percent: if cpu_percent.is_finite() {
                cpu_percent
            } else {
                0.0
            },
            memory_available_bytes: self.system.available_memory(),
            power_source: power_source as i32,
            battery_percent,
            charging,
        }
    }
}

/// Samples every `interval` and queues the record, for as long as the agent runs.
pub async fn run_sampler(
    telemetry: Arc<Telemetry>,
    host: Option<Arc<ModelHost>>,
    interval: Duration,
) {
    let mut sampler = Sampler::new(host);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let record = sampler.sample();
        match telemetry.append(record).await {
            Ok(sequence) => tracing::debug!(sequence, "telemetry record queued"),
            Err(error) => tracing::error!(%error, "a telemetry record could not be queued"),
        }
    }
}

/// The sender of one session; aborted when the session ends.
pub struct Sender(tokio::task::JoinHandle<()>);

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts sending the queue over `client` until the returned handle is dropped.
pub fn start_sender(telemetry: Arc<Telemetry>, client: NodeServiceClient<Channel>) -> Sender {
    Sender(tokio::spawn(
        send_loop(telemetry, client).instrument(tracing::info_span!("telemetry_sender")),
    ))
}

/// Sends the oldest records in batches, forgets what the coordinator acknowledged, and
/// waits for the sampler when the queue is empty. A failed call is retried with the same
/// records (the coordinator skips what it already applied); records the coordinator
/// refuses as malformed are dropped and counted, so one bad record cannot stall the rest.
async fn send_loop(telemetry: Arc<Telemetry>, mut client: NodeServiceClient<Channel>) {
    let mut delay = Duration::from_millis(500);
    loop {
        let (records, dropped_total) = {
            let queue = telemetry.queue();
            (queue.pending(MAX_BATCH_RECORDS), queue.dropped_total())
        };
        let Some(last) = records.last().map(|r| r.sequence) else {
            telemetry.appended.notified().await;
            continue;
        };
        let count = records.len();
        let batch = TelemetryBatch {
            records,
            dropped_total,
        };
        let outcome = match client.report_telemetry(batch).await {
            Ok(ack) => {
                let applied = ack.into_inner().applied_sequence;
                tracing::debug!(count, applied, "telemetry acknowledged");
                telemetry.with_queue(move |q| q.ack(applied)).await
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                tracing::error!(reason = %status.message(), through = last, "the coordinator refused telemetry records; dropping them");
                telemetry.with_queue(move |q| q.drop_through(last)).await
            }
            Err(status) => {
                // The session notices a dead connection itself; this only waits to retry.
                tracing::debug!(code = ?status.code(), reason = %status.message(), "telemetry not sent; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        delay = Duration::from_millis(500);
        if let Err(error) = outcome {
            tracing::error!(%error, "the telemetry queue could not be updated");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tokens: u64) -> TelemetryRecord {
        TelemetryRecord {
            models: vec![ModelSample {
                name: "m".into(),
                version: "1".into(),
                requests: 1,
                completion_tokens: tokens,
                ..ModelSample::default()
            }],
            ..TelemetryRecord::default()
        }
    }

    fn sequences(queue: &TelemetryQueue) -> Vec<u64> {
        queue
            .pending(usize::MAX)
            .iter()
            .map(|r| r.sequence)
            .collect()
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = TelemetryQueue::open(dir.path(), 3).unwrap();
        for tokens in 1..=5 {
            queue.append(record(tokens)).unwrap();
        }
        assert_eq!(sequences(&queue), [3, 4, 5]);
        assert_eq!(queue.dropped_total(), 2);
        drop(queue);
        // The count and the numbering survive a restart.
        let mut queue = TelemetryQueue::open(dir.path(), 3).unwrap();
        assert_eq!(sequences(&queue), [3, 4, 5]);
        assert_eq!(queue.dropped_total(), 2);
        assert_eq!(queue.append(record(6)).unwrap(), 6);
        assert_eq!(queue.dropped_total(), 3);
        // A smaller limit at the next start drops the excess, oldest first.
        drop(queue);
        let queue = TelemetryQueue::open(dir.path(), 1).unwrap();
        assert_eq!(sequences(&queue), [6]);
        assert_eq!(queue.dropped_total(), 5);
    }

    #[test]
    fn a_torn_tail_is_cut_off_on_open_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        for tokens in 1..=3 {
            queue.append(record(tokens)).unwrap();
        }
        drop(queue);
        let log = dir.path().join(LOG_FILE);
        let whole = std::fs::read(&log).unwrap();
        // A crash in the middle of the third append.
        std::fs::write(&log, &whole[..whole.len() - 5]).unwrap();
        let mut queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        assert_eq!(sequences(&queue), [1, 2]);
        assert_eq!(queue.append(record(9)).unwrap(), 3);
        drop(queue);
        let queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        assert_eq!(sequences(&queue), [1, 2, 3]);
        assert_eq!(queue.pending(9)[2].models[0].completion_tokens, 9);

        // A flipped byte fails the checksum: that record and everything after it go.
        drop(queue);
        let mut bytes = std::fs::read(&log).unwrap();
        let first_len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        bytes[2 * FRAME_HEADER + first_len + 2] ^= 0xff;
        std::fs::write(&log, &bytes).unwrap();
        let queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        assert_eq!(sequences(&queue), [1]);
        assert_eq!(queue.next_sequence(), 2);
    }

    #[test]
    fn an_ack_removes_records_for_good_and_numbering_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        for tokens in 1..=4 {
            queue.append(record(tokens)).unwrap();
        }
        queue.ack(2).unwrap();
        assert_eq!(sequences(&queue), [3, 4]);
        // An old ack changes nothing.
        queue.ack(1).unwrap();
        assert_eq!(sequences(&queue), [3, 4]);
        drop(queue);
        let mut queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        assert_eq!(sequences(&queue), [3, 4]);
        queue.ack(4).unwrap();
        assert!(queue.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
            0
        );
        drop(queue);
        // An empty queue still knows where its numbering is.
        let mut queue = TelemetryQueue::open(dir.path(), 100).unwrap();
        assert_eq!(queue.append(record(5)).unwrap(), 5);
        // The coordinator applied more than this queue remembers: numbering jumps past it.
        queue.ack(40).unwrap();
        assert!(queue.is_empty());
        assert_eq!(queue.append(record(6)).unwrap(), 41);
        assert_eq!(queue.dropped_total(), 0);
    }

    #[test]
    fn many_acknowledged_records_are_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = TelemetryQueue::open(dir.path(), 1000).unwrap();
        for tokens in 0..200 {
            queue.append(record(tokens)).unwrap();
        }
        let full = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        queue.ack(190).unwrap();
        let compacted = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(compacted * 10 < full, "{compacted} of {full} bytes");
        queue.append(record(1)).unwrap();
        drop(queue);
        let queue = TelemetryQueue::open(dir.path(), 1000).unwrap();
        assert_eq!(
            sequences(&queue),
            (191..=201).collect::<Vec<_>>(),
            "compaction kept the live records in order"
        );
    }

    #[test]
    fn the_sampler_reports_changes_per_period_and_bounded_events() {
        use nanofleet_inference::tiny::{write_tiny_model, TinyTokenizer};
        use nanofleet_inference::{Architecture, GenerateRequest};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        write_tiny_model(&file, Architecture::Llama, TinyTokenizer::ByteLevel, 1).unwrap();
        let host = Arc::new(ModelHost::new(crate::models::HostOptions {
            threads: Some(1),
            context_length: None,
            device: nanofleet_inference::Device::Cpu,
            smoke_prompt: "Say hello.".into(),
            smoke_max_tokens: 2,
        }));
        host.activate(host.prove("m", "1.0.0", &file, None).unwrap());
        let mut sampler = Sampler::new(Some(host.clone()));
        let first = sampler.sample();
        assert_eq!(first.models.len(), 1);
        assert!(first.models[0].active);
        assert_eq!(first.models[0].requests, 0);
        assert_eq!(first.events[0].kind, "model.activated");
        assert!(first.system.unwrap().memory_rss_bytes > 0);

        let model = host.get("m").unwrap();
        let request = GenerateRequest::greedy("hello", 3);
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let done = model
                .engine
                .generate(&request, |_| std::ops::ControlFlow::Continue(()));
            host.record(&model, started.elapsed(), done.as_ref());
        }
        let second = sampler.sample();
        assert_eq!(second.models[0].requests, 2);
        let tokens = second.models[0].completion_tokens;
        assert!(tokens > 0);
        assert!(second.events.is_empty());
        let third = sampler.sample();
        assert_eq!(third.models[0].requests, 0, "only the change is reported");
        assert_eq!(
            host.stats()[0].completion_tokens,
            tokens,
            "the periods add up to the host's counters"
        );

        host.deactivate("m");
        for i in 0..(MAX_EVENTS_PER_RECORD + 5) {
            host.activate(host.prove("m", &format!("2.{i}"), &file, None).unwrap());
        }
        let fourth = sampler.sample();
        assert_eq!(fourth.events.len(), MAX_EVENTS_PER_RECORD);
        assert_eq!(fourth.events[0].kind, "model.deactivated");
        assert_eq!(fourth.events_dropped, 6);
        assert!(!fourth.models.iter().any(|m| m.version == "1.0.0"));
    }
}
