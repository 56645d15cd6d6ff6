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

use super::StoreError;
use super::sqlite::{NewEvent, append_event};
use crate::ledger::anchor::{self, AnchorFile, AnchorState};
use aex_core::chain::GENESIS;
use serde_json::json;
use sqlx::SqlitePool;
use std::path::Path;

/// The chain's newest seq and hash (`genesis` when empty).
pub(super) async fn head(pool: &SqlitePool) -> Result<(i64, String), StoreError> {
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(pool)
            .await?;
    Ok(head.unwrap_or((0, GENESIS.to_string())))
}

pub(super) async fn check_and_open(
    pool: &SqlitePool,
    ledger_key: &[u8],
    path: &Path,
) -> Result<AnchorFile, StoreError> {
    let io = |e: std::io::Error| {
        StoreError::Unavailable(format!("ledger head anchor {}: {e}", path.display()))
    };
    let state = anchor::read(path, ledger_key);
    let (db_seq, db_hash) = head(pool).await?;
    let (anchored_before,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM events WHERE kind = 'ledger.anchored')")
            .fetch_one(pool)
            .await?;
    let mismatch = match &state {
        AnchorState::Present(a) => {
            let at_anchor: Option<String> = if a.seq == 0 {
                Some(GENESIS.to_string())
            } else {
                sqlx::query_scalar("SELECT hash FROM events WHERE seq = ?1")
                    .bind(a.seq)
                    .fetch_optional(pool)
                    .await?
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
        let kept = path.with_extension(format!("head.rejected-{}", super::now_ms()));
        std::fs::copy(path, &kept).map_err(io)?;
    }
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let now = super::now_ms();
    if let Some((reason, message, anchor)) = &mismatch {
        tracing::error!(reason, %message, "the ledger does not reach its anchored head; recorded in the chain (run `aexctl audit`)");
        let details = json!({
            "message": message,
            "anchor_seq": anchor.as_ref().map(|a| a.seq),
            "anchor_hash": anchor.as_ref().map(|a| a.hash.clone()),
            "anchor_written_at_ms": anchor.as_ref().map(|a| a.written_at_ms),
            "db_seq": db_seq, "db_hash": db_hash,
        });
        append_event(
            &mut tx,
            ledger_key,
            now,
            NewEvent::ledger("ledger.head_mismatch", reason, details),
        )
        .await?;
    } else if matches!(state, AnchorState::Missing) {
        // The first start with an anchor: from here on the head is known.
        append_event(
            &mut tx,
            ledger_key,
            now,
            NewEvent::ledger(
                "ledger.anchored",
                "",
                json!({"anchor": path.display().to_string(), "head_seq": db_seq}),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    let file = AnchorFile::open(path, ledger_key).map_err(io)?;
    let (seq, hash) = head(pool).await?;
    file.reset(seq, &hash).map_err(io)?;
    tracing::info!(seq, hash = %hash, anchor = %path.display(), "ledger head anchored");
    Ok(file)
}
