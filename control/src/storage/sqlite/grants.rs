//! Grants on SQLite, run by the writer thread inside its batch's
//! transaction like every other write (`writes.rs`): the sizing is the
//! domain's ([`NewGrant::size`]), made atomic here with the agent's amounts.

use super::writer::Chain;
use super::writes::insert_reservation;
use crate::storage::rows::{GRANT_COLUMNS, GrantRow};
use crate::storage::{
    GrantEnd, GrantOutcome, GrantRecord, NewGrant, NewReservation, ReserveOutcome, StoreError,
    now_ms,
};
use aex_core::grant::{carve_call, refused_report_event};
use rusqlite::{Connection, OptionalExtension, params};

fn grant(conn: &Connection, id: &str) -> Result<Option<GrantRecord>, StoreError> {
    conn.prepare_cached(&format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?1"))?
        .query_row([id], GrantRow::from_rusqlite)
        .optional()?
        .map(TryInto::try_into)
        .transpose()
}

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
        end_grant(conn, chain, old, &g.agent_id, GrantEnd::Returned)?;
    }
    let free: Option<i64> = conn
        .prepare_cached(
            "SELECT budget_micro - spent_micro - reserved_micro FROM agents \
             WHERE id = ?1 AND deleted_at_ms IS NULL",
        )?
        .query_row([&g.agent_id], |r| r.get(0))
        .optional()?;
    let Some(free) = free else {
        return Ok(GrantOutcome::Refused(aex_core::grant::NoGrant::Invalid));
    };
    let others: i64 = conn
        .prepare_cached(
            "SELECT COUNT(DISTINCT data_plane) FROM grants \
             WHERE state = 'open' AND agent_id = ?1 AND data_plane <> ?2",
        )?
        .query_row(params![g.agent_id, g.data_plane], |r| r.get(0))?;
    let grant = match g.size(free, u32::try_from(others).unwrap_or(u32::MAX)) {
        Ok(grant) => grant,
        Err(no) => return Ok(GrantOutcome::Refused(no)),
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
) -> Result<Option<GrantRecord>, StoreError> {
    let Some(current) = grant(conn, grant_id)?.filter(|g| g.agent_id == agent_id) else {
        return Ok(None);
    };
    let now = now_ms();
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

/// A call a data plane admitted from a grant: its amount moves from the
/// grant to the reservation (from an expired grant, out of its expiry's
/// charge: [`aex_core::grant::GrantRecord::carved`]).
pub(super) fn reserve_from_grant(
    conn: &Connection,
    chain: &mut Chain<'_>,
    n: &NewReservation,
    grant_id: &str,
) -> Result<ReserveOutcome, StoreError> {
    let r = &n.record;
    let found = grant(conn, grant_id)?;
    let carve = match carve_call(found.as_ref(), grant_id, &r.agent_id, r.amount_micro) {
        Ok(c) => c,
        Err(why) => {
            let logged: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM events \
                     WHERE reservation_id = ?1 AND kind = 'report.refused')",
                )?
                .query_row([&r.id], |row| row.get(0))?;
            if !logged {
                chain.append(conn, &refused_report_event(n, grant_id, &why, now_ms()))?;
            }
            return Ok(ReserveOutcome::GrantNotCovered(why));
        }
    };
    let g = &carve.after;
    conn.prepare_cached(
        "UPDATE grants SET used_micro = ?2, requests_used = ?3, charged_micro = ?4 \
         WHERE id = ?1 AND state = ?5",
    )?
    .execute(params![
        grant_id,
        g.used_micro,
        i64::from(g.requests_used),
        g.charged_micro,
        g.state.as_str(),
    ])?;
    let remaining: i64 = conn
        .prepare_cached(
            "UPDATE agents SET last_activity_at_ms = ?2, reserved_micro = reserved_micro + ?3, \
             spent_micro = spent_micro - ?4 WHERE id = ?1 \
             RETURNING budget_micro - spent_micro - reserved_micro",
        )?
        .query_row(
            params![
                r.agent_id,
                r.created_at_ms,
                carve.reserved_delta,
                carve.uncharged_micro
            ],
            |row| row.get(0),
        )?;
    insert_reservation(conn, chain, &carve.reservation(n))?;
    Ok(ReserveOutcome::Reserved {
        remaining_micro: remaining,
    })
}
