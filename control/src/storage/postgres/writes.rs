//! The write operations, each run by the writer inside its batch's
//! transaction (see `writer.rs`). What to write was decided by the domain
//! (`aex_core::{agent, reservation, process}`); here each step is one SQL
//! statement where it must be atomic — the budget check and the take, the
//! close of a reservation as a compare-and-set — and the decided events are
//! appended. The same steps as `sqlite/writes.rs`, in PostgreSQL's SQL.

use super::writer::{Chain, Operation, Owner};
use crate::storage::rows::{
    AGENT_COLUMNS, AGENT_SETTABLE_COLUMNS, AgentRow, PROCESS_SELECT, ProcessRow,
    RESERVATION_COLUMNS, ReservationRow, stored_u64,
};
use crate::storage::{
    AgentChange, AgentRecord, AgentWrite, DenialRecord, NewReservation, ProcessRecord,
    ProcessState, ReservationState, ReserveOutcome, SettleOutcome, Settlement, StoreError, now_ms,
};
use aex_core::reservation::{admit_event, budget_denial_event};
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

#[derive(sqlx::FromRow)]
struct ExistingReservation {
    #[sqlx(flatten)]
    row: ReservationRow,
    state: String,
}

pub(super) struct Reserve(pub NewReservation);

#[async_trait]
impl Operation for Reserve {
    type Output = ReserveOutcome;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.0.record.agent_id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<ReserveOutcome, StoreError> {
        let n = &self.0;
        let r = &n.record;
        if let Some(grant_id) = &n.grant_id {
            let existing: Option<ExistingReservation> = sqlx::query_as(&format!(
                "SELECT {RESERVATION_COLUMNS}, state FROM reservations WHERE request_id = $1"
            ))
            .bind(&r.request_id)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(existing) = existing {
                return Ok(if existing.state == ReservationState::Open.as_str() {
                    ReserveOutcome::AlreadyAdmitted(existing.row.into())
                } else {
                    ReserveOutcome::AlreadyClosed(existing.row.into())
                });
            }
            return super::grants::reserve_from_grant(conn, chain, n, grant_id).await;
        }
        // One statement, one round trip, in the order the outcome is
        // decided: a reservation this request already has; the agent's
        // limit on open reservations (counted under the agent's lock, which
        // every control plane takes before touching its rows, so the count
        // cannot move before this one is inserted); then the budget check
        // and the take together, so no two admissions on any control plane
        // can both take the last micro. The row is inserted only if the
        // budget was taken.
        let decided: Option<(Option<String>, i64, Option<i64>, Option<i64>)> = sqlx::query_as(
            "WITH existing AS (SELECT id FROM reservations WHERE request_id = $2), \
             open_now AS (SELECT COUNT(*) AS n FROM reservations \
             WHERE $13 > 0 AND state = 'open' AND agent_id = $3), \
             taken AS (UPDATE agents SET reserved_micro = reserved_micro + $5, \
             last_activity_at_ms = $11 \
             WHERE id = $3 AND deleted_at_ms IS NULL \
             AND budget_micro - spent_micro - reserved_micro >= $5 \
             AND NOT EXISTS (SELECT 1 FROM existing) \
             AND ($13 = 0 OR (SELECT n FROM open_now) < $13) \
             RETURNING budget_micro - spent_micro - reserved_micro AS remaining), \
             inserted AS (INSERT INTO reservations (id, request_id, agent_id, model, \
             amount_micro, input_pico_per_token, output_pico_per_token, \
             input_tokens_bound, output_tokens_cap, state, created_at_ms, expires_at_ms, \
             cached_input_pico_per_token, cache_write_pico_per_token) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $14, $15 FROM taken) \
             SELECT (SELECT id FROM existing), (SELECT n FROM open_now), \
             (SELECT remaining FROM taken), \
             budget_micro - spent_micro - reserved_micro \
             FROM agents WHERE id = $3",
        )
        .bind(&r.id)
        .bind(&r.request_id)
        .bind(&r.agent_id)
        .bind(&r.model)
        .bind(r.amount_micro)
        .bind(r.pricing.input_pico_per_token)
        .bind(r.pricing.output_pico_per_token)
        .bind(stored_u64(r.input_tokens_bound))
        .bind(stored_u64(r.output_tokens_cap))
        .bind(ReservationState::Open.as_str())
        .bind(r.created_at_ms)
        .bind(r.expires_at_ms)
        .bind(i64::from(n.max_open))
        .bind(r.pricing.cached_input_pico_per_token)
        .bind(r.pricing.cache_write_pico_per_token)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((existing, open, taken, remaining_before)) = decided else {
            return Err(StoreError::AgentNotFound(n.agent_name.clone()));
        };
        if existing.is_some() {
            // A retry: answered with the row as it stands (rare, so read apart).
            let existing: ExistingReservation = sqlx::query_as(&format!(
                "SELECT {RESERVATION_COLUMNS}, state FROM reservations WHERE request_id = $1"
            ))
            .bind(&r.request_id)
            .fetch_one(&mut *conn)
            .await?;
            return Ok(if existing.state == ReservationState::Open.as_str() {
                ReserveOutcome::AlreadyAdmitted(existing.row.into())
            } else {
                ReserveOutcome::AlreadyClosed(existing.row.into())
            });
        }
        if n.max_open > 0 && open >= i64::from(n.max_open) {
            return Ok(ReserveOutcome::TooManyOpen);
        }
        let Some(remaining) = taken else {
            let remaining = remaining_before.unwrap_or(0);
            if n.log_budget_denial {
                chain.append(&budget_denial_event(n, remaining));
            }
            return Ok(ReserveOutcome::InsufficientBudget {
                remaining_micro: remaining,
            });
        };
        chain.append(&admit_event(n));
        Ok(ReserveOutcome::Reserved {
            remaining_micro: remaining,
        })
    }
}

pub(super) struct Settle(pub Settlement);

#[async_trait]
impl Operation for Settle {
    type Output = SettleOutcome;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.0.agent_id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<SettleOutcome, StoreError> {
        let st = &self.0;
        let now = now_ms();
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT agent_id, amount_micro FROM reservations WHERE id = $1")
                .bind(&st.reservation_id)
                .fetch_optional(&mut *conn)
                .await?;
        let Some((agent_id, reserved)) = row else {
            return Ok(SettleOutcome::UnknownReservation);
        };
        if agent_id != st.agent_id {
            // The batch locked the agent the caller named, not this one.
            return Err(StoreError::settled_as_another_agent(st));
        }
        let charge = st.charge_within(reserved);
        let overrun = st.overrun();
        // Compare-and-set: only the first settlement of an open reservation
        // changes anything, however often (and wherever) it is retried; the
        // agent's totals move in the same statement. The overrun total
        // saturates: one absurd report must not overflow it.
        let (closed, remaining): (i64, Option<i64>) = sqlx::query_as(
            "WITH closed AS (UPDATE reservations SET state = $2, settled_at_ms = $3, \
                 charged_micro = $4, outcome = $5, prompt_tokens = $6, completion_tokens = $7, \
                 overrun_micro = $8, cached_input_tokens = $10, cache_write_tokens = $11 \
                 WHERE id = $1 AND state = 'open' RETURNING agent_id), \
             moved AS (UPDATE agents SET reserved_micro = reserved_micro - $9, \
                 spent_micro = spent_micro + $4, last_activity_at_ms = $3, \
                 overrun_micro = CASE WHEN overrun_micro > 9223372036854775807 - $8 \
                     THEN 9223372036854775807 ELSE overrun_micro + $8 END \
                 FROM closed WHERE agents.id = closed.agent_id \
                 RETURNING budget_micro - spent_micro - reserved_micro AS remaining) \
             SELECT (SELECT COUNT(*) FROM closed), (SELECT remaining FROM moved)",
        )
        .bind(&st.reservation_id)
        .bind(st.final_state(charge).as_str())
        .bind(now)
        .bind(charge)
        .bind(st.closing.as_str())
        .bind(stored_u64(st.usage.input))
        .bind(stored_u64(st.usage.output))
        .bind(overrun)
        .bind(reserved)
        .bind(stored_u64(st.usage.cached_input))
        .bind(stored_u64(st.usage.cache_write))
        .fetch_one(&mut *conn)
        .await?;
        if closed == 0 {
            return Ok(SettleOutcome::AlreadyClosed);
        }
        let Some(remaining) = remaining else {
            // Undone with the batch: a reservation is never closed without
            // its agent's totals.
            return Err(StoreError::AgentNotFound(st.agent_name.clone()));
        };
        chain.append_all(&st.events(&agent_id, charge, now));
        Ok(SettleOutcome::Settled {
            charged_micro: charge,
            remaining_micro: remaining,
        })
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
        chain.append(&self.0.event(now_ms()));
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
        let now = now_ms();
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
