//! At start: does the database reach the head the anchor file recorded?
//!
//! Run before the ledger writer starts and before anything is admitted. A
//! database that ends before the anchor (events removed, or all of them), a
//! different event at the anchored position, or an anchor that is missing
//! or forged once the chain has been anchored, is recorded as a chained
//! `ledger.head_mismatch` event, so it fails every later audit and cannot be
//! erased without breaking the chain; the rejected anchor file is kept
//! beside it. The control plane then carries on from the database as it is
//! (an attacker who can edit the database can stop it anyway).

use super::writer::{Chain, read_head};
use crate::ledger::anchor::{self, AnchorFile, AnchorState};
use crate::storage::{EventKind, NewEvent, StoreError, now_ms};
use aex_core::chain::{ChainKey, GENESIS};
use aex_core::event::Head;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde_json::json;
use std::path::Path;

pub(super) fn check_and_open(
    conn: &mut Connection,
    ledger_key: &[u8],
    path: &Path,
) -> Result<AnchorFile, StoreError> {
    let io = |e: std::io::Error| {
        StoreError::Unavailable(format!("ledger head anchor {}: {e}", path.display()))
    };
    let state = anchor::read(path, ledger_key);
    let Head {
        seq: db_seq,
        hash: db_hash,
    } = read_head(conn)?;
    let anchored_before: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM events WHERE kind = ?1)",
        [EventKind::LedgerAnchored.as_str()],
        |r| r.get(0),
    )?;
    let mismatch = match &state {
        AnchorState::Present(a) => {
            let at_anchor: Option<String> = if a.seq == 0 {
                Some(GENESIS.to_string())
            } else {
                conn.query_row("SELECT hash FROM events WHERE seq = ?1", [a.seq], |r| {
                    r.get(0)
                })
                .optional()?
            };
            if at_anchor.as_deref() == Some(a.hash.as_str()) {
                None
            } else if db_seq < a.seq {
                Some((
                    if db_seq == 0 { "wiped" } else { "truncated" },
                    format!(
                        "the database ends at event {db_seq} but the anchor (written at {} ms) says the chain reached event {}: {} event(s) removed",
                        a.written_at_ms,
                        a.seq,
                        a.seq - db_seq
                    ),
                    Some(a.clone()),
                ))
            } else {
                Some((
                    "rewritten",
                    format!(
                        "event {} is not the one the anchor recorded: the chain was replaced from there",
                        a.seq
                    ),
                    Some(a.clone()),
                ))
            }
        }
        AnchorState::Missing if anchored_before => Some((
            "anchor_missing",
            format!(
                "{} is missing although this chain was anchored",
                path.display()
            ),
            None,
        )),
        AnchorState::Missing => None,
        AnchorState::Invalid(why) => Some(("anchor_invalid", why.clone(), None)),
    };
    if mismatch.is_some() && path.exists() {
        // Keep the evidence before the anchor is rewritten.
        let kept = path.with_extension(format!("head.rejected-{}", now_ms()));
        std::fs::copy(path, &kept).map_err(io)?;
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let key = ChainKey::new(ledger_key);
    let mut chain = Chain::read(&tx, &key)?;
    let now = now_ms();
    if let Some((reason, message, anchor)) = &mismatch {
        tracing::error!(reason, %message, "the ledger does not reach its anchored head; recorded in the chain (run `aexctl audit`)");
        let details = json!({
            "message": message,
            "anchor_seq": anchor.as_ref().map(|a| a.seq),
            "anchor_hash": anchor.as_ref().map(|a| a.hash.clone()),
            "anchor_written_at_ms": anchor.as_ref().map(|a| a.written_at_ms),
            "db_seq": db_seq, "db_hash": db_hash,
        });
        chain.append(
            &tx,
            &NewEvent::ledger(now, EventKind::LedgerHeadMismatch, reason, details),
        )?;
    } else if matches!(state, AnchorState::Missing) {
        // The first start with an anchor: from here on the head is known.
        chain.append(
            &tx,
            &NewEvent::ledger(
                now,
                EventKind::LedgerAnchored,
                "",
                json!({"anchor": path.display().to_string(), "head_seq": db_seq}),
            ),
        )?;
    }
    let (seq, hash) = (chain.head().seq, chain.head().hash.clone());
    tx.commit()?;
    let file = AnchorFile::open(path, ledger_key).map_err(io)?;
    file.reset(seq, &hash).map_err(io)?;
    tracing::info!(seq, hash = %hash, anchor = %path.display(), "ledger head anchored");
    Ok(file)
}
