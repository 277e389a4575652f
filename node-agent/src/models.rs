//! The models this device serves: loads an activated GGUF into the inference engine,
//! proves it with a smoke prompt before it may serve, and swaps it in so that new requests
//! use it while requests in flight finish on the model they started with. Counts tokens,
//! speed, latency and errors per model version.

use std::collections::{BTreeMap, VecDeque};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nanofleet_inference::{
    ChatMessage, Completion, Device, Engine, EngineOptions, GenerateRequest, InferenceError,
    LoraSource,
};
use serde::Serialize;

/// How models are loaded and proven.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Threads for the forward pass; `None` = one per core.
    pub threads: Option<usize>,
    /// A context shorter than the model's, to bound KV-cache memory.
    pub context_length: Option<usize>,
    /// Where every model this host loads runs (opened once, at start).
    pub device: Device,
    /// The user message of the smoke prompt every model must answer before it serves.
    pub smoke_prompt: String,
    /// Tokens the smoke prompt generates.
    pub smoke_max_tokens: usize,
}

/// Why a model may not serve.
#[derive(Debug, thiserror::Error)]
pub enum ProveError {
    #[error("the model does not load: {0}")]
    Load(InferenceError),
    #[error("the smoke prompt failed: {0}")]
    Smoke(String),
}

/// A model that loaded and answered the smoke prompt.
pub struct ServedModel {
    pub name: String,
    pub version: String,
    pub engine: Engine,
    /// Seconds since the epoch when it started serving.
    pub activated_at: u64,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Latencies kept per version for the p95; old ones fall out.
const LATENCY_WINDOW: usize = 512;

/// Counters of one model version since the agent started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VersionStats {
    pub name: String,
    pub version: String,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Decode speed over all requests: generated tokens after the first, per second.
    pub generation_tokens_per_second: f64,
    pub mean_time_to_first_token_ms: f64,
    pub p50_latency_ms: f64,
    pub p95_latency_ms: f64,
    // Running sums the rates above come from; telemetry takes their changes per period.
    #[serde(skip)]
    pub(crate) generation_secs: f64,
    #[serde(skip)]
    pub(crate) decoded_tokens: u64,
    #[serde(skip)]
    pub(crate) ttft_ms_total: f64,
    #[serde(skip)]
    latencies_ms: VecDeque<f64>,
}

impl VersionStats {
    fn record(&mut self, latency: Duration, outcome: Result<&Completion, ()>) {
        self.requests += 1;
        match outcome {
            Ok(completion) => {
                let stats = &completion.stats;
                self.prompt_tokens += stats.prompt_tokens as u64;
                self.completion_tokens += stats.completion_tokens as u64;
                self.decoded_tokens += stats.completion_tokens.saturating_sub(1) as u64;
                self.generation_secs += stats.generation_time.as_secs_f64();
                self.ttft_ms_total += stats.time_to_first_token.as_secs_f64() * 1e3;
            }
            Err(()) => self.errors += 1,
        }
        if self.latencies_ms.len() == LATENCY_WINDOW {
            self.latencies_ms.pop_front();
        }
        self.latencies_ms.push_back(latency.as_secs_f64() * 1e3);
        self.refresh();
    }

    fn refresh(&mut self) {
        self.generation_tokens_per_second = if self.generation_secs > 0.0 {
            self.decoded_tokens as f64 / self.generation_secs
        } else {
            0.0
        };
        let answered = self.requests - self.errors;
        self.mean_time_to_first_token_ms = if answered > 0 {
            self.ttft_ms_total / answered as f64
        } else {
            0.0
        };
        let mut sorted: Vec<f64> = self.latencies_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let percentile = |p: usize| {
            sorted
                .get((sorted.len() * p).div_ceil(100).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        self.p50_latency_ms = percentile(50);
        self.p95_latency_ms = percentile(95);
    }

    /// Share of requests that failed, 0..1.
    pub fn error_rate(&self) -> f32 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f32 / self.requests as f32
        }
    }
}

/// Something that happened to the served models, kept for the agent's telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct HostEvent {
    pub time_unix_ms: i64,
    /// "model.activated", "model.deactivated" or "request.error".
    pub kind: &'static str,
    /// `name@version`, or the name alone when no version applies.
    pub subject: String,
    pub detail: String,
}

/// Events kept until telemetry takes them; older ones are dropped and counted, so a
/// device without telemetry (or a burst of failing requests) stays bounded.
const MAX_PENDING_EVENTS: usize = 256;

/// Pending events and how many fell out since they were last taken.
#[derive(Default)]
struct EventBuffer {
    events: VecDeque<HostEvent>,
    dropped: u64,
}

/// The served models by artifact name, and their counters.
pub struct ModelHost {
    options: HostOptions,
    served: RwLock<BTreeMap<String, Arc<ServedModel>>>,
    stats: Mutex<BTreeMap<(String, String), VersionStats>>,
    events: Mutex<EventBuffer>,
}

impl ModelHost {
    pub fn new(options: HostOptions) -> Self {
        Self {
            options,
            served: RwLock::new(BTreeMap::new()),
            stats: Mutex::new(BTreeMap::new()),
            events: Mutex::new(EventBuffer::default()),
        }
    }

    fn note(&self, kind: &'static str, subject: String, detail: String) {
        let mut buffer = self.events.lock().expect("event lock");
        if buffer.events.len() == MAX_PENDING_EVENTS {
            buffer.events.pop_front();
            buffer.dropped += 1;
        }
        buffer.events.push_back(HostEvent {
            time_unix_ms: crate::now_unix_ms(),
            kind,
            subject,
            detail,
        });
    }

    /// The events since the last call, oldest first, and how many were dropped meanwhile.
    pub fn take_events(&self) -> (Vec<HostEvent>, u64) {
        let mut buffer = self.events.lock().expect("event lock");
        let dropped = std::mem::take(&mut buffer.dropped);
        (buffer.events.drain(..).collect(), dropped)
    }

    /// Where this host's models run, e.g. `cpu` or `cuda:0 (NVIDIA H100 80GB HBM3)`.
    pub fn device_description(&self) -> String {
        nanofleet_inference::device::describe(&self.options.device)
    }

    /// Loads `file` (with `lora` applied, for an adapter served on its base model) and runs
    /// the smoke prompt on it. Blocking and CPU-heavy: call it from a blocking thread.
    /// Nothing changes for the models being served.
    pub fn prove(
        &self,
        name: &str,
        version: &str,
        file: &Path,
        lora: Option<LoraSource>,
    ) -> Result<ServedModel, ProveError> {
        let engine = Engine::load(
            file,
            EngineOptions {
                threads: self.options.threads,
                context_length: self.options.context_length,
                device: self.options.device.clone(),
                lora,
            },
        )
        .map_err(ProveError::Load)?;
        smoke_test(&engine, &self.options)?;
        Ok(ServedModel {
            name: name.to_owned(),
            version: version.to_owned(),
            engine,
            activated_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Makes `model` the one served under its name; requests in flight keep the old one.
    pub fn activate(&self, model: ServedModel) {
        let name = model.name.clone();
        let subject = format!("{}@{}", model.name, model.version);
        let previous = self
            .served
            .write()
            .expect("served-model lock")
            .insert(name.clone(), Arc::new(model));
        let detail = match &previous {
            Some(previous) => {
                tracing::info!(%name, replaced = %previous.version, "model swapped");
                format!("replaced {}", previous.version)
            }
            None => String::new(),
        };
        self.note("model.activated", subject, detail);
    }

    /// Stops serving `name` (requests in flight finish).
    pub fn deactivate(&self, name: &str) {
        let removed = self.served.write().expect("served-model lock").remove(name);
        if let Some(removed) = removed {
            let subject = format!("{}@{}", removed.name, removed.version);
            self.note("model.deactivated", subject, String::new());
        }
    }

    /// The model served under `name`, held for the length of a request.
    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.served
            .read()
            .expect("served-model lock")
            .get(name)
            .cloned()
    }

    /// The version served under `name`, if any.
    pub fn served_version(&self, name: &str) -> Option<String> {
        self.get(name).map(|model| model.version.clone())
    }

    pub fn list(&self) -> Vec<Arc<ServedModel>> {
        self.served
            .read()
            .expect("served-model lock")
            .values()
            .cloned()
            .collect()
    }

    /// Counts one request against the version that served it; a failure is also an event.
    pub fn record(
        &self,
        model: &ServedModel,
        latency: Duration,
        outcome: Result<&Completion, &InferenceError>,
    ) {
        {
            let mut stats = self.stats.lock().expect("stats lock");
            stats
                .entry((model.name.clone(), model.version.clone()))
                .or_insert_with(|| VersionStats {
                    name: model.name.clone(),
                    version: model.version.clone(),
                    ..VersionStats::default()
                })
                .record(latency, outcome.map_err(|_| ()));
        }
        if let Err(error) = outcome {
            let subject = format!("{}@{}", model.name, model.version);
            self.note("request.error", subject, error.to_string());
        }
    }

    /// Counters of every version that served since the agent started.
    pub fn stats(&self) -> Vec<VersionStats> {
        self.stats
            .lock()
            .expect("stats lock")
            .values()
            .cloned()
            .collect()
    }
}

/// A model serves only if it runs a short chat prompt to finite logits and generates from it
/// without error: a file can carry a valid header and signature and still hold weights that
/// produce nothing usable (a diverged fine-tune, a broken conversion).
fn smoke_test(engine: &Engine, options: &HostOptions) -> Result<(), ProveError> {
    let smoke = |e: InferenceError| ProveError::Smoke(e.to_string());
    let prompt = engine
        .render_chat(&[ChatMessage::new("user", options.smoke_prompt.clone())])
        .map_err(smoke)?;
    let tokens = engine.tokenize(&prompt, true).map_err(smoke)?;
    let logits = engine.next_token_logits(&tokens).map_err(smoke)?;
    if let Some(bad) = logits.iter().find(|l| !l.is_finite()) {
        return Err(ProveError::Smoke(format!(
            "the model's output is not a number ({bad}); its weights are broken"
        )));
    }
    // NaN weights can also come out as all-equal logits (the quantized matmul flushes them).
    if logits.windows(2).all(|pair| pair[0] == pair[1]) {
        return Err(ProveError::Smoke(
            "the model's output is flat (every token equally likely); its weights are broken"
                .to_owned(),
        ));
    }
    let mut request = GenerateRequest::greedy(prompt, options.smoke_max_tokens.max(1));
    request.prompt = nanofleet_inference::Prompt::Tokens(tokens);
    let completion = engine
        .generate(&request, |_| ControlFlow::Continue(()))
        .map_err(smoke)?;
    tracing::info!(
        answer = %completion.text,
        tokens_per_second = completion.stats.generation_tokens_per_second(),
        "smoke prompt answered"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanofleet_inference::{FinishReason, GenerateStats};

    fn completion(prompt_tokens: usize, completion_tokens: usize, secs: f64) -> Completion {
        Completion {
            text: String::new(),
            tokens: Vec::new(),
            stats: GenerateStats {
                prompt_tokens,
                completion_tokens,
                finish_reason: FinishReason::Length,
                prompt_time: Duration::ZERO,
                generation_time: Duration::from_secs_f64(secs),
                time_to_first_token: Duration::from_millis(100),
            },
        }
    }

    #[test]
    fn counters_add_up_per_version() {
        let mut stats = VersionStats::default();
        stats.record(Duration::from_millis(200), Ok(&completion(10, 11, 1.0)));
        stats.record(Duration::from_millis(400), Ok(&completion(5, 21, 1.0)));
        stats.record(Duration::from_millis(50), Err(()));
        assert_eq!(stats.requests, 3);
        assert_eq!(stats.errors, 1);
        assert_eq!(stats.prompt_tokens, 15);
        assert_eq!(stats.completion_tokens, 32);
        // (10 + 20) decoded tokens over 2 s.
        assert_eq!(stats.generation_tokens_per_second, 15.0);
        assert_eq!(stats.mean_time_to_first_token_ms, 100.0);
        assert_eq!(stats.p95_latency_ms, 400.0);
        assert!((stats.error_rate() - 1.0 / 3.0).abs() < 1e-6);
    }

    fn host() -> ModelHost {
        ModelHost::new(HostOptions {
            threads: Some(1),
            context_length: None,
            device: nanofleet_inference::Device::Cpu,
            smoke_prompt: "Say hello.".into(),
            smoke_max_tokens: 4,
        })
    }

    #[test]
    fn a_sound_model_is_proven_and_swapped_in_while_old_handles_stay_valid() {
        use nanofleet_inference::tiny::{write_tiny_model, TinyTokenizer};
        use nanofleet_inference::Architecture;
        let dir = tempfile::tempdir().unwrap();
        let host = host();
        for (seed, version) in [(1, "1.0.0"), (2, "2.0.0")] {
            let file = dir.path().join(format!("{version}.gguf"));
            write_tiny_model(&file, Architecture::Llama, TinyTokenizer::ByteLevel, seed).unwrap();
            let held = host.get("m");
            host.activate(host.prove("m", version, &file, None).unwrap());
            if let Some(held) = held {
                assert_eq!(held.version, "1.0.0", "a held model stays what it was");
            }
        }
        assert_eq!(host.served_version("m").as_deref(), Some("2.0.0"));
        host.deactivate("m");
        assert!(host.get("m").is_none());
    }

    #[test]
    fn a_model_with_broken_weights_fails_the_smoke_prompt() {
        use nanofleet_inference::tiny::{write_broken_tiny_model, TinyTokenizer};
        use nanofleet_inference::Architecture;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broken.gguf");
        write_broken_tiny_model(&file, Architecture::Llama, TinyTokenizer::ByteLevel, 1).unwrap();
        let error = host().prove("m", "1", &file, None).unwrap_err();
        assert!(matches!(error, ProveError::Smoke(_)), "{error}");
        assert!(error.to_string().contains("weights are broken"), "{error}");

        std::fs::write(&file, b"GGUF but not really").unwrap();
        let error = host().prove("m", "1", &file, None).unwrap_err();
        assert!(matches!(error, ProveError::Load(_)), "{error}");
    }

    #[test]
    fn the_latency_window_is_bounded() {
        let mut stats = VersionStats::default();
        for i in 0..(LATENCY_WINDOW + 100) {
            stats.record(Duration::from_millis(i as u64), Err(()));
        }
        assert_eq!(stats.latencies_ms.len(), LATENCY_WINDOW);
        assert_eq!(stats.latencies_ms[0], 100.0);
    }
}
