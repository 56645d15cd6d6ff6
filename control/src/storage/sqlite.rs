//! SQLite storage (WAL). Writes go through a single connection, which both
//! serialises the hash chain and matches SQLite's one-writer design; reads
//! use their own pool so they never wait behind a write.
//!
//! Durability: WAL with `synchronous = NORMAL` survives a `kill -9` of the
//! process (committed frames are in the OS page cache); only a power loss can
//! drop the last transactions.

use super::sqlite_ledger::{LedgerWriter, WalPolicy};
use super::{
    AgentActivity, AgentPatch, AgentRecord, AgentState, AuditData, Caps, DenialRecord, EventFilter,
    EventRecord, NewAgent, NewReservation, ProcessRecord, ReservationRecord, ReserveOutcome, Scope,
    SettleOutcome, Settlement, StatusTotals, Store, StoreError, TokenChange, counter_name, now_ms,
};
use crate::ledger::anchor::AnchorFile;
use aex_core::chain::{EventBody, GENESIS, chain_hash};
use aex_core::money::Pricing;
use async_trait::async_trait;
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqliteConnection, SqlitePool};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const AGENT_COLUMNS: &str = "id, name, token_sha256, token_prefix, token_expires_at_ms, \
    token_ttl_seconds, budget_micro, spent_micro, reserved_micro, overrun_micro, rpm, tpm, max_concurrent, \
    allowed_models, cap_streaming, cap_tools, cap_function_calling, cap_vision, scope, state, \
    created_at_ms, updated_at_ms, last_activity_at_ms, deleted_at_ms";

pub struct SqliteStore {
    /// Admin writes. Transactions take the write lock up front (`BEGIN
    /// IMMEDIATE`): a deferred one that read first could not upgrade once
    /// the ledger writer had committed (SQLITE_BUSY_SNAPSHOT in WAL).
    writer: SqlitePool,
    reader: SqlitePool,
    /// Reservations, settlements and denials, group-committed.
    ledger: LedgerWriter,
    ledger_key: Vec<u8>,
    /// The chain's head outside the database (see `ledger::anchor`); None
    /// for stores opened without one (migrations, tests, benchmarks).
    anchor: Option<Arc<AnchorFile>>,
}

impl SqliteStore {
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
    /// chain, see `sqlite_anchor`), then anchors every commit.
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
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        // Before the ledger writer starts and anything is admitted.
        let anchor = match anchor_path {
            Some(p) => {
                let anchor = super::sqlite_anchor::check_and_open(&writer, &ledger_key, p).await?;
                if super::sqlite_baseline::commit_legacy_tokens(&writer, &ledger_key).await? > 0 {
                    let (seq, hash) = super::sqlite_anchor::head(&writer).await?;
                    anchor
                        .write(seq, &hash)
                        .map_err(|e| StoreError::Unavailable(format!("ledger head anchor: {e}")))?;
                }
                Some(Arc::new(anchor))
            }
            None => None,
        };
        let ledger = LedgerWriter::start(path, ledger_key.clone(), wal, anchor.clone())?;
        Ok(Self {
            writer,
            reader,
            ledger,
            ledger_key,
            anchor,
        })
    }
}

/// Creates the database if needed and applies pending migrations; how
/// many were applied. Opens no ledger writer (for `aex-control migrate`).
pub async fn migrate(path: &Path) -> Result<usize, StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
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

impl SqliteStore {
    /// An admin write transaction holding SQLite's write lock from its first
    /// statement (why: see `writer`).
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Commits an admin transaction and anchors the chain's new head before
    /// the change is acknowledged.
    async fn commit_anchored(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    ) -> Result<(), StoreError> {
        tx.commit().await?;
        if let Some(anchor) = &self.anchor {
            let (seq, hash) = super::sqlite_anchor::head(&self.writer).await?;
            if let Err(e) = anchor.write(seq, &hash) {
                tracing::error!(error = %e, path = %anchor.path().display(), "cannot write the ledger head anchor");
            }
        }
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    id: String,
    name: String,
    token_sha256: String,
    token_prefix: String,
    token_expires_at_ms: Option<i64>,
    token_ttl_seconds: i64,
    budget_micro: i64,
    spent_micro: i64,
    reserved_micro: i64,
    overrun_micro: i64,
    rpm: i64,
    tpm: i64,
    max_concurrent: i64,
    allowed_models: String,
    cap_streaming: bool,
    cap_tools: bool,
    cap_function_calling: bool,
    cap_vision: bool,
    scope: String,
    state: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    last_activity_at_ms: Option<i64>,
    deleted_at_ms: Option<i64>,
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;
    fn try_from(r: AgentRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("agent {}: {what}", r.id));
        Ok(AgentRecord {
            allowed_models: serde_json::from_str(&r.allowed_models)
                .map_err(|_| corrupt("allowed_models"))?,
            scope: Scope::parse(&r.scope).ok_or_else(|| corrupt("scope"))?,
            state: AgentState::parse(&r.state).ok_or_else(|| corrupt("state"))?,
            rpm: u32::try_from(r.rpm).map_err(|_| corrupt("rpm"))?,
            tpm: u64::try_from(r.tpm).map_err(|_| corrupt("tpm"))?,
            max_concurrent: u32::try_from(r.max_concurrent)
                .map_err(|_| corrupt("max_concurrent"))?,
            caps: Caps {
                streaming: r.cap_streaming,
                tools: r.cap_tools,
                function_calling: r.cap_function_calling,
                vision: r.cap_vision,
            },
            id: r.id,
            name: r.name,
            token_sha256: r.token_sha256,
            token_prefix: r.token_prefix,
            token_expires_at_ms: r.token_expires_at_ms,
            token_ttl_seconds: r.token_ttl_seconds,
            budget_micro: r.budget_micro,
            spent_micro: r.spent_micro,
            reserved_micro: r.reserved_micro,
            overrun_micro: r.overrun_micro,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            last_activity_at_ms: r.last_activity_at_ms,
            deleted_at_ms: r.deleted_at_ms,
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    ts_ms: i64,
    kind: String,
    agent_id: String,
    agent_name: String,
    reservation_id: String,
    amount_micro: i64,
    reason: String,
    details: String,
    prev_hash: String,
    hash: String,
}

impl From<EventRow> for EventRecord {
    fn from(r: EventRow) -> Self {
        EventRecord {
            body: EventBody {
                seq: r.seq,
                ts_ms: r.ts_ms,
                kind: r.kind,
                agent_id: r.agent_id,
                agent_name: r.agent_name,
                reservation_id: r.reservation_id,
                amount_micro: r.amount_micro,
                reason: r.reason,
                details_json: r.details,
            },
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

/// What a mutation wants logged; seq, time and hashes are filled in here.
pub(super) struct NewEvent<'a> {
    pub(super) kind: &'a str,
    pub(super) agent_id: &'a str,
    pub(super) agent_name: &'a str,
    pub(super) reservation_id: &'a str,
    pub(super) amount_micro: i64,
    pub(super) reason: &'a str,
    pub(super) details: serde_json::Value,
}

impl<'a> NewEvent<'a> {
    /// An event about the ledger itself (no agent).
    pub(super) fn ledger(kind: &'a str, reason: &'a str, details: serde_json::Value) -> Self {
        Self {
            kind,
            agent_id: "",
            agent_name: "",
            reservation_id: "",
            amount_micro: 0,
            reason,
            details,
        }
    }

    /// An admin change to `agent`.
    fn admin(
        kind: &'a str,
        agent: &'a AgentRecord,
        amount_micro: i64,
        details: serde_json::Value,
    ) -> Self {
        Self {
            kind,
            agent_id: &agent.id,
            agent_name: &agent.name,
            reservation_id: "",
            amount_micro,
            reason: "",
            details,
        }
    }
}

/// Shared with the ledger writer (rusqlite binds `$N` by position, as the
/// placeholders appear in order).
pub(super) const INSERT_EVENT: &str = "INSERT INTO events (seq, ts_ms, kind, agent_id, \
    agent_name, reservation_id, amount_micro, reason, details, prev_hash, hash) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
/// Per-agent event counters, bumped in the event's own transaction.
/// Bumps a counter by $3: 1 per event, or the number of denials an
/// aggregated event stands for.
pub(super) const BUMP_COUNTER: &str = "INSERT INTO counters (agent_id, name, value) \
    VALUES ($1, $2, $3) ON CONFLICT (agent_id, name) DO UPDATE SET value = counters.value + $3";

pub(super) async fn append_event(
    conn: &mut SqliteConnection,
    key: &[u8],
    ts_ms: i64,
    e: NewEvent<'_>,
) -> Result<EventRecord, StoreError> {
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (prev_seq, prev_hash) = head.unwrap_or((0, GENESIS.to_string()));
    let body = EventBody {
        seq: prev_seq + 1,
        ts_ms,
        kind: e.kind.to_string(),
        agent_id: e.agent_id.to_string(),
        agent_name: e.agent_name.to_string(),
        reservation_id: e.reservation_id.to_string(),
        amount_micro: e.amount_micro,
        reason: e.reason.to_string(),
        details_json: e.details.to_string(),
    };
    let hash = chain_hash(key, &prev_hash, &body);
    sqlx::query(INSERT_EVENT)
        .bind(body.seq)
        .bind(body.ts_ms)
        .bind(&body.kind)
        .bind(&body.agent_id)
        .bind(&body.agent_name)
        .bind(&body.reservation_id)
        .bind(body.amount_micro)
        .bind(&body.reason)
        .bind(&body.details_json)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    sqlx::query(BUMP_COUNTER)
        .bind(&body.agent_id)
        .bind(counter_name(&body.kind, &body.reason))
        .bind(1i64)
        .execute(&mut *conn)
        .await?;
    Ok(EventRecord {
        body,
        prev_hash,
        hash,
    })
}

async fn live_agent(conn: &mut SqliteConnection, name: &str) -> Result<AgentRecord, StoreError> {
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 AND deleted_at_ms IS NULL"
    ))
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    row.ok_or_else(|| StoreError::AgentNotFound(name.to_string()))?
        .try_into()
}

/// Writes every mutable column of `a` back to its row.
async fn save_agent(conn: &mut SqliteConnection, a: &AgentRecord) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE agents SET token_sha256 = $2, token_prefix = $3, token_expires_at_ms = $4, \
         token_ttl_seconds = $5, budget_micro = $6, rpm = $7, tpm = $8, max_concurrent = $9, \
         allowed_models = $10, cap_streaming = $11, cap_tools = $12, cap_function_calling = $13, \
         cap_vision = $14, scope = $15, state = $16, updated_at_ms = $17, deleted_at_ms = $18 \
         WHERE id = $1",
    )
    .bind(&a.id)
    .bind(&a.token_sha256)
    .bind(&a.token_prefix)
    .bind(a.token_expires_at_ms)
    .bind(a.token_ttl_seconds)
    .bind(a.budget_micro)
    .bind(i64::from(a.rpm))
    .bind(a.tpm as i64)
    .bind(i64::from(a.max_concurrent))
    .bind(serde_json::to_string(&a.allowed_models).expect("strings serialise"))
    .bind(a.caps.streaming)
    .bind(a.caps.tools)
    .bind(a.caps.function_calling)
    .bind(a.caps.vision)
    .bind(a.scope.as_str())
    .bind(a.state.as_str())
    .bind(a.updated_at_ms)
    .bind(a.deleted_at_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Applies a patch to a copy of the agent, refusing changes that would break
/// an invariant. Returns the details to log.
fn apply_patch(
    a: &mut AgentRecord,
    p: &AgentPatch,
) -> Result<(serde_json::Map<String, serde_json::Value>, Option<i64>), StoreError> {
    let mut changed = serde_json::Map::new();
    let mut top_up = None;
    if let Some(b) = p.budget_micro {
        if b < 0 {
            return Err(StoreError::Invalid("the budget cannot be negative".into()));
        }
        changed.insert(
            "budget_micro".into(),
            json!({"from": a.budget_micro, "to": b}),
        );
        a.budget_micro = b;
    }
    if let Some(t) = p.top_up_micro {
        if t <= 0 {
            return Err(StoreError::Invalid(
                "a top-up must add a positive amount".into(),
            ));
        }
        a.budget_micro = a
            .budget_micro
            .checked_add(t)
            .ok_or_else(|| StoreError::Invalid("the budget would overflow".into()))?;
        top_up = Some(t);
    }
    if a.budget_micro < a.spent_micro {
        return Err(StoreError::Invalid(format!(
            "a budget of {} µ is below what '{}' has already spent ({} µ)",
            a.budget_micro, a.name, a.spent_micro
        )));
    }
    macro_rules! set {
        ($field:ident, $target:expr) => {
            if let Some(v) = p.$field.clone() {
                changed.insert(stringify!($field).into(), json!({"from": $target, "to": v}));
                $target = v;
            }
        };
    }
    set!(rpm, a.rpm);
    set!(tpm, a.tpm);
    set!(max_concurrent, a.max_concurrent);
    set!(allowed_models, a.allowed_models);
    set!(streaming, a.caps.streaming);
    set!(tools, a.caps.tools);
    set!(function_calling, a.caps.function_calling);
    set!(vision, a.caps.vision);
    if let Some(s) = p.scope {
        changed.insert(
            "scope".into(),
            json!({"from": a.scope.as_str(), "to": s.as_str()}),
        );
        a.scope = s;
    }
    Ok((changed, top_up))
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_agent(&self, n: NewAgent) -> Result<AgentRecord, StoreError> {
        let now = now_ms();
        let agent = AgentRecord {
            id: aex_core::secrets::new_id("agt"),
            name: n.name,
            token_sha256: n.token_sha256,
            token_prefix: n.token_prefix,
            token_expires_at_ms: n.token_expires_at_ms,
            token_ttl_seconds: n.token_ttl_seconds,
            budget_micro: n.budget_micro,
            spent_micro: 0,
            reserved_micro: 0,
            overrun_micro: 0,
            rpm: n.rpm,
            tpm: n.tpm,
            max_concurrent: n.max_concurrent,
            allowed_models: n.allowed_models,
            caps: n.caps,
            scope: n.scope,
            state: AgentState::Active,
            created_at_ms: now,
            updated_at_ms: now,
            last_activity_at_ms: None,
            deleted_at_ms: None,
        };
        let mut tx = self.write_tx().await?;
        let inserted = sqlx::query(
            "INSERT INTO agents (id, name, token_sha256, token_prefix, token_expires_at_ms, \
             token_ttl_seconds, budget_micro, rpm, tpm, max_concurrent, allowed_models, \
             cap_streaming, cap_tools, cap_function_calling, cap_vision, scope, state, \
             created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $18)",
        )
        .bind(&agent.id)
        .bind(&agent.name)
        .bind(&agent.token_sha256)
        .bind(&agent.token_prefix)
        .bind(agent.token_expires_at_ms)
        .bind(agent.token_ttl_seconds)
        .bind(agent.budget_micro)
        .bind(i64::from(agent.rpm))
        .bind(agent.tpm as i64)
        .bind(i64::from(agent.max_concurrent))
        .bind(serde_json::to_string(&agent.allowed_models).expect("strings serialise"))
        .bind(agent.caps.streaming)
        .bind(agent.caps.tools)
        .bind(agent.caps.function_calling)
        .bind(agent.caps.vision)
        .bind(agent.scope.as_str())
        .bind(agent.state.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::DuplicateName(agent.name));
            }
            other => other?,
        };
        let details = json!({
            "rpm": agent.rpm, "tpm": agent.tpm, "max_concurrent": agent.max_concurrent,
            "allowed_models": agent.allowed_models, "scope": agent.scope.as_str(),
            "streaming": agent.caps.streaming, "tools": agent.caps.tools,
            "function_calling": agent.caps.function_calling, "vision": agent.caps.vision,
            "token_prefix": agent.token_prefix, "token_expires_at_ms": agent.token_expires_at_ms,
            "token_mac": crate::ledger::fold::token_mac(&self.ledger_key, &agent.token_sha256),
            "token_ttl_seconds": agent.token_ttl_seconds,
        });
        append_event(
            &mut tx,
            &self.ledger_key,
            now,
            NewEvent::admin("agent.created", &agent, agent.budget_micro, details),
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(agent)
    }

    async fn list_agents(&self, include_deleted: bool) -> Result<Vec<AgentRecord>, StoreError> {
        let sql = if include_deleted {
            format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at_ms, id")
        } else {
            format!(
                "SELECT {AGENT_COLUMNS} FROM agents WHERE deleted_at_ms IS NULL ORDER BY created_at_ms, id"
            )
        };
        let rows: Vec<AgentRow> = sqlx::query_as(&sql).fetch_all(&self.reader).await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn agent_by_name(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        let mut conn = self.reader.acquire().await?;
        match live_agent(&mut conn, name).await {
            Ok(a) => Ok(Some(a)),
            Err(StoreError::AgentNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn agent_by_token(&self, token_sha256: &str) -> Result<Option<AgentRecord>, StoreError> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE token_sha256 = $1 AND deleted_at_ms IS NULL"
        ))
        .bind(token_sha256)
        .fetch_optional(&self.reader)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn update_agent(&self, name: &str, patch: AgentPatch) -> Result<AgentRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut agent = live_agent(&mut tx, name).await?;
        let (changed, top_up) = apply_patch(&mut agent, &patch)?;
        let now = now_ms();
        agent.updated_at_ms = now;
        save_agent(&mut tx, &agent).await?;
        // In the order apply_patch applied them (a new budget, then the
        // top-up on it), so the chain folds to the row. Older logs wrote the
        // top-up first; `ledger::fold` knows that order too.
        if !changed.is_empty() {
            append_event(
                &mut tx,
                &self.ledger_key,
                now,
                NewEvent::admin(
                    "agent.updated",
                    &agent,
                    0,
                    serde_json::Value::Object(changed),
                ),
            )
            .await?;
        }
        if let Some(amount) = top_up {
            let details = json!({"budget_micro": agent.budget_micro, "order": "after_update"});
            append_event(
                &mut tx,
                &self.ledger_key,
                now,
                NewEvent::admin("agent.topped_up", &agent, amount, details),
            )
            .await?;
        }
        self.commit_anchored(tx).await?;
        Ok(agent)
    }

    async fn rotate_token(
        &self,
        name: &str,
        token: TokenChange,
    ) -> Result<AgentRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut agent = live_agent(&mut tx, name).await?;
        let old_prefix = std::mem::replace(&mut agent.token_prefix, token.token_prefix);
        agent.token_sha256 = token.token_sha256;
        agent.token_expires_at_ms = token.token_expires_at_ms;
        agent.token_ttl_seconds = token.token_ttl_seconds;
        let now = now_ms();
        agent.updated_at_ms = now;
        save_agent(&mut tx, &agent).await?;
        let details = json!({
            "old_token_prefix": old_prefix, "token_prefix": agent.token_prefix,
            "token_expires_at_ms": agent.token_expires_at_ms,
            "token_mac": crate::ledger::fold::token_mac(&self.ledger_key, &agent.token_sha256),
            "token_ttl_seconds": agent.token_ttl_seconds,
        });
        append_event(
            &mut tx,
            &self.ledger_key,
            now,
            NewEvent::admin("agent.token_rotated", &agent, 0, details),
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(agent)
    }

    async fn set_state(&self, name: &str, state: AgentState) -> Result<AgentRecord, StoreError> {
        let kind = match state {
            AgentState::Active => "agent.resumed",
            AgentState::Paused => "agent.paused",
            AgentState::Deleted => return self.delete_agent(name).await,
        };
        let mut tx = self.write_tx().await?;
        let mut agent = live_agent(&mut tx, name).await?;
        if agent.state == state {
            return Ok(agent);
        }
        let now = now_ms();
        agent.state = state;
        agent.updated_at_ms = now;
        save_agent(&mut tx, &agent).await?;
        append_event(
            &mut tx,
            &self.ledger_key,
            now,
            NewEvent::admin(kind, &agent, 0, json!({})),
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(agent)
    }

    async fn delete_agent(&self, name: &str) -> Result<AgentRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut agent = live_agent(&mut tx, name).await?;
        let now = now_ms();
        agent.state = AgentState::Deleted;
        agent.deleted_at_ms = Some(now);
        agent.updated_at_ms = now;
        // Not a hex digest, so no presented token can ever hash to it; stays
        // unique per agent.
        agent.token_sha256 = format!("revoked:{}", agent.id);
        save_agent(&mut tx, &agent).await?;
        let details = json!({
            "budget_micro": agent.budget_micro, "spent_micro": agent.spent_micro,
            "reserved_micro": agent.reserved_micro,
        });
        append_event(
            &mut tx,
            &self.ledger_key,
            now,
            NewEvent::admin("agent.deleted", &agent, 0, details),
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(agent)
    }

    async fn reserve(&self, n: NewReservation) -> Result<ReserveOutcome, StoreError> {
        self.ledger.reserve(n).await
    }

    async fn settle(&self, st: Settlement) -> Result<SettleOutcome, StoreError> {
        self.ledger.settle(st).await
    }

    async fn record_denial(&self, d: DenialRecord) -> Result<(), StoreError> {
        self.ledger.deny(d).await
    }

    async fn open_reservations(&self) -> Result<Vec<ReservationRecord>, StoreError> {
        let rows: Vec<ReservationRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'open' ORDER BY created_at_ms"
        ))
        .fetch_all(&self.writer)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn extend_reservations(
        &self,
        ids: &[String],
        expires_at_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut closed = Vec::new();
        for id in ids {
            let extended = sqlx::query(
                "UPDATE reservations SET expires_at_ms = $2 WHERE id = $1 AND state = 'open'",
            )
            .bind(id)
            .bind(expires_at_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if extended == 0 {
                closed.push(id.clone());
            }
        }
        self.commit_anchored(tx).await?;
        Ok(closed)
    }

    async fn kill_agent(&self, name: &str) -> Result<AgentRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut agent = live_agent(&mut tx, name).await?;
        let now = now_ms();
        agent.state = AgentState::Paused;
        agent.updated_at_ms = now;
        save_agent(&mut tx, &agent).await?;
        append_event(
            &mut tx,
            &self.ledger_key,
            now,
            NewEvent::admin("agent.killed", &agent, 0, json!({})),
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(agent)
    }

    async fn start_process(&self, p: ProcessRecord) -> Result<ProcessRecord, StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO processes (id, agent_id, token_sha256, pid, command, host, state, started_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 'running', $7)",
        )
        .bind(&p.id)
        .bind(&p.agent_id)
        .bind(&p.token_sha256)
        .bind(i64::from(p.pid))
        .bind(&p.command)
        .bind(&p.host)
        .bind(p.started_at_ms)
        .execute(&mut *tx)
        .await?;
        append_event(
            &mut tx,
            &self.ledger_key,
            p.started_at_ms,
            NewEvent {
                kind: "process.started",
                agent_id: &p.agent_id,
                agent_name: &p.agent_name,
                reservation_id: "",
                amount_micro: 0,
                reason: "",
                details: json!({
                    "process_id": p.id, "command": p.command, "host": p.host,
                    "token_mac": crate::ledger::fold::token_mac(&self.ledger_key, &p.token_sha256),
                }),
            },
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(p)
    }

    async fn request_kill(&self, agent_id: &str, reason: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE processes SET kill_reason = $2 WHERE agent_id = $1 AND state = 'running'",
        )
        .bind(agent_id)
        .bind(reason)
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    async fn set_process_pid(&self, id: &str, pid: u32) -> Result<(), StoreError> {
        sqlx::query("UPDATE processes SET pid = $2 WHERE id = $1")
            .bind(id)
            .bind(i64::from(pid))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn end_process(
        &self,
        id: &str,
        state: &'static str,
        exit_code: Option<i32>,
        reason: &str,
    ) -> Result<Option<ProcessRecord>, StoreError> {
        let now = now_ms();
        let mut tx = self.write_tx().await?;
        let ended = sqlx::query(
            "UPDATE processes SET state = $2, ended_at_ms = $3, exit_code = $4, reason = $5 \
             WHERE id = $1 AND state = 'running'",
        )
        .bind(id)
        .bind(state)
        .bind(now)
        .bind(exit_code.map(i64::from))
        .bind(reason)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !ended {
            return Ok(None);
        }
        let process = process_by_id(&mut tx, id).await?;
        append_event(
            &mut tx,
            &self.ledger_key,
            now,
            NewEvent {
                kind: match state {
                    "killed" => "process.killed",
                    "lost" => "process.lost",
                    _ => "process.exited",
                },
                agent_id: &process.agent_id,
                agent_name: &process.agent_name,
                reservation_id: "",
                amount_micro: 0,
                reason,
                details: json!({"process_id": id, "pid": process.pid, "exit_code": exit_code}),
            },
        )
        .await?;
        self.commit_anchored(tx).await?;
        Ok(Some(process))
    }

    async fn list_processes(&self, include_ended: bool) -> Result<Vec<ProcessRecord>, StoreError> {
        let filter = if include_ended {
            ""
        } else {
            "WHERE p.state = 'running'"
        };
        let rows: Vec<ProcessRow> = sqlx::query_as(&format!(
            "{PROCESS_SELECT} {filter} ORDER BY p.started_at_ms"
        ))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn audit_data(&self, now_ms: i64) -> Result<AuditData, StoreError> {
        // One read transaction: agents, counters and the last event seq are
        // one snapshot even while requests keep settling. The log itself is
        // tallied as it is verified (one pass instead of two GROUP BY scans,
        // which took 4 s each over 1M events).
        // Before the snapshot: the anchor is written after each commit, so
        // the snapshot reaches at least the head it names.
        let anchor = self
            .anchor
            .as_ref()
            .map(|a| crate::ledger::anchor::read(a.path(), &self.ledger_key));
        let mut tx = self.reader.begin().await?;
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents ORDER BY created_at_ms, id"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let mut data = AuditData {
            agents: rows
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            ..Default::default()
        };
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, SUM(amount_micro) FROM reservations WHERE state = 'open' GROUP BY agent_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        data.open_reserved = rows.into_iter().collect();
        data.overdue = sqlx::query_as(
            "SELECT id, agent_id, expires_at_ms FROM reservations WHERE state = 'open' AND expires_at_ms < $1",
        )
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT agent_id, name, value FROM counters")
                .fetch_all(&mut *tx)
                .await?;
        data.counters = rows.into_iter().map(|(a, n, v)| ((a, n), v)).collect();
        let (last_seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM events")
            .fetch_one(&mut *tx)
            .await?;
        data.last_seq = last_seq.unwrap_or(0);
        let rows: Vec<ReservationAuditRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_AUDIT_COLUMNS} FROM reservations WHERE state = 'open'"
        ))
        .fetch_all(&mut *tx)
        .await?;
        data.open_reservation_rows = rows.into_iter().map(Into::into).collect();
        // In pages, by key: the history can hold millions of rows.
        data.closed_reservations = crate::ledger::fold::ClosedDigest::new(&self.ledger_key);
        let mut after_id = String::new();
        loop {
            let page: Vec<ReservationAuditRow> = sqlx::query_as(&format!(
                "SELECT {RESERVATION_AUDIT_COLUMNS} FROM reservations \
                 WHERE id > $1 AND state <> 'open' ORDER BY id LIMIT 10000"
            ))
            .bind(&after_id)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = page.last() else { break };
            after_id = last.id.clone();
            for row in page {
                data.closed_reservations
                    .add(&crate::ledger::fold::ReservationRow::from(row).facts);
            }
        }
        let rows: Vec<ProcessRow> = sqlx::query_as(PROCESS_SELECT).fetch_all(&mut *tx).await?;
        data.processes = rows.into_iter().map(Into::into).collect();
        if let Some(crate::ledger::anchor::AnchorState::Present(a)) = &anchor {
            data.hash_at_anchor = if a.seq == 0 {
                Some(GENESIS.to_string())
            } else {
                sqlx::query_scalar("SELECT hash FROM events WHERE seq = $1")
                    .bind(a.seq)
                    .fetch_optional(&mut *tx)
                    .await?
            };
        }
        data.anchor = anchor;
        tx.commit().await?;
        Ok(data)
    }

    async fn reservation_history(
        &self,
        agent_id: &str,
    ) -> Result<(Vec<crate::ledger::fold::ReservationRow>, Vec<EventRecord>), StoreError> {
        let mut tx = self.reader.begin().await?;
        let rows: Vec<ReservationAuditRow> = sqlx::query_as(&format!(
            "SELECT {RESERVATION_AUDIT_COLUMNS} FROM reservations WHERE agent_id = $1"
        ))
        .bind(agent_id)
        .fetch_all(&mut *tx)
        .await?;
        let events: Vec<EventRow> = sqlx::query_as(
            "SELECT seq, ts_ms, kind, agent_id, agent_name, reservation_id, amount_micro, reason, \
             details, prev_hash, hash FROM events WHERE agent_id = $1 \
             AND kind IN ('admit', 'settle', 'release', 'expire', 'overrun') ORDER BY seq",
        )
        .bind(agent_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            rows.into_iter().map(Into::into).collect(),
            events.into_iter().map(Into::into).collect(),
        ))
    }

    async fn status_totals(&self) -> Result<StatusTotals, StoreError> {
        // Summed here, saturating: SQLite's SUM fails outright on overflow,
        // and one absurd value must not take `status` down.
        let amounts: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT budget_micro, spent_micro, reserved_micro, overrun_micro \
             FROM agents WHERE deleted_at_ms IS NULL",
        )
        .fetch_all(&self.reader)
        .await?;
        let total = |pick: fn(&(i64, i64, i64, i64)) -> i64| {
            amounts.iter().map(pick).fold(0i64, i64::saturating_add)
        };
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, value FROM counters")
            .fetch_all(&self.reader)
            .await?;
        let mut counters = std::collections::HashMap::<String, i64>::new();
        for (name, value) in rows {
            let c = counters.entry(name).or_default();
            *c = c.saturating_add(value);
        }
        let (open,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM reservations WHERE state = 'open'")
                .fetch_one(&self.reader)
                .await?;
        let (running,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM processes WHERE state = 'running'")
                .fetch_one(&self.reader)
                .await?;
        Ok(StatusTotals {
            running_processes: running as u64,
            agents: amounts.len() as u32,
            total_budget_micro: total(|a| a.0),
            total_spent_micro: total(|a| a.1),
            total_reserved_micro: total(|a| a.2),
            total_overrun_micro: total(|a| a.3),
            counters,
            open_reservations: open as u64,
        })
    }

    async fn activity(
        &self,
        window_start_ms: i64,
        minute_start_ms: i64,
    ) -> Result<std::collections::HashMap<String, AgentActivity>, StoreError> {
        let mut out: std::collections::HashMap<String, AgentActivity> = Default::default();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, SUM(amount_micro) FROM events \
             WHERE ts_ms >= $1 AND kind IN ('settle', 'expire') GROUP BY agent_id",
        )
        .bind(window_start_ms)
        .fetch_all(&self.reader)
        .await?;
        for (agent, charged) in rows {
            out.entry(agent).or_default().charged_in_window = charged;
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT agent_id, COUNT(*) FROM events WHERE ts_ms >= $1 AND kind = 'admit' GROUP BY agent_id",
        )
        .bind(minute_start_ms)
        .fetch_all(&self.reader)
        .await?;
        for (agent, n) in rows {
            out.entry(agent).or_default().admitted_last_minute = n as u32;
        }
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT agent_id, name, value FROM counters WHERE name = 'admit' OR name LIKE 'deny:%'",
        )
        .fetch_all(&self.reader)
        .await?;
        for (agent, name, value) in rows {
            let a = out.entry(agent).or_default();
            if name == "admit" {
                a.admitted += value;
            } else {
                a.denied += value;
            }
        }
        Ok(out)
    }

    async fn list_events(&self, f: EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        let limit = if f.limit == 0 {
            1000
        } else {
            f.limit.min(10_000)
        };
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT seq, ts_ms, kind, agent_id, agent_name, reservation_id, amount_micro, reason, \
             details, prev_hash, hash FROM events \
             WHERE seq > $1 AND ts_ms >= $2 AND ($3 = '' OR agent_name = $3) \
             ORDER BY seq LIMIT $4",
        )
        .bind(f.after_seq)
        .bind(f.since_ms)
        .bind(f.agent_name.unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }
}

// A LEFT JOIN: a process row naming no agent is shown (and audited), not hidden.
const PROCESS_SELECT: &str = "SELECT p.id, p.agent_id, COALESCE(a.name, '') AS agent_name, \
    p.token_sha256, p.pid, p.command, p.host, p.state, p.started_at_ms, p.ended_at_ms, p.exit_code, \
    p.reason, p.kill_reason FROM processes p LEFT JOIN agents a ON a.id = p.agent_id";

const RESERVATION_AUDIT_COLUMNS: &str = "id, agent_id, request_id, model, amount_micro, \
    input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, state, \
    created_at_ms, settled_at_ms, charged_micro, outcome, prompt_tokens, completion_tokens, overrun_micro";

#[derive(sqlx::FromRow)]
struct ReservationAuditRow {
    id: String,
    agent_id: String,
    request_id: String,
    model: String,
    amount_micro: i64,
    input_pico_per_token: i64,
    output_pico_per_token: i64,
    input_tokens_bound: i64,
    output_tokens_cap: i64,
    state: String,
    created_at_ms: i64,
    settled_at_ms: Option<i64>,
    charged_micro: Option<i64>,
    outcome: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    overrun_micro: i64,
}

impl From<ReservationAuditRow> for crate::ledger::fold::ReservationRow {
    fn from(r: ReservationAuditRow) -> Self {
        Self {
            facts: crate::ledger::fold::ReservationFacts {
                id: r.id,
                agent_id: r.agent_id,
                request_id: r.request_id,
                model: r.model,
                amount_micro: r.amount_micro,
                input_tokens_bound: r.input_tokens_bound,
                output_tokens_cap: r.output_tokens_cap,
                created_at_ms: r.created_at_ms,
                state: r.state,
                settled_at_ms: r.settled_at_ms,
                charged_micro: r.charged_micro,
                outcome: r.outcome,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                overrun_micro: r.overrun_micro,
            },
            pricing: aex_core::money::Pricing {
                input_pico_per_token: r.input_pico_per_token,
                output_pico_per_token: r.output_pico_per_token,
            },
        }
    }
}

#[derive(sqlx::FromRow)]
struct ProcessRow {
    id: String,
    agent_id: String,
    agent_name: String,
    token_sha256: String,
    pid: i64,
    command: String,
    host: String,
    state: String,
    started_at_ms: i64,
    ended_at_ms: Option<i64>,
    exit_code: Option<i64>,
    reason: String,
    kill_reason: Option<String>,
}

impl From<ProcessRow> for ProcessRecord {
    fn from(r: ProcessRow) -> Self {
        ProcessRecord {
            id: r.id,
            agent_id: r.agent_id,
            agent_name: r.agent_name,
            token_sha256: r.token_sha256,
            pid: r.pid.clamp(0, i64::from(u32::MAX)) as u32,
            command: r.command,
            host: r.host,
            state: r.state,
            started_at_ms: r.started_at_ms,
            ended_at_ms: r.ended_at_ms,
            exit_code: r.exit_code.map(|c| c as i32),
            reason: r.reason,
            kill_reason: r.kill_reason,
        }
    }
}

async fn process_by_id(conn: &mut SqliteConnection, id: &str) -> Result<ProcessRecord, StoreError> {
    let row: ProcessRow = sqlx::query_as(&format!("{PROCESS_SELECT} WHERE p.id = $1"))
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.into())
}

const RESERVATION_COLUMNS: &str = "id, request_id, agent_id, model, amount_micro, \
    input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, \
    created_at_ms, expires_at_ms";

#[derive(sqlx::FromRow)]
struct ReservationRow {
    id: String,
    request_id: String,
    agent_id: String,
    model: String,
    amount_micro: i64,
    input_pico_per_token: i64,
    output_pico_per_token: i64,
    input_tokens_bound: i64,
    output_tokens_cap: i64,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl From<ReservationRow> for ReservationRecord {
    fn from(r: ReservationRow) -> Self {
        ReservationRecord {
            id: r.id,
            request_id: r.request_id,
            agent_id: r.agent_id,
            model: r.model,
            amount_micro: r.amount_micro,
            pricing: Pricing {
                input_pico_per_token: r.input_pico_per_token,
                output_pico_per_token: r.output_pico_per_token,
            },
            input_tokens_bound: r.input_tokens_bound.max(0) as u64,
            output_tokens_cap: r.output_tokens_cap.max(0) as u64,
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_agent(name: &str, hash: &str) -> NewAgent {
        NewAgent {
            name: name.into(),
            token_sha256: hash.into(),
            token_prefix: "aex_abc".into(),
            token_expires_at_ms: None,
            token_ttl_seconds: 0,
            budget_micro: 5_000_000,
            rpm: 120,
            tpm: 0,
            max_concurrent: 0,
            allowed_models: vec!["m".into()],
            caps: Caps {
                streaming: true,
                tools: true,
                function_calling: true,
                vision: false,
            },
            scope: Scope::Execution,
        }
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("aex.db"), vec![7; 32])
            .await
            .unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn lifecycle_is_logged_in_an_intact_chain() {
        let (_d, s) = store().await;
        let a = s.create_agent(new_agent("dev", "h1")).await.unwrap();
        assert!(matches!(
            s.create_agent(new_agent("dev", "h2")).await,
            Err(StoreError::DuplicateName(_))
        ));
        let up = s
            .update_agent(
                "dev",
                AgentPatch {
                    top_up_micro: Some(1_000_000),
                    rpm: Some(60),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(up.budget_micro, 6_000_000);
        assert_eq!(up.rpm, 60);
        assert!(matches!(
            s.update_agent(
                "dev",
                AgentPatch {
                    top_up_micro: Some(-1),
                    ..Default::default()
                }
            )
            .await,
            Err(StoreError::Invalid(_))
        ));
        s.set_state("dev", AgentState::Paused).await.unwrap();
        s.set_state("dev", AgentState::Paused).await.unwrap(); // no second event
        s.delete_agent("dev").await.unwrap();
        assert!(s.agent_by_name("dev").await.unwrap().is_none());
        assert_eq!(s.list_agents(true).await.unwrap()[0].id, a.id);
        // The name is free again after the tombstone.
        s.create_agent(new_agent("dev", "h1")).await.unwrap();

        let events = s.list_events(EventFilter::default()).await.unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.body.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "agent.created",
                "agent.updated",
                "agent.topped_up",
                "agent.paused",
                "agent.deleted",
                "agent.created"
            ]
        );
        let mut prev = GENESIS.to_string();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.body.seq, i as i64 + 1);
            assert_eq!(e.prev_hash, prev);
            assert_eq!(e.hash, chain_hash(&[7; 32], &prev, &e.body));
            prev = e.hash.clone();
        }
        let only_first = s
            .list_events(EventFilter {
                agent_name: Some("dev".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(only_first.len(), 6);
        let _ = a;
    }

    fn reservation(agent_id: &str, n: usize, amount_micro: i64) -> NewReservation {
        NewReservation {
            record: ReservationRecord {
                id: format!("rsv_{n}"),
                request_id: format!("req_{n}"),
                agent_id: agent_id.into(),
                model: "m".into(),
                amount_micro,
                pricing: Pricing {
                    input_pico_per_token: 1_000_000,
                    output_pico_per_token: 2_000_000,
                },
                input_tokens_bound: 10,
                output_tokens_cap: 10,
                created_at_ms: now_ms(),
                expires_at_ms: now_ms() + 60_000,
            },
            agent_name: "busy".into(),
            details: json!({"n": n}),
        }
    }

    /// Group-committed ledger writes on their own connection, and admin
    /// writes through sqlx, all at once: one unbroken chain, and money that
    /// adds up to the micro.
    /// Sustained sequential writes never leave the WAL wholly copied by a
    /// passive checkpoint; without the writer's catch-up it grew by
    /// hundreds of MB here. With it, the WAL keeps starting over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wal_starts_over_under_sustained_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aex.db");
        let policy = WalPolicy {
            checkpoint_every: Duration::from_millis(20),
            restart_after_frames: 500,
            keep_bytes: 1 << 20,
        };
        let s = SqliteStore::open_with(&path, vec![7; 32], policy)
            .await
            .unwrap();
        let agent = s.create_agent(new_agent("busy", "h")).await.unwrap();
        let wal = dir.path().join("aex.db-wal");
        let wal_bytes = || std::fs::metadata(&wal).map_or(0, |m| m.len());
        let (mut largest, mut last, mut restarts, mut n) = (0, 0, 0, 0);
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            s.reserve(reservation(&agent.id, n, 1)).await.unwrap();
            s.settle(Settlement {
                reservation_id: format!("rsv_{n}"),
                agent_name: "busy".into(),
                state: "settled",
                charge_micro: 1,
                overrun_micro: 0,
                outcome: "completed".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                extra_events: vec![],
                details: json!({}),
            })
            .await
            .unwrap();
            let now = wal_bytes();
            // A restart truncates the file to `keep_bytes`.
            if now < last {
                restarts += 1;
            }
            (largest, last) = (largest.max(now), now);
            n += 1;
        }
        assert!(
            restarts > 0,
            "the WAL never started over: {largest} bytes after {n} reservations"
        );
        // Loose: a starved checkpointer on a busy CI machine lets it grow
        // further between restarts, but never without bound.
        assert!(
            largest < 64 << 20,
            "the WAL reached {largest} bytes over {n} reservations"
        );
        assert_eq!(
            s.agent_by_name("busy").await.unwrap().unwrap().spent_micro,
            n as i64
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_ledger_and_admin_writes_keep_one_chain_and_exact_money() {
        let (_d, s) = store().await;
        let s = std::sync::Arc::new(s);
        let agent = s.create_agent(new_agent("busy", "h")).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..300 {
            let (s, id) = (s.clone(), agent.id.clone());
            tasks.spawn(async move {
                let reserved = s.reserve(reservation(&id, n, 100)).await.unwrap();
                assert!(matches!(reserved, ReserveOutcome::Reserved { .. }));
                // A retried admission is the same reservation, not a second.
                let again = s.reserve(reservation(&id, n, 100)).await.unwrap();
                assert!(matches!(again, ReserveOutcome::AlreadyAdmitted(_)));
                let settlement = Settlement {
                    reservation_id: format!("rsv_{n}"),
                    agent_name: "busy".into(),
                    state: "settled",
                    charge_micro: (n % 7) as i64,
                    overrun_micro: 0,
                    outcome: "completed".into(),
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    extra_events: vec![],
                    details: json!({}),
                };
                let first = s.settle(settlement.clone()).await.unwrap();
                assert!(matches!(first, SettleOutcome::Settled { .. }));
                assert_eq!(
                    s.settle(settlement).await.unwrap(),
                    SettleOutcome::AlreadyClosed
                );
            });
        }
        for _ in 0..30 {
            let s = s.clone();
            tasks.spawn(async move {
                s.update_agent(
                    "busy",
                    AgentPatch {
                        top_up_micro: Some(1_000),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                s.record_denial(DenialRecord {
                    agent_id: "nobody".into(),
                    agent_name: "nobody".into(),
                    reason: "rpm".into(),
                    details: json!({}),
                    count: 1,
                })
                .await
                .unwrap();
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }

        let after = s.agent_by_name("busy").await.unwrap().unwrap();
        let charged: i64 = (0..300).map(|n| (n % 7) as i64).sum();
        assert_eq!(after.spent_micro, charged);
        assert_eq!(after.reserved_micro, 0);
        assert_eq!(after.budget_micro, 5_000_000 + 30 * 1_000);

        let events = s
            .list_events(EventFilter {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        // created + 300 × (admit, settle) + 30 × (top-up, deny)
        assert_eq!(events.len(), 1 + 600 + 60);
        let mut verifier = crate::ledger::audit::ChainVerifier::new(&[7; 32]);
        for e in &events {
            verifier.push(e);
        }
        let check = verifier.finish(events.len() as i64);
        assert!(check.passed, "{:?}", check.offenders);
    }

    /// One operation failing inside a batch rolls back only itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_operation_leaves_the_rest_of_its_batch() {
        let (_d, s) = store().await;
        let s = std::sync::Arc::new(s);
        let agent = s.create_agent(new_agent("busy", "h")).await.unwrap();
        s.reserve(reservation(&agent.id, 999, 10)).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..50 {
            let (s, id) = (s.clone(), agent.id.clone());
            tasks.spawn(async move {
                let mut r = reservation(&id, n, 10);
                if n % 10 == 0 {
                    // The id of an existing reservation, for a new
                    // request: the primary key refuses it.
                    r.record.id = "rsv_999".into();
                }
                (n, s.reserve(r).await)
            });
        }
        let mut failed = 0;
        while let Some(done) = tasks.join_next().await {
            let (n, result) = done.unwrap();
            if n % 10 == 0 {
                assert!(result.is_err(), "{n}");
                failed += 1;
            } else {
                assert!(matches!(result, Ok(ReserveOutcome::Reserved { .. })), "{n}");
            }
        }
        assert_eq!(failed, 5);
        let after = s.agent_by_name("busy").await.unwrap().unwrap();
        assert_eq!(
            after.reserved_micro,
            46 * 10,
            "only the ones that succeeded"
        );
        let events = s.list_events(EventFilter::default()).await.unwrap();
        assert_eq!(events.len(), 1 + 46);
        let mut verifier = crate::ledger::audit::ChainVerifier::new(&[7; 32]);
        for e in &events {
            verifier.push(e);
        }
        assert!(verifier.finish(events.len() as i64).passed);
    }

    #[tokio::test]
    async fn budget_cannot_drop_below_spent() {
        let (_d, s) = store().await;
        s.create_agent(new_agent("a", "h")).await.unwrap();
        sqlx::query("UPDATE agents SET spent_micro = 100")
            .execute(&s.writer)
            .await
            .unwrap();
        let e = s
            .update_agent(
                "a",
                AgentPatch {
                    budget_micro: Some(99),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already spent"), "{e}");
        assert!(matches!(
            s.update_agent("nobody", AgentPatch::default()).await,
            Err(StoreError::AgentNotFound(_))
        ));
    }

    /// An agent created before the chain committed to tokens: swapping its
    /// token went unnoticed until the first start of this version gave it
    /// an `agent.baseline` commitment.
    #[tokio::test]
    async fn legacy_agents_get_their_token_committed_once() {
        let (_d, s) = store().await;
        let key = vec![7; 32];
        s.create_agent(new_agent("old", "h1")).await.unwrap();
        // Rewrite the log as an earlier version wrote it: no token_mac.
        let created: (String,) = sqlx::query_as("SELECT details FROM events WHERE seq = 1")
            .fetch_one(&s.writer)
            .await
            .unwrap();
        let mut details: serde_json::Value = serde_json::from_str(&created.0).unwrap();
        details.as_object_mut().unwrap().remove("token_mac");
        let mut events = s.list_events(EventFilter::default()).await.unwrap();
        events[0].body.details_json = details.to_string();
        let mut prev = GENESIS.to_string();
        for e in &mut events {
            e.prev_hash = prev.clone();
            e.hash = chain_hash(&key, &prev, &e.body);
            sqlx::query("UPDATE events SET details = $2, prev_hash = $3, hash = $4 WHERE seq = $1")
                .bind(e.body.seq)
                .bind(&e.body.details_json)
                .bind(&e.prev_hash)
                .bind(&e.hash)
                .execute(&s.writer)
                .await
                .unwrap();
            prev = e.hash.clone();
        }
        let fold_against = |events: &[EventRecord], rows: &[AgentRecord]| {
            let mut fold = crate::ledger::fold::AgentFold::default();
            for e in events {
                fold.push(e);
            }
            fold.compare(rows, &key)
        };
        let mut swapped = s.list_agents(true).await.unwrap();
        swapped[0].token_sha256 = "attacker".into();
        assert_eq!(
            fold_against(&events, &swapped),
            Vec::<String>::new(),
            "without a commitment the swap is not seen"
        );
        assert_eq!(
            super::super::sqlite_baseline::commit_legacy_tokens(&s.writer, &key)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            super::super::sqlite_baseline::commit_legacy_tokens(&s.writer, &key)
                .await
                .unwrap(),
            0,
            "once"
        );
        let events = s.list_events(EventFilter::default()).await.unwrap();
        assert_eq!(events.last().unwrap().body.kind, "agent.baseline");
        let rows = s.list_agents(true).await.unwrap();
        assert_eq!(fold_against(&events, &rows), Vec::<String>::new());
        let offenders = fold_against(&events, &swapped);
        assert!(
            offenders
                .iter()
                .any(|o| o.contains("token hash was replaced")),
            "{offenders:?}"
        );
    }

    /// Whatever details a caller passes, the admit and settle events say
    /// what the reservation row holds, so audit's replay of a store's own
    /// writes finds nothing (benchmarks seed with bare details).
    #[tokio::test]
    async fn reservation_events_describe_their_rows_whatever_the_caller_adds() {
        let (_d, s) = store().await;
        let key = vec![7; 32];
        let a = s.create_agent(new_agent("busy", "h1")).await.unwrap();
        for n in 0..3 {
            let mut r = reservation(&a.id, n, 100);
            r.details = json!({});
            s.reserve(r).await.unwrap();
        }
        for n in 0..2 {
            s.settle(Settlement {
                reservation_id: format!("rsv_{n}"),
                agent_name: "busy".into(),
                state: if n == 0 { "settled" } else { "released" },
                charge_micro: if n == 0 { 40 } else { 0 },
                overrun_micro: if n == 0 { 5 } else { 0 },
                outcome: "completed".into(),
                prompt_tokens: u64::MAX,
                completion_tokens: 7,
                extra_events: if n == 0 {
                    vec![("overrun", "usage_above_reservation".into(), json!({}))]
                } else {
                    vec![]
                },
                details: serde_json::Value::Null,
            })
            .await
            .unwrap();
        }
        let data = s.audit_data(now_ms()).await.unwrap();
        let mut tally = crate::ledger::audit::LogTally::new(&key);
        for e in s.list_events(EventFilter::default()).await.unwrap() {
            tally.push(&e);
        }
        let (offenders, differing) = tally.reservations_against(&data);
        assert_eq!(offenders, Vec::<String>::new());
        assert_eq!(differing, Vec::<String>::new());
        assert_eq!(data.open_reservation_rows.len(), 1);
    }
}
