//! Grants on PostgreSQL: each operation is owned by its agent, so the batch
//! holds the agent's advisory lock (which every control plane takes before
//! touching the agent's rows) and a read followed by a write cannot race
//! another replica. The same steps as `sqlite/grants.rs`.

use super::writer::{Chain, Operation, Owner};
use crate::storage::rows::{GRANT_COLUMNS, GrantRow, stored_u64};
use crate::storage::{
    GrantEnd, GrantOutcome, GrantRecord, NewGrant, NewReservation, ReservationState,
    ReserveOutcome, StoreError, now_ms,
};
use aex_core::grant::{carve_call, refused_report_event};
use aex_core::reservation::admit_event;
use async_trait::async_trait;
use sqlx::postgres::PgConnection;

async fn grant(conn: &mut PgConnection, id: &str) -> Result<Option<GrantRecord>, StoreError> {
    let row: Option<GrantRow> =
        sqlx::query_as(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    row.map(TryInto::try_into).transpose()
}

async fn end(
    conn: &mut PgConnection,
    chain: &mut Chain,
    grant_id: &str,
    agent_id: &str,
    how: GrantEnd,
) -> Result<Option<GrantRecord>, StoreError> {
    let Some(current) = grant(conn, grant_id)
        .await?
        .filter(|g| g.agent_id == agent_id)
    else {
        return Ok(None);
    };
    let name: Option<(String,)> = sqlx::query_as("SELECT name FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_optional(&mut *conn)
        .await?;
    let now = now_ms();
    let Some(ending) = current.end(how, &name.map(|n| n.0).unwrap_or_default(), now) else {
        return Ok(None);
    };
    // Compare-and-set on the state, the agent's amounts in the same statement.
    let ended: Option<(i64,)> = sqlx::query_as(
        "WITH ended AS (UPDATE grants SET state = $2, charged_micro = $3, ended_at_ms = $4 \
         WHERE id = $1 AND state = 'open' RETURNING agent_id) \
         UPDATE agents SET reserved_micro = reserved_micro + $5, spent_micro = spent_micro + $6 \
         WHERE id = (SELECT agent_id FROM ended) RETURNING 1::BIGINT",
    )
    .bind(grant_id)
    .bind(ending.after.state.as_str())
    .bind(ending.after.charged_micro)
    .bind(now)
    .bind(ending.reserved_delta)
    .bind(ending.spent_delta)
    .fetch_optional(&mut *conn)
    .await?;
    if ended.is_none() {
        return Ok(None);
    }
    chain.append(&ending.event);
    Ok(Some(ending.after))
}

pub(super) struct IssueGrant(pub NewGrant);

#[async_trait]
impl Operation for IssueGrant {
    type Output = GrantOutcome;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.0.agent_id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<GrantOutcome, StoreError> {
        let g = &self.0;
        if let Some(old) = &g.replaces {
            end(conn, chain, old, &g.agent_id, GrantEnd::Returned).await?;
        }
        let read: Option<(i64, i64)> = sqlx::query_as(
            "SELECT budget_micro - spent_micro - reserved_micro, \
             (SELECT COUNT(DISTINCT data_plane) FROM grants \
              WHERE state = 'open' AND agent_id = $1 AND data_plane <> $2) \
             FROM agents WHERE id = $1 AND deleted_at_ms IS NULL",
        )
        .bind(&g.agent_id)
        .bind(&g.data_plane)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((free, others)) = read else {
            return Ok(GrantOutcome::Refused(aex_core::grant::NoGrant::Invalid));
        };
        let grant = match g.size(free, u32::try_from(others).unwrap_or(u32::MAX)) {
            Ok(grant) => grant,
            Err(no) => return Ok(GrantOutcome::Refused(no)),
        };
        sqlx::query(&format!(
            "WITH held AS (UPDATE agents SET reserved_micro = reserved_micro + $4 WHERE id = $2) \
             INSERT INTO grants ({GRANT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&grant.id)
        .bind(&grant.agent_id)
        .bind(&grant.data_plane)
        .bind(grant.budget_micro)
        .bind(grant.used_micro)
        .bind(grant.requests.map(i64::from))
        .bind(i64::from(grant.requests_used))
        .bind(grant.created_at_ms)
        .bind(grant.deadline_ms)
        .bind(grant.state.as_str())
        .bind(grant.charged_micro)
        .execute(&mut *conn)
        .await?;
        chain.append(&grant.issued_event(&g.agent_name, g.replaces.as_deref()));
        Ok(GrantOutcome::Issued(grant))
    }
}

pub(super) struct EndGrant {
    pub grant_id: String,
    pub agent_id: String,
    pub end: GrantEnd,
}

#[async_trait]
impl Operation for EndGrant {
    type Output = Option<GrantRecord>;
    fn owners(&self) -> Vec<Owner> {
        vec![Owner::Agent(self.agent_id.clone())]
    }
    async fn run(
        &self,
        conn: &mut PgConnection,
        chain: &mut Chain,
    ) -> Result<Option<GrantRecord>, StoreError> {
        end(conn, chain, &self.grant_id, &self.agent_id, self.end).await
    }
}

/// A call a data plane admitted from a grant (the request id was checked
/// first by `Reserve`): its amount moves from the grant's unused part to
/// the reservation; the agent's `reserved` stays.
pub(super) async fn reserve_from_grant(
    conn: &mut PgConnection,
    chain: &mut Chain,
    n: &NewReservation,
    grant_id: &str,
) -> Result<ReserveOutcome, StoreError> {
    let r = &n.record;
    let found = grant(conn, grant_id).await?;
    let carve = match carve_call(found.as_ref(), grant_id, &r.agent_id, r.amount_micro) {
        Ok(c) => c,
        Err(why) => {
            // The batch holds the agent's lock: no other replica logs it
            // between this read and the commit.
            let logged: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM events \
                 WHERE reservation_id = $1 AND kind = 'report.refused')",
            )
            .bind(&r.id)
            .fetch_one(&mut *conn)
            .await?;
            if !logged && !chain.refused(&r.id) {
                chain.append(&refused_report_event(n, grant_id, &why, now_ms()));
            }
            return Ok(ReserveOutcome::GrantNotCovered(why));
        }
    };
    let carved = &carve.after;
    let (remaining,): (i64,) = sqlx::query_as(
        "WITH carved AS (UPDATE grants SET used_micro = $13, requests_used = $14, \
         charged_micro = $18 WHERE id = $15 AND state = $19), \
         inserted AS (INSERT INTO reservations (id, request_id, agent_id, model, \
         amount_micro, input_pico_per_token, output_pico_per_token, \
         input_tokens_bound, output_tokens_cap, state, created_at_ms, expires_at_ms, \
         cached_input_pico_per_token, cache_write_pico_per_token) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $16, $17)) \
         UPDATE agents SET last_activity_at_ms = $11, reserved_micro = reserved_micro + $20, \
         spent_micro = spent_micro - $21 WHERE id = $3 \
         RETURNING budget_micro - spent_micro - reserved_micro",
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
    .bind(carved.used_micro)
    .bind(i64::from(carved.requests_used))
    .bind(grant_id)
    .bind(r.pricing.cached_input_pico_per_token)
    .bind(r.pricing.cache_write_pico_per_token)
    .bind(carved.charged_micro)
    .bind(carved.state.as_str())
    .bind(carve.reserved_delta)
    .bind(carve.uncharged_micro)
    .fetch_one(&mut *conn)
    .await?;
    chain.append(&admit_event(&carve.reservation(n)));
    Ok(ReserveOutcome::Reserved {
        remaining_micro: remaining,
    })
}
