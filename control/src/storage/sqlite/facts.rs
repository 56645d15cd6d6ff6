//! What a write reads inside its transaction before the domain decides:
//! an agent's amounts and a grant's row (`reserve.rs`, `grants.rs`).

use crate::storage::rows::{GRANT_COLUMNS, GrantRow};
use crate::storage::{GrantRecord, StoreError};
use aex_core::agent::Funds;
use rusqlite::{Connection, OptionalExtension};

/// The agent's amounts; `None` when no agent, deleted or not, has the id.
pub(super) fn funds(conn: &Connection, agent_id: &str) -> Result<Option<Funds>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT budget_micro - spent_micro - reserved_micro, deleted_at_ms IS NULL \
             FROM agents WHERE id = ?1",
        )?
        .query_row([agent_id], |r| {
            Ok(Funds {
                free_micro: r.get(0)?,
                live: r.get(1)?,
            })
        })
        .optional()?)
}

pub(super) fn grant(conn: &Connection, id: &str) -> Result<Option<GrantRecord>, StoreError> {
    conn.prepare_cached(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?1"))?
        .query_row([id], GrantRow::from_rusqlite)
        .optional()?
        .map(TryInto::try_into)
        .transpose()
}
