//! The shared rows (`storage/rows.rs`) as SQLite's writer reads them, with
//! rusqlite, by column position in the shared column lists.

use crate::storage::rows::{AgentRow, CredentialRow, GrantRow, ProcessRow, ReservationRow};

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
            cached_input_pico_per_token: r.get(11)?,
            cache_write_pico_per_token: r.get(12)?,
        })
    }
}

impl GrantRow {
    /// A row selected with [`GRANT_COLUMNS`], in that order.
    pub(super) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            agent_id: r.get(1)?,
            data_plane: r.get(2)?,
            budget_micro: r.get(3)?,
            used_micro: r.get(4)?,
            requests: r.get(5)?,
            requests_used: r.get(6)?,
            created_at_ms: r.get(7)?,
            deadline_ms: r.get(8)?,
            state: r.get(9)?,
            charged_micro: r.get(10)?,
        })
    }
}

impl CredentialRow {
    /// A row selected with [`CREDENTIAL_COLUMNS`], in that order.
    pub(super) fn from_rusqlite(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            name: r.get(1)?,
            secret_sha256: r.get(2)?,
            secret_prefix: r.get(3)?,
            agents: r.get(4)?,
            created_at_ms: r.get(5)?,
            revoked_at_ms: r.get(6)?,
        })
    }
}
