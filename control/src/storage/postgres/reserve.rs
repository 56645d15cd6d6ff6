//! Reservations on PostgreSQL. Each operation is owned by its agent, so
//! its batch holds the agent's advisory lock (which every control plane
//! takes before touching the agent's rows): what it reads cannot move
//! before it writes, on any replica. The store reads what the rule needs,
//! [`aex_core::reserve::decide`] decides, and the take is written in one
//! statement, in one place for calls admitted here and calls reported
//! from a grant alike. The same steps as `sqlite/reserve.rs`.

use super::writer::{Chain, Operation, Owner};
use crate::storage::rows::{
    GRANT_COLUMNS, GrantRow, RESERVATION_COLUMNS, ReservationRow, stored_u64,
};
use crate::storage::{
    NewReservation, ReservationState, ReserveOutcome, Settle as Decided, SettleOutcome, Settlement,
    StoreError,
};
use aex_core::agent::Funds;
use aex_core::reservation::Held;
use aex_core::reserve::{Reserve as Decision, ReserveRead, Take, counts_open, decide};
use async_trait::async_trait;
use sqlx::postgres::PgConnection;
use sqlx::{FromRow, Row};

#[derive(sqlx::FromRow)]
struct ExistingReservation {
    #[sqlx(flatten)]
    row: ReservationRow,
    state: String,
}

fn state(id: &str, state: &str) -> Result<ReservationState, StoreError> {
    ReservationState::parse(state)
        .ok_or_else(|| StoreError::Corrupt(format!("reservation {id} has state '{state}'")))
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
        match decide(n, read(conn, n).await?) {
            Decision::Answer { outcome, event } => {
                if let Some(event) = event {
                    chain.append(&event);
                }
                Ok(outcome)
            }
            Decision::NotCovered { why, event } => {
                let logged: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events \
                     WHERE reservation_id = $1 AND kind = 'report.refused')",
                )
                .bind(&n.record.id)
                .fetch_one(&mut *conn)
                .await?;
                if !logged && !chain.refused(&n.record.id) {
                    chain.append(&event);
                }
                Ok(ReserveOutcome::GrantNotCovered(why))
            }
            Decision::UnknownAgent => Err(StoreError::AgentNotFound(n.agent_name.clone())),
            Decision::Take(take) => {
                write(conn, &take).await?;
                chain.append(&take.event);
                Ok(take.outcome())
            }
        }
    }
}

/// What [`decide`] reads, in one statement: whether the request id has a
/// reservation, the agent's amounts, its open reservations (when the rule
/// counts them) and the grant a reported call names (when it names one).
/// The grant's columns keep their own names, so its row reads as any
/// grant's.
static READ: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let grant: Vec<String> = GRANT_COLUMNS
        .split(", ")
        .map(|c| format!("g.{c}"))
        .collect();
    format!(
        "SELECT (SELECT id FROM reservations WHERE request_id = $1) AS existing_id, \
         a.budget_micro - a.spent_micro - a.reserved_micro AS free_micro, \
         a.deleted_at_ms IS NULL AS live, \
         CASE WHEN $3 THEN (SELECT COUNT(*) FROM reservations \
             WHERE state = 'open' AND agent_id = $2) ELSE 0 END AS open_count, {} \
         FROM (SELECT 1) AS one LEFT JOIN agents a ON a.id = $2 \
         LEFT JOIN grants g ON g.id = $4",
        grant.join(", ")
    )
});

/// What [`decide`] needs, in one round trip ([`READ`]); the existing row
/// (a retry, rare) in one more.
async fn read(conn: &mut PgConnection, n: &NewReservation) -> Result<ReserveRead, StoreError> {
    let r = &n.record;
    let row = sqlx::query(&READ)
        .bind(&r.request_id)
        .bind(&r.agent_id)
        .bind(counts_open(n))
        .bind(n.grant_id.as_deref())
        .fetch_one(&mut *conn)
        .await?;
    let existing: Option<String> = row.try_get("existing_id")?;
    if existing.is_some() {
        let found: ExistingReservation = sqlx::query_as(&format!(
            "SELECT {RESERVATION_COLUMNS}, state FROM reservations WHERE request_id = $1"
        ))
        .bind(&r.request_id)
        .fetch_one(&mut *conn)
        .await?;
        let state = state(&found.row.id, &found.state)?;
        return Ok(ReserveRead {
            existing: Some((found.row.into(), state)),
            ..Default::default()
        });
    }
    let free: Option<i64> = row.try_get("free_micro")?;
    let live: Option<bool> = row.try_get("live")?;
    let open: i64 = row.try_get("open_count")?;
    let grant = match row.try_get::<Option<String>, _>("id")? {
        Some(_) => Some(GrantRow::from_row(&row)?.try_into()?),
        None => None,
    };
    Ok(ReserveRead {
        existing: None,
        funds: free
            .zip(live)
            .map(|(free_micro, live)| Funds { free_micro, live }),
        grant,
        open: open.max(0) as u64,
    })
}

/// The one place a reservation is written: the grant it came from (none
/// matches a NULL id), the agent's amounts and its row, in one statement.
async fn write(conn: &mut PgConnection, take: &Take<'_>) -> Result<(), StoreError> {
    let r = &take.reservation.record;
    let g = take.grant_after.as_ref();
    sqlx::query(&format!(
        "WITH carved AS (UPDATE grants SET used_micro = $15, requests_used = $16, \
             charged_micro = $17 WHERE id = $18), \
         moved AS (UPDATE agents SET reserved_micro = reserved_micro + $19, \
             spent_micro = spent_micro + $20, last_activity_at_ms = $10 WHERE id = $3) \
         INSERT INTO reservations ({RESERVATION_COLUMNS}, state) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
    ))
    .bind(&r.id)
    .bind(&r.request_id)
    .bind(&r.agent_id)
    .bind(&r.model)
    .bind(r.amount_micro)
    .bind(r.pricing.input_pico_per_token)
    .bind(r.pricing.output_pico_per_token)
    .bind(stored_u64(r.input_tokens_bound))
    .bind(stored_u64(r.output_tokens_cap))
    .bind(r.created_at_ms)
    .bind(r.expires_at_ms)
    .bind(r.pricing.cached_input_pico_per_token)
    .bind(r.pricing.cache_write_pico_per_token)
    .bind(ReservationState::Open.as_str())
    .bind(g.map_or(0, |g| g.used_micro))
    .bind(g.map_or(0, |g| i64::from(g.requests_used)))
    .bind(g.map_or(0, |g| g.charged_micro))
    .bind(g.map(|g| g.id.as_str()))
    .bind(take.reserved_delta)
    .bind(take.spent_delta)
    .execute(&mut *conn)
    .await?;
    Ok(())
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
        let found: Option<(String, i64, String)> =
            sqlx::query_as("SELECT agent_id, amount_micro, state FROM reservations WHERE id = $1")
                .bind(&st.reservation_id)
                .fetch_optional(&mut *conn)
                .await?;
        let held = match found {
            None => None,
            Some((agent_id, amount_micro, s)) => Some(Held {
                agent_id,
                amount_micro,
                state: state(&st.reservation_id, &s)?,
            }),
        };
        let close = match st.decide(held) {
            Decided::Answer(outcome) => return Ok(outcome),
            // The batch locked the agent the caller named, not this one.
            Decided::AnotherAgent => return Err(StoreError::settled_as_another_agent(st)),
            Decided::Close(close) => close,
        };
        // The agent's totals move in the same statement as the close. The
        // overrun total saturates: one absurd report must not overflow it.
        let remaining: Option<i64> = sqlx::query_scalar(
            "WITH closed AS (UPDATE reservations SET state = $2, settled_at_ms = $3, \
                 charged_micro = $4, outcome = $5, prompt_tokens = $6, completion_tokens = $7, \
                 overrun_micro = $8, cached_input_tokens = $10, cache_write_tokens = $11 \
                 WHERE id = $1 RETURNING agent_id) \
             UPDATE agents SET reserved_micro = reserved_micro - $9, \
                 spent_micro = spent_micro + $4, last_activity_at_ms = $3, \
                 overrun_micro = CASE WHEN overrun_micro > 9223372036854775807 - $8 \
                     THEN 9223372036854775807 ELSE overrun_micro + $8 END \
                 FROM closed WHERE agents.id = closed.agent_id \
                 RETURNING budget_micro - spent_micro - reserved_micro",
        )
        .bind(&st.reservation_id)
        .bind(close.state.as_str())
        .bind(st.at_ms)
        .bind(close.charge_micro)
        .bind(st.closing.as_str())
        .bind(stored_u64(st.usage.input))
        .bind(stored_u64(st.usage.output))
        .bind(close.overrun_micro)
        .bind(close.reserved_micro)
        .bind(stored_u64(st.usage.cached_input))
        .bind(stored_u64(st.usage.cache_write))
        .fetch_optional(&mut *conn)
        .await?;
        let Some(remaining) = remaining else {
            // Undone with the batch: a reservation is never closed without
            // its agent's totals.
            return Err(StoreError::AgentNotFound(st.agent_name.clone()));
        };
        chain.append_all(&close.events);
        Ok(SettleOutcome::Settled {
            charged_micro: close.charge_micro,
            remaining_micro: remaining,
        })
    }
}
