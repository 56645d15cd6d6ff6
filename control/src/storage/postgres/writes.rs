//! The write operations on agents and processes, and denials, each run by
//! the writer inside its batch's transaction (see `writer.rs`; reservations
//! are `reserve.rs`, grants `grants.rs`). What to write was decided by the
//! domain (`aex_core::{agent, process}`); here each step is one SQL
//! statement where it must be atomic, and the decided events are appended.
//! The same steps as `sqlite/writes.rs`, in PostgreSQL's SQL.

use super::writer::{Chain, Operation, Owner};
use crate::storage::rows::{
    AGENT_COLUMNS, AGENT_SETTABLE_COLUMNS, AgentRow, PROCESS_SELECT, ProcessRow, stored_u64,
};
use crate::storage::{
    AgentChange, AgentRecord, AgentWrite, DenialRecord, ProcessRecord, ProcessState, StoreError,
};
use async_trait::async_trait;
use sqlx::Postgres;
use sqlx::postgres::{PgArguments, PgConnection};
use sqlx::query::Query;

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

/// Binds the settable columns of `a`, in [`AGENT_SETTABLE_COLUMNS`]' order.
fn bind_settable<'q>(q: PgQuery<'q>, a: &'q AgentRecord) -> PgQuery<'q> {
    q.bind(&a.id)
        .bind(&a.token_sha256)
        .bind(&a.token_prefix)
        .bind(a.token_expires_at_ms)
        .bind(a.token_ttl_seconds)
        .bind(a.budget_micro)
        .bind(i64::from(a.rpm))
        .bind(stored_u64(a.tpm))
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
}

/// `$from, $from+1, …` for `n` parameters.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn settable_count() -> usize {
    AGENT_SETTABLE_COLUMNS.split(", ").count()
}

pub(super) struct InsertAgent(pub AgentWrite);

#[async_trait]
impl Operation for InsertAgent {
    type Output = AgentRecord;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.0.agent.id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<AgentRecord, StoreError> {
        let a = &self.0.agent;
        let n = settable_count();
        let sql = format!(
            "INSERT INTO agents ({AGENT_SETTABLE_COLUMNS}, name, created_at_ms) VALUES ({})",
            placeholders(1, n + 2)
        );
        let inserted = bind_settable(sqlx::query(&sql), a)
            .bind(&a.name)
            .bind(a.created_at_ms)
            .execute(&mut *conn)
            .await;
        if let Err(sqlx::Error::Database(db)) = &inserted
            && db.is_unique_violation()
        {
            return Err(match db.constraint() {
                Some("agents_token_sha256_key") => StoreError::Conflict(
                    "another agent already has this token; issue a new one".into(),
                ),
                Some("agents_live_name") => StoreError::DuplicateName(a.name.clone()),
                _ => StoreError::Conflict(format!("agent id {} is taken", a.id)),
            });
        }
        inserted?;
        chain.append_all(&self.0.events);
        super::notify::agent_changed(conn, &a.id).await?;
        Ok(a.clone())
    }
}

pub(super) struct ChangeAgent {
    pub name: String,
    pub change: Box<AgentChange>,
}

#[async_trait]
impl Operation for ChangeAgent {
    type Output = AgentRecord;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::AgentNamed(self.name.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<AgentRecord, StoreError> {
        // FOR UPDATE: decided against the row as committed, and a change
        // from another control plane waits for this one.
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 AND deleted_at_ms IS NULL FOR UPDATE"
        ))
        .bind(&self.name)
        .fetch_optional(&mut *conn)
        .await?;
        let current: AgentRecord = row
            .ok_or_else(|| StoreError::AgentNotFound(self.name.clone()))?
            .try_into()?;
        if !chain.holds(&current.id) {
            // The name moved to another agent (deleted, then created again)
            // between the batch's lookup and its locks.
            return Err(StoreError::Unavailable(format!(
                "agent '{}' was replaced while this change waited; retry it",
                self.name
            )));
        }
        let Some(w) = (self.change)(&current)? else {
            return Ok(current);
        };
        let assignments = AGENT_SETTABLE_COLUMNS
            .split(", ")
            .enumerate()
            .skip(1)
            .map(|(i, column)| format!("{column} = ${}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        bind_settable(
            sqlx::query(&format!("UPDATE agents SET {assignments} WHERE id = $1")),
            &w.agent,
        )
        .execute(&mut *conn)
        .await?;
        chain.append_all(&w.events);
        super::notify::agent_changed(conn, &w.agent.id).await?;
        Ok(w.agent)
    }
}

pub(super) struct Deny(pub DenialRecord);

#[async_trait]
impl Operation for Deny {
    type Output = ();
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.0.agent_id.clone())]
    }
    async fn run(&self, _conn: &mut PgConnection, chain: &mut Chain) -> Result<(), StoreError> {
        chain.append(&self.0.event());
        Ok(())
    }
}

pub(super) struct Extend {
    pub ids: Vec<String>,
    pub expires_at_ms: i64,
}

#[async_trait]
impl Operation for Extend {
    type Output = Vec<String>;
    fn owners(&self) -> Vec<Owner> {
        self.ids.iter().cloned().map(Owner::Reservation).collect()
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        _chain: &mut Chain,
    ) -> Result<Vec<String>, StoreError> {
        let extended: Vec<String> = sqlx::query_scalar(
            "UPDATE reservations SET expires_at_ms = $2 \
             WHERE id = ANY($1) AND state = 'open' RETURNING id",
        )
        .bind(&self.ids)
        .bind(self.expires_at_ms)
        .fetch_all(&mut *conn)
        .await?;
        let extended: std::collections::HashSet<String> = extended.into_iter().collect();
        Ok(self
            .ids
            .iter()
            .filter(|id| !extended.contains(*id))
            .cloned()
            .collect())
    }
}

pub(super) struct StartProcess {
    pub process: ProcessRecord,
    pub ledger_key: Vec<u8>,
}

#[async_trait]
impl Operation for StartProcess {
    type Output = ProcessRecord;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.process.agent_id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<ProcessRecord, StoreError> {
        let p = &self.process;
        sqlx::query(
            "INSERT INTO processes (id, agent_id, token_sha256, pid, command, host, state, started_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&p.id)
        .bind(&p.agent_id)
        .bind(&p.token_sha256)
        .bind(i64::from(p.pid))
        .bind(&p.command)
        .bind(&p.host)
        .bind(ProcessState::Running.as_str())
        .bind(p.started_at_ms)
        .execute(&mut *conn)
        .await?;
        chain.append(&p.started_event(&self.ledger_key));
        // Every control plane lets its token sign in (`refresh_agent`).
        super::notify::agent_changed(conn, &p.agent_id).await?;
        Ok(p.clone())
    }
}

pub(super) struct SetPid {
    pub id: String,
    pub pid: u32,
}

#[async_trait]
impl Operation for SetPid {
    type Output = ();
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Process(self.id.clone())]
    }
    async fn run(&self, conn: &mut PgConnection, _chain: &mut Chain) -> Result<(), StoreError> {
        sqlx::query("UPDATE processes SET pid = $2 WHERE id = $1")
            .bind(&self.id)
            .bind(i64::from(self.pid))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

pub(super) struct RequestKill {
    pub agent_id: String,
    pub reason: String,
}

#[async_trait]
impl Operation for RequestKill {
    type Output = u64;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.agent_id.clone())]
    }
    async fn run(&self, conn: &mut PgConnection, _chain: &mut Chain) -> Result<u64, StoreError> {
        let ordered = sqlx::query(
            "UPDATE processes SET kill_reason = $2 WHERE agent_id = $1 AND state = 'running'",
        )
        .bind(&self.agent_id)
        .bind(&self.reason)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if ordered > 0 {
            // Every control plane tells the supervisors connected to it.
            super::notify::agent_changed(conn, &self.agent_id).await?;
        }
        Ok(ordered)
    }
}

pub(super) struct EndProcess {
    pub id: String,
    pub state: ProcessState,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub now_ms: i64,
}

#[async_trait]
impl Operation for EndProcess {
    type Output = Option<ProcessRecord>;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Process(self.id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<Option<ProcessRecord>, StoreError> {
        if self.state == ProcessState::Running {
            return Err(StoreError::Invalid(
                "a process ends as exited, killed or lost, not running".into(),
            ));
        }
        let now = self.now_ms;
        let ended = sqlx::query(
            "UPDATE processes SET state = $2, ended_at_ms = $3, exit_code = $4, reason = $5 \
             WHERE id = $1 AND state = 'running'",
        )
        .bind(&self.id)
        .bind(self.state.as_str())
        .bind(now)
        .bind(self.exit_code.map(i64::from))
        .bind(&self.reason)
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1;
        if !ended {
            return Ok(None);
        }
        let process: ProcessRecord =
            sqlx::query_as::<_, ProcessRow>(&format!("{PROCESS_SELECT} WHERE p.id = $1"))
                .bind(&self.id)
                .fetch_one(&mut *conn)
                .await?
                .into();
        if let Some(event) = process.ended_event(self.state, self.exit_code, &self.reason, now) {
            chain.append(&event);
        }
        // Every control plane stops letting its token sign in.
        super::notify::agent_changed(conn, &process.agent_id).await?;
        Ok(Some(process))
    }
}
