//! SecAgg+ secure aggregation as pure message-passing state machines: no I/O, no async.
//!
//! The crate implements the four stages of SecAgg+ (Bell et al. 2020), of which full
//! SecAgg (Bonawitz et al. 2017) is the special case of a complete graph
//! (`group_size == num_clients`):
//!
//! 1. **Advertise keys.** Each [`Client`] makes two X25519 key pairs, one to encrypt the
//!    shares it sends to its neighbours, one to agree pairwise mask keys, and sends both
//!    public keys ([`AdvertiseKeys`]).
//! 2. **Share keys.** Each client splits its self-mask seed and its mask secret key into
//!    Shamir shares ([`shamir`], threshold `t`), one per member of its neighbourhood, and
//!    sends each neighbour its shares encrypted and authenticated with AES-256-GCM under
//!    a key derived by HKDF-SHA256 from the X25519 secret; the round, sender and
//!    recipient are bound into the key derivation and the associated data, so a share
//!    that the server replays, redirects or alters fails to open.
//! 3. **Masked input.** Each client encodes its vector in fixed point into the ring
//!    `Z_{2^m}` ([`encoding`]), adds its self mask and, for every neighbour that sent it
//!    shares, adds or subtracts the pairwise mask ([`prg`]: AES-256-CTR keyed with the
//!    full 256-bit HKDF output), and sends the result.
//! 4. **Unmask.** For each surviving neighbour a client reveals its share of that
//!    neighbour's self-mask seed; for each neighbour that dropped after sharing keys it
//!    reveals its share of the neighbour's mask secret key; never both for one neighbour.
//!    The [`Server`] reconstructs the secrets, removes the masks and outputs only the
//!    sum.
//!
//! Neighbourhoods come from a public seed ([`Graph`]): a random ring of the clients in
//! which each client is joined to the `(k-1)/2` nearest on either side.
//!
//! # Security model
//!
//! The server is honest but curious: it follows the protocol and routes messages
//! faithfully, and tries to learn from what it sees. Such a server, even together with
//! up to `t - 1` colluding clients of any one neighbourhood, learns nothing about an
//! honest client's input beyond the sum of the inputs of the clients that survived the
//! masked-input stage. A malicious server that lies about who dropped out (asking some
//! clients for a seed share and others for a key share of the same client) is outside
//! this model; SecAgg's consistency round with signatures would be needed for it.
//! Message senders are not authenticated here: the caller must check each message's
//! `sender` against the transport's identity (the mTLS certificate).
//!
//! # Dropouts
//!
//! Any client may vanish between stages; the caller decides when a stage ends by calling
//! [`Server::close_stage`] (after a deadline, say). The sum stays exact as long as every
//! client that shared keys keeps at least `t` members of its neighbourhood (itself
//! included) alive to the unmask stage, i.e. at most `k - t` dropouts in total in any
//! neighbourhood. Otherwise the round fails with a typed error.
//!
//! # Example
//!
//! ```
//! use nanofleet_secagg::{Client, ClientMessage, Config, Params, Server};
//!
//! let mut config = Config::new(3, 4);
//! config.threshold = 2;
//! let params = Params::new(config)?;
//! let mut rng = rand_core::OsRng;
//! let mut clients: Vec<Client> = (0..3)
//!     .map(|id| Client::new(id, params.clone(), &mut rng))
//!     .collect::<Result<_, _>>()?;
//! let mut server = Server::new(params);
//! for client in &mut clients {
//!     server.receive(ClientMessage::AdvertiseKeys(client.advertise()?))?;
//! }
//! server.close_stage()?;
//! for client in &mut clients {
//!     let keys = server.advertised_keys_for(client.id())?;
//!     server.receive(ClientMessage::ShareKeys(client.share_keys(&keys)?))?;
//! }
//! server.close_stage()?;
//! for client in &mut clients {
//!     let shares = server.shares_for(client.id())?;
//!     let input = [0.5, -1.0, 2.0, 0.0];
//!     server.receive(ClientMessage::MaskedInput(client.masked_input(&shares, &input)?))?;
//! }
//! server.close_stage()?;
//! for client in &mut clients {
//!     let request = server.unmask_request_for(client.id())?;
//!     server.receive(ClientMessage::Unmask(client.unmask(&request)?))?;
//! }
//! let sum = server.close_stage()?.expect("the unmask stage yields the aggregate");
//! let decoded = sum.decode();
//! assert!((decoded[0] - 1.5).abs() < 1e-4 && (decoded[2] - 6.0).abs() < 1e-4);
//! # Ok::<(), nanofleet_secagg::SecAggError>(())
//! ```

mod client;
pub mod codec;
mod crypto;
pub mod encoding;
mod error;
mod graph;
mod keystream;
mod messages;
mod params;
pub mod prg;
mod server;
pub mod shamir;

pub use client::Client;
pub use error::SecAggError;
pub use graph::Graph;
pub use messages::{
    AdvertiseKeys, ClientMessage, EncryptedShare, MaskedInput, ShareKeys, UnmaskRequest,
    UnmaskResponse,
};
pub use params::{Config, Params};
pub use server::{Aggregate, Server};

/// A client's index in the round, `0..num_clients`.
pub type ClientId = u32;

/// The four stages of a round, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    Unmask,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::AdvertiseKeys => "advertise-keys",
            Stage::ShareKeys => "share-keys",
            Stage::MaskedInput => "masked-input",
            Stage::Unmask => "unmask",
        })
    }
}
