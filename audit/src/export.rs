//! The audit log's export and its offline check: a JSONL document (first line the signed
//! tree head, then one entry per line with its index and, for a partial export, its
//! inclusion proof), a CSV rendering for people, and [`verify_export`], which
//! `nanofleet audit verify` runs against the coordinator's public key.
//!
//! A complete export (every index from 0 to the head's size, in order) is checked by
//! recomputing the root, so a changed, removed, added or reordered entry fails. A partial
//! export (filtered by time, node or action) is checked entry by entry: each must carry an
//! inclusion proof against the signed head.

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::entry::AuditEntry;
use crate::head::SignedTreeHead;
use crate::merkle::{verify_inclusion, CompactRange, Hash, VerifyError};
use crate::HeadError;

/// Longest accepted line of an export, in bytes: an entry at its limits with a full proof
/// fits many times over.
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// The first line of a JSONL export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportHeader {
    pub signed_tree_head: SignedTreeHead,
}

/// One entry line of a JSONL export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedEntry {
    pub index: u64,
    pub entry: AuditEntry,
    /// The audit path against the head's size; present in partial exports.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_hashes")]
    pub inclusion_proof: Option<Vec<Hash>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("the export is empty: its first line must be the signed tree head")]
    NoHead,
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("entry {index} is at or beyond the signed tree size {size}")]
    BeyondHead { index: u64, size: u64 },
    #[error("entry {index} follows entry {previous}: entries must be in increasing index order")]
    OutOfOrder { index: u64, previous: u64 },
    #[error(
        "the export does not hold every entry of the signed tree (entry {missing} is absent) \
         and entry {index} has no inclusion proof"
    )]
    IncompleteWithoutProof { missing: u64, index: u64 },
    #[error("entry {index}: its inclusion proof does not verify: {source}")]
    Inclusion { index: u64, source: VerifyError },
    #[error(
        "the {size} entries do not hash to the signed root: an entry was changed, removed, \
         added or reordered"
    )]
    RootMismatch { size: u64 },
}

/// What a successful check established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedExport {
    /// The size of the signed tree the entries belong to.
    pub tree_size: u64,
    /// How many entries were checked.
    pub entries: u64,
    /// True when the export held the whole tree and its root was recomputed.
    pub complete: bool,
}

/// Renders the JSONL export.
pub fn to_jsonl(head: &SignedTreeHead, entries: &[ExportedEntry]) -> String {
    let mut out = serde_json::to_string(&ExportHeader {
        signed_tree_head: head.clone(),
    })
    .expect("the header serializes");
    out.push('\n');
    for entry in entries {
        out.push_str(&serde_json::to_string(entry).expect("entries serialize"));
        out.push('\n');
    }
    out
}

/// Parses a JSONL export, strictly: unknown fields, bad hex and over-long lines are refused
/// with their line number.
pub fn parse_jsonl(text: &str) -> Result<(SignedTreeHead, Vec<ExportedEntry>), ExportError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty());
    let parse_line = |number: usize, line: &str| {
        if line.len() > MAX_LINE_BYTES {
            return Err(ExportError::Malformed {
                line: number + 1,
                reason: format!("{} bytes, at most {MAX_LINE_BYTES}", line.len()),
            });
        }
        Ok(())
    };
    let (number, first) = lines.next().ok_or(ExportError::NoHead)?;
    parse_line(number, first)?;
    let header: ExportHeader = serde_json::from_str(first).map_err(|e| ExportError::Malformed {
        line: number + 1,
        reason: format!("not the signed tree head: {e}"),
    })?;
    let mut entries = Vec::new();
    for (number, line) in lines {
        parse_line(number, line)?;
        entries.push(
            serde_json::from_str(line).map_err(|e| ExportError::Malformed {
                line: number + 1,
                reason: e.to_string(),
            })?,
        );
    }
    Ok((header.signed_tree_head, entries))
}

/// Checks an export against the coordinator's key: the head's signature, then either the
/// recomputed root (complete export) or every entry's inclusion proof (partial export).
pub fn verify_export(
    head: &SignedTreeHead,
    key: &VerifyingKey,
    entries: &[ExportedEntry],
) -> Result<VerifiedExport, ExportError> {
    let head = head.verify(key)?;
    let size = head.size;
    let mut previous: Option<u64> = None;
    for exported in entries {
        if exported.index >= size {
            return Err(ExportError::BeyondHead {
                index: exported.index,
                size,
            });
        }
        if let Some(previous) = previous.filter(|p| exported.index <= *p) {
            return Err(ExportError::OutOfOrder {
                index: exported.index,
                previous,
            });
        }
        previous = Some(exported.index);
    }
    let complete = entries.len() as u64 == size;
    if complete {
        // Indices are increasing and below `size`, so they are exactly 0..size.
        let mut range = CompactRange::new();
        for exported in entries {
            range.append(exported.entry.leaf_hash());
        }
        if range.root() != head.root {
            return Err(ExportError::RootMismatch { size });
        }
    } else {
        // The first index the export lacks, for the error message.
        let missing = entries
            .iter()
            .zip(0..)
            .find(|(e, i)| e.index != *i)
            .map_or(entries.len() as u64, |(_, i)| i);
        for exported in entries {
            let Some(proof) = &exported.inclusion_proof else {
                return Err(ExportError::IncompleteWithoutProof {
                    missing,
                    index: exported.index,
                });
            };
            verify_inclusion(
                &exported.entry.leaf_hash(),
                exported.index,
                size,
                proof,
                &head.root,
            )
            .map_err(|source| ExportError::Inclusion {
                index: exported.index,
                source,
            })?;
        }
    }
    Ok(VerifiedExport {
        tree_size: size,
        entries: entries.len() as u64,
        complete,
    })
}

/// Renders entries as CSV (RFC 4180 quoting) for spreadsheets: index, UTC time, time in
/// milliseconds, actor, action, subject, details, leaf hash.
pub fn to_csv(entries: &[ExportedEntry]) -> String {
    let mut out = String::from("index,time,time_ms,actor,action,subject,details,leaf_hash\r\n");
    for exported in entries {
        let entry = &exported.entry;
        let time = u64::try_from(entry.time_ms())
            .ok()
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .unwrap_or_default();
        let fields = [
            exported.index.to_string(),
            time,
            entry.time_ms().to_string(),
            entry.actor().to_string(),
            entry.action().to_owned(),
            entry.subject().to_owned(),
            entry.details().to_owned(),
            hex::encode(entry.leaf_hash()),
        ];
        let quoted: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&quoted.join(","));
        out.push_str("\r\n");
    }
    out
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Optional lists of hashes as lowercase hex strings.
mod hex_hashes {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::merkle::Hash;

    pub fn serialize<S: Serializer>(hashes: &Option<Vec<Hash>>, s: S) -> Result<S::Ok, S::Error> {
        match hashes {
            None => s.serialize_none(),
            Some(hashes) => s.collect_seq(hashes.iter().map(hex::encode)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Hash>>, D::Error> {
        let Some(texts) = Option::<Vec<String>>::deserialize(d)? else {
            return Ok(None);
        };
        // A proof never has more hashes than a 64-level tree is deep.
        if texts.len() > 64 {
            return Err(D::Error::custom("an inclusion proof has at most 64 hashes"));
        }
        texts
            .iter()
            .map(|text| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(text, &mut out).map_err(D::Error::custom)?;
                Ok(out)
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::entry::Actor;
    use crate::head::TreeHead;
    use crate::merkle::{inclusion_proof, leaf_hash};

    fn log(n: u64) -> Vec<ExportedEntry> {
        (0..n)
            .map(|i| ExportedEntry {
                index: i,
                entry: AuditEntry::new(
                    1_700_000_000_000 + i as i64,
                    Actor::Node(format!("n{}", i % 3)),
                    "artifact.activated",
                    format!("m@{i}"),
                    "with, \"quotes\"",
                )
                .unwrap(),
                inclusion_proof: None,
            })
            .collect()
    }

    fn signed(entries: &[ExportedEntry], key: &SigningKey) -> SignedTreeHead {
        let mut range = CompactRange::new();
        for e in entries {
            range.append(e.entry.leaf_hash());
        }
        TreeHead {
            size: range.size(),
            root: range.root(),
            time_ms: 1,
        }
        .sign(key)
    }

    fn with_proofs(entries: &[ExportedEntry], keep: impl Fn(u64) -> bool) -> Vec<ExportedEntry> {
        let leaves: Vec<Hash> = entries.iter().map(|e| e.entry.leaf_hash()).collect();
        entries
            .iter()
            .filter(|e| keep(e.index))
            .map(|e| ExportedEntry {
                inclusion_proof: Some(
                    inclusion_proof(&leaves, e.index, leaves.len() as u64).unwrap(),
                ),
                ..e.clone()
            })
            .collect()
    }

    #[test]
    fn complete_and_partial_exports_verify_and_round_trip() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let entries = log(11);
        let head = signed(&entries, &key);
        let text = to_jsonl(&head, &entries);
        let (parsed_head, parsed) = parse_jsonl(&text).unwrap();
        assert_eq!((&parsed_head, &parsed[..]), (&head, &entries[..]));
        let verified = verify_export(&head, &key.verifying_key(), &parsed).unwrap();
        assert!(verified.complete);
        assert_eq!(verified.entries, 11);

        let partial = with_proofs(&entries, |i| i % 3 == 1);
        let (_, parsed) = parse_jsonl(&to_jsonl(&head, &partial)).unwrap();
        let verified = verify_export(&head, &key.verifying_key(), &parsed).unwrap();
        assert!(!verified.complete);
        assert_eq!(verified.entries, 4);
    }

    #[test]
    fn changed_removed_reordered_or_foreign_entries_fail() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let vk = key.verifying_key();
        let entries = log(9);
        let head = signed(&entries, &key);

        let mut changed = entries.clone();
        changed[4].entry =
            AuditEntry::new(1, Actor::Coordinator, "artifact.activated", "m@4", "").unwrap();
        assert!(matches!(
            verify_export(&head, &vk, &changed),
            Err(ExportError::RootMismatch { size: 9 })
        ));

        let mut removed = entries.clone();
        removed.remove(5);
        assert!(matches!(
            verify_export(&head, &vk, &removed),
            Err(ExportError::IncompleteWithoutProof { missing: 5, .. })
        ));

        let mut reordered = entries.clone();
        reordered.swap(2, 3);
        assert!(matches!(
            verify_export(&head, &vk, &reordered),
            Err(ExportError::OutOfOrder { .. })
        ));
        // Swapping the contents but keeping the indices changes the root.
        let mut swapped = entries.clone();
        let (a, b) = (swapped[2].entry.clone(), swapped[3].entry.clone());
        swapped[2].entry = b;
        swapped[3].entry = a;
        assert!(matches!(
            verify_export(&head, &vk, &swapped),
            Err(ExportError::RootMismatch { .. })
        ));

        let mut partial = with_proofs(&entries, |i| i % 2 == 0);
        partial[1].entry = changed[4].entry.clone();
        assert!(matches!(
            verify_export(&head, &vk, &partial),
            Err(ExportError::Inclusion { index: 2, .. })
        ));

        let other = SigningKey::from_bytes(&[8; 32]);
        assert!(matches!(
            verify_export(&head, &other.verifying_key(), &entries),
            Err(ExportError::Head(HeadError::BadSignature))
        ));
        let mut beyond = entries.clone();
        beyond.push(ExportedEntry {
            index: 9,
            ..entries[0].clone()
        });
        assert!(matches!(
            verify_export(&head, &vk, &beyond),
            Err(ExportError::BeyondHead { index: 9, size: 9 })
        ));
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let entries = log(2);
        let head = signed(&entries, &key);
        let text = to_jsonl(&head, &entries);
        assert_eq!(parse_jsonl(""), Err(ExportError::NoHead));
        let bad = text.replace("\"index\":1", "\"index\":\"one\"");
        assert!(matches!(
            parse_jsonl(&bad),
            Err(ExportError::Malformed { line: 3, .. })
        ));
        let extra = text.replacen("{\"index\":0,", "{\"index\":0,\"note\":1,", 1);
        assert!(matches!(
            parse_jsonl(&extra),
            Err(ExportError::Malformed { line: 2, .. })
        ));
        assert!(matches!(
            parse_jsonl(&format!("{}\n", "x".repeat(MAX_LINE_BYTES + 1))),
            Err(ExportError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn csv_quotes_fields_and_shows_utc_time() {
        let csv = to_csv(&log(1));
        let row = csv.lines().nth(1).unwrap();
        assert!(row.starts_with("0,2023-11-14T22:13:20.000Z,1700000000000,node:n0,"));
        assert!(row.contains("\"with, \"\"quotes\"\"\""));
        assert!(row.ends_with(&hex::encode(leaf_hash(&log(1)[0].entry.canonical_bytes()))));
    }
}
