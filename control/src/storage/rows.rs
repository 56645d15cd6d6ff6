//! Rows as the SQL backends store them (the same columns in SQLite and
//! PostgreSQL), read by sqlx and converted once into the domain's records.
//! SQLite's writer reads the same rows with rusqlite (`sqlite/rows.rs`).

use crate::ledger::fold::{ReservationFacts, ReservationRow as AuditedReservation};
use crate::storage::{
    AgentRecord, AgentState, Caps, EventRecord, ProcessRecord, ReservationRecord, Scope, StoreError,
};
use aex_core::chain::EventBody;
use aex_core::money::Pricing;

pub(in crate::storage) const AGENT_COLUMNS: &str = "id, name, token_sha256, token_prefix, token_expires_at_ms, \
    token_ttl_seconds, budget_micro, spent_micro, reserved_micro, overrun_micro, rpm, tpm, max_concurrent, \
    allowed_models, cap_streaming, cap_tools, cap_function_calling, cap_vision, scope, state, \
    created_at_ms, updated_at_ms, last_activity_at_ms, deleted_at_ms";

/// The columns an admin change may set, in the order each backend binds them;
/// the money columns the hot path moves are not among them.
pub(in crate::storage) const AGENT_SETTABLE_COLUMNS: &str = "id, token_sha256, token_prefix, token_expires_at_ms, \
    token_ttl_seconds, budget_micro, rpm, tpm, max_concurrent, allowed_models, cap_streaming, \
    cap_tools, cap_function_calling, cap_vision, scope, state, updated_at_ms, deleted_at_ms";

/// Provider-reported and configured counts are u64; SQL integers are i64.
/// Past i64::MAX a count is stored saturated, never wrapped negative.
pub(in crate::storage) fn stored_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(sqlx::FromRow)]
pub(in crate::storage) struct AgentRow {
    pub(in crate::storage) id: String,
    pub(in crate::storage) name: String,
    pub(in crate::storage) token_sha256: String,
    pub(in crate::storage) token_prefix: String,
    pub(in crate::storage) token_expires_at_ms: Option<i64>,
    pub(in crate::storage) token_ttl_seconds: i64,
    pub(in crate::storage) budget_micro: i64,
    pub(in crate::storage) spent_micro: i64,
    pub(in crate::storage) reserved_micro: i64,
    pub(in crate::storage) overrun_micro: i64,
    pub(in crate::storage) rpm: i64,
    pub(in crate::storage) tpm: i64,
    pub(in crate::storage) max_concurrent: i64,
    pub(in crate::storage) allowed_models: String,
    pub(in crate::storage) cap_streaming: bool,
    pub(in crate::storage) cap_tools: bool,
    pub(in crate::storage) cap_function_calling: bool,
    pub(in crate::storage) cap_vision: bool,
    pub(in crate::storage) scope: String,
    pub(in crate::storage) state: String,
    pub(in crate::storage) created_at_ms: i64,
    pub(in crate::storage) updated_at_ms: i64,
    pub(in crate::storage) last_activity_at_ms: Option<i64>,
    pub(in crate::storage) deleted_at_ms: Option<i64>,
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

pub(in crate::storage) const EVENT_COLUMNS: &str = "seq, ts_ms, kind, agent_id, agent_name, reservation_id, \
    amount_micro, reason, details, prev_hash, hash";

#[derive(sqlx::FromRow)]
pub(in crate::storage) struct EventRow {
    pub(in crate::storage) seq: i64,
    pub(in crate::storage) ts_ms: i64,
    pub(in crate::storage) kind: String,
    pub(in crate::storage) agent_id: String,
    pub(in crate::storage) agent_name: String,
    pub(in crate::storage) reservation_id: String,
    pub(in crate::storage) amount_micro: i64,
    pub(in crate::storage) reason: String,
    pub(in crate::storage) details: String,
    pub(in crate::storage) prev_hash: String,
    pub(in crate::storage) hash: String,
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
pub(in crate::storage) const PROCESS_SELECT: &str = "SELECT p.id, p.agent_id, COALESCE(a.name, '') AS agent_name, \
    p.token_sha256, p.pid, p.command, p.host, p.state, p.started_at_ms, p.ended_at_ms, p.exit_code, \
    p.reason, p.kill_reason FROM processes p LEFT JOIN agents a ON a.id = p.agent_id";

#[derive(sqlx::FromRow)]
pub(in crate::storage) struct ProcessRow {
    pub(in crate::storage) id: String,
    pub(in crate::storage) agent_id: String,
    pub(in crate::storage) agent_name: String,
    pub(in crate::storage) token_sha256: String,
    pub(in crate::storage) pid: i64,
    pub(in crate::storage) command: String,
    pub(in crate::storage) host: String,
    pub(in crate::storage) state: String,
    pub(in crate::storage) started_at_ms: i64,
    pub(in crate::storage) ended_at_ms: Option<i64>,
    pub(in crate::storage) exit_code: Option<i64>,
    pub(in crate::storage) reason: String,
    pub(in crate::storage) kill_reason: Option<String>,
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

pub(in crate::storage) const RESERVATION_COLUMNS: &str = "id, request_id, agent_id, model, amount_micro, \
    input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, \
    created_at_ms, expires_at_ms, cached_input_pico_per_token, cache_write_pico_per_token";

#[derive(sqlx::FromRow)]
pub(in crate::storage) struct ReservationRow {
    pub(in crate::storage) id: String,
    pub(in crate::storage) request_id: String,
    pub(in crate::storage) agent_id: String,
    pub(in crate::storage) model: String,
    pub(in crate::storage) amount_micro: i64,
    pub(in crate::storage) input_pico_per_token: i64,
    pub(in crate::storage) output_pico_per_token: i64,
    pub(in crate::storage) input_tokens_bound: i64,
    pub(in crate::storage) output_tokens_cap: i64,
    pub(in crate::storage) created_at_ms: i64,
    pub(in crate::storage) expires_at_ms: i64,
    pub(in crate::storage) cached_input_pico_per_token: Option<i64>,
    pub(in crate::storage) cache_write_pico_per_token: Option<i64>,
}

impl From<ReservationRow> for ReservationRecord {
    fn from(r: ReservationRow) -> Self {
        ReservationRecord {
            id: r.id,
            request_id: r.request_id,
            agent_id: r.agent_id,
            model: r.model,
            amount_micro: r.amount_micro,
            pricing: Pricing::with_optional_cache(
                r.input_pico_per_token,
                r.output_pico_per_token,
                r.cached_input_pico_per_token,
                r.cache_write_pico_per_token,
            ),
            input_tokens_bound: r.input_tokens_bound.max(0) as u64,
            output_tokens_cap: r.output_tokens_cap.max(0) as u64,
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
        }
    }
}

pub(in crate::storage) const RESERVATION_AUDIT_COLUMNS: &str = "id, agent_id, request_id, model, amount_micro, \
    input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, state, \
    created_at_ms, settled_at_ms, charged_micro, outcome, prompt_tokens, completion_tokens, overrun_micro, \
    cached_input_pico_per_token, cache_write_pico_per_token, cached_input_tokens, cache_write_tokens";

/// Everything a reservation row holds, for audit.
#[derive(sqlx::FromRow)]
pub(in crate::storage) struct ReservationAuditRow {
    pub(in crate::storage) id: String,
    pub(in crate::storage) agent_id: String,
    pub(in crate::storage) request_id: String,
    pub(in crate::storage) model: String,
    pub(in crate::storage) amount_micro: i64,
    pub(in crate::storage) input_pico_per_token: i64,
    pub(in crate::storage) output_pico_per_token: i64,
    pub(in crate::storage) input_tokens_bound: i64,
    pub(in crate::storage) output_tokens_cap: i64,
    pub(in crate::storage) state: String,
    pub(in crate::storage) created_at_ms: i64,
    pub(in crate::storage) settled_at_ms: Option<i64>,
    pub(in crate::storage) charged_micro: Option<i64>,
    pub(in crate::storage) outcome: Option<String>,
    pub(in crate::storage) prompt_tokens: Option<i64>,
    pub(in crate::storage) completion_tokens: Option<i64>,
    pub(in crate::storage) overrun_micro: i64,
    pub(in crate::storage) cached_input_pico_per_token: Option<i64>,
    pub(in crate::storage) cache_write_pico_per_token: Option<i64>,
    pub(in crate::storage) cached_input_tokens: Option<i64>,
    pub(in crate::storage) cache_write_tokens: Option<i64>,
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
                cached_input_tokens: r.cached_input_tokens.unwrap_or(0),
                cache_write_tokens: r.cache_write_tokens.unwrap_or(0),
                overrun_micro: r.overrun_micro,
            },
            pricing: Pricing::with_optional_cache(
                r.input_pico_per_token,
                r.output_pico_per_token,
                r.cached_input_pico_per_token,
                r.cache_write_pico_per_token,
            ),
        }
    }
}

pub(in crate::storage) const GRANT_COLUMNS: &str = "id, agent_id, data_plane, budget_micro, used_micro, \
    requests, requests_used, created_at_ms, deadline_ms, state, charged_micro";

#[derive(sqlx::FromRow)]
pub(in crate::storage) struct GrantRow {
    pub(in crate::storage) id: String,
    pub(in crate::storage) agent_id: String,
    pub(in crate::storage) data_plane: String,
    pub(in crate::storage) budget_micro: i64,
    pub(in crate::storage) used_micro: i64,
    pub(in crate::storage) requests: Option<i64>,
    pub(in crate::storage) requests_used: i64,
    pub(in crate::storage) created_at_ms: i64,
    pub(in crate::storage) deadline_ms: i64,
    pub(in crate::storage) state: String,
    pub(in crate::storage) charged_micro: i64,
}

impl TryFrom<GrantRow> for crate::storage::GrantRecord {
    type Error = StoreError;
    fn try_from(r: GrantRow) -> Result<Self, StoreError> {
        let count = |n: i64| u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        Ok(crate::storage::GrantRecord {
            state: crate::storage::GrantState::parse(&r.state).ok_or_else(|| {
                StoreError::Corrupt(format!("grant {}: unknown state '{}'", r.id, r.state))
            })?,
            id: r.id,
            agent_id: r.agent_id,
            data_plane: r.data_plane,
            budget_micro: r.budget_micro,
            used_micro: r.used_micro,
            requests: r.requests.map(count),
            requests_used: count(r.requests_used),
            created_at_ms: r.created_at_ms,
            deadline_ms: r.deadline_ms,
            charged_micro: r.charged_micro,
        })
    }
}

pub(in crate::storage) const CREDENTIAL_COLUMNS: &str =
    "id, name, secret_sha256, secret_prefix, agents, created_at_ms, revoked_at_ms";

#[derive(sqlx::FromRow)]
pub(in crate::storage) struct CredentialRow {
    pub(in crate::storage) id: String,
    pub(in crate::storage) name: String,
    pub(in crate::storage) secret_sha256: String,
    pub(in crate::storage) secret_prefix: String,
    pub(in crate::storage) agents: String,
    pub(in crate::storage) created_at_ms: i64,
    pub(in crate::storage) revoked_at_ms: Option<i64>,
}

impl TryFrom<CredentialRow> for crate::storage::CredentialRecord {
    type Error = StoreError;
    fn try_from(r: CredentialRow) -> Result<Self, StoreError> {
        Ok(crate::storage::CredentialRecord {
            agents: serde_json::from_str(&r.agents).map_err(|e| {
                StoreError::Corrupt(format!("credential {}: agents are not a list: {e}", r.id))
            })?,
            id: r.id,
            name: r.name,
            secret_sha256: r.secret_sha256,
            secret_prefix: r.secret_prefix,
            created_at_ms: r.created_at_ms,
            revoked_at_ms: r.revoked_at_ms,
        })
    }
}

/// How a credential's agents are stored (a JSON list, like `allowed_models`).
pub(in crate::storage) fn stored_agents(c: &crate::storage::CredentialRecord) -> String {
    serde_json::to_string(&c.agents).expect("strings serialise")
}
