//! Serde for fixed-size byte arrays (hashes, signatures) as lowercase hex strings, so the
//! JSON a person or another tool reads shows them the way `sha256sum` does.

use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    let text = String::deserialize(d)?;
    let mut out = [0u8; N];
    // decode_to_slice refuses any length other than exactly 2 * N hex digits.
    hex::decode_to_slice(&text, &mut out).map_err(D::Error::custom)?;
    Ok(out)
}
