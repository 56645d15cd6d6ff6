//! At start: agents created before the chain committed to tokens get one
//! `agent.baseline` event carrying the commitment to the token they have
//! now, so from then on a token swapped in the database is named by audit
//! (see `ledger::fold`). Trust on first use: a swap made before the
//! upgrade cannot be told apart, which `docs/LEDGER.md` says.

use super::writer::Chain;
use crate::clock::now_ms;
use crate::storage::StoreError;
use aex_core::chain::ChainKey;
use rusqlite::{Connection, TransactionBehavior};

/// How many agents got their commitment (0 after the first time).
pub(super) fn commit_legacy_tokens(
    conn: &mut Connection,
    ledger_key: &[u8],
) -> Result<usize, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let legacy: Vec<(String, String, String)> = tx
        .prepare(
            "SELECT a.id, a.name, a.token_sha256 FROM agents a WHERE a.deleted_at_ms IS NULL \
             AND EXISTS (SELECT 1 FROM events e WHERE e.agent_id = a.id AND e.kind = 'agent.created' \
                 AND e.details NOT LIKE '%\"token_mac\"%') \
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.agent_id = a.id \
                 AND e.kind IN ('agent.token_rotated', 'agent.baseline'))",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let key = ChainKey::new(ledger_key);
    let mut chain = Chain::read(&tx, &key)?;
    let now = now_ms();
    for (id, name, token_sha256) in &legacy {
        let event = aex_core::agent::baseline(id, name, token_sha256, now, ledger_key);
        chain.append(&tx, &event)?;
    }
    tx.commit()?;
    if !legacy.is_empty() {
        tracing::info!(
            agents = legacy.len(),
            "committed the tokens of agents created by an earlier version to the ledger (agent.baseline events)"
        );
    }
    Ok(legacy.len())
}
