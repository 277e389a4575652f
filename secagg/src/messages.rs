//! The messages of the four stages, as plain data for the caller's transport.

use std::fmt;

use crate::shamir::Share;
use crate::{ClientId, Stage};

/// Stage 1, client to server: the client's two X25519 public keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub round: u64,
    pub sender: ClientId,
    /// Key for encrypting the shares sent to this client.
    pub encryption_public_key: [u8; 32],
    /// Key for agreeing pairwise masks with this client.
    pub mask_public_key: [u8; 32],
}

/// One client's shares for one neighbour, encrypted and authenticated for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedShare {
    pub round: u64,
    pub sender: ClientId,
    pub recipient: ClientId,
    pub ciphertext: Vec<u8>,
}

/// Stage 2, client to server: one [`EncryptedShare`] per neighbour that advertised keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareKeys {
    pub round: u64,
    pub sender: ClientId,
    pub shares: Vec<EncryptedShare>,
}

/// Stage 3, client to server: the encoded input plus all of the client's masks.
#[derive(Clone, PartialEq, Eq)]
pub struct MaskedInput {
    pub round: u64,
    pub sender: ClientId,
    pub values: Vec<u32>,
}

impl fmt::Debug for MaskedInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaskedInput")
            .field("round", &self.round)
            .field("sender", &self.sender)
            .field("len", &self.values.len())
            .finish()
    }
}

/// Stage 4, server to client: which of its neighbours survived the masked-input stage
/// (itself included) and which dropped after sharing keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub round: u64,
    pub recipient: ClientId,
    pub dropped: Vec<ClientId>,
    pub survivors: Vec<ClientId>,
}

/// Stage 4, client to server: shares of the survivors' self-mask seeds and of the
/// dropped clients' mask secret keys, each as `(owner of the secret, share)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskResponse {
    pub round: u64,
    pub sender: ClientId,
    pub self_mask_seed_shares: Vec<(ClientId, Share)>,
    pub mask_key_shares: Vec<(ClientId, Share)>,
}

/// Any client-to-server message, for a server that takes them from one queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    AdvertiseKeys(AdvertiseKeys),
    ShareKeys(ShareKeys),
    MaskedInput(MaskedInput),
    Unmask(UnmaskResponse),
}

impl ClientMessage {
    pub fn stage(&self) -> Stage {
        match self {
            ClientMessage::AdvertiseKeys(_) => Stage::AdvertiseKeys,
            ClientMessage::ShareKeys(_) => Stage::ShareKeys,
            ClientMessage::MaskedInput(_) => Stage::MaskedInput,
            ClientMessage::Unmask(_) => Stage::Unmask,
        }
    }

    pub fn sender(&self) -> ClientId {
        match self {
            ClientMessage::AdvertiseKeys(m) => m.sender,
            ClientMessage::ShareKeys(m) => m.sender,
            ClientMessage::MaskedInput(m) => m.sender,
            ClientMessage::Unmask(m) => m.sender,
        }
    }

    pub fn round(&self) -> u64 {
        match self {
            ClientMessage::AdvertiseKeys(m) => m.round,
            ClientMessage::ShareKeys(m) => m.round,
            ClientMessage::MaskedInput(m) => m.round,
            ClientMessage::Unmask(m) => m.round,
        }
    }
}
