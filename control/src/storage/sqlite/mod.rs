//! SQLite storage (WAL), the embedded default. Every write goes through one
//! thread with group commit (`writer.rs`), which both serialises the hash
//! chain and matches SQLite's one-writer design; reads use their own sqlx
//! pool (`reads.rs`), so they never wait behind a write.
//!
//! Durability: WAL with `synchronous = NORMAL` survives a `kill -9` of the
//! process (committed frames are in the OS page cache); only a power loss can
//! drop the last transactions.

mod anchor;
mod baseline;
mod credentials;
mod errors;
mod facts;
mod grants;
mod reads;
mod reserve;
mod rows;
#[cfg(test)]
mod tests;
mod writer;
mod writes;

pub use writer::WalPolicy;

use crate::ledger::anchor::AnchorFile;
use crate::storage::{
    AgentChange, AgentRecord, AgentStore, AgentWrite, CredentialRecord, CredentialStore,
    CredentialWrite, DenialRecord, GrantEnd, GrantOutcome, GrantRecord, GrantStore, LedgerStore,
    NewGrant, NewReservation, ProcessRecord, ProcessState, ProcessStore, ReservationRecord,
    ReserveOutcome, SettleOutcome, Settlement, StoreError, each_or_all,
};
use async_trait::async_trait;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use writer::LedgerWriter;

pub struct SqliteStore {
    reader: SqlitePool,
    writer: LedgerWriter,
    ledger_key: Vec<u8>,
    /// The chain's head outside the database (see `ledger::anchor`); None
    /// for stores opened without one (tests, benchmarks).
    anchor: Option<Arc<AnchorFile>>,
}

fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
}

impl SqliteStore {
    /// A read transaction in WAL mode is one snapshot already.
    const SNAPSHOT: Option<&'static str> = None;

    /// What the anchor file says now (None: opened without one).
    fn anchor_state(&self) -> Option<crate::ledger::anchor::AnchorState> {
        self.anchor
            .as_ref()
            .map(|a| crate::ledger::anchor::read(a.path(), &self.ledger_key))
    }

    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(path: &Path, ledger_key: Vec<u8>) -> Result<Self, StoreError> {
        Self::open_with(path, ledger_key, WalPolicy::default()).await
    }

    pub async fn open_with(
        path: &Path,
        ledger_key: Vec<u8>,
        wal: WalPolicy,
    ) -> Result<Self, StoreError> {
        Self::open_inner(path, ledger_key, wal, None).await
    }

    /// Opens the database with its head anchored in `anchor_path`: checks
    /// the anchor against the chain first (a mismatch is recorded in the
    /// chain, see `anchor.rs`), then anchors every commit.
    pub async fn open_anchored(
        path: &Path,
        ledger_key: Vec<u8>,
        anchor_path: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_inner(path, ledger_key, WalPolicy::default(), Some(anchor_path)).await
    }

    async fn open_inner(
        path: &Path,
        ledger_key: Vec<u8>,
        wal: WalPolicy,
        anchor_path: Option<&Path>,
    ) -> Result<Self, StoreError> {
        migrate(path).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(connect_options(path).read_only(true))
            .await?;
        let mut conn = writer::connect(path, wal)?;
        // Before the writer starts and anything is admitted.
        let anchor = match anchor_path {
            Some(p) => {
                let anchor = anchor::check_and_open(&mut conn, &ledger_key, p)?;
                if baseline::commit_legacy_tokens(&mut conn, &ledger_key)? > 0 {
                    let head = writer::read_head(&conn)?;
                    anchor
                        .write(head.seq, &head.hash)
                        .map_err(|e| StoreError::Unavailable(format!("ledger head anchor: {e}")))?;
                }
                Some(Arc::new(anchor))
            }
            None => None,
        };
        let writer = LedgerWriter::start(conn, path, ledger_key.clone(), wal, anchor.clone())?;
        Ok(Self {
            reader,
            writer,
            ledger_key,
            anchor,
        })
    }
}

/// Creates the database if needed and applies pending migrations; how
/// many were applied. Opens no ledger writer (for `aex-control migrate`).
pub async fn migrate(path: &Path) -> Result<usize, StoreError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(connect_options(path))
        .await?;
    let migrator = sqlx::migrate!("./migrations/sqlite");
    let applied_before: i64 = applied_migrations(&pool).await;
    migrator.run(&pool).await?;
    let applied_after: i64 = applied_migrations(&pool).await;
    pool.close().await;
    Ok((applied_after - applied_before).max(0) as usize)
}

async fn applied_migrations(pool: &SqlitePool) -> i64 {
    // The table does not exist before the first migration.
    sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// SQLite's own integrity check of the file, read-only: `ok`, or what it
/// found (for `aexctl doctor` while the control plane is stopped).
pub async fn integrity_check(path: &Path) -> Result<String, StoreError> {
    if !path.exists() {
        return Err(StoreError::Unavailable(format!(
            "{} does not exist (run `aexctl init`)",
            path.display()
        )));
    }
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let verdict: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok(verdict)
}

#[async_trait]
impl AgentStore for SqliteStore {
    fn ledger_key(&self) -> &[u8] {
        &self.ledger_key
    }

    async fn insert_agent(&self, write: AgentWrite) -> Result<AgentRecord, StoreError> {
        self.writer
            .write(move |conn, chain| writes::insert_agent(conn, chain, &write))
            .await
    }

    async fn change_agent(
        &self,
        name: &str,
        change: Box<AgentChange>,
    ) -> Result<AgentRecord, StoreError> {
        // Decided on the writer's thread, inside the transaction that reads
        // the row: against the row as committed, never a stale copy.
        let name = name.to_string();
        self.writer
            .write(move |conn, chain| writes::change_agent(conn, chain, &name, &*change))
            .await
    }

    async fn list_agents(&self, include_deleted: bool) -> Result<Vec<AgentRecord>, StoreError> {
        reads::list_agents(&self.reader, include_deleted).await
    }

    async fn agent_by_name(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        reads::agent_by_name(&self.reader, name).await
    }

    async fn agent_by_id(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        reads::agent_by_id(&self.reader, id).await
    }

    async fn agent_by_token(&self, token_sha256: &str) -> Result<Option<AgentRecord>, StoreError> {
        reads::agent_by_token(&self.reader, token_sha256).await
    }

    async fn retired_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<aex_core::presented::Retired>, StoreError> {
        reads::retired_token(&self.reader, &self.ledger_key, token_sha256).await
    }
}

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn reserve(&self, n: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.writer
            .write(move |conn, chain| reserve::reserve(conn, chain, &n))
            .await
    }

    async fn settle(&self, st: Settlement) -> Result<SettleOutcome, StoreError> {
        self.writer
            .write(move |conn, chain| reserve::settle(conn, chain, &st))
            .await
    }

    async fn reserve_many(
        &self,
        ns: Vec<NewReservation>,
    ) -> Vec<Result<ReserveOutcome, StoreError>> {
        let n = ns.len();
        let done = self
            .writer
            .write(move |conn, chain| {
                writer::each_alone(conn, chain, &ns, |conn, chain, n| {
                    reserve::reserve(conn, chain, n)
                })
            })
            .await;
        each_or_all(done, n)
    }

    async fn settle_many(&self, sts: Vec<Settlement>) -> Vec<Result<SettleOutcome, StoreError>> {
        let n = sts.len();
        let done = self
            .writer
            .write(move |conn, chain| {
                writer::each_alone(conn, chain, &sts, |conn, chain, st| {
                    reserve::settle(conn, chain, st)
                })
            })
            .await;
        each_or_all(done, n)
    }

    async fn record_denial(&self, d: DenialRecord) -> Result<(), StoreError> {
        self.writer
            .write(move |conn, chain| writes::deny(conn, chain, &d))
            .await
    }

    async fn open_reservations(&self) -> Result<Vec<ReservationRecord>, StoreError> {
        reads::open_reservations(&self.reader).await
    }

    async fn open_reservation(&self, id: &str) -> Result<Option<ReservationRecord>, StoreError> {
        reads::open_reservation(&self.reader, id).await
    }

    async fn due_reservations(&self, now_ms: i64) -> Result<Vec<ReservationRecord>, StoreError> {
        reads::due_reservations(&self.reader, now_ms).await
    }

    async fn extend_reservations(
        &self,
        ids: &[String],
        expires_at_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let ids = ids.to_vec();
        self.writer
            .write(move |conn, _| writes::extend_reservations(conn, &ids, expires_at_ms))
            .await
    }
}

#[async_trait]
impl GrantStore for SqliteStore {
    async fn issue_grant(&self, g: NewGrant) -> Result<GrantOutcome, StoreError> {
        self.writer
            .write(move |conn, chain| grants::issue_grant(conn, chain, &g))
            .await
    }

    async fn end_grant(
        &self,
        grant_id: &str,
        agent_id: &str,
        end: GrantEnd,
        now_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError> {
        let (grant_id, agent_id) = (grant_id.to_string(), agent_id.to_string());
        self.writer
            .write(move |conn, chain| {
                grants::end_grant(conn, chain, &grant_id, &agent_id, end, now_ms)
            })
            .await
    }

    async fn open_grants(&self, agent_id: Option<&str>) -> Result<Vec<GrantRecord>, StoreError> {
        reads::open_grants(&self.reader, agent_id).await
    }
}

#[async_trait]
impl CredentialStore for SqliteStore {
    async fn insert_credential(&self, w: CredentialWrite) -> Result<CredentialRecord, StoreError> {
        self.writer
            .write(move |conn, chain| credentials::insert(conn, chain, &w))
            .await
    }

    async fn revoke_credential(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let name = name.to_string();
        self.writer
            .write(move |conn, chain| credentials::revoke(conn, chain, &name, now_ms))
            .await
    }

    async fn list_credentials(
        &self,
        include_revoked: bool,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        reads::list_credentials(&self.reader, include_revoked).await
    }
}

#[async_trait]
impl ProcessStore for SqliteStore {
    async fn start_process(&self, p: ProcessRecord) -> Result<ProcessRecord, StoreError> {
        let key = self.ledger_key.clone();
        self.writer
            .write(move |conn, chain| {
                writes::start_process(conn, chain, &p, &key)?;
                Ok(p)
            })
            .await
    }

    async fn set_process_pid(&self, id: &str, pid: u32) -> Result<(), StoreError> {
        let id = id.to_string();
        self.writer
            .write(move |conn, _| writes::set_process_pid(conn, &id, pid))
            .await
    }

    async fn request_kill(&self, agent_id: &str, reason: &str) -> Result<u64, StoreError> {
        let (agent_id, reason) = (agent_id.to_string(), reason.to_string());
        self.writer
            .write(move |conn, _| writes::request_kill(conn, &agent_id, &reason))
            .await
    }

    async fn end_process(
        &self,
        id: &str,
        state: ProcessState,
        exit_code: Option<i32>,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<ProcessRecord>, StoreError> {
        let (id, reason) = (id.to_string(), reason.to_string());
        self.writer
            .write(move |conn, chain| {
                writes::end_process(conn, chain, &id, state, exit_code, &reason, now_ms)
            })
            .await
    }

    async fn list_processes(&self, include_ended: bool) -> Result<Vec<ProcessRecord>, StoreError> {
        reads::list_processes(&self.reader, include_ended).await
    }
}
