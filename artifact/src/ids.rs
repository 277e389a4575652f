//! Fixed-size binary identifiers that manifests, signatures and policies write as hex:
//! SHA-256 digests and signing key ids.
//!
//! Parsing accepts upper- or lower-case hex; output is always lower-case, so the
//! canonical encoding of a manifest does not depend on how its input was written.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A hex string that does not encode the expected number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be {expected_chars} hex characters (0-9, a-f), got {input:?}")]
pub struct HexIdError {
    what: &'static str,
    expected_chars: usize,
    input: String,
}

/// Parses exactly `N` bytes of hex; `what` names the value in the error.
fn parse_hex_array<const N: usize>(what: &'static str, input: &str) -> Result<[u8; N], HexIdError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(input, &mut out).map_err(|_| HexIdError {
        what,
        expected_chars: N * 2,
        // Long garbage would flood logs; the start is enough to find it.
        input: input.chars().take(80).collect(),
    })?;
    Ok(out)
}

/// Declares a newtype over `[u8; N]` that is written as lower-case hex everywhere
/// (Display, Debug, FromStr, serde).
macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; $len]);

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Lower-case hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl FromStr for $name {
            type Err = HexIdError;

            fn from_str(s: &str) -> Result<Self, HexIdError> {
                parse_hex_array($what, s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_hex())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_id!(
    /// A SHA-256 digest (32 bytes, 64 hex characters).
    Sha256Digest,
    32,
    "a SHA-256 digest"
);

hex_id!(
    /// A signing key id: the first 16 bytes of SHA-256 over the raw public key bytes
    /// (32 hex characters).
    KeyId,
    16,
    "a key id"
);

impl Sha256Digest {
    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl KeyId {
    /// The id of a public key given as its raw bytes.
    pub fn of_public_key(raw_public_key: &[u8]) -> Self {
        let digest = Sha256::digest(raw_public_key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_through_json_in_lower_case() {
        let digest = Sha256Digest::of(b"abc");
        assert_eq!(
            digest.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let json = serde_json::to_string(&digest).unwrap();
        let upper: Sha256Digest = serde_json::from_str(&json.to_uppercase()).unwrap();
        assert_eq!(upper, digest);
        assert_eq!(serde_json::to_string(&upper).unwrap(), json);
    }

    #[test]
    fn wrong_length_or_non_hex_is_refused_with_the_expected_length() {
        let err = "abcd".parse::<Sha256Digest>().unwrap_err();
        assert!(err.to_string().contains("64 hex characters"), "{err}");
        assert!("zz".repeat(16).parse::<KeyId>().is_err());
        assert!("00".repeat(16).parse::<KeyId>().is_ok());
    }

    #[test]
    fn key_id_is_the_digest_prefix() {
        let id = KeyId::of_public_key(b"abc");
        assert_eq!(id.to_hex(), "ba7816bf8f01cfea414140de5dae2223");
    }
}
