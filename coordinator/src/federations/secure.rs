//! SecAgg+ inside a round: the stage each secure round is in, the messages the
//! coordinator received (kept as files, so that a restarted coordinator rebuilds the
//! server by replaying them), and what each node gets next. The coordinator holds masked
//! vectors and the final sum, never one node's update.
//!
//! Stage 1 (advertise keys) rides on the node's round update after local training; the
//! other stages each have their own deadline (`stage_timeout_secs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nanofleet_secagg::codec::{
    decode_client_message, encode_client_message, encode_keys, encode_shares, encode_unmask_request,
};
use nanofleet_secagg::{ClientId, ClientMessage, Config, Params, SecAggError, Server};
use serde::{Deserialize, Serialize};

/// The ring: 4-byte masked elements (Flower's default modulus).
pub const MODULUS_BITS: u32 = 32;

/// Secure-aggregation settings of a federation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureOptions {
    /// Neighbourhood size k; 0: every selected node (full SecAgg).
    pub group_size: u32,
    pub stage_timeout_secs: u32,
    /// A node's weight is min(examples, weight_cap) / weight_cap.
    pub weight_cap: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecureStage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    Unmask,
}

impl SecureStage {
    const ALL: [SecureStage; 4] = [
        SecureStage::AdvertiseKeys,
        SecureStage::ShareKeys,
        SecureStage::MaskedInput,
        SecureStage::Unmask,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn next(self) -> Option<SecureStage> {
        SecureStage::ALL.get(self.index() + 1).copied()
    }

    fn of(message: &ClientMessage) -> SecureStage {
        match message {
            ClientMessage::AdvertiseKeys(_) => SecureStage::AdvertiseKeys,
            ClientMessage::ShareKeys(_) => SecureStage::ShareKeys,
            ClientMessage::MaskedInput(_) => SecureStage::MaskedInput,
            ClientMessage::Unmask(_) => SecureStage::Unmask,
        }
    }
}

/// A round's secure aggregation as stored with the round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRound {
    pub stage: SecureStage,
    /// Deadline of the current stage (stage 1: the round's training deadline).
    pub stage_deadline_ms: i64,
    /// Each selected node's client id in the protocol.
    pub client_ids: BTreeMap<String, ClientId>,
    /// Public seed of the neighbour graph, hex.
    pub graph_seed: String,
    /// Bound into every key derivation, so nothing crosses rounds.
    pub round_tag: u64,
    pub group_size: u32,
    pub threshold: u32,
    /// Elements per node vector (the update plus its weight); 0 until the first node
    /// told its layout.
    pub vector_len: usize,
    pub clipping_range: f64,
    pub quantization_range: u64,
    pub weight_cap: u64,
    /// Distributed DP: the noise std of each node's share (0: none).
    pub noise_stddev: f64,
    /// Nodes whose message for the current stage arrived.
    pub received: Vec<String>,
    /// Nodes the current stage waits for (stage 1: every selected node).
    pub expected: Vec<String>,
}

/// The parameters a node needs for its client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSetup {
    pub client_id: ClientId,
    pub num_clients: u32,
    pub group_size: u32,
    pub threshold: u32,
    pub graph_seed: [u8; 32],
    pub round_tag: u64,
    pub clipping_range: f64,
    pub quantization_range: u64,
    pub modulus_bits: u32,
    pub weight_cap: u64,
    pub noise_stddev: f64,
}

impl SecureRound {
    /// Sets up secure aggregation over `selected` nodes. The clipping range covers every
    /// coordinate of a clipped, weighted update (|x| <= its L2 norm <= `clip_norm`), the
    /// weight (<= 1) and a margin for distributed noise; the quantization range keeps the
    /// sum of all nodes below the modulus.
    pub fn new(
        selected: &[String],
        options: &SecureOptions,
        clip_norm: f64,
        noise_stddev: f64,
        deadline_ms: i64,
    ) -> Self {
        let n = selected.len() as u32;
        let group_size = match options.group_size {
            0 => n,
            k => k.min(n),
        };
        let seed: [u8; 32] = rand::random();
        SecureRound {
            stage: SecureStage::AdvertiseKeys,
            stage_deadline_ms: deadline_ms,
            client_ids: selected
                .iter()
                .enumerate()
                .map(|(i, node)| (node.clone(), i as ClientId))
                .collect(),
            graph_seed: hex::encode(seed),
            round_tag: rand::random(),
            group_size,
            threshold: 2 * group_size / 3 + 1,
            vector_len: 0,
            clipping_range: clip_norm.max(1.0) + 6.0 * noise_stddev,
            quantization_range: ((1u64 << MODULUS_BITS) - 1) / u64::from(n.max(1)),
            weight_cap: options.weight_cap.max(1),
            noise_stddev,
            received: Vec::new(),
            expected: selected.to_vec(),
        }
    }

    /// Whether every node the current stage waits for has answered.
    pub fn stage_complete(&self) -> bool {
        self.expected.iter().all(|n| self.received.contains(n))
    }

    fn seed(&self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        if let Ok(bytes) = hex::decode(&self.graph_seed) {
            if bytes.len() == 32 {
                seed.copy_from_slice(&bytes);
            }
        }
        seed
    }

    pub fn client_setup(&self, node: &str) -> Option<ClientSetup> {
        Some(ClientSetup {
            client_id: *self.client_ids.get(node)?,
            num_clients: self.client_ids.len() as u32,
            group_size: self.group_size,
            threshold: self.threshold,
            graph_seed: self.seed(),
            round_tag: self.round_tag,
            clipping_range: self.clipping_range,
            quantization_range: self.quantization_range,
            modulus_bits: MODULUS_BITS,
            weight_cap: self.weight_cap,
            noise_stddev: self.noise_stddev,
        })
    }

    /// The protocol parameters (once the vector length is known).
    pub fn params(&self) -> Result<Params, SecAggError> {
        Params::new(Config {
            round: self.round_tag,
            num_clients: self.client_ids.len() as u32,
            group_size: self.group_size,
            threshold: self.threshold,
            graph_seed: self.seed(),
            vector_len: self.vector_len,
            clipping_range: self.clipping_range,
            quantization_range: self.quantization_range,
            modulus_bits: MODULUS_BITS,
        })
    }

    fn node_of(&self, client: ClientId) -> Option<&String> {
        self.client_ids
            .iter()
            .find(|(_, id)| **id == client)
            .map(|(node, _)| node)
    }

    /// Checks that `bytes` is `node`'s message for the current stage of this round.
    pub fn check_message(&self, node: &str, bytes: &[u8]) -> Result<ClientMessage, String> {
        let message = decode_client_message(bytes).map_err(|e| e.to_string())?;
        let Some(&client) = self.client_ids.get(node) else {
            return Err("this node is not part of the round's secure aggregation".into());
        };
        if message.sender() != client {
            // The protocol's sender field is only a claim; the mTLS identity decides.
            return Err(format!(
                "the message claims client {} but this node is client {client}",
                message.sender()
            ));
        }
        if message.round() != self.round_tag {
            return Err("the message belongs to another round: stale or replayed".into());
        }
        let stage = SecureStage::of(&message);
        if stage != self.stage {
            return Err(format!(
                "a {stage:?} message arrived while the {:?} stage is open",
                self.stage
            ));
        }
        if self.received.iter().any(|n| n == node) {
            return Err("this node already sent its message for this stage".into());
        }
        Ok(message)
    }
}

/// The received messages of one round, as files `<stage>-<client>.bin`.
pub struct MessageFiles {
    dir: PathBuf,
}

impl MessageFiles {
    pub fn new(updates_dir: &Path) -> Self {
        Self {
            dir: updates_dir.join("secagg"),
        }
    }

    pub fn write(&self, message: &ClientMessage) -> std::io::Result<()> {
        let stage = SecureStage::of(message).index();
        super::write_durably(
            &self.dir.join(format!("{stage}-{}.bin", message.sender())),
            &encode_client_message(message),
        )
    }

    /// The stored messages of `stage`, by client id.
    pub fn read_stage(&self, stage: SecureStage) -> std::io::Result<Vec<ClientMessage>> {
        let prefix = format!("{}-", stage.index());
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".bin"))
            })
            .collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path)?;
            let message = decode_client_message(&bytes)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            out.push(message);
        }
        Ok(out)
    }
}

/// What closing a stage led to.
pub enum StageOutcome {
    /// The next stage opened; each node gets its payload.
    Next(Vec<(String, Vec<u8>)>),
    /// The unmask stage closed: the decoded sum and the nodes whose inputs are in it.
    Sum(Vec<f32>, Vec<String>),
}

/// The server of `round` as it stood when its current stage opened plus the messages of
/// the current stage: replayed from the files, so a restart loses nothing.
pub fn rebuild(round: &SecureRound, files: &MessageFiles) -> Result<Server, String> {
    let params = round.params().map_err(|e| e.to_string())?;
    let mut server = Server::new(params);
    for stage in SecureStage::ALL {
        for message in files.read_stage(stage).map_err(|e| e.to_string())? {
            server.receive(message).map_err(|e| e.to_string())?;
        }
        if stage == round.stage {
            break;
        }
        server.close_stage().map_err(|e| e.to_string())?;
    }
    Ok(server)
}

/// Closes the current stage of `server`; on success moves `round` to the next stage.
pub fn close_stage(
    round: &mut SecureRound,
    server: &mut Server,
    stage_timeout_ms: i64,
    now_ms: i64,
) -> Result<StageOutcome, SecAggError> {
    if let Some(aggregate) = server.close_stage()? {
        let contributors = aggregate
            .contributors()
            .iter()
            .filter_map(|client| round.node_of(*client).cloned())
            .collect();
        return Ok(StageOutcome::Sum(aggregate.decode(), contributors));
    }
    let next = round
        .stage
        .next()
        .expect("only the unmask stage yields the sum");
    round.stage = next;
    round.stage_deadline_ms = now_ms + stage_timeout_ms;
    round.received.clear();
    let mut out = Vec::new();
    for client in server.expected_senders() {
        let Some(node) = round.node_of(client).cloned() else {
            continue;
        };
        out.push((node, payload_for(round, server, client)?));
    }
    round.expected = out.iter().map(|(node, _)| node.clone()).collect();
    Ok(StageOutcome::Next(out))
}

/// The message `node` needs to take part in the current stage, when it is expected.
pub fn payload_for_node(round: &SecureRound, server: &Server, node: &str) -> Option<Vec<u8>> {
    let client = *round.client_ids.get(node)?;
    if round.stage == SecureStage::AdvertiseKeys || !server.expected_senders().contains(&client) {
        return None;
    }
    payload_for(round, server, client).ok()
}

fn payload_for(
    round: &SecureRound,
    server: &Server,
    client: ClientId,
) -> Result<Vec<u8>, SecAggError> {
    Ok(match round.stage {
        SecureStage::AdvertiseKeys => Vec::new(),
        SecureStage::ShareKeys => {
            encode_keys(round.round_tag, &server.advertised_keys_for(client)?)
        }
        SecureStage::MaskedInput => encode_shares(round.round_tag, &server.shares_for(client)?),
        SecureStage::Unmask => encode_unmask_request(&server.unmask_request_for(client)?),
    })
}
