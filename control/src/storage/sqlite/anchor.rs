//! At start, on SQLite: the facts `ledger::anchor_check` decides on, read
//! before the ledger writer starts and before anything is admitted, and
//! the event it returns appended.

use super::writer::{Chain, read_head};
use crate::ledger::anchor::{self, AnchorFile};
use crate::ledger::anchor_check::{StartFacts, start_event};
use crate::storage::{EventKind, StoreError};
use aex_core::chain::{ChainKey, GENESIS};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;

pub(super) fn check_and_open(
    conn: &mut Connection,
    ledger_key: &[u8],
    path: &Path,
) -> Result<AnchorFile, StoreError> {
    let state = anchor::read(path, ledger_key);
    let db_head = read_head(conn)?;
    let anchored_before: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM events WHERE kind = ?1)",
        [EventKind::LedgerAnchored.as_str()],
        |r| r.get(0),
    )?;
    let hash_at_anchor = match state.anchor() {
        Some(a) if a.seq == 0 => Some(GENESIS.to_string()),
        Some(a) => conn
            .query_row("SELECT hash FROM events WHERE seq = ?1", [a.seq], |r| {
                r.get(0)
            })
            .optional()?,
        None => None,
    };
    let facts = StartFacts {
        state,
        db_head,
        hash_at_anchor,
        anchored_before,
    };
    let event = start_event(path, &facts, &path.display().to_string())
        .map_err(|e| StoreError::anchor(path, e))?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let key = ChainKey::new(ledger_key);
    let mut chain = Chain::read(&tx, &key)?;
    if let Some(event) = &event {
        chain.append(&tx, event)?;
    }
    let (seq, hash) = (chain.head().seq, chain.head().hash.clone());
    tx.commit()?;
    let file = AnchorFile::open(path, ledger_key).map_err(|e| StoreError::anchor(path, e))?;
    file.reset(seq, &hash)
        .map_err(|e| StoreError::anchor(path, e))?;
    tracing::info!(seq, hash = %hash, anchor = %path.display(), "ledger head anchored");
    Ok(file)
}
