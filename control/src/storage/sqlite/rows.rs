//! Rows as SQLite stores them, read by sqlx (the reader pool) or rusqlite
//! (the writer), and converted once into the domain's records.

use crate::ledger::fold::{ReservationFacts, ReservationRow as AuditedReservation};
use crate::storage::{
    AgentRecord, AgentState, Caps, EventRecord, ProcessRecord, ReservationRecord, Scope, StoreError,
};
use aex_core::chain::EventBody;
use aex_core::money::Pricing;

pub(super) const AGENT_COLUMNS: &str = "id, name, token_sha256, token_prefix, token_expires_at_ms, \
    token_ttl_seconds, budget_micro, spent_micro, reserved_micro, overrun_micro, rpm, tpm, max_concurrent, \
    allowed_models, cap_streaming, cap_tools, cap_function_calling, cap_vision, scope, state, \
    created_at_ms, updated_at_ms, last_activity_at_ms, deleted_at_ms";

#[derive(sqlx::FromRow)]
pub(super) struct AgentRow {
    id: String,
    name: String,
    token_sha256: String,
    token_prefix: String,
    token_expires_at_ms: Option<i64>,
    token_ttl_seconds: i64,
    budget_micro: i64,
    spent_micro: i64,
    reserved_micro: i64,
    overrun_micro: i64,
    rpm: i64,
    tpm: i64,
    max_concurrent: i64,
    allowed_models: String,
    cap_streaming: bool,
    cap_tools: bool,
    cap_function_calling: bool,
    cap_vision: bool,
    scope: String,
    state: String,
    created_at_ms: i64,
    updated_at_ms: i64,
    last_activity_at_ms: Option<i64>,
    deleted_at_ms: Option<i64>,
}

impl AgentRow {
    /// A row selected with [`AGENT_COLUMNS`], in that order.
    pub(super) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            name: r.get(1)?,
            token_sha256: r.get(2)?,
            token_prefix: r.get(3)?,
            token_expires_at_ms: r.get(4)?,
            token_ttl_seconds: r.get(5)?,
            budget_micro: r.get(6)?,
            spent_micro: r.get(7)?,
            reserved_micro: r.get(8)?,
            overrun_micro: r.get(9)?,
            rpm: r.get(10)?,
            tpm: r.get(11)?,
            max_concurrent: r.get(12)?,
            allowed_models: r.get(13)?,
            cap_streaming: r.get(14)?,
            cap_tools: r.get(15)?,
            cap_function_calling: r.get(16)?,
            cap_vision: r.get(17)?,
            scope: r.get(18)?,
            state: r.get(19)?,
            created_at_ms: r.get(20)?,
            updated_at_ms: r.get(21)?,
            last_activity_at_ms: r.get(22)?,
            deleted_at_ms: r.get(23)?,
        })
    }
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;
    fn try_from(r: AgentRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("agent {}: {what}", r.id));
        Ok(AgentRecord {
            allowed_models: serde_json::from_str(&r.allowed_models)
                .map_err(|_| corrupt("allowed_models"))?,
            scope: Scope::parse(&r.scope).ok_or_else(|| corrupt("scope"))?,
            state: AgentState::parse(&r.state).ok_or_else(|| corrupt("state"))?,
            rpm: u32::try_from(r.rpm).map_err(|_| corrupt("rpm"))?,
            tpm: u64::try_from(r.tpm).map_err(|_| corrupt("tpm"))?,
            max_concurrent: u32::try_from(r.max_concurrent)
                .map_err(|_| corrupt("max_concurrent"))?,
            caps: Caps {
                streaming: r.cap_streaming,
                tools: r.cap_tools,
                function_calling: r.cap_function_calling,
                vision: r.cap_vision,
            },
            id: r.id,
            name: r.name,
            token_sha256: r.token_sha256,
            token_prefix: r.token_prefix,
            token_expires_at_ms: r.token_expires_at_ms,
            token_ttl_seconds: r.token_ttl_seconds,
            budget_micro: r.budget_micro,
            spent_micro: r.spent_micro,
            reserved_micro: r.reserved_micro,
            overrun_micro: r.overrun_micro,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            last_activity_at_ms: r.last_activity_at_ms,
            deleted_at_ms: r.deleted_at_ms,
        })
    }
}

pub(super) const EVENT_COLUMNS: &str = "seq, ts_ms, kind, agent_id, agent_name, reservation_id, \
    amount_micro, reason, details, prev_hash, hash";

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    seq: i64,
    ts_ms: i64,
    kind: String,
    agent_id: String,
    agent_name: String,
    reservation_id: String,
    amount_micro: i64,
    reason: String,
    details: String,
    prev_hash: String,
    hash: String,
}

impl From<EventRow> for EventRecord {
    fn from(r: EventRow) -> Self {
        EventRecord {
            body: EventBody {
                seq: r.seq,
                ts_ms: r.ts_ms,
                kind: r.kind,
                agent_id: r.agent_id,
                agent_name: r.agent_name,
                reservation_id: r.reservation_id,
                amount_micro: r.amount_micro,
                reason: r.reason,
                details_json: r.details,
            },
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

// A LEFT JOIN: a process row naming no agent is shown (and audited), not hidden.
pub(super) const PROCESS_SELECT: &str = "SELECT p.id, p.agent_id, COALESCE(a.name, '') AS agent_name, \
    p.token_sha256, p.pid, p.command, p.host, p.state, p.started_at_ms, p.ended_at_ms, p.exit_code, \
    p.reason, p.kill_reason FROM processes p LEFT JOIN agents a ON a.id = p.agent_id";

#[derive(sqlx::FromRow)]
pub(super) struct ProcessRow {
    id: String,
    agent_id: String,
    agent_name: String,
    token_sha256: String,
    pid: i64,
    command: String,
    host: String,
    state: String,
    started_at_ms: i64,
    ended_at_ms: Option<i64>,
    exit_code: Option<i64>,
    reason: String,
    kill_reason: Option<String>,
}

impl ProcessRow {
    /// A row selected with [`PROCESS_SELECT`].
    pub(super) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            agent_id: r.get(1)?,
            agent_name: r.get(2)?,
            token_sha256: r.get(3)?,
            pid: r.get(4)?,
            command: r.get(5)?,
            host: r.get(6)?,
            state: r.get(7)?,
            started_at_ms: r.get(8)?,
            ended_at_ms: r.get(9)?,
            exit_code: r.get(10)?,
            reason: r.get(11)?,
            kill_reason: r.get(12)?,
        })
    }
}

impl From<ProcessRow> for ProcessRecord {
    fn from(r: ProcessRow) -> Self {
        ProcessRecord {
            id: r.id,
            agent_id: r.agent_id,
            agent_name: r.agent_name,
            token_sha256: r.token_sha256,
            pid: r.pid.clamp(0, i64::from(u32::MAX)) as u32,
            command: r.command,
            host: r.host,
            state: r.state,
            started_at_ms: r.started_at_ms,
            ended_at_ms: r.ended_at_ms,
            exit_code: r.exit_code.map(|c| c as i32),
            reason: r.reason,
            kill_reason: r.kill_reason,
        }
    }
}

pub(super) const RESERVATION_COLUMNS: &str = "id, request_id, agent_id, model, amount_micro, \
    input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, \
    created_at_ms, expires_at_ms";

#[derive(sqlx::FromRow)]
pub(super) struct ReservationRow {
    id: String,
    request_id: String,
    agent_id: String,
    model: String,
    amount_micro: i64,
    input_pico_per_token: i64,
    output_pico_per_token: i64,
    input_tokens_bound: i64,
    output_tokens_cap: i64,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl ReservationRow {
    /// A row selected with [`RESERVATION_COLUMNS`].
    pub(super) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            request_id: r.get(1)?,
            agent_id: r.get(2)?,
            model: r.get(3)?,
            amount_micro: r.get(4)?,
            input_pico_per_token: r.get(5)?,
            output_pico_per_token: r.get(6)?,
            input_tokens_bound: r.get(7)?,
            output_tokens_cap: r.get(8)?,
            created_at_ms: r.get(9)?,
            expires_at_ms: r.get(10)?,
        })
    }
}

impl From<ReservationRow> for ReservationRecord {
    fn from(r: ReservationRow) -> Self {
        ReservationRecord {
            id: r.id,
            request_id: r.request_id,
            agent_id: r.agent_id,
            model: r.model,
            amount_micro: r.amount_micro,
            pricing: Pricing {
                input_pico_per_token: r.input_pico_per_token,
                output_pico_per_token: r.output_pico_per_token,
            },
            input_tokens_bound: r.input_tokens_bound.max(0) as u64,
            output_tokens_cap: r.output_tokens_cap.max(0) as u64,
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
        }
    }
}

pub(super) const RESERVATION_AUDIT_COLUMNS: &str = "id, agent_id, request_id, model, amount_micro, \
    input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, state, \
    created_at_ms, settled_at_ms, charged_micro, outcome, prompt_tokens, completion_tokens, overrun_micro";

/// Everything a reservation row holds, for audit.
#[derive(sqlx::FromRow)]
pub(super) struct ReservationAuditRow {
    pub(super) id: String,
    agent_id: String,
    request_id: String,
    model: String,
    amount_micro: i64,
    input_pico_per_token: i64,
    output_pico_per_token: i64,
    input_tokens_bound: i64,
    output_tokens_cap: i64,
    state: String,
    created_at_ms: i64,
    settled_at_ms: Option<i64>,
    charged_micro: Option<i64>,
    outcome: Option<String>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    overrun_micro: i64,
}

impl From<ReservationAuditRow> for AuditedReservation {
    fn from(r: ReservationAuditRow) -> Self {
        Self {
            facts: ReservationFacts {
                id: r.id,
                agent_id: r.agent_id,
                request_id: r.request_id,
                model: r.model,
                amount_micro: r.amount_micro,
                input_tokens_bound: r.input_tokens_bound,
                output_tokens_cap: r.output_tokens_cap,
                created_at_ms: r.created_at_ms,
                state: r.state,
                settled_at_ms: r.settled_at_ms,
                charged_micro: r.charged_micro,
                outcome: r.outcome,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                overrun_micro: r.overrun_micro,
            },
            pricing: Pricing {
                input_pico_per_token: r.input_pico_per_token,
                output_pico_per_token: r.output_pico_per_token,
            },
        }
    }
}
