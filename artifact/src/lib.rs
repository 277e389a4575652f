//! Artifact logic that the coordinator (publishing) and the node agent (verifying before
//! activation) share: pure functions over bytes, no network and no file access.
//!
//! - [`gguf`]: a bounded GGUF header parser, a model summary, a size check against the
//!   file, and a small writer for tests.
//! - [`manifest`]: the artifact manifest, its validation, the streaming [`manifest::Chunker`]
//!   and the canonical bytes that get signed.
//! - [`signing`]: ed25519 signatures over manifests, the signed JSON envelope and PEM key
//!   files.
//! - [`trust`]: which keys may sign which artifacts, and when; [`trust::verify`].
//! - [`openssf`]: verification of bundles written by OpenSSF `model_signing sign key`.
//! - [`ids`]: SHA-256 digests and key ids written as hex.
//! - [`digests`]: the chunk and whole-file SHA-256 of a byte stream in one pass (both
//!   states through each block together with SHA-NI), for publisher, coordinator and agent.

pub mod digests;
pub mod gguf;
pub mod ids;
pub mod manifest;
pub mod openssf;
pub mod signing;
pub mod trust;
