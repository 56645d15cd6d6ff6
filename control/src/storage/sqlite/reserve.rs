//! Reservations on SQLite, run by the writer thread inside its batch's
//! transaction (see `writer.rs`): the store reads what the rule needs,
//! [`aex_core::reserve::decide`] decides, and the take is written here in
//! one place, for calls admitted here and calls reported from a grant alike.
//! The single writer is what makes the read and the write one step.

use super::facts::{funds, grant};
use super::writer::Chain;
use crate::storage::rows::{RESERVATION_COLUMNS, ReservationRow, stored_u64};
use crate::storage::{
    NewReservation, ReservationState, ReserveOutcome, Settle, SettleOutcome, Settlement, StoreError,
};
use aex_core::reservation::Held;
use aex_core::reserve::{Reserve, ReserveRead, Take, counts_open, decide};
use rusqlite::{Connection, OptionalExtension, params};

pub(super) fn reserve(
    conn: &Connection,
    chain: &mut Chain<'_>,
    n: &NewReservation,
) -> Result<ReserveOutcome, StoreError> {
    match decide(n, read(conn, n)?) {
        Reserve::Answer { outcome, event } => {
            if let Some(event) = event {
                chain.append(conn, &event)?;
            }
            Ok(outcome)
        }
        Reserve::NotCovered { why, event } => {
            let logged: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM events \
                     WHERE reservation_id = ?1 AND kind = 'report.refused')",
                )?
                .query_row([&n.record.id], |row| row.get(0))?;
            if !logged {
                chain.append(conn, &event)?;
            }
            Ok(ReserveOutcome::GrantNotCovered(why))
        }
        Reserve::UnknownAgent => Err(StoreError::AgentNotFound(n.agent_name.clone())),
        Reserve::Take(take) => {
            write(conn, chain, &take)?;
            Ok(take.outcome())
        }
    }
}

/// What [`decide`] needs, read in the order it decides: nothing past a
/// request id already reserved.
fn read(conn: &Connection, n: &NewReservation) -> Result<ReserveRead, StoreError> {
    let r = &n.record;
    let existing = conn
        .prepare_cached(&format!(
            "SELECT {RESERVATION_COLUMNS}, state FROM reservations WHERE request_id = ?1"
        ))?
        .query_row([&r.request_id], |row| {
            Ok((
                ReservationRow::from_rusqlite(row)?,
                row.get::<_, String>("state")?,
            ))
        })
        .optional()?;
    if let Some((row, state)) = existing {
        let state = ReservationState::parse(&state).ok_or_else(|| {
            StoreError::Corrupt(format!("reservation {} has state '{state}'", row.id))
        })?;
        return Ok(ReserveRead {
            existing: Some((row.into(), state)),
            ..Default::default()
        });
    }
    let funds = funds(conn, &r.agent_id)?;
    let grant = match &n.grant_id {
        Some(id) => grant(conn, id)?,
        None => None,
    };
    let open: i64 = if counts_open(n) {
        conn.prepare_cached(
            "SELECT COUNT(*) FROM reservations WHERE state = 'open' AND agent_id = ?1",
        )?
        .query_row([&r.agent_id], |row| row.get(0))?
    } else {
        0
    };
    Ok(ReserveRead {
        existing: None,
        funds,
        grant,
        open: open.max(0) as u64,
    })
}

/// The one place a reservation is written: the grant it came from, the
/// agent's amounts, its row, its admit event.
fn write(conn: &Connection, chain: &mut Chain<'_>, take: &Take<'_>) -> Result<(), StoreError> {
    let n = &*take.reservation;
    let r = &n.record;
    if let Some(g) = &take.grant_after {
        conn.prepare_cached(
            "UPDATE grants SET used_micro = ?2, requests_used = ?3, charged_micro = ?4 \
             WHERE id = ?1",
        )?
        .execute(params![
            g.id,
            g.used_micro,
            i64::from(g.requests_used),
            g.charged_micro,
        ])?;
    }
    conn.prepare_cached(
        "UPDATE agents SET reserved_micro = reserved_micro + ?2, spent_micro = spent_micro + ?3, \
         last_activity_at_ms = ?4 WHERE id = ?1",
    )?
    .execute(params![
        r.agent_id,
        take.reserved_delta,
        take.spent_delta,
        r.created_at_ms
    ])?;
    conn.prepare_cached(&format!(
        "INSERT INTO reservations ({RESERVATION_COLUMNS}, state) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
    ))?
    .execute(params![
        r.id,
        r.request_id,
        r.agent_id,
        r.model,
        r.amount_micro,
        r.pricing.input_pico_per_token,
        r.pricing.output_pico_per_token,
        stored_u64(r.input_tokens_bound),
        stored_u64(r.output_tokens_cap),
        r.created_at_ms,
        r.expires_at_ms,
        r.pricing.cached_input_pico_per_token,
        r.pricing.cache_write_pico_per_token,
        ReservationState::Open.as_str(),
    ])?;
    chain.append(conn, &take.event)
}

pub(super) fn settle(
    conn: &Connection,
    chain: &mut Chain<'_>,
    st: &Settlement,
) -> Result<SettleOutcome, StoreError> {
    let found = conn
        .prepare_cached("SELECT agent_id, amount_micro, state FROM reservations WHERE id = ?1")?
        .query_row([&st.reservation_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, String>(2)?))
        })
        .optional()?;
    let held = match found {
        None => None,
        Some((agent_id, amount_micro, state)) => Some(Held {
            agent_id,
            amount_micro,
            state: ReservationState::parse(&state).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "reservation {} has state '{state}'",
                    st.reservation_id
                ))
            })?,
        }),
    };
    let close = match st.decide(held) {
        Settle::Answer(outcome) => return Ok(outcome),
        Settle::AnotherAgent => return Err(StoreError::settled_as_another_agent(st)),
        Settle::Close(close) => close,
    };
    conn.prepare_cached(
        "UPDATE reservations SET state = ?2, settled_at_ms = ?3, charged_micro = ?4, \
         outcome = ?5, prompt_tokens = ?6, completion_tokens = ?7, overrun_micro = ?8, \
         cached_input_tokens = ?9, cache_write_tokens = ?10 WHERE id = ?1",
    )?
    .execute(params![
        st.reservation_id,
        close.state.as_str(),
        st.at_ms,
        close.charge_micro,
        st.closing.as_str(),
        stored_u64(st.usage.input),
        stored_u64(st.usage.output),
        close.overrun_micro,
        stored_u64(st.usage.cached_input),
        stored_u64(st.usage.cache_write),
    ])?;
    // The overrun total saturates: one absurd report must not wrap it.
    let remaining: i64 = conn
        .prepare_cached(
            "UPDATE agents SET reserved_micro = reserved_micro - ?2, \
             spent_micro = spent_micro + ?3, last_activity_at_ms = ?4, \
             overrun_micro = CASE WHEN overrun_micro > 9223372036854775807 - ?5 \
                 THEN 9223372036854775807 ELSE overrun_micro + ?5 END WHERE id = ?1 \
             RETURNING budget_micro - spent_micro - reserved_micro",
        )?
        .query_row(
            params![
                close.agent_id,
                close.reserved_micro,
                close.charge_micro,
                st.at_ms,
                close.overrun_micro
            ],
            |r| r.get(0),
        )?;
    chain.append_all(conn, &close.events)?;
    Ok(SettleOutcome::Settled {
        charged_micro: close.charge_micro,
        remaining_micro: remaining,
    })
}
