//! The node's side of federated rounds: local data loaded once, and a worker that takes
//! each `TrainRound`, evaluates the round's global adapter on the held-out split, trains
//! LoRA on the training split on top of the quantized base the device already holds,
//! clips the delta, and sends only that delta, the example count and the metrics. In a
//! secure round the delta never leaves in the clear: the node weights it, adds its noise
//! share (distributed DP), and takes part in SecAgg+ (keys with the round update, then
//! one message per `SecAggStep`), so the coordinator learns only the sum.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nanofleet_federated::{
    initial_adapter, weighted_vector, AdapterTensors, AggregationMode, Target,
};
use nanofleet_inference::lora::LoraTarget;
use nanofleet_proto::v1::{
    node_service_client::NodeServiceClient, AggregationMode as PbMode, EvalMetrics, MatrixShape,
    RoundUpdate, SecAggMessage, SecAggParams, SecAggStep, TrainRound,
};
use nanofleet_secagg::codec::{
    decode_keys, decode_shares, decode_unmask_request, encode_client_message,
};
use nanofleet_secagg::{Client, ClientMessage, Config, Params};
use nanofleet_train::{Example, LoraSpec, TrainOptions, Trainer};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::artifacts::ArtifactManager;

/// Tokens generated per held-out example when measuring exact match.
const EVAL_MAX_NEW_TOKENS: usize = 48;

/// The node's training data, split once.
pub struct LocalData {
    pub train: Vec<Example>,
    pub held_out: Vec<Example>,
}

impl LocalData {
    pub fn load(
        path: &Path,
        holdout_fraction: f64,
    ) -> Result<Self, Box<nanofleet_train::TrainError>> {
        let examples = nanofleet_train::load_jsonl(path).map_err(Box::new)?;
        let (train, held_out) = nanofleet_train::split_holdout(examples, holdout_fraction);
        Ok(Self { train, held_out })
    }

    pub fn len(&self) -> usize {
        self.train.len() + self.held_out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct TrainingContext {
    pub data: LocalData,
    pub artifacts: Arc<ArtifactManager>,
    pub memory_budget_bytes: Option<u64>,
    /// Where the node keeps its own copy of each update it sent.
    pub dir: PathBuf,
    /// Secure rounds in progress: the SecAgg+ client and the vector it will mask, by
    /// round id. Memory only: an agent that restarts mid-round is a dropout.
    pub secure: Mutex<HashMap<String, SecureSession>>,
}

impl TrainingContext {
    pub fn new(
        data: LocalData,
        artifacts: Arc<ArtifactManager>,
        memory_budget_bytes: Option<u64>,
        dir: PathBuf,
    ) -> Self {
        Self {
            data,
            artifacts,
            memory_budget_bytes,
            dir,
            secure: Mutex::new(HashMap::new()),
        }
    }
}

/// A node's part in one secure round.
pub struct SecureSession {
    client: Client,
    /// The weighted, noised update and its weight, as it enters the sum.
    vector: Vec<f32>,
}

pub type TrainingJob = (TrainRound, NodeServiceClient<Channel>);

/// Runs rounds one at a time; a round sent again after a reconnect runs once.
pub async fn training_worker(ctx: Arc<TrainingContext>, mut jobs: mpsc::Receiver<TrainingJob>) {
    let mut seen = HashSet::new();
    while let Some((round, mut client)) = jobs.recv().await {
        if !seen.insert(round.round_id.clone()) {
            continue;
        }
        let span =
            tracing::info_span!("round", federation = %round.federation, round = round.round);
        let _enter = span.enter();
        tracing::info!("round received");
        let work = ctx.clone();
        let round_for_work = round.clone();
        let update =
            match tokio::task::spawn_blocking(move || run_round(&work, &round_for_work)).await {
                Ok(Ok(update)) => update,
                Ok(Err(reason)) => declined(&round, reason),
                Err(panic) => declined(&round, format!("the trainer failed: {panic}")),
            };
        if !update.declined_reason.is_empty() {
            tracing::warn!(reason = %update.declined_reason, "round declined");
        }
        submit(&mut client, update, round.deadline_unix_ms).await;
    }
}

/// Sends the update, retrying through a coordinator restart or a dropped connection
/// until the round's deadline; a refusal (closed round, bad update) is final.
async fn submit(client: &mut NodeServiceClient<Channel>, update: RoundUpdate, deadline_ms: i64) {
    use tonic::Code;
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        match client.submit_update(update.clone()).await {
            Ok(_) => {
                tracing::info!("round update sent");
                return;
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) && crate::now_unix_ms() + (delay.as_millis() as i64) < deadline_ms =>
            {
                tracing::warn!(status = %status.message(), "coordinator unreachable; sending the update again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), status = %status.message(), "round update refused");
                return;
            }
        }
    }
}

fn declined(round: &TrainRound, reason: String) -> RoundUpdate {
    RoundUpdate {
        round_id: round.round_id.clone(),
        declined_reason: reason,
        ..Default::default()
    }
}

fn lora_target(target: Target) -> LoraTarget {
    match target {
        Target::Q => LoraTarget::Query,
        Target::K => LoraTarget::Key,
        Target::V => LoraTarget::Value,
        Target::O => LoraTarget::Output,
        Target::Gate => LoraTarget::Gate,
        Target::Up => LoraTarget::Up,
        Target::Down => LoraTarget::Down,
    }
}

/// Seed of the node's local randomness (batches, dropout) for one round: fixed by the
/// federation's seed and the round, so a rerun trains alike.
fn round_seed(init_seed: u64, round: u32) -> u64 {
    init_seed ^ u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One round on this node; `Err` is the reason it declined.
fn run_round(ctx: &TrainingContext, round: &TrainRound) -> Result<RoundUpdate, String> {
    if round.deadline_unix_ms <= crate::now_unix_ms() {
        return Err("the round's deadline passed before it reached this node".into());
    }
    let spec = round.adapter.clone().unwrap_or_default();
    let plan = round.plan.unwrap_or_default();
    let mode = match PbMode::try_from(spec.mode) {
        Ok(PbMode::Exact) => AggregationMode::Exact,
        _ => AggregationMode::FedAvg,
    };
    let targets = spec
        .targets
        .iter()
        .map(|t| Target::parse(t).map(lora_target))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let model = ctx
        .artifacts
        .stored_model(&round.base_name, &round.base_version, &round.base_sha256)
        .ok_or_else(|| {
            format!(
                "this node does not hold the base model {}@{} (roll it out first)",
                round.base_name, round.base_version
            )
        })?;
    let lora = LoraSpec {
        rank: spec.rank as usize,
        alpha: spec.alpha,
        dropout: spec.dropout,
        targets,
        freeze_a: mode == AggregationMode::Exact,
    };
    let mut trainer = Trainer::load(&model, lora).map_err(|e| e.to_string())?;
    let layout = trainer.adapter_layout();
    let global = if round.global_adapter.is_empty() {
        initial_adapter(&layout, spec.init_seed).map_err(|e| e.to_string())?
    } else {
        AdapterTensors::from_safetensors(&round.global_adapter)
            .map_err(|e| format!("the round's global adapter is unusable: {e}"))?
    };
    trainer
        .set_adapter(&global.to_vectors())
        .map_err(|e| format!("the round's global adapter does not fit the base model: {e}"))?;
    let eval = if ctx.data.held_out.is_empty() {
        EvalMetrics::default()
    } else {
        let report = trainer
            .evaluate(&ctx.data.held_out, EVAL_MAX_NEW_TOKENS)
            .map_err(|e| e.to_string())?;
        EvalMetrics {
            examples: report.examples as u64,
            loss: report.loss,
            exact_match: report.exact_match,
        }
    };
    let mut update = RoundUpdate {
        round_id: round.round_id.clone(),
        eval: Some(eval),
        layout: layout
            .iter()
            .map(|(name, (rows, cols))| MatrixShape {
                name: name.clone(),
                rows: *rows as u32,
                cols: *cols as u32,
            })
            .collect(),
        ..Default::default()
    };
    if plan.steps == 0 {
        return Ok(update);
    }
    if ctx.data.train.is_empty() {
        return Err("no local training examples".into());
    }
    let options = TrainOptions {
        steps: plan.steps as usize,
        learning_rate: plan.learning_rate,
        batch_size: plan.batch_size as usize,
        grad_accumulation: 1,
        max_seq_len: plan.max_seq_len as usize,
        weight_decay: 0.0,
        seed: round_seed(spec.init_seed, round.round),
        memory_budget_bytes: ctx.memory_budget_bytes,
    };
    let report = trainer
        .train(&ctx.data.train, &options)
        .map_err(|e| e.to_string())?;
    let local =
        AdapterTensors::from_vectors(trainer.adapter().map_err(|e| e.to_string())?, &layout)
            .map_err(|e| format!("the trainer returned an adapter of another layout: {e}"))?;
    let mut delta = local.minus(&global).map_err(|e| e.to_string())?;
    if mode == AggregationMode::Exact {
        delta.retain(|half| half == nanofleet_federated::tensors::Half::B);
    }
    let mut flat = delta.flatten();
    let norm = nanofleet_privacy::clip::l2_norm(&flat);
    nanofleet_privacy::clip::clip_l2(&mut flat, plan.clip_norm).map_err(|e| e.to_string())?;
    delta.unflatten_from(&flat).map_err(|e| e.to_string())?;
    tracing::info!(
        steps = report.steps,
        first_loss = report.first_loss,
        last_loss = report.last_loss,
        update_norm = norm,
        "local training done"
    );
    let bytes = delta.to_safetensors(None);
    // The node's own record of what it sent (it stays on the device).
    let record = ctx.dir.join(format!(
        "{}-round-{}.safetensors",
        round.federation, round.round
    ));
    if let Err(e) = std::fs::create_dir_all(&ctx.dir).and_then(|_| std::fs::write(&record, &bytes))
    {
        tracing::warn!(error = %e, "could not keep a copy of the update");
    }
    update.train_loss_first = report.first_loss;
    update.train_loss_last = report.last_loss;
    let examples = ctx.data.train.len() as u64;
    match &round.secagg {
        None => {
            update.delta = bytes;
            update.examples = examples;
        }
        Some(params) => {
            let (session, advertise) = secure_session(params, &delta, examples)?;
            ctx.secure
                .lock()
                .expect("secure session lock")
                .insert(round.round_id.clone(), session);
            update.secagg_advertise = advertise;
        }
    }
    Ok(update)
}

/// Joins a secure round: the weighted update with its noise share, the SecAgg+ client,
/// and its first message (its public keys).
fn secure_session(
    params: &SecAggParams,
    delta: &AdapterTensors,
    examples: u64,
) -> Result<(SecureSession, Vec<u8>), String> {
    let client_id = params.client_id;
    let cap = params.weight_cap.max(1);
    let weight = examples.min(cap) as f32 / cap as f32;
    let mut vector = weighted_vector(delta, weight);
    if params.noise_stddev > 0.0 {
        // Distributed DP: this node's share of the noise, from its own randomness.
        let last = vector.len() - 1;
        nanofleet_privacy::GaussianSampler::from_rng(&mut rand::rngs::OsRng)
            .add_noise(&mut vector[..last], params.noise_stddev)
            .map_err(|e| e.to_string())?;
    }
    let graph_seed: [u8; 32] = params
        .graph_seed
        .as_slice()
        .try_into()
        .map_err(|_| "the round's graph seed is not 32 bytes".to_owned())?;
    let config = Config {
        round: params.round_tag,
        num_clients: params.num_clients,
        group_size: params.group_size,
        threshold: params.threshold,
        graph_seed,
        vector_len: vector.len(),
        clipping_range: params.clipping_range,
        quantization_range: params.quantization_range,
        modulus_bits: params.modulus_bits,
    };
    let params = Params::new(config).map_err(|e| e.to_string())?;
    let mut client =
        Client::new(client_id, params, &mut rand::rngs::OsRng).map_err(|e| e.to_string())?;
    let advertise = client.advertise().map_err(|e| e.to_string())?;
    let bytes = encode_client_message(&ClientMessage::AdvertiseKeys(advertise));
    Ok((SecureSession { client, vector }, bytes))
}

/// Answers one secure-aggregation step of a round this node trained in.
pub async fn secure_step(
    ctx: Arc<TrainingContext>,
    step: SecAggStep,
    mut client: NodeServiceClient<Channel>,
) {
    let round_id = step.round_id.clone();
    let work = ctx.clone();
    let reply = tokio::task::spawn_blocking(move || answer_step(&work, &step)).await;
    let payload = match reply {
        Ok(Ok(Some(payload))) => payload,
        Ok(Ok(None)) => {
            tracing::warn!(round = %round_id, "a secure-aggregation step for a round this node is not in (restarted?); it counts as a dropout");
            return;
        }
        Ok(Err(reason)) => {
            tracing::warn!(round = %round_id, %reason, "secure-aggregation step failed");
            return;
        }
        Err(panic) => {
            tracing::error!(round = %round_id, %panic, "secure-aggregation step panicked");
            return;
        }
    };
    let message = SecAggMessage {
        round_id: round_id.clone(),
        payload,
    };
    if let Err(status) = client.submit_sec_agg(message).await {
        tracing::warn!(round = %round_id, code = ?status.code(), status = %status.message(), "secure-aggregation message refused");
    }
}

/// The node's message for the stage `step` opens; `None` when the node has no session.
fn answer_step(ctx: &TrainingContext, step: &SecAggStep) -> Result<Option<Vec<u8>>, String> {
    let mut sessions = ctx.secure.lock().expect("secure session lock");
    let Some(session) = sessions.get_mut(&step.round_id) else {
        return Ok(None);
    };
    let err = |e: nanofleet_secagg::SecAggError| e.to_string();
    let message = if let Ok(keys) = decode_keys(&step.payload) {
        ClientMessage::ShareKeys(session.client.share_keys(&keys).map_err(err)?)
    } else if let Ok(shares) = decode_shares(&step.payload) {
        let masked = session
            .client
            .masked_input(&shares, &session.vector)
            .map_err(err)?;
        ClientMessage::MaskedInput(masked)
    } else {
        let request = decode_unmask_request(&step.payload).map_err(|e| e.to_string())?;
        let response = session.client.unmask(&request).map_err(err)?;
        sessions.remove(&step.round_id);
        ClientMessage::Unmask(response)
    };
    Ok(Some(encode_client_message(&message)))
}
