//! Grants on SQLite, run by the writer thread inside its batch's
//! transaction like every other write (`writes.rs`): the sizing is the
//! domain's ([`NewGrant::size`]), made atomic here with the agent's amounts.
//! A call carved from a grant is a reservation (`reserve.rs`).

use super::facts::{funds, grant};
use super::writer::Chain;
use crate::storage::rows::GRANT_COLUMNS;
use crate::storage::{GrantEnd, GrantOutcome, GrantRecord, NewGrant, StoreError};
use rusqlite::{Connection, OptionalExtension, params};

fn agent_name(conn: &Connection, agent_id: &str) -> Result<String, StoreError> {
    Ok(conn
        .prepare_cached("SELECT name FROM agents WHERE id = ?1")?
        .query_row([agent_id], |r| r.get(0))
        .optional()?
        .unwrap_or_default())
}

pub(super) fn issue_grant(
    conn: &Connection,
    chain: &mut Chain<'_>,
    g: &NewGrant,
) -> Result<GrantOutcome, StoreError> {
    if let Some(old) = &g.replaces {
        end_grant(
            conn,
            chain,
            old,
            &g.agent_id,
            GrantEnd::Returned,
            g.created_at_ms,
        )?;
    }
    let funds = funds(conn, &g.agent_id)?;
    let others: i64 = conn
        .prepare_cached(
            "SELECT COUNT(DISTINCT data_plane) FROM grants \
             WHERE state = 'open' AND agent_id = ?1 AND data_plane <> ?2",
        )?
        .query_row(params![g.agent_id, g.data_plane], |r| r.get(0))?;
    let grant = match g.decide(funds, u32::try_from(others).unwrap_or(u32::MAX)) {
        GrantOutcome::Issued(grant) => grant,
        refused => return Ok(refused),
    };
    conn.prepare_cached("UPDATE agents SET reserved_micro = reserved_micro + ?2 WHERE id = ?1")?
        .execute(params![g.agent_id, grant.budget_micro])?;
    conn.prepare_cached(&format!(
        "INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        grant.id,
        grant.agent_id,
        grant.data_plane,
        grant.budget_micro,
        grant.used_micro,
        grant.requests.map(i64::from),
        i64::from(grant.requests_used),
        grant.created_at_ms,
        grant.deadline_ms,
        grant.state.as_str(),
        grant.charged_micro,
    ])?;
    chain.append(
        conn,
        &grant.issued_event(&g.agent_name, g.replaces.as_deref()),
    )?;
    Ok(GrantOutcome::Issued(grant))
}

pub(super) fn end_grant(
    conn: &Connection,
    chain: &mut Chain<'_>,
    grant_id: &str,
    agent_id: &str,
    end: GrantEnd,
    now: i64,
) -> Result<Option<GrantRecord>, StoreError> {
    let Some(current) = grant(conn, grant_id)?.filter(|g| g.agent_id == agent_id) else {
        return Ok(None);
    };
    let Some(ending) = current.end(end, &agent_name(conn, agent_id)?, now) else {
        return Ok(None);
    };
    // Compare-and-set on the state: a grant ends once, however often asked.
    let ended =
        conn.prepare_cached(
            "UPDATE grants SET state = ?2, charged_micro = ?3, ended_at_ms = ?4 \
             WHERE id = ?1 AND state = 'open'",
        )?
        .execute(params![
            grant_id,
            ending.after.state.as_str(),
            ending.after.charged_micro,
            now
        ])? == 1;
    if !ended {
        return Ok(None);
    }
    conn.prepare_cached(
        "UPDATE agents SET reserved_micro = reserved_micro + ?2, spent_micro = spent_micro + ?3 \
         WHERE id = ?1",
    )?
    .execute(params![agent_id, ending.reserved_delta, ending.spent_delta])?;
    chain.append(conn, &ending.event)?;
    Ok(Some(ending.after))
}
