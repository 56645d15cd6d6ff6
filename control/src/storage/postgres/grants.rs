//! Grants on PostgreSQL: each operation is owned by its agent, so the batch
//! holds the agent's advisory lock (which every control plane takes before
//! touching the agent's rows) and a read followed by a write cannot race
//! another replica. The same steps as `sqlite/grants.rs`; a call carved from
//! a grant is a reservation (`reserve.rs`).

use super::writer::{Chain, Operation, Owner};
use crate::storage::rows::{GRANT_COLUMNS, GrantRow};
use crate::storage::{GrantEnd, GrantOutcome, GrantRecord, NewGrant, StoreError};
use aex_core::agent::Funds;
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
    now: i64,
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
            end(
                conn,
                chain,
                old,
                &g.agent_id,
                GrantEnd::Returned,
                g.created_at_ms,
            )
            .await?;
        }
        let (free, live, others): (Option<i64>, Option<bool>, i64) = sqlx::query_as(
            "SELECT a.budget_micro - a.spent_micro - a.reserved_micro, a.deleted_at_ms IS NULL, \
             (SELECT COUNT(DISTINCT data_plane) FROM grants \
              WHERE state = 'open' AND agent_id = $1 AND data_plane <> $2) \
             FROM (SELECT 1) AS one LEFT JOIN agents a ON a.id = $1",
        )
        .bind(&g.agent_id)
        .bind(&g.data_plane)
        .fetch_one(&mut *conn)
        .await?;
        let funds = free
            .zip(live)
            .map(|(free_micro, live)| Funds { free_micro, live });
        let grant = match g.decide(funds, u32::try_from(others).unwrap_or(u32::MAX)) {
            GrantOutcome::Issued(grant) => grant,
            refused => return Ok(refused),
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
    pub now_ms: i64,
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
        end(
            conn,
            chain,
            &self.grant_id,
            &self.agent_id,
            self.end,
            self.now_ms,
        )
        .await
    }
}
