//! At start: agents created before the chain committed to tokens get one
//! `agent.baseline` event carrying the commitment to the token they have
//! now, so from then on a token swapped in the database is named by audit
//! (see `ledger::fold`). Trust on first use: a swap made before the
//! upgrade cannot be told apart, which `docs/LEDGER.md` says.

use super::StoreError;
use super::sqlite::{NewEvent, append_event};
use serde_json::json;
use sqlx::SqlitePool;

pub(super) async fn commit_legacy_tokens(
    pool: &SqlitePool,
    ledger_key: &[u8],
) -> Result<usize, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let legacy: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT a.id, a.name, a.token_sha256 FROM agents a WHERE a.deleted_at_ms IS NULL \
         AND EXISTS (SELECT 1 FROM events e WHERE e.agent_id = a.id AND e.kind = 'agent.created' \
             AND e.details NOT LIKE '%\"token_mac\"%') \
         AND NOT EXISTS (SELECT 1 FROM events e WHERE e.agent_id = a.id \
             AND e.kind IN ('agent.token_rotated', 'agent.baseline'))",
    )
    .fetch_all(&mut *tx)
    .await?;
    let now = super::now_ms();
    for (id, name, token_sha256) in &legacy {
        append_event(
            &mut tx,
            ledger_key,
            now,
            NewEvent {
                kind: "agent.baseline",
                agent_id: id,
                agent_name: name,
                reservation_id: "",
                amount_micro: 0,
                reason: "token_committed",
                details: json!({
                    "token_mac": crate::ledger::fold::token_mac(ledger_key, token_sha256),
                }),
            },
        )
        .await?;
    }
    tx.commit().await?;
    if !legacy.is_empty() {
        tracing::info!(
            agents = legacy.len(),
            "committed the tokens of agents created by an earlier version to the ledger (agent.baseline events)"
        );
    }
    Ok(legacy.len())
}
