//! The crate's one error type: every refusal of a message or a stage, with what to do.

use crate::{ClientId, Stage};

/// Why a parameter set, a message or a stage transition was refused.
///
/// A refused message leaves the state machine as it was, so the round continues; only
/// [`SecAggError::TooFewSurvivors`] and the reconstruction errors at the close of a
/// stage end the round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    #[error("invalid secure-aggregation parameters: {0}")]
    InvalidParams(String),
    #[error("message belongs to round {got} but this is round {expected}: it is stale or replayed; drop it")]
    WrongRound { expected: u64, got: u64 },
    #[error("a {got} message arrived while the {expected} stage is open: it is out of order or replayed")]
    WrongStage { expected: Stage, got: Stage },
    #[error("client {0} is not part of this round (client ids run from 0 to num_clients - 1)")]
    UnknownClient(ClientId),
    #[error(
        "client {0} already sent its message for this stage; duplicates and replays are refused"
    )]
    Duplicate(ClientId),
    #[error("client {0} did not complete the previous stage and cannot rejoin this round")]
    NotAParticipant(ClientId),
    #[error("vector has {got} elements but the round is configured for {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("element {index} is {value}, outside the ring Z_2^{modulus_bits}")]
    OutOfRing {
        index: usize,
        value: u32,
        modulus_bits: u32,
    },
    #[error("element {index} of the input is not a finite number; clip or drop the update")]
    NonFinite { index: usize },
    #[error("message from client {sender} is malformed: {reason}")]
    Malformed { sender: ClientId, reason: String },
    #[error("the share from client {sender} to client {recipient} failed authentication: it was tampered with, replayed or redirected")]
    ShareAuthentication {
        sender: ClientId,
        recipient: ClientId,
    },
    #[error("client {client} keeps {have} live members in its neighbourhood (itself included) but the threshold is {need}: too many dropouts for this round")]
    TooFewSurvivors {
        client: ClientId,
        have: usize,
        need: usize,
    },
    #[error("only {have} shares of client {owner}'s secret arrived but {need} are needed to reconstruct it")]
    NotEnoughShares {
        owner: ClientId,
        have: usize,
        need: usize,
    },
    #[error("the shares of client {owner}'s secret do not agree: at least one was altered")]
    InconsistentShares { owner: ClientId },
    #[error("no client completed the {0} stage")]
    NoClients(Stage),
    #[error("{0} are not available in the current stage")]
    NotAvailable(&'static str),
    #[error("the round already failed ({0}); start a new round")]
    RoundFailed(String),
    #[error("the round is finished; start a new round")]
    RoundFinished,
}
