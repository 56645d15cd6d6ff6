//! PostgreSQL storage, for several control planes over one database.
//! Selected by `--database-url postgres://…` (or `AEX_DATABASE_URL`); SQLite
//! stays the embedded default.
//!
//! Writes go through one writer task per control plane with group commit
//! (`writer.rs`): every queued operation in one transaction (one that fails
//! is taken out and the rest run again), committed once with
//! `synchronous_commit` as the server has it (on by default), then
//! answered. A batch locks only the agents it touches; replicas take turns
//! only to append its events to the one chain and commit. Reads use a sqlx
//! pool, with the SQL shared with SQLite (`storage/sql_reads.rs`); the
//! shared rate limiters have sessions of their own (`rates.rs`).
//!
//! Every change to an agent or its processes, and every models reload, is
//! also a NOTIFY (delivered when its transaction commits), so every control
//! plane on the database applies it and tells its data planes (`notify.rs`).
//! Each control plane keeps its own copy of the chain's head in its
//! AEX_HOME (`anchored.rs`). Needs PostgreSQL 13 or later
//! (`pg_current_xact_id`).

mod anchored;
mod credentials;
mod grants;
mod many;
mod notify;
mod rates;
mod reads;
mod reserve;
#[cfg(test)]
mod tests;
mod writer;
mod writes;

use crate::ledger::anchor::{AnchorFile, AnchorState};
use crate::storage::{
    AgentChange, AgentRecord, AgentStore, AgentWrite, ChangeFeed, CredentialRecord,
    CredentialStore, CredentialWrite, DenialRecord, GrantEnd, GrantOutcome, GrantRecord,
    GrantStore, LedgerStore, NewGrant, NewReservation, ProcessRecord, ProcessState, ProcessStore,
    ReservationRecord, ReserveOutcome, SettleOutcome, Settlement, StoreError,
};
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use writer::LedgerWriter;

pub struct PgStore {
    reader: PgPool,
    writer: LedgerWriter,
    ledger_key: Vec<u8>,
    /// Rate-limiter writes, on sessions of their own (see `rates.rs`).
    rates: PgPool,
    /// This control plane's copy of the chain's head outside the database
    /// (see `anchored.rs`); None when opened without one (tests).
    anchor: Option<Arc<AnchorFile>>,
}

/// `postgres://user@host:port/db?…` → connect options; the error names the
/// flag, never the URL (it may hold a password).
pub fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url).map_err(|e| {
        StoreError::Invalid(format!(
            "--database-url is not a PostgreSQL URL ({e}); write postgres://USER[:PASSWORD]@HOST:PORT/DATABASE"
        ))
    })
}

impl PgStore {
    /// Audit's reads in one snapshot, while replicas keep writing.
    const SNAPSHOT: Option<&'static str> =
        Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY");

    /// Connects, applies migrations (several control planes starting at
    /// once take turns: sqlx's migrator holds an advisory lock), checks
    /// this control plane's head anchor (`anchor`, in its AEX_HOME) against
    /// the chain and starts the writer, which anchors every commit it makes.
    pub async fn open(
        options: PgConnectOptions,
        ledger_key: Vec<u8>,
        anchor: Option<&Path>,
    ) -> Result<Self, StoreError> {
        migrate(&options).await?;
        let reader = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let (anchor_file, start_event) = match anchor {
            Some(path) => {
                let (file, event) = anchored::check(&reader, &ledger_key, path).await?;
                (Some(Arc::new(file)), event)
            }
            None => (None, None),
        };
        let rates = rates::pool(&options);
        let writer = LedgerWriter::start(options, ledger_key.clone(), anchor_file.clone()).await?;
        if let Some(file) = &anchor_file {
            anchored::record(&reader, &writer, file, start_event).await?;
        }
        Ok(Self {
            reader,
            writer,
            ledger_key,
            rates,
            anchor: anchor_file,
        })
    }

    /// What this control plane's anchor file says now.
    fn anchor_state(&self) -> Option<AnchorState> {
        self.anchor
            .as_ref()
            .map(|a| crate::ledger::anchor::read(a.path(), &self.ledger_key))
    }
}

/// Applies pending migrations; how many were applied.
pub async fn migrate(options: &PgConnectOptions) -> Result<usize, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    let mut migrator = sqlx::migrate!("./migrations/postgres");
    // A newer replica may have migrated already (a rolling update): an
    // older one still starts on the schema it knows.
    migrator.set_ignore_missing(true);
    // An empty database has no migrations table yet: every one is pending.
    let pending = pending_migrations(&pool, &migrator)
        .await
        .unwrap_or_else(|_| migrator.iter().count());
    migrator.run(&pool).await?;
    pool.close().await;
    Ok(pending)
}

/// `ok` when the server answers and every migration this AEX knows is
/// applied; else what is wrong. (The server checks its own pages.)
pub async fn check(options: &PgConnectOptions) -> String {
    let pool = match PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await
    {
        Ok(pool) => pool,
        Err(e) => return format!("cannot connect: {e}"),
    };
    let pending = pending_migrations(&pool, &sqlx::migrate!("./migrations/postgres")).await;
    pool.close().await;
    match pending {
        Ok(0) => "ok".into(),
        Ok(_) => "migrations are pending: run `aex-control --database-url … migrate`".into(),
        Err(e) => format!("not an AEX ledger ({e}): run `aex-control --database-url … migrate`"),
    }
}

/// How many of `migrator`'s migrations the database has not applied.
async fn pending_migrations(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<usize, sqlx::Error> {
    let applied: std::collections::HashSet<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    Ok(migrator
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .count())
}

#[async_trait]
impl AgentStore for PgStore {
    fn ledger_key(&self) -> &[u8] {
        &self.ledger_key
    }

    async fn insert_agent(&self, write: AgentWrite) -> Result<AgentRecord, StoreError> {
        self.writer.write(writes::InsertAgent(write)).await
    }

    async fn change_agent(
        &self,
        name: &str,
        change: Box<AgentChange>,
    ) -> Result<AgentRecord, StoreError> {
        self.writer
            .write(writes::ChangeAgent {
                name: name.to_string(),
                change,
            })
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

    async fn changes(&self) -> Result<Option<ChangeFeed>, StoreError> {
        Ok(Some(notify::changes(&self.reader).await?))
    }

    async fn announce_models_reloaded(&self) -> Result<(), StoreError> {
        notify::models_reloaded(&self.reader).await
    }

    async fn announce_grants_recalled(&self, agent_id: &str) -> Result<(), StoreError> {
        notify::grants_recalled(&self.reader, agent_id).await
    }
}

#[async_trait]
impl LedgerStore for PgStore {
    fn shared_rates(&self) -> Option<std::sync::Arc<dyn crate::storage::SharedRates>> {
        Some(std::sync::Arc::new(rates::PgRates {
            pool: self.rates.clone(),
        }))
    }

    async fn reserve(&self, n: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.writer.write(reserve::Reserve(n)).await
    }

    async fn settle(&self, st: Settlement) -> Result<SettleOutcome, StoreError> {
        self.writer.write(reserve::Settle(st)).await
    }

    async fn reserve_many(
        &self,
        ns: Vec<NewReservation>,
    ) -> Vec<Result<ReserveOutcome, StoreError>> {
        self.writer
            .write_many(ns.into_iter().map(reserve::Reserve).collect())
            .await
    }

    async fn settle_many(&self, sts: Vec<Settlement>) -> Vec<Result<SettleOutcome, StoreError>> {
        self.writer
            .write_many(sts.into_iter().map(reserve::Settle).collect())
            .await
    }

    async fn record_denial(&self, d: DenialRecord) -> Result<(), StoreError> {
        self.writer.write(writes::Deny(d)).await
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
        self.writer
            .write(writes::Extend {
                ids: ids.to_vec(),
                expires_at_ms,
            })
            .await
    }
}

#[async_trait]
impl GrantStore for PgStore {
    async fn issue_grant(&self, g: NewGrant) -> Result<GrantOutcome, StoreError> {
        self.writer.write(grants::IssueGrant(g)).await
    }

    async fn end_grant(
        &self,
        grant_id: &str,
        agent_id: &str,
        end: GrantEnd,
        now_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError> {
        self.writer
            .write(grants::EndGrant {
                grant_id: grant_id.to_string(),
                agent_id: agent_id.to_string(),
                end,
                now_ms,
            })
            .await
    }

    async fn open_grants(&self, agent_id: Option<&str>) -> Result<Vec<GrantRecord>, StoreError> {
        reads::open_grants(&self.reader, agent_id).await
    }
}

#[async_trait]
impl CredentialStore for PgStore {
    async fn insert_credential(&self, w: CredentialWrite) -> Result<CredentialRecord, StoreError> {
        self.writer.write(credentials::Insert(w)).await
    }

    async fn revoke_credential(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        self.writer
            .write(credentials::Revoke {
                name: name.to_string(),
                now_ms,
            })
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
impl ProcessStore for PgStore {
    async fn start_process(&self, p: ProcessRecord) -> Result<ProcessRecord, StoreError> {
        self.writer
            .write(writes::StartProcess {
                process: p,
                ledger_key: self.ledger_key.clone(),
            })
            .await
    }

    async fn set_process_pid(&self, id: &str, pid: u32) -> Result<(), StoreError> {
        self.writer
            .write(writes::SetPid {
                id: id.to_string(),
                pid,
            })
            .await
    }

    async fn request_kill(&self, agent_id: &str, reason: &str) -> Result<u64, StoreError> {
        self.writer
            .write(writes::RequestKill {
                agent_id: agent_id.to_string(),
                reason: reason.to_string(),
            })
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
        self.writer
            .write(writes::EndProcess {
                id: id.to_string(),
                state,
                exit_code,
                reason: reason.to_string(),
                now_ms,
            })
            .await
    }

    async fn list_processes(&self, include_ended: bool) -> Result<Vec<ProcessRecord>, StoreError> {
        reads::list_processes(&self.reader, include_ended).await
    }
}
