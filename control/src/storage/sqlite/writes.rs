//! The write operations, each run by the writer thread inside its batch's
//! transaction (see `writer.rs`). What to write was decided by the domain
//! (`aex_core::{agent, reservation, process}`); here each step is made
//! atomic in SQL, and the decided events appended.

use super::errors::is_unique_violation;
use super::writer::Chain;
use crate::storage::rows::{
    AGENT_COLUMNS, AGENT_SETTABLE_COLUMNS, AgentRow, PROCESS_SELECT, ProcessRow,
    RESERVATION_COLUMNS, ReservationRow, stored_u64,
};
use crate::storage::{
    AgentChange, AgentRecord, AgentWrite, DenialRecord, NewReservation, ProcessRecord,
    ProcessState, ReservationState, ReserveOutcome, SettleOutcome, Settlement, StoreError, now_ms,
};
use aex_core::reservation::{admit_event, budget_denial_event};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

pub(super) fn insert_agent(
    conn: &Connection,
    chain: &mut Chain<'_>,
    w: &AgentWrite,
) -> Result<AgentRecord, StoreError> {
    let a = &w.agent;
    // The settable columns as `?1..?18`, then what only an insert sets.
    let inserted = conn
        .prepare_cached(&format!(
            "INSERT INTO agents ({AGENT_SETTABLE_COLUMNS}, name, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
        ))?
        .execute(params_from_iter(settable_values(a).into_iter().chain([
            Value::from(a.name.clone()),
            Value::from(a.created_at_ms),
        ])));
    match inserted {
        Err(e) if is_unique_violation(&e) && e.to_string().contains("agents.token_sha256") => {
            return Err(StoreError::Conflict(
                "another agent already has this token; issue a new one".into(),
            ));
        }
        Err(e) if is_unique_violation(&e) => return Err(StoreError::DuplicateName(a.name.clone())),
        other => other?,
    };
    chain.append_all(conn, &w.events)?;
    Ok(w.agent.clone())
}

pub(super) fn change_agent(
    conn: &Connection,
    chain: &mut Chain<'_>,
    name: &str,
    change: &AgentChange,
) -> Result<AgentRecord, StoreError> {
    let current: AgentRecord = conn
        .prepare_cached(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE name = ?1 AND deleted_at_ms IS NULL"
        ))?
        .query_row([name], AgentRow::from_rusqlite)
        .optional()?
        .ok_or_else(|| StoreError::AgentNotFound(name.to_string()))?
        .try_into()?;
    let Some(w) = change(&current)? else {
        return Ok(current);
    };
    save_agent(conn, &w.agent)?;
    chain.append_all(conn, &w.events)?;
    Ok(w.agent)
}

fn settable_values(a: &AgentRecord) -> [Value; 18] {
    [
        a.id.clone().into(),
        a.token_sha256.clone().into(),
        a.token_prefix.clone().into(),
        a.token_expires_at_ms.into(),
        a.token_ttl_seconds.into(),
        a.budget_micro.into(),
        i64::from(a.rpm).into(),
        stored_u64(a.tpm).into(),
        i64::from(a.max_concurrent).into(),
        serde_json::to_string(&a.allowed_models)
            .expect("strings serialise")
            .into(),
        a.caps.streaming.into(),
        a.caps.tools.into(),
        a.caps.function_calling.into(),
        a.caps.vision.into(),
        a.scope.as_str().to_string().into(),
        a.state.as_str().to_string().into(),
        a.updated_at_ms.into(),
        a.deleted_at_ms.into(),
    ]
}

/// Writes every settable column of `a` back to its row.
fn save_agent(conn: &Connection, a: &AgentRecord) -> Result<(), StoreError> {
    let assignments = AGENT_SETTABLE_COLUMNS
        .split(", ")
        .enumerate()
        .skip(1)
        .map(|(i, column)| format!("{column} = ?{}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    conn.prepare_cached(&format!("UPDATE agents SET {assignments} WHERE id = ?1"))?
        .execute(params_from_iter(settable_values(a)))?;
    Ok(())
}

pub(super) fn reserve(
    conn: &Connection,
    chain: &mut Chain<'_>,
    n: &NewReservation,
) -> Result<ReserveOutcome, StoreError> {
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
    if let Some((existing, state)) = existing {
        return Ok(if state == ReservationState::Open.as_str() {
            ReserveOutcome::AlreadyAdmitted(existing.into())
        } else {
            ReserveOutcome::AlreadyClosed(existing.into())
        });
    }
    if let Some(grant_id) = &n.grant_id {
        return super::grants::reserve_from_grant(conn, chain, n, grant_id);
    }
    if n.max_open > 0 {
        let open: i64 = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM reservations WHERE state = 'open' AND agent_id = ?1",
            )?
            .query_row([&r.agent_id], |row| row.get(0))?;
        if open >= i64::from(n.max_open) {
            return Ok(ReserveOutcome::TooManyOpen);
        }
    }
    // The budget check and the reservation are one statement, so no two
    // admissions can both take the last micro.
    let taken: Option<i64> = conn
        .prepare_cached(
            "UPDATE agents SET reserved_micro = reserved_micro + ?1, last_activity_at_ms = ?3 \
             WHERE id = ?2 AND deleted_at_ms IS NULL \
             AND budget_micro - spent_micro - reserved_micro >= ?1 \
             RETURNING budget_micro - spent_micro - reserved_micro",
        )?
        .query_row(
            params![r.amount_micro, r.agent_id, r.created_at_ms],
            |row| row.get(0),
        )
        .optional()?;
    let Some(remaining) = taken else {
        let remaining: i64 = conn
            .prepare_cached(
                "SELECT budget_micro - spent_micro - reserved_micro FROM agents WHERE id = ?1",
            )?
            .query_row([&r.agent_id], |row| row.get(0))?;
        if n.log_budget_denial {
            chain.append(conn, &budget_denial_event(n, remaining))?;
        }
        return Ok(ReserveOutcome::InsufficientBudget {
            remaining_micro: remaining,
        });
    };
    insert_reservation(conn, chain, n)?;
    Ok(ReserveOutcome::Reserved {
        remaining_micro: remaining,
    })
}

/// Stores an open reservation and logs its admit event.
pub(super) fn insert_reservation(
    conn: &Connection,
    chain: &mut Chain<'_>,
    n: &NewReservation,
) -> Result<(), StoreError> {
    let r = &n.record;
    conn.prepare_cached(
        "INSERT INTO reservations (id, request_id, agent_id, model, amount_micro, \
         input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, \
         state, created_at_ms, expires_at_ms, cached_input_pico_per_token, cache_write_pico_per_token) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
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
        ReservationState::Open.as_str(),
        r.created_at_ms,
        r.expires_at_ms,
        r.pricing.cached_input_pico_per_token,
        r.pricing.cache_write_pico_per_token,
    ])?;
    chain.append(conn, &admit_event(n))?;
    Ok(())
}

pub(super) fn settle(
    conn: &Connection,
    chain: &mut Chain<'_>,
    st: &Settlement,
) -> Result<SettleOutcome, StoreError> {
    let now = now_ms();
    let row: Option<(String, i64)> = conn
        .prepare_cached("SELECT agent_id, amount_micro FROM reservations WHERE id = ?1")?
        .query_row([&st.reservation_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((agent_id, reserved)) = row else {
        return Ok(SettleOutcome::UnknownReservation);
    };
    if agent_id != st.agent_id {
        return Err(StoreError::settled_as_another_agent(st));
    }
    let charge = st.charge_within(reserved);
    let overrun = st.overrun();
    // Compare-and-set: only the first settlement of an open reservation
    // changes anything, however often it is retried.
    let closed =
        conn.prepare_cached(
            "UPDATE reservations SET state = ?2, settled_at_ms = ?3, charged_micro = ?4, \
             outcome = ?5, prompt_tokens = ?6, completion_tokens = ?7, overrun_micro = ?8, \
             cached_input_tokens = ?9, cache_write_tokens = ?10 WHERE id = ?1 AND state = 'open'",
        )?
        .execute(params![
            st.reservation_id,
            st.final_state(charge).as_str(),
            now,
            charge,
            st.closing.as_str(),
            stored_u64(st.usage.input),
            stored_u64(st.usage.output),
            overrun,
            stored_u64(st.usage.cached_input),
            stored_u64(st.usage.cache_write),
        ])? == 1;
    if !closed {
        return Ok(SettleOutcome::AlreadyClosed);
    }
    // The overrun total saturates: one absurd report must not wrap it.
    let remaining: i64 = conn
        .prepare_cached(
            "UPDATE agents SET reserved_micro = reserved_micro - ?2, \
             spent_micro = spent_micro + ?3, last_activity_at_ms = ?4, \
             overrun_micro = CASE WHEN overrun_micro > 9223372036854775807 - ?5 \
                 THEN 9223372036854775807 ELSE overrun_micro + ?5 END WHERE id = ?1 \
             RETURNING budget_micro - spent_micro - reserved_micro",
        )?
        .query_row(params![agent_id, reserved, charge, now, overrun], |r| {
            r.get(0)
        })?;
    chain.append_all(conn, &st.events(&agent_id, charge, now))?;
    Ok(SettleOutcome::Settled {
        charged_micro: charge,
        remaining_micro: remaining,
    })
}

pub(super) fn deny(
    conn: &Connection,
    chain: &mut Chain<'_>,
    d: &DenialRecord,
) -> Result<(), StoreError> {
    chain.append(conn, &d.event(now_ms()))
}

pub(super) fn extend_reservations(
    conn: &Connection,
    ids: &[String],
    expires_at_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let mut closed = Vec::new();
    let mut extend = conn.prepare_cached(
        "UPDATE reservations SET expires_at_ms = ?2 WHERE id = ?1 AND state = 'open'",
    )?;
    for id in ids {
        if extend.execute(params![id, expires_at_ms])? == 0 {
            closed.push(id.clone());
        }
    }
    Ok(closed)
}

pub(super) fn start_process(
    conn: &Connection,
    chain: &mut Chain<'_>,
    p: &ProcessRecord,
    ledger_key: &[u8],
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO processes (id, agent_id, token_sha256, pid, command, host, state, started_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        p.id,
        p.agent_id,
        p.token_sha256,
        i64::from(p.pid),
        p.command,
        p.host,
        ProcessState::Running.as_str(),
        p.started_at_ms,
    ])?;
    chain.append(conn, &p.started_event(ledger_key))
}

pub(super) fn set_process_pid(conn: &Connection, id: &str, pid: u32) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE processes SET pid = ?2 WHERE id = ?1")?
        .execute(params![id, i64::from(pid)])?;
    Ok(())
}

/// Records a kill order on the agent's running processes; how many.
pub(super) fn request_kill(
    conn: &Connection,
    agent_id: &str,
    reason: &str,
) -> Result<u64, StoreError> {
    let ordered = conn
        .prepare_cached(
            "UPDATE processes SET kill_reason = ?2 WHERE agent_id = ?1 AND state = 'running'",
        )?
        .execute(params![agent_id, reason])?;
    Ok(ordered as u64)
}

pub(super) fn end_process(
    conn: &Connection,
    chain: &mut Chain<'_>,
    id: &str,
    state: ProcessState,
    exit_code: Option<i32>,
    reason: &str,
) -> Result<Option<ProcessRecord>, StoreError> {
    if state == ProcessState::Running {
        return Err(StoreError::Invalid(
            "a process ends as exited, killed or lost, not running".into(),
        ));
    }
    let now = now_ms();
    let ended =
        conn.prepare_cached(
            "UPDATE processes SET state = ?2, ended_at_ms = ?3, exit_code = ?4, reason = ?5 \
             WHERE id = ?1 AND state = 'running'",
        )?
        .execute(params![
            id,
            state.as_str(),
            now,
            exit_code.map(i64::from),
            reason
        ])? == 1;
    if !ended {
        return Ok(None);
    }
    let process: ProcessRecord = conn
        .prepare_cached(&format!("{PROCESS_SELECT} WHERE p.id = ?1"))?
        .query_row([id], ProcessRow::from_rusqlite)?
        .into();
    if let Some(event) = process.ended_event(state, exit_code, reason, now) {
        chain.append(conn, &event)?;
    }
    Ok(Some(process))
}
