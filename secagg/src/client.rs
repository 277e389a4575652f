//! The client side of a round: one state machine per client and round.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRngCore, RngCore, SeedableRng};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::crypto::{open_share, pairwise_mask_key, seal_share, self_mask_key};
use crate::encoding::quantize;
use crate::prg::{apply_masks, MaskJob, MaskKey, MaskPrg, MaskSign};
use crate::shamir::{split, Share, SHARE_BYTES};
use crate::{
    AdvertiseKeys, ClientId, EncryptedShare, MaskedInput, Params, SecAggError, ShareKeys, Stage,
    UnmaskRequest, UnmaskResponse,
};

/// One client's part in one round. Each method is one stage and may be called once, in
/// order; a refused call leaves the client as it was.
pub struct Client {
    id: ClientId,
    params: Params,
    /// The stage whose method is due next; `None` once the client has answered unmask.
    next_stage: Option<Stage>,
    encryption_secret: StaticSecret,
    mask_secret: StaticSecret,
    own_keys: AdvertiseKeys,
    self_mask_seed: Zeroizing<[u8; 32]>,
    /// Private randomness for Shamir polynomials and stochastic rounding.
    rng: ChaCha20Rng,
    /// Neighbours that advertised keys, by id.
    peer_keys: BTreeMap<ClientId, AdvertiseKeys>,
    /// Shares this client holds, by owner of the secret (itself included).
    held_seed_shares: BTreeMap<ClientId, Share>,
    held_mask_key_shares: BTreeMap<ClientId, Share>,
}

impl Client {
    /// Makes the client's two key pairs and self-mask seed for the round.
    pub fn new(
        id: ClientId,
        params: Params,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, SecAggError> {
        params.check_client(id)?;
        let encryption_secret = StaticSecret::random_from_rng(&mut *rng);
        let mask_secret = StaticSecret::random_from_rng(&mut *rng);
        let mut self_mask_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *self_mask_seed);
        let mut rng_seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *rng_seed);
        let own_keys = AdvertiseKeys {
            round: params.round(),
            sender: id,
            encryption_public_key: PublicKey::from(&encryption_secret).to_bytes(),
            mask_public_key: PublicKey::from(&mask_secret).to_bytes(),
        };
        Ok(Client {
            id,
            params,
            next_stage: Some(Stage::AdvertiseKeys),
            encryption_secret,
            mask_secret,
            own_keys,
            self_mask_seed,
            rng: ChaCha20Rng::from_seed(*rng_seed),
            peer_keys: BTreeMap::new(),
            held_seed_shares: BTreeMap::new(),
            held_mask_key_shares: BTreeMap::new(),
        })
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Stage 1: the client's public keys.
    pub fn advertise(&mut self) -> Result<AdvertiseKeys, SecAggError> {
        self.expect_stage(Stage::AdvertiseKeys)?;
        self.next_stage = Some(Stage::ShareKeys);
        Ok(self.own_keys.clone())
    }

    /// Stage 2: given the keys of the neighbourhood (this client's own included), shares
    /// the self-mask seed and the mask secret key, one encrypted share per neighbour.
    pub fn share_keys(&mut self, keys: &[AdvertiseKeys]) -> Result<ShareKeys, SecAggError> {
        self.expect_stage(Stage::ShareKeys)?;
        let round = self.params.round();
        let mut peers = BTreeMap::new();
        let mut saw_own = false;
        let mut public_keys = HashSet::new();
        for keys in keys {
            self.params.check_round(keys.round)?;
            if keys.sender == self.id {
                if *keys != self.own_keys {
                    return Err(self.malformed(
                        "the server relayed keys for this client that it did not advertise",
                    ));
                }
                saw_own = true;
            } else {
                if !self.params.graph().are_neighbours(self.id, keys.sender) {
                    return Err(SecAggError::Malformed {
                        sender: keys.sender,
                        reason: format!(
                            "client {} is not a neighbour of client {}",
                            keys.sender, self.id
                        ),
                    });
                }
                if peers.insert(keys.sender, keys.clone()).is_some() {
                    return Err(SecAggError::Duplicate(keys.sender));
                }
            }
            if !public_keys.insert(keys.encryption_public_key)
                || !public_keys.insert(keys.mask_public_key)
            {
                return Err(SecAggError::Malformed {
                    sender: keys.sender,
                    reason: "advertised a public key that another key already uses".into(),
                });
            }
        }
        if !saw_own {
            return Err(self.malformed("the key list lacks this client's own keys"));
        }
        let threshold = self.params.threshold();
        if peers.len() + 1 < threshold {
            return Err(SecAggError::TooFewSurvivors {
                client: self.id,
                have: peers.len() + 1,
                need: threshold,
            });
        }
        let holders: Vec<ClientId> = peers.keys().copied().chain([self.id]).collect();
        let mask_secret_bytes = Zeroizing::new(self.mask_secret.to_bytes());
        let seed_shares = split(&self.self_mask_seed, threshold, &holders, &mut self.rng);
        let key_shares = split(&mask_secret_bytes, threshold, &holders, &mut self.rng);
        let mut held_seed_shares = BTreeMap::new();
        let mut held_mask_key_shares = BTreeMap::new();
        let mut shares = Vec::with_capacity(peers.len());
        for (seed_share, key_share) in seed_shares.into_iter().zip(key_shares) {
            let holder = seed_share.holder();
            if holder == self.id {
                held_seed_shares.insert(self.id, seed_share);
                held_mask_key_shares.insert(self.id, key_share);
                continue;
            }
            let mut plaintext = Zeroizing::new([0u8; 2 * SHARE_BYTES]);
            plaintext[..SHARE_BYTES].copy_from_slice(&seed_share.to_bytes());
            plaintext[SHARE_BYTES..].copy_from_slice(&key_share.to_bytes());
            let ciphertext = seal_share(
                &self.encryption_secret,
                &peers[&holder].encryption_public_key,
                round,
                self.id,
                holder,
                &*plaintext,
            )?;
            shares.push(EncryptedShare {
                round,
                sender: self.id,
                recipient: holder,
                ciphertext,
            });
        }
        self.peer_keys = peers;
        self.held_seed_shares = held_seed_shares;
        self.held_mask_key_shares = held_mask_key_shares;
        self.next_stage = Some(Stage::MaskedInput);
        Ok(ShareKeys {
            round,
            sender: self.id,
            shares,
        })
    }

    /// Stage 3 for float inputs: clips and stochastically quantizes `values` into the
    /// ring, then masks them (see [`Client::masked_input_encoded`]).
    pub fn masked_input(
        &mut self,
        shares: &[EncryptedShare],
        values: &[f32],
    ) -> Result<MaskedInput, SecAggError> {
        self.expect_stage(Stage::MaskedInput)?;
        self.check_len(values.len())?;
        let mut rounding_key = [0u8; 32];
        self.rng.fill_bytes(&mut rounding_key);
        let mut randomness = MaskPrg::new(&MaskKey::from_bytes(rounding_key));
        let encoded = quantize(values, self.params.config(), &mut randomness)?;
        self.mask(shares, encoded)
    }

    /// Stage 3 for inputs already in the ring `Z_{2^m}`: opens the shares that the
    /// neighbours sent, then adds the self mask and one pairwise mask per neighbour that
    /// sent shares.
    pub fn masked_input_encoded(
        &mut self,
        shares: &[EncryptedShare],
        values: &[u32],
    ) -> Result<MaskedInput, SecAggError> {
        self.expect_stage(Stage::MaskedInput)?;
        self.check_len(values.len())?;
        check_ring(values, &self.params)?;
        self.mask(shares, values.to_vec())
    }

    fn mask(
        &mut self,
        shares: &[EncryptedShare],
        mut values: Vec<u32>,
    ) -> Result<MaskedInput, SecAggError> {
        let round = self.params.round();
        let mut received_seed_shares = BTreeMap::new();
        let mut received_key_shares = BTreeMap::new();
        for share in shares {
            self.params.check_round(share.round)?;
            if share.recipient != self.id {
                return Err(SecAggError::Malformed {
                    sender: share.sender,
                    reason: format!(
                        "share addressed to client {} was delivered to client {}",
                        share.recipient, self.id
                    ),
                });
            }
            let peer = self
                .peer_keys
                .get(&share.sender)
                .ok_or(SecAggError::NotAParticipant(share.sender))?;
            if received_seed_shares.contains_key(&share.sender) {
                return Err(SecAggError::Duplicate(share.sender));
            }
            let plaintext = open_share(
                &self.encryption_secret,
                &peer.encryption_public_key,
                round,
                share.sender,
                self.id,
                &share.ciphertext,
            )?;
            let parsed = (plaintext.len() == 2 * SHARE_BYTES)
                .then(|| {
                    let seed = Share::from_bytes(self.id, &plaintext[..SHARE_BYTES])?;
                    let key = Share::from_bytes(self.id, &plaintext[SHARE_BYTES..])?;
                    Some((seed, key))
                })
                .flatten();
            let (seed_share, key_share) = parsed.ok_or_else(|| SecAggError::Malformed {
                sender: share.sender,
                reason: "decrypted share has the wrong size or leaves the field".into(),
            })?;
            received_seed_shares.insert(share.sender, seed_share);
            received_key_shares.insert(share.sender, key_share);
        }
        let threshold = self.params.threshold();
        if received_seed_shares.len() + 1 < threshold {
            return Err(SecAggError::TooFewSurvivors {
                client: self.id,
                have: received_seed_shares.len() + 1,
                need: threshold,
            });
        }
        let mut jobs = vec![MaskJob {
            key: self_mask_key(&self.self_mask_seed, round, self.id),
            sign: MaskSign::Add,
        }];
        for &partner in received_seed_shares.keys() {
            jobs.push(MaskJob {
                key: pairwise_mask_key(
                    &self.mask_secret,
                    &self.peer_keys[&partner].mask_public_key,
                    round,
                    self.id,
                    partner,
                )?,
                sign: pairwise_sign(self.id, partner),
            });
        }
        // A client runs on one core: an edge device has few and they are busy training.
        apply_masks(&mut values, &jobs, 1);
        let ring_mask = self.params.ring_mask();
        values.iter_mut().for_each(|v| *v &= ring_mask);
        self.held_seed_shares.append(&mut received_seed_shares);
        self.held_mask_key_shares.append(&mut received_key_shares);
        self.next_stage = Some(Stage::Unmask);
        Ok(MaskedInput {
            round,
            sender: self.id,
            values,
        })
    }

    /// Stage 4: reveals seed shares of the survivors and key shares of the dropped, and
    /// refuses any request that would reveal both for one client.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        self.expect_stage(Stage::Unmask)?;
        self.params.check_round(request.round)?;
        if request.recipient != self.id {
            return Err(self.malformed(&format!(
                "unmask request for client {} was delivered to client {}",
                request.recipient, self.id
            )));
        }
        let survivors: BTreeSet<ClientId> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<ClientId> = request.dropped.iter().copied().collect();
        if survivors.len() != request.survivors.len() || dropped.len() != request.dropped.len() {
            return Err(self.malformed("unmask request lists a client twice"));
        }
        if let Some(both) = survivors.intersection(&dropped).next() {
            return Err(self.malformed(&format!(
                "unmask request lists client {both} as both survivor and dropped; answering would reveal its input"
            )));
        }
        if !survivors.contains(&self.id) {
            return Err(self.malformed("unmask request does not list this client as a survivor"));
        }
        if let Some(stranger) = survivors
            .iter()
            .chain(&dropped)
            .find(|owner| !self.held_seed_shares.contains_key(owner))
        {
            return Err(self.malformed(&format!(
                "unmask request names client {stranger}, which never shared keys with this client"
            )));
        }
        let threshold = self.params.threshold();
        if survivors.len() < threshold {
            return Err(SecAggError::TooFewSurvivors {
                client: self.id,
                have: survivors.len(),
                need: threshold,
            });
        }
        let self_mask_seed_shares = survivors
            .iter()
            .map(|owner| (*owner, self.held_seed_shares[owner].clone()))
            .collect();
        let mask_key_shares = dropped
            .iter()
            .map(|owner| (*owner, self.held_mask_key_shares[owner].clone()))
            .collect();
        self.held_seed_shares.clear();
        self.held_mask_key_shares.clear();
        self.next_stage = None;
        Ok(UnmaskResponse {
            round: self.params.round(),
            sender: self.id,
            self_mask_seed_shares,
            mask_key_shares,
        })
    }

    fn expect_stage(&self, got: Stage) -> Result<(), SecAggError> {
        match self.next_stage {
            Some(expected) if expected == got => Ok(()),
            Some(expected) => Err(SecAggError::WrongStage { expected, got }),
            None => Err(SecAggError::RoundFinished),
        }
    }

    fn check_len(&self, got: usize) -> Result<(), SecAggError> {
        let expected = self.params.config().vector_len;
        if got == expected {
            Ok(())
        } else {
            Err(SecAggError::WrongLength { expected, got })
        }
    }

    fn malformed(&self, reason: &str) -> SecAggError {
        SecAggError::Malformed {
            sender: self.id,
            reason: reason.into(),
        }
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("round", &self.params.round())
            .field("next_stage", &self.next_stage)
            .finish_non_exhaustive()
    }
}

/// The sign with which `me` adds its pairwise mask with `peer`; the two ends use
/// opposite signs so the masks cancel in the sum.
pub(crate) fn pairwise_sign(me: ClientId, peer: ClientId) -> MaskSign {
    if me > peer {
        MaskSign::Add
    } else {
        MaskSign::Subtract
    }
}

/// Refuses values outside `Z_{2^m}`.
pub(crate) fn check_ring(values: &[u32], params: &Params) -> Result<(), SecAggError> {
    let ring_mask = params.ring_mask();
    // Every word is in a 32-bit ring; otherwise an OR over all values vectorizes, and
    // the position is sought only on refusal.
    if ring_mask == u32::MAX || values.iter().fold(0, |acc, &v| acc | v) & !ring_mask == 0 {
        return Ok(());
    }
    match values.iter().position(|&v| v & !ring_mask != 0) {
        Some(index) => Err(SecAggError::OutOfRing {
            index,
            value: values[index],
            modulus_bits: params.config().modulus_bits,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use rand_core::OsRng;

    /// Two clients of a round in the ring `Z_{2^24}`.
    fn pair() -> (Client, Client) {
        let mut config = Config::new(2, 3);
        config.threshold = 2;
        config.modulus_bits = 24;
        let params = Params::new(config).unwrap();
        (
            Client::new(0, params.clone(), &mut OsRng).unwrap(),
            Client::new(1, params, &mut OsRng).unwrap(),
        )
    }

    #[test]
    fn stages_must_come_in_order() {
        let (mut a, _) = pair();
        assert_eq!(
            a.share_keys(&[]).unwrap_err(),
            SecAggError::WrongStage {
                expected: Stage::AdvertiseKeys,
                got: Stage::ShareKeys
            }
        );
        a.advertise().unwrap();
        assert!(matches!(a.advertise(), Err(SecAggError::WrongStage { .. })));
    }

    #[test]
    fn refuses_request_that_would_reveal_seed_and_key_of_one_client() {
        let (mut a, mut b) = pair();
        let keys = [a.advertise().unwrap(), b.advertise().unwrap()];
        let from_a = a.share_keys(&keys).unwrap();
        let from_b = b.share_keys(&keys).unwrap();
        a.masked_input_encoded(&from_b.shares, &[1, 2, 3]).unwrap();
        b.masked_input_encoded(&from_a.shares, &[4, 5, 6]).unwrap();
        let greedy = UnmaskRequest {
            round: 0,
            recipient: 0,
            dropped: vec![1],
            survivors: vec![0, 1],
        };
        let err = a.unmask(&greedy).unwrap_err();
        assert!(
            err.to_string().contains("both survivor and dropped"),
            "{err}"
        );
        // The refusal left the client able to answer an honest request.
        let honest = UnmaskRequest {
            dropped: vec![],
            ..greedy
        };
        let response = a.unmask(&honest).unwrap();
        assert_eq!(response.self_mask_seed_shares.len(), 2);
        assert!(response.mask_key_shares.is_empty());
        assert_eq!(a.unmask(&honest).unwrap_err(), SecAggError::RoundFinished);
    }

    #[test]
    fn refuses_inputs_outside_the_ring_and_of_wrong_length() {
        let (mut a, mut b) = pair();
        let keys = [a.advertise().unwrap(), b.advertise().unwrap()];
        a.share_keys(&keys).unwrap();
        let from_b = b.share_keys(&keys).unwrap();
        assert!(matches!(
            a.masked_input_encoded(&from_b.shares, &[1, 1 << 24, 3]),
            Err(SecAggError::OutOfRing { index: 1, .. })
        ));
        assert_eq!(
            a.masked_input(&from_b.shares, &[1.0]).unwrap_err(),
            SecAggError::WrongLength {
                expected: 3,
                got: 1
            }
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let (a, _) = pair();
        let shown = format!("{a:?}");
        assert!(shown.contains("id: 0") && !shown.contains("secret") && !shown.contains("seed"));
    }
}
