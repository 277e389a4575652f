//! The wire form of every message of the four stages, in both directions: compact binary,
//! little-endian, decoded with limits so that a peer cannot make the reader allocate
//! without bound. Masked vectors travel in 4 bytes per element (the ring has at most 32
//! bits).
//!
//! Every message starts with the magic `NFSA`, a version byte and a kind byte.

use crate::shamir::{Share, SHARE_BYTES};
use crate::{
    AdvertiseKeys, ClientId, ClientMessage, EncryptedShare, MaskedInput, ShareKeys, UnmaskRequest,
    UnmaskResponse,
};

const MAGIC: &[u8; 4] = b"NFSA";
const VERSION: u8 = 2;
/// Most items of any list (neighbours, shares, clients).
pub const MAX_ITEMS: usize = 1 << 16;
/// Most bytes of one encrypted share.
pub const MAX_CIPHERTEXT: usize = 4096;
/// Most elements of a masked vector.
pub const MAX_VECTOR: usize = 1 << 28;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed secure-aggregation message: {0}")]
pub struct CodecError(String);

fn err<T>(what: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(what.into()))
}

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    AdvertiseKeys = 1,
    ShareKeys = 2,
    MaskedInput = 3,
    Unmask = 4,
    /// Server to client: the advertised keys of the round.
    Keys = 5,
    /// Server to client: the encrypted shares addressed to it.
    Shares = 6,
    UnmaskRequest = 7,
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: Kind, round: u64) -> Self {
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(MAGIC);
        w.0.push(VERSION);
        w.0.push(kind as u8);
        w.u64(round);
        w
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn ids(&mut self, ids: &[ClientId]) {
        self.u32(ids.len() as u32);
        for id in ids {
            self.u32(*id);
        }
    }
    fn shares(&mut self, shares: &[(ClientId, Share)]) {
        self.u32(shares.len() as u32);
        for (owner, share) in shares {
            self.u32(*owner);
            self.u32(share.holder());
            self.0.extend_from_slice(&share.to_bytes());
        }
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks the header; returns the kind and round.
    fn open(bytes: &'a [u8]) -> Result<(Self, u8, u64), CodecError> {
        if bytes.len() < 14 || &bytes[..4] != MAGIC {
            return err("not a nanofleet secure-aggregation message");
        }
        if bytes[4] != VERSION {
            return err(format!("version {} is not supported", bytes[4]));
        }
        let mut r = Reader { rest: &bytes[6..] };
        let round = r.u64()?;
        Ok((r, bytes[5], round))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.rest.len() < n {
            return err("truncated");
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn key(&mut self) -> Result<[u8; 32], CodecError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn count(&mut self, limit: usize, what: &str) -> Result<usize, CodecError> {
        let n = self.u32()? as usize;
        if n > limit {
            return err(format!("{n} {what}; at most {limit}"));
        }
        Ok(n)
    }
    fn bytes(&mut self, limit: usize) -> Result<Vec<u8>, CodecError> {
        let n = self.count(limit, "bytes")?;
        Ok(self.take(n)?.to_vec())
    }
    fn ids(&mut self) -> Result<Vec<ClientId>, CodecError> {
        let n = self.count(MAX_ITEMS, "client ids")?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn shares(&mut self) -> Result<Vec<(ClientId, Share)>, CodecError> {
        let n = self.count(MAX_ITEMS, "shares")?;
        (0..n)
            .map(|_| {
                let owner = self.u32()?;
                let holder = self.u32()?;
                let share = Share::from_bytes(holder, self.take(SHARE_BYTES)?)
                    .ok_or_else(|| CodecError("a share is outside the field".into()))?;
                Ok((owner, share))
            })
            .collect()
    }
    fn done(self) -> Result<(), CodecError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            err(format!("{} bytes after the end", self.rest.len()))
        }
    }
}

fn encrypted_share(w: &mut Writer, share: &EncryptedShare) {
    w.u64(share.round);
    w.u32(share.sender);
    w.u32(share.recipient);
    w.bytes(&share.ciphertext);
}

fn read_encrypted_share(r: &mut Reader) -> Result<EncryptedShare, CodecError> {
    Ok(EncryptedShare {
        round: r.u64()?,
        sender: r.u32()?,
        recipient: r.u32()?,
        ciphertext: r.bytes(MAX_CIPHERTEXT)?,
    })
}

fn advertise(w: &mut Writer, m: &AdvertiseKeys) {
    w.u32(m.sender);
    w.0.extend_from_slice(&m.encryption_public_key);
    w.0.extend_from_slice(&m.mask_public_key);
}

fn read_advertise(r: &mut Reader, round: u64) -> Result<AdvertiseKeys, CodecError> {
    Ok(AdvertiseKeys {
        round,
        sender: r.u32()?,
        encryption_public_key: r.key()?,
        mask_public_key: r.key()?,
    })
}

/// A client's message for the server.
pub fn encode_client_message(message: &ClientMessage) -> Vec<u8> {
    let mut w;
    match message {
        ClientMessage::AdvertiseKeys(m) => {
            w = Writer::new(Kind::AdvertiseKeys, m.round);
            advertise(&mut w, m);
        }
        ClientMessage::ShareKeys(m) => {
            w = Writer::new(Kind::ShareKeys, m.round);
            w.u32(m.sender);
            w.u32(m.shares.len() as u32);
            for share in &m.shares {
                encrypted_share(&mut w, share);
            }
        }
        ClientMessage::MaskedInput(m) => {
            w = Writer::new(Kind::MaskedInput, m.round);
            w.u32(m.sender);
            w.u32(m.values.len() as u32);
            w.0.reserve(m.values.len() * 4);
            for v in &m.values {
                w.u32(*v);
            }
        }
        ClientMessage::Unmask(m) => {
            w = Writer::new(Kind::Unmask, m.round);
            w.u32(m.sender);
            w.shares(&m.self_mask_seed_shares);
            w.shares(&m.mask_key_shares);
        }
    }
    w.0
}

pub fn decode_client_message(bytes: &[u8]) -> Result<ClientMessage, CodecError> {
    let (mut r, kind, round) = Reader::open(bytes)?;
    let message = match kind {
        k if k == Kind::AdvertiseKeys as u8 => {
            ClientMessage::AdvertiseKeys(read_advertise(&mut r, round)?)
        }
        k if k == Kind::ShareKeys as u8 => {
            let sender = r.u32()?;
            let n = r.count(MAX_ITEMS, "shares")?;
            let shares = (0..n)
                .map(|_| read_encrypted_share(&mut r))
                .collect::<Result<_, _>>()?;
            ClientMessage::ShareKeys(ShareKeys {
                round,
                sender,
                shares,
            })
        }
        k if k == Kind::MaskedInput as u8 => {
            let sender = r.u32()?;
            let n = r.count(MAX_VECTOR, "elements")?;
            let values = r
                .take(n * 4)?
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            ClientMessage::MaskedInput(MaskedInput {
                round,
                sender,
                values,
            })
        }
        k if k == Kind::Unmask as u8 => ClientMessage::Unmask(UnmaskResponse {
            round,
            sender: r.u32()?,
            self_mask_seed_shares: r.shares()?,
            mask_key_shares: r.shares()?,
        }),
        other => return err(format!("kind {other} is not a client message")),
    };
    r.done()?;
    Ok(message)
}

/// Stage 2 input for a client: the keys its neighbours advertised.
pub fn encode_keys(round: u64, keys: &[AdvertiseKeys]) -> Vec<u8> {
    let mut w = Writer::new(Kind::Keys, round);
    w.u32(keys.len() as u32);
    for k in keys {
        advertise(&mut w, k);
    }
    w.0
}

pub fn decode_keys(bytes: &[u8]) -> Result<Vec<AdvertiseKeys>, CodecError> {
    let (mut r, kind, round) = Reader::open(bytes)?;
    if kind != Kind::Keys as u8 {
        return err(format!("kind {kind} is not a key list"));
    }
    let n = r.count(MAX_ITEMS, "keys")?;
    let keys = (0..n)
        .map(|_| read_advertise(&mut r, round))
        .collect::<Result<_, _>>()?;
    r.done()?;
    Ok(keys)
}

/// Stage 3 input for a client: the encrypted shares addressed to it.
pub fn encode_shares(round: u64, shares: &[EncryptedShare]) -> Vec<u8> {
    let mut w = Writer::new(Kind::Shares, round);
    w.u32(shares.len() as u32);
    for s in shares {
        encrypted_share(&mut w, s);
    }
    w.0
}

pub fn decode_shares(bytes: &[u8]) -> Result<Vec<EncryptedShare>, CodecError> {
    let (mut r, kind, _round) = Reader::open(bytes)?;
    if kind != Kind::Shares as u8 {
        return err(format!("kind {kind} is not a share list"));
    }
    let n = r.count(MAX_ITEMS, "shares")?;
    let shares = (0..n)
        .map(|_| read_encrypted_share(&mut r))
        .collect::<Result<_, _>>()?;
    r.done()?;
    Ok(shares)
}

/// Stage 4 input for a client.
pub fn encode_unmask_request(request: &UnmaskRequest) -> Vec<u8> {
    let mut w = Writer::new(Kind::UnmaskRequest, request.round);
    w.u32(request.recipient);
    w.ids(&request.dropped);
    w.ids(&request.survivors);
    w.0
}

pub fn decode_unmask_request(bytes: &[u8]) -> Result<UnmaskRequest, CodecError> {
    let (mut r, kind, round) = Reader::open(bytes)?;
    if kind != Kind::UnmaskRequest as u8 {
        return err(format!("kind {kind} is not an unmask request"));
    }
    let request = UnmaskRequest {
        round,
        recipient: r.u32()?,
        dropped: r.ids()?,
        survivors: r.ids()?,
    };
    r.done()?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Client, Config, Params, Server};

    /// Runs a 3-client round with every message through the codec.
    #[test]
    fn a_round_through_the_wire_form_sums_exactly() {
        let mut config = Config::new(3, 5);
        config.threshold = 2;
        config.round = 9;
        let params = Params::new(config).unwrap();
        let mut rng = rand_core::OsRng;
        let mut clients: Vec<Client> = (0..3)
            .map(|id| Client::new(id, params.clone(), &mut rng).unwrap())
            .collect();
        let mut server = Server::new(params);
        let wire = |m: ClientMessage| decode_client_message(&encode_client_message(&m)).unwrap();
        for c in &mut clients {
            server
                .receive(wire(ClientMessage::AdvertiseKeys(c.advertise().unwrap())))
                .unwrap();
        }
        server.close_stage().unwrap();
        for c in &mut clients {
            let keys = decode_keys(&encode_keys(
                9,
                &server.advertised_keys_for(c.id()).unwrap(),
            ))
            .unwrap();
            server
                .receive(wire(ClientMessage::ShareKeys(c.share_keys(&keys).unwrap())))
                .unwrap();
        }
        server.close_stage().unwrap();
        for c in &mut clients {
            let shares =
                decode_shares(&encode_shares(9, &server.shares_for(c.id()).unwrap())).unwrap();
            let input = [0.25, -1.0, 2.0, 0.0, 1.5];
            server
                .receive(wire(ClientMessage::MaskedInput(
                    c.masked_input(&shares, &input).unwrap(),
                )))
                .unwrap();
        }
        server.close_stage().unwrap();
        for c in &mut clients {
            let request = decode_unmask_request(&encode_unmask_request(
                &server.unmask_request_for(c.id()).unwrap(),
            ))
            .unwrap();
            server
                .receive(wire(ClientMessage::Unmask(c.unmask(&request).unwrap())))
                .unwrap();
        }
        let sum = server.close_stage().unwrap().unwrap().decode();
        assert!(
            (sum[1] + 3.0).abs() < 1e-4 && (sum[4] - 4.5).abs() < 1e-4,
            "{sum:?}"
        );
    }

    #[test]
    fn masked_vectors_take_four_bytes_per_element() {
        let m = ClientMessage::MaskedInput(MaskedInput {
            round: 1,
            sender: 2,
            values: vec![u32::MAX; 1000],
        });
        let bytes = encode_client_message(&m);
        assert!(bytes.len() < 1000 * 4 + 64);
        assert_eq!(decode_client_message(&bytes).unwrap(), m);
    }

    #[test]
    fn bad_bytes_are_refused_with_a_reason() {
        assert!(decode_client_message(b"junk").is_err());
        let good = encode_client_message(&ClientMessage::MaskedInput(MaskedInput {
            round: 1,
            sender: 0,
            values: vec![1, 2, 3],
        }));
        for cut in 0..good.len() {
            assert!(decode_client_message(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode_client_message(&long).is_err());
        // A count far beyond the bytes that follow does not allocate.
        let mut huge = encode_keys(1, &[]);
        let at = huge.len() - 4;
        huge[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_keys(&huge).is_err());
        // A server-to-client payload is not a client message.
        assert!(decode_client_message(&encode_keys(1, &[])).is_err());
    }
}
