//! Key agreement and derivation: X25519 secrets, HKDF-SHA256 keys, AES-256-GCM shares.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::prg::MaskKey;
use crate::{ClientId, SecAggError};

/// Salt of every HKDF in the crate; the label in `info` separates the uses.
const KDF_SALT: &[u8] = b"nanofleet-secagg v1";
const SHARE_AD_LABEL: &[u8] = b"nanofleet-secagg v1 share";
/// AES-GCM appends a 16-byte tag.
pub(crate) const AEAD_TAG_BYTES: usize = 16;

/// HKDF-SHA256 of `ikm` into a 256-bit key for one use (`label`) in one round between
/// clients `a` and `b`.
pub(crate) fn derive_key(
    ikm: &[u8],
    round: u64,
    label: &[u8],
    a: ClientId,
    b: ClientId,
) -> MaskKey {
    let mut info = Vec::with_capacity(label.len() + 16);
    info.extend_from_slice(label);
    info.extend_from_slice(&round.to_le_bytes());
    info.extend_from_slice(&a.to_le_bytes());
    info.extend_from_slice(&b.to_le_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(KDF_SALT), ikm)
        .expand(&info, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    MaskKey::from_bytes(key)
}

/// The X25519 secret between `own` and the peer's public key, refusing low-order points
/// (a peer that sends one would make the secret predictable).
fn agree(
    own: &StaticSecret,
    peer_public: &[u8; 32],
    peer: ClientId,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = own.diffie_hellman(&PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(SecAggError::Malformed {
            sender: peer,
            reason: "public key is a low-order point".into(),
        });
    }
    Ok(Zeroizing::new(*shared.as_bytes()))
}

/// The pairwise mask key of `me` and `peer`; both ends derive the same key.
pub(crate) fn pairwise_mask_key(
    own_mask_secret: &StaticSecret,
    peer_mask_public: &[u8; 32],
    round: u64,
    me: ClientId,
    peer: ClientId,
) -> Result<MaskKey, SecAggError> {
    let shared = agree(own_mask_secret, peer_mask_public, peer)?;
    let (low, high) = (me.min(peer), me.max(peer));
    Ok(derive_key(&*shared, round, b"pairwise mask", low, high))
}

/// The self-mask key of `owner` from its 32-byte seed.
pub(crate) fn self_mask_key(seed: &[u8; 32], round: u64, owner: ClientId) -> MaskKey {
    derive_key(seed, round, b"self mask", owner, owner)
}

/// The authenticated cipher of one direction of share exchange and its parameters.
struct ShareChannel {
    cipher: Aes256Gcm,
    nonce: [u8; 12],
    associated_data: [u8; SHARE_AD_LABEL.len() + 16],
}

impl ShareChannel {
    fn new(
        own_encryption_secret: &StaticSecret,
        peer_encryption_public: &[u8; 32],
        round: u64,
        sender: ClientId,
        recipient: ClientId,
        peer: ClientId,
    ) -> Result<Self, SecAggError> {
        let shared = agree(own_encryption_secret, peer_encryption_public, peer)?;
        let (low, high) = (sender.min(recipient), sender.max(recipient));
        let key = derive_key(&*shared, round, b"share encryption", low, high);
        // Each direction of a pair sends exactly one message per round under this key,
        // so the sender id makes the nonce unique.
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&sender.to_le_bytes());
        let mut associated_data = [0u8; SHARE_AD_LABEL.len() + 16];
        let (label, rest) = associated_data.split_at_mut(SHARE_AD_LABEL.len());
        label.copy_from_slice(SHARE_AD_LABEL);
        rest[..8].copy_from_slice(&round.to_le_bytes());
        rest[8..12].copy_from_slice(&sender.to_le_bytes());
        rest[12..].copy_from_slice(&recipient.to_le_bytes());
        Ok(ShareChannel {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key.0)),
            nonce,
            associated_data,
        })
    }

    fn payload<'a>(&'a self, msg: &'a [u8]) -> Payload<'a, 'a> {
        Payload {
            msg,
            aad: &self.associated_data,
        }
    }
}

/// Encrypts `plaintext` from `sender` to `recipient` (run by the sender).
pub(crate) fn seal_share(
    own_encryption_secret: &StaticSecret,
    recipient_encryption_public: &[u8; 32],
    round: u64,
    sender: ClientId,
    recipient: ClientId,
    plaintext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let channel = ShareChannel::new(
        own_encryption_secret,
        recipient_encryption_public,
        round,
        sender,
        recipient,
        recipient,
    )?;
    channel
        .cipher
        .encrypt(
            Nonce::from_slice(&channel.nonce),
            channel.payload(plaintext),
        )
        .map_err(|_| SecAggError::ShareAuthentication { sender, recipient })
}

/// Decrypts and authenticates a share from `sender` to `recipient` (run by the
/// recipient); fails if the ciphertext, round, sender or recipient was changed.
pub(crate) fn open_share(
    own_encryption_secret: &StaticSecret,
    sender_encryption_public: &[u8; 32],
    round: u64,
    sender: ClientId,
    recipient: ClientId,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SecAggError> {
    let channel = ShareChannel::new(
        own_encryption_secret,
        sender_encryption_public,
        round,
        sender,
        recipient,
        sender,
    )?;
    channel
        .cipher
        .decrypt(
            Nonce::from_slice(&channel.nonce),
            channel.payload(ciphertext),
        )
        .map(Zeroizing::new)
        .map_err(|_| SecAggError::ShareAuthentication { sender, recipient })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn pairwise_keys_agree_and_shares_bind_round_and_ids() {
        let (a, b) = (
            StaticSecret::random_from_rng(OsRng),
            StaticSecret::random_from_rng(OsRng),
        );
        let (pa, pb) = (
            PublicKey::from(&a).to_bytes(),
            PublicKey::from(&b).to_bytes(),
        );
        assert_eq!(
            pairwise_mask_key(&a, &pb, 4, 1, 2).unwrap(),
            pairwise_mask_key(&b, &pa, 4, 2, 1).unwrap()
        );
        let sealed = seal_share(&a, &pb, 4, 1, 2, b"share").unwrap();
        assert_eq!(&**open_share(&b, &pa, 4, 1, 2, &sealed).unwrap(), b"share");
        assert!(
            open_share(&b, &pa, 5, 1, 2, &sealed).is_err(),
            "other round"
        );
        assert!(
            open_share(&b, &pa, 4, 3, 2, &sealed).is_err(),
            "other sender"
        );
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(open_share(&b, &pa, 4, 1, 2, &tampered).is_err(), "tampered");
    }

    #[test]
    fn low_order_public_key_is_refused() {
        let a = StaticSecret::random_from_rng(OsRng);
        let err = pairwise_mask_key(&a, &[0u8; 32], 0, 1, 2).unwrap_err();
        assert!(matches!(err, SecAggError::Malformed { sender: 2, .. }));
    }
}
