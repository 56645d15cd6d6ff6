//! The chain's head outside the database, on PostgreSQL: each control
//! plane keeps its own anchor file in its AEX_HOME (`ledger-<hash>.head`,
//! named for the database), written after each commit it makes with the
//! head that commit reached. At start it checks that the chain still
//! reaches that head (`ledger::anchor_check`), and `aexctl audit` on it
//! checks the same. Every replica's anchor trails the chain by at most the
//! other replicas' commits since its own last one; a tail removed beyond
//! every surviving replica's anchor is what no anchor here can see (see
//! docs/LEDGER.md).
//!
//! The chain names each anchor by host and path (`ledger.anchored`), so a
//! missing file is a deleted anchor only where that host and path anchored
//! before; a new replica (a new pod) starts its own.

use super::writer::{Chain, LedgerWriter, Operation, Owner};
use crate::ledger::anchor::{self, AnchorFile};
use crate::ledger::anchor_check::{StartFacts, start_event};
use crate::storage::{EventKind, NewEvent, StoreError};
use aex_core::chain::GENESIS;
use aex_core::event::Head;
use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgPool};
use std::path::Path;

/// How the chain names this control plane's anchor.
fn anchored_as(path: &Path) -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{host}:{}", path.display())
}

async fn head(reader: &PgPool) -> Result<Head, StoreError> {
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(reader)
            .await?;
    Ok(head.map_or_else(Head::genesis, |(seq, hash)| Head { seq, hash }))
}

/// Compares the anchor file with the chain; the file opened for writing,
/// and the event to record before anything is admitted.
pub(super) async fn check(
    reader: &PgPool,
    ledger_key: &[u8],
    path: &Path,
) -> Result<(AnchorFile, Option<NewEvent>), StoreError> {
    let state = anchor::read(path, ledger_key);
    let name = anchored_as(path);
    let anchored_before: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE kind = $1 AND details::jsonb ->> 'anchor' = $2)",
    )
    .bind(EventKind::LedgerAnchored.as_str())
    .bind(&name)
    .fetch_one(reader)
    .await?;
    let hash_at_anchor = match state.anchor() {
        Some(a) if a.seq == 0 => Some(GENESIS.to_string()),
        Some(a) => {
            sqlx::query_scalar("SELECT hash FROM events WHERE seq = $1")
                .bind(a.seq)
                .fetch_optional(reader)
                .await?
        }
        None => None,
    };
    let facts = StartFacts {
        state,
        db_head: head(reader).await?,
        hash_at_anchor,
        anchored_before,
    };
    let event = start_event(path, &facts, &name).map_err(|e| StoreError::anchor(path, e))?;
    let file = AnchorFile::open(path, ledger_key).map_err(|e| StoreError::anchor(path, e))?;
    Ok((file, event))
}

/// Records the start's event, then anchors the chain as it stands (even
/// behind the old anchor: the mismatch is in the chain now).
pub(super) async fn record(
    reader: &PgPool,
    writer: &LedgerWriter,
    file: &AnchorFile,
    event: Option<NewEvent>,
) -> Result<(), StoreError> {
    if let Some(event) = event {
        writer.write(LedgerNote(event)).await?;
    }
    let head = head(reader).await?;
    file.reset(head.seq, &head.hash)
        .map_err(|e| StoreError::anchor(file.path(), e))?;
    tracing::info!(seq = head.seq, hash = %head.hash, anchor = %file.path().display(), "ledger head anchored");
    Ok(())
}

/// An event about the ledger itself.
struct LedgerNote(NewEvent);

#[async_trait]
impl Operation for LedgerNote {
    type Output = ();
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(String::new())]
    }
    async fn run(&self, _conn: &mut PgConnection, chain: &mut Chain) -> Result<(), StoreError> {
        chain.append(&self.0);
        Ok(())
    }
}
