//! The server side of a round: collects each stage, tracks dropouts, outputs only the sum.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::client::{check_ring, pairwise_sign};
use crate::crypto::{pairwise_mask_key, self_mask_key, AEAD_TAG_BYTES};
use crate::encoding::decode_sum;
use crate::prg::{apply_masks, MaskJob, MaskSign};
use crate::shamir::{reconstruct, ReconstructError, Share, SHARE_BYTES};
use crate::{
    AdvertiseKeys, ClientId, ClientMessage, Config, EncryptedShare, MaskedInput, Params,
    SecAggError, ShareKeys, Stage, UnmaskRequest, UnmaskResponse,
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum RoundState {
    Open(Stage),
    Finished,
    Failed(String),
}

/// The server's state machine for one round.
///
/// Messages go in through [`Server::receive`], which refuses anything of the wrong round
/// or stage, from an unknown client or one that dropped earlier, duplicated, or
/// malformed, and leaves the state unchanged when it does. The caller ends each stage
/// with [`Server::close_stage`] (after all expected messages, or at a deadline): whoever
/// has not answered by then has dropped out. Between stages the caller routes what
/// [`Server::advertised_keys_for`], [`Server::shares_for`] and
/// [`Server::unmask_request_for`] return.
pub struct Server {
    params: Params,
    threads: usize,
    state: RoundState,
    /// Stage 1 messages; once the stage is closed, their senders are the round's members.
    advertised: BTreeMap<ClientId, AdvertiseKeys>,
    public_keys: HashSet<[u8; 32]>,
    /// Clients whose shares were accepted in stage 2.
    share_senders: BTreeSet<ClientId>,
    /// Encrypted shares waiting for their recipient, by recipient.
    inbox: BTreeMap<ClientId, Vec<EncryptedShare>>,
    /// Clients whose masked input was accepted in stage 3, and the running sum.
    masked_senders: BTreeSet<ClientId>,
    masked_sum: Vec<u32>,
    unmask_requests: BTreeMap<ClientId, UnmaskRequest>,
    unmask_responses: BTreeMap<ClientId, UnmaskResponse>,
}

/// The outcome of a round: the sum of the survivors' inputs and nothing else.
#[derive(Clone, PartialEq)]
pub struct Aggregate {
    sum: Vec<u32>,
    contributors: Vec<ClientId>,
    config: Config,
}

impl Aggregate {
    /// The sum in the ring `Z_{2^m}`.
    pub fn sum(&self) -> &[u32] {
        &self.sum
    }

    /// The clients whose inputs are in the sum.
    pub fn contributors(&self) -> &[ClientId] {
        &self.contributors
    }

    /// The sum decoded from fixed point to floats.
    pub fn decode(self) -> Vec<f32> {
        decode_sum(self.sum, self.contributors.len(), &self.config)
    }
}

impl fmt::Debug for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aggregate")
            .field("len", &self.sum.len())
            .field("contributors", &self.contributors)
            .finish()
    }
}

impl Server {
    /// A server for one round; mask removal uses every core the machine reports.
    pub fn new(params: Params) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Server {
            params,
            threads,
            state: RoundState::Open(Stage::AdvertiseKeys),
            advertised: BTreeMap::new(),
            public_keys: HashSet::new(),
            share_senders: BTreeSet::new(),
            inbox: BTreeMap::new(),
            masked_senders: BTreeSet::new(),
            masked_sum: Vec::new(),
            unmask_requests: BTreeMap::new(),
            unmask_responses: BTreeMap::new(),
        }
    }

    /// Sets how many threads expand masks when the round is unmasked.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The open stage, or `None` once the round finished or failed.
    pub fn stage(&self) -> Option<Stage> {
        match self.state {
            RoundState::Open(stage) => Some(stage),
            RoundState::Finished | RoundState::Failed(_) => None,
        }
    }

    /// The clients that may send in the open stage: those that completed the previous
    /// one (every client in the first stage).
    pub fn expected_senders(&self) -> Vec<ClientId> {
        match self.state {
            RoundState::Open(Stage::AdvertiseKeys) => {
                (0..self.params.config().num_clients).collect()
            }
            RoundState::Open(Stage::ShareKeys) => self.advertised.keys().copied().collect(),
            RoundState::Open(Stage::MaskedInput) => self.share_senders.iter().copied().collect(),
            RoundState::Open(Stage::Unmask) => self.masked_senders.iter().copied().collect(),
            RoundState::Finished | RoundState::Failed(_) => Vec::new(),
        }
    }

    /// Takes one client message. An error refuses this message only; the round goes on.
    pub fn receive(&mut self, message: ClientMessage) -> Result<(), SecAggError> {
        let stage = self.open_stage()?;
        self.params.check_round(message.round())?;
        self.params.check_client(message.sender())?;
        if message.stage() != stage {
            return Err(SecAggError::WrongStage {
                expected: stage,
                got: message.stage(),
            });
        }
        match message {
            ClientMessage::AdvertiseKeys(keys) => self.receive_keys(keys),
            ClientMessage::ShareKeys(shares) => self.receive_shares(shares),
            ClientMessage::MaskedInput(input) => self.receive_masked_input(input),
            ClientMessage::Unmask(response) => self.receive_unmask(response),
        }
    }

    fn receive_keys(&mut self, keys: AdvertiseKeys) -> Result<(), SecAggError> {
        if self.advertised.contains_key(&keys.sender) {
            return Err(SecAggError::Duplicate(keys.sender));
        }
        let (encryption, mask) = (keys.encryption_public_key, keys.mask_public_key);
        if encryption == mask
            || self.public_keys.contains(&encryption)
            || self.public_keys.contains(&mask)
        {
            return Err(SecAggError::Malformed {
                sender: keys.sender,
                reason: "advertised a public key that is already in use in this round".into(),
            });
        }
        self.public_keys.extend([encryption, mask]);
        self.advertised.insert(keys.sender, keys);
        Ok(())
    }

    fn receive_shares(&mut self, message: ShareKeys) -> Result<(), SecAggError> {
        let sender = message.sender;
        require_member(&self.advertised.keys().copied().collect(), sender)?;
        if self.share_senders.contains(&sender) {
            return Err(SecAggError::Duplicate(sender));
        }
        let expected: BTreeSet<ClientId> =
            self.live_neighbours(sender, |c| self.advertised.contains_key(&c));
        let mut recipients = BTreeSet::new();
        for share in &message.shares {
            self.params.check_round(share.round)?;
            let malformed = |reason: String| SecAggError::Malformed { sender, reason };
            if share.sender != sender {
                return Err(malformed(format!(
                    "carries a share signed as from client {}",
                    share.sender
                )));
            }
            if !expected.contains(&share.recipient) {
                return Err(malformed(format!(
                    "addresses a share to client {}, which is not a live neighbour",
                    share.recipient
                )));
            }
            if !recipients.insert(share.recipient) {
                return Err(malformed(format!(
                    "sends client {} two shares",
                    share.recipient
                )));
            }
            if share.ciphertext.len() != 2 * SHARE_BYTES + AEAD_TAG_BYTES {
                return Err(malformed(format!(
                    "share for client {} has {} bytes, not {}",
                    share.recipient,
                    share.ciphertext.len(),
                    2 * SHARE_BYTES + AEAD_TAG_BYTES
                )));
            }
        }
        if recipients != expected {
            return Err(SecAggError::Malformed {
                sender,
                reason: format!(
                    "sent shares to {} of its {} live neighbours; masks would not cancel",
                    recipients.len(),
                    expected.len()
                ),
            });
        }
        for share in message.shares {
            self.inbox.entry(share.recipient).or_default().push(share);
        }
        self.share_senders.insert(sender);
        Ok(())
    }

    fn receive_masked_input(&mut self, input: MaskedInput) -> Result<(), SecAggError> {
        require_member(&self.share_senders, input.sender)?;
        if self.masked_senders.contains(&input.sender) {
            return Err(SecAggError::Duplicate(input.sender));
        }
        let expected = self.params.config().vector_len;
        if input.values.len() != expected {
            return Err(SecAggError::WrongLength {
                expected,
                got: input.values.len(),
            });
        }
        check_ring(&input.values, &self.params)?;
        if self.masked_senders.is_empty() {
            // The first input becomes the running sum: no zeroed vector to fault in.
            self.masked_sum = input.values;
        } else {
            // One thread: split across cores, the sum's lines would move between caches
            // on every input, which costs more than the adding.
            for (sum, value) in self.masked_sum.iter_mut().zip(&input.values) {
                *sum = sum.wrapping_add(*value);
            }
        }
        self.masked_senders.insert(input.sender);
        Ok(())
    }

    fn receive_unmask(&mut self, response: UnmaskResponse) -> Result<(), SecAggError> {
        let sender = response.sender;
        require_member(&self.masked_senders, sender)?;
        if self.unmask_responses.contains_key(&sender) {
            return Err(SecAggError::Duplicate(sender));
        }
        let request = &self.unmask_requests[&sender];
        let answers = |shares: &[(ClientId, Share)], owners: &[ClientId]| {
            shares.len() == owners.len()
                && shares
                    .iter()
                    .zip(owners)
                    .all(|((owner, share), expected)| owner == expected && share.holder() == sender)
        };
        if !answers(&response.self_mask_seed_shares, &request.survivors)
            || !answers(&response.mask_key_shares, &request.dropped)
        {
            return Err(SecAggError::Malformed {
                sender,
                reason: "unmask response does not answer the request it was sent".into(),
            });
        }
        self.unmask_responses.insert(sender, response);
        Ok(())
    }

    /// Ends the open stage: whoever has not sent by now has dropped out. Fails the round
    /// if some client would keep fewer than `threshold` live members in its
    /// neighbourhood; closing the unmask stage returns the aggregate.
    pub fn close_stage(&mut self) -> Result<Option<Aggregate>, SecAggError> {
        let stage = self.open_stage()?;
        let outcome = match stage {
            Stage::AdvertiseKeys => {
                let members: BTreeSet<ClientId> = self.advertised.keys().copied().collect();
                self.check_neighbourhoods(Stage::AdvertiseKeys, &members, &members)
            }
            Stage::ShareKeys => self.check_neighbourhoods(
                Stage::ShareKeys,
                &self.share_senders,
                &self.share_senders,
            ),
            Stage::MaskedInput => self.check_neighbourhoods(
                Stage::MaskedInput,
                &self.share_senders,
                &self.masked_senders,
            ),
            Stage::Unmask => Ok(()),
        };
        let outcome = outcome.and_then(|()| match stage {
            Stage::AdvertiseKeys => Ok(Next::Stage(Stage::ShareKeys)),
            Stage::ShareKeys => {
                let senders = &self.share_senders;
                self.inbox
                    .retain(|recipient, _| senders.contains(recipient));
                Ok(Next::Stage(Stage::MaskedInput))
            }
            Stage::MaskedInput => {
                self.inbox.clear();
                self.unmask_requests = self.build_unmask_requests();
                Ok(Next::Stage(Stage::Unmask))
            }
            Stage::Unmask => self.unmask().map(Next::Done),
        });
        match outcome {
            Ok(Next::Stage(next)) => {
                self.state = RoundState::Open(next);
                Ok(None)
            }
            Ok(Next::Done(aggregate)) => {
                self.state = RoundState::Finished;
                Ok(Some(aggregate))
            }
            Err(error) => {
                self.state = RoundState::Failed(error.to_string());
                Err(error)
            }
        }
    }

    /// Stage 2 routing: the keys of `client`'s neighbourhood (its own included).
    pub fn advertised_keys_for(&self, client: ClientId) -> Result<Vec<AdvertiseKeys>, SecAggError> {
        self.expect_routing(Stage::ShareKeys, "advertised keys")?;
        require_member(&self.advertised.keys().copied().collect(), client)?;
        let mut neighbourhood = self.live_neighbours(client, |c| self.advertised.contains_key(&c));
        neighbourhood.insert(client);
        Ok(neighbourhood
            .iter()
            .map(|id| self.advertised[id].clone())
            .collect())
    }

    /// Stage 3 routing: the encrypted shares addressed to `client`.
    pub fn shares_for(&self, client: ClientId) -> Result<Vec<EncryptedShare>, SecAggError> {
        self.expect_routing(Stage::MaskedInput, "encrypted shares")?;
        require_member(&self.share_senders, client)?;
        Ok(self.inbox.get(&client).cloned().unwrap_or_default())
    }

    /// Stage 4 routing: which of `client`'s neighbours survived and which dropped.
    pub fn unmask_request_for(&self, client: ClientId) -> Result<UnmaskRequest, SecAggError> {
        self.expect_routing(Stage::Unmask, "unmask requests")?;
        require_member(&self.masked_senders, client)?;
        Ok(self.unmask_requests[&client].clone())
    }

    fn open_stage(&self) -> Result<Stage, SecAggError> {
        match &self.state {
            RoundState::Open(stage) => Ok(*stage),
            RoundState::Finished => Err(SecAggError::RoundFinished),
            RoundState::Failed(reason) => Err(SecAggError::RoundFailed(reason.clone())),
        }
    }

    fn expect_routing(&self, stage: Stage, what: &'static str) -> Result<(), SecAggError> {
        if self.open_stage()? == stage {
            Ok(())
        } else {
            Err(SecAggError::NotAvailable(what))
        }
    }

    /// The neighbours of `client` for which `live` holds.
    fn live_neighbours(
        &self,
        client: ClientId,
        live: impl Fn(ClientId) -> bool,
    ) -> BTreeSet<ClientId> {
        self.params
            .graph()
            .neighbours(client)
            .iter()
            .copied()
            .filter(|&c| live(c))
            .collect()
    }

    /// Every member must keep at least `threshold` live clients in its neighbourhood
    /// (itself included), or its secrets could not be rebuilt at the end.
    fn check_neighbourhoods(
        &self,
        stage: Stage,
        members: &BTreeSet<ClientId>,
        live: &BTreeSet<ClientId>,
    ) -> Result<(), SecAggError> {
        if live.is_empty() {
            return Err(SecAggError::NoClients(stage));
        }
        let need = self.params.threshold();
        for &client in members {
            let have = self.live_neighbours(client, |c| live.contains(&c)).len()
                + usize::from(live.contains(&client));
            if have < need {
                return Err(SecAggError::TooFewSurvivors { client, have, need });
            }
        }
        Ok(())
    }

    fn build_unmask_requests(&self) -> BTreeMap<ClientId, UnmaskRequest> {
        self.masked_senders
            .iter()
            .map(|&client| {
                let shared = self.live_neighbours(client, |c| self.share_senders.contains(&c));
                let (mut survivors, dropped): (Vec<ClientId>, Vec<ClientId>) = shared
                    .into_iter()
                    .partition(|c| self.masked_senders.contains(c));
                survivors.push(client);
                survivors.sort_unstable();
                let request = UnmaskRequest {
                    round: self.params.round(),
                    recipient: client,
                    dropped,
                    survivors,
                };
                (client, request)
            })
            .collect()
    }

    /// Rebuilds every needed secret, lists the masks to remove and removes them.
    fn unmask(&mut self) -> Result<Aggregate, SecAggError> {
        let round = self.params.round();
        let threshold = self.params.threshold();
        let mut seed_shares: BTreeMap<ClientId, Vec<Share>> = BTreeMap::new();
        let mut key_shares: BTreeMap<ClientId, Vec<Share>> = BTreeMap::new();
        for response in self.unmask_responses.values() {
            for (owner, share) in &response.self_mask_seed_shares {
                seed_shares.entry(*owner).or_default().push(share.clone());
            }
            for (owner, share) in &response.mask_key_shares {
                key_shares.entry(*owner).or_default().push(share.clone());
            }
        }
        let rebuild = |owner: ClientId, shares: Option<&Vec<Share>>| {
            reconstruct(shares.map_or(&[][..], Vec::as_slice), threshold).map_err(|e| match e {
                ReconstructError::NotEnough { have, need } => {
                    SecAggError::NotEnoughShares { owner, have, need }
                }
                ReconstructError::Inconsistent => SecAggError::InconsistentShares { owner },
            })
        };
        let mut jobs = Vec::new();
        // `(owner, survivor)`: `owner` shared keys but sent no input, so the survivor's
        // input holds a pairwise mask with it that no longer cancels.
        let mut broken_pairs: Vec<(ClientId, ClientId)> = Vec::new();
        let mut dropped_secrets: BTreeMap<ClientId, StaticSecret> = BTreeMap::new();
        for &owner in &self.share_senders {
            if self.masked_senders.contains(&owner) {
                let seed = zeroize::Zeroizing::new(rebuild(owner, seed_shares.get(&owner))?);
                jobs.push(MaskJob {
                    key: self_mask_key(&seed, round, owner),
                    sign: MaskSign::Subtract,
                });
                continue;
            }
            let secret = StaticSecret::from(rebuild(owner, key_shares.get(&owner))?);
            if PublicKey::from(&secret).to_bytes() != self.advertised[&owner].mask_public_key {
                return Err(SecAggError::InconsistentShares { owner });
            }
            dropped_secrets.insert(owner, secret);
            let survivors = self.live_neighbours(owner, |c| self.masked_senders.contains(&c));
            broken_pairs.extend(survivors.into_iter().map(|survivor| (owner, survivor)));
        }
        // One key agreement per pair, the slowest step here: spread over the threads.
        let pairwise = map_on_threads(&broken_pairs, self.threads, |&(owner, survivor)| {
            let key = pairwise_mask_key(
                &dropped_secrets[&owner],
                &self.advertised[&survivor].mask_public_key,
                round,
                owner,
                survivor,
            )?;
            // The survivor applied its sign for the pair; apply the opposite.
            let sign = match pairwise_sign(survivor, owner) {
                MaskSign::Add => MaskSign::Subtract,
                MaskSign::Subtract => MaskSign::Add,
            };
            Ok(MaskJob { key, sign })
        });
        for job in pairwise {
            jobs.push(job?);
        }
        // At least `threshold` inputs arrived (`check_neighbourhoods`), so the sum is whole.
        let mut sum = std::mem::take(&mut self.masked_sum);
        debug_assert_eq!(sum.len(), self.params.config().vector_len);
        apply_masks(&mut sum, &jobs, self.threads);
        let ring_mask = self.params.ring_mask();
        if ring_mask != u32::MAX {
            sum.iter_mut().for_each(|v| *v &= ring_mask);
        }
        self.unmask_responses.clear();
        Ok(Aggregate {
            sum,
            contributors: self.masked_senders.iter().copied().collect(),
            config: self.params.config().clone(),
        })
    }
}

enum Next {
    Stage(Stage),
    Done(Aggregate),
}

/// `f` over `items` on up to `threads` threads (the caller's among them), results in
/// the order of `items`.
fn map_on_threads<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let per_thread = items.len().div_ceil(threads.max(1)).max(1);
    let mut chunks = items.chunks(per_thread);
    let Some(head) = chunks.next() else {
        return Vec::new();
    };
    std::thread::scope(|scope| {
        let f = &f;
        let others: Vec<_> = chunks
            .map(|chunk| scope.spawn(move || chunk.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = head.iter().map(f).collect();
        for other in others {
            out.extend(
                other
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            );
        }
        out
    })
}

fn require_member(members: &BTreeSet<ClientId>, client: ClientId) -> Result<(), SecAggError> {
    if members.contains(&client) {
        Ok(())
    } else {
        Err(SecAggError::NotAParticipant(client))
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("round", &self.params.round())
            .field("state", &self.state)
            .field("advertised", &self.advertised.len())
            .field("share_senders", &self.share_senders.len())
            .field("masked_senders", &self.masked_senders.len())
            .field("unmask_responses", &self.unmask_responses.len())
            .finish_non_exhaustive()
    }
}
