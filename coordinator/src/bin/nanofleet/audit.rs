//! `nanofleet audit`: the tamper-evident audit log from the operator's side: signed heads,
//! exports (JSONL with proofs, CSV), proofs, and the offline check of an export or a proof
//! against the coordinator's audit key.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use ed25519_dalek::Signature;
use nanofleet_artifact::signing::verifying_key_from_pem;
use nanofleet_audit::export::{parse_jsonl, to_csv, to_jsonl, verify_export, ExportedEntry};
use nanofleet_audit::{verify_consistency, AuditEntry, Hash, SignedTreeHead, TreeHead};
use nanofleet_proto::v1 as pb;

use crate::{client, status_error, Cli};

#[derive(Subcommand, Clone)]
pub enum AuditCommand {
    /// Print the log's current head, signed by the coordinator's audit key (JSON). Keep it:
    /// later heads must be consistent with it (`audit consistency`).
    Head {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Export entries: JSONL (the signed head, then entries; filtered exports carry an
    /// inclusion proof per entry) or CSV for spreadsheets.
    Export {
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
        /// Entries at or after this time (RFC 3339, e.g. 2026-11-24T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Entries before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Entries by this node or about it.
        #[arg(long)]
        node: Option<String>,
        /// Entries whose action starts with this, e.g. `rollout.` or `node.revoke`.
        #[arg(long)]
        action: Option<String>,
        /// Entries with this text anywhere (case-insensitive).
        #[arg(long)]
        text: Option<String>,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write one entry with its inclusion proof and the signed head (a JSONL export of one
    /// entry, which `audit verify` checks).
    Proof {
        index: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a JSONL export or proof offline against the coordinator's audit public key
    /// (`<data_dir>/audit-signing.pub` on the coordinator's host). Exits non-zero when an
    /// entry was changed, removed, added or reordered, or a signature does not verify.
    Verify {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check that the coordinator's current log extends a head you kept (its consistency
    /// proof), and print the new signed head.
    Consistency {
        /// A signed head from `audit head`.
        #[arg(long)]
        old: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

pub async fn audit(cli: &Cli, command: &AuditCommand) -> anyhow::Result<()> {
    match command.clone() {
        AuditCommand::Head { out } => {
            let head = fetch_head(cli).await?;
            write_out(out, &format!("{}\n", serde_json::to_string_pretty(&head)?))?;
        }
        AuditCommand::Export {
            format,
            since,
            until,
            node,
            action,
            text,
            out,
        } => {
            let filter = pb::AuditEntryFilter {
                since_unix_ms: since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                until_unix_ms: until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
                node: node.unwrap_or_default(),
                action_prefix: action.unwrap_or_default(),
                text: text.unwrap_or_default(),
            };
            let filtered = filter != pb::AuditEntryFilter::default();
            let head = fetch_head(cli).await?;
            let entries = fetch_entries(cli, head.head.size, filter, filtered).await?;
            let text = match format.as_str() {
                "csv" => to_csv(&entries),
                _ => to_jsonl(&head, &entries),
            };
            write_out(out, &text)?;
        }
        AuditCommand::Proof { index, out } => {
            let head = fetch_head(cli).await?;
            let leaf = client(cli)
                .await?
                .get_inclusion_proof(pb::InclusionProofRequest {
                    index,
                    tree_size: head.head.size,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            write_out(out, &to_jsonl(&head, &[leaf_from_proto(leaf)?]))?;
        }
        AuditCommand::Verify { file, key } => {
            let key = read_key(&key)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let (head, entries) = parse_jsonl(&text).with_context(|| file.display().to_string())?;
            let verified = verify_export(&head, &key, &entries)
                .with_context(|| format!("{} does not verify", file.display()))?;
            let how = match verified.complete {
                true => "the whole log; its root matches the signed head".to_owned(),
                false => "each with an inclusion proof against the signed head".to_owned(),
            };
            println!(
                "verified: {} entries of a log of {} ({how})",
                verified.entries, verified.tree_size
            );
        }
        AuditCommand::Consistency { old, key } => {
            let key = read_key(&key)?;
            let text = std::fs::read_to_string(&old)
                .with_context(|| format!("reading {}", old.display()))?;
            let old: SignedTreeHead = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a signed tree head", old.display()))?;
            let old_head = *old.verify(&key).context("the old head")?;
            let new = fetch_head(cli).await?;
            let new_head = *new.verify(&key).context("the coordinator's current head")?;
            let proof = client(cli)
                .await?
                .get_consistency_proof(pb::ConsistencyProofRequest {
                    old_size: old_head.size,
                    new_size: new_head.size,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let hashes = proof
                .hashes
                .iter()
                .map(|h| hash_from(h))
                .collect::<anyhow::Result<Vec<_>>>()?;
            verify_consistency(
                old_head.size,
                new_head.size,
                &old_head.root,
                &new_head.root,
                &hashes,
            )
            .context("the current log does not extend the old head: it was rewritten")?;
            println!("{}", serde_json::to_string_pretty(&new)?);
            eprintln!(
                "consistent: the log of {} entries extends the kept head of {}",
                new_head.size, old_head.size
            );
        }
    }
    Ok(())
}

async fn fetch_head(cli: &Cli) -> anyhow::Result<SignedTreeHead> {
    let head = client(cli)
        .await?
        .get_audit_head(pb::GetAuditHeadRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let signature: [u8; 64] = head
        .signature
        .as_slice()
        .try_into()
        .context("the coordinator sent a signature that is not 64 bytes")?;
    Ok(SignedTreeHead {
        head: TreeHead {
            size: head.size,
            root: hash_from(&head.root)?,
            time_ms: head.time_unix_ms,
        },
        signature: Signature::from_bytes(&signature),
    })
}

/// Every matching entry of the tree of `size`, page by page.
async fn fetch_entries(
    cli: &Cli,
    size: u64,
    filter: pb::AuditEntryFilter,
    with_proofs: bool,
) -> anyhow::Result<Vec<ExportedEntry>> {
    let mut client = client(cli).await?;
    let mut entries = Vec::new();
    let mut start = 0;
    while start < size {
        let page = client
            .list_audit_entries(pb::ListAuditEntriesRequest {
                tree_size: size,
                start_index: start,
                limit: 10_000,
                filter: Some(filter.clone()),
                with_proofs,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for leaf in page.entries {
            entries.push(leaf_from_proto(leaf)?);
        }
        anyhow::ensure!(
            page.next_index > start,
            "the coordinator's listing did not advance"
        );
        start = page.next_index;
    }
    Ok(entries)
}

fn leaf_from_proto(leaf: pb::AuditLeaf) -> anyhow::Result<ExportedEntry> {
    let entry = AuditEntry::from_canonical_bytes(&leaf.canonical_entry)
        .with_context(|| format!("entry {} from the coordinator", leaf.index))?;
    let proof = leaf
        .inclusion_proof
        .iter()
        .map(|h| hash_from(h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ExportedEntry {
        index: leaf.index,
        entry,
        inclusion_proof: (!proof.is_empty()).then_some(proof),
    })
}

fn hash_from(bytes: &[u8]) -> anyhow::Result<Hash> {
    bytes
        .try_into()
        .context("the coordinator sent a hash that is not 32 bytes")
}

fn parse_time(text: &str) -> anyhow::Result<i64> {
    let time = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("{text:?} is not an RFC 3339 time"))?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .context("times before 1970 are not in the log")?
        .as_millis();
    Ok(ms as i64)
}

fn read_key(path: &PathBuf) -> anyhow::Result<ed25519_dalek::VerifyingKey> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    verifying_key_from_pem(&pem)
        .with_context(|| format!("{} is not an ed25519 public key", path.display()))
}

fn write_out(out: Option<PathBuf>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}
