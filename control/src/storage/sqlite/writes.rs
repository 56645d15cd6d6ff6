//! The write operations on agents and processes, and denials, each run by
//! the writer thread inside its batch's transaction (see `writer.rs`;
//! reservations are `reserve.rs`, grants `grants.rs`). What to write was
//! decided by the domain (`aex_core::{agent, process}`); here each step is
//! made atomic in SQL, and the decided events appended.

use super::errors::is_unique_violation;
use super::writer::Chain;
use crate::storage::rows::{
    AGENT_COLUMNS, AGENT_SETTABLE_COLUMNS, AgentRow, PROCESS_SELECT, ProcessRow, stored_u64,
};
use crate::storage::{
    AgentChange, AgentRecord, AgentWrite, DenialRecord, ProcessRecord, ProcessState, StoreError,
};
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

pub(super) fn deny(
    conn: &Connection,
    chain: &mut Chain<'_>,
    d: &DenialRecord,
) -> Result<(), StoreError> {
    chain.append(conn, &d.event())
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
    now: i64,
) -> Result<Option<ProcessRecord>, StoreError> {
    if state == ProcessState::Running {
        return Err(StoreError::Invalid(
            "a process ends as exited, killed or lost, not running".into(),
        ));
    }
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
