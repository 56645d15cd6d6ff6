//! Supervised processes (`aexctl run`): the record, its states, and the
//! events that log a process starting and ending.

use crate::chain::token_mac;
use crate::event::{EventKind, NewEvent};
use serde_json::json;

crate::named::named_set! {
    /// The names are the stored form.
    ProcessState {
        Running => "running",
        Exited => "exited",
        /// Its supervisor killed it on an order (budget exhausted, `agent kill`).
        Killed => "killed",
        /// Its supervisor went away without saying how it ended.
        Lost => "lost",
    }
}

impl ProcessState {
    /// The event that ends a process in this state (`None` for running).
    pub fn ending_event(self) -> Option<EventKind> {
        match self {
            ProcessState::Running => None,
            ProcessState::Exited => Some(EventKind::ProcessExited),
            ProcessState::Killed => Some(EventKind::ProcessKilled),
            ProcessState::Lost => Some(EventKind::ProcessLost),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub token_sha256: String,
    pub pid: u32,
    pub command: String,
    pub host: String,
    /// As stored: a row holding a state no AEX writes is shown as it is
    /// (and named by audit), so this stays a string.
    pub state: String,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub reason: String,
    /// A kill order given and not yet carried out.
    pub kill_reason: Option<String>,
}

impl ProcessRecord {
    pub fn state(&self) -> Option<ProcessState> {
        ProcessState::parse(&self.state)
    }

    /// `process.started`, committing to the process's own token.
    pub fn started_event(&self, ledger_key: &[u8]) -> NewEvent {
        NewEvent::about(
            self.started_at_ms,
            EventKind::ProcessStarted,
            &self.agent_id,
            &self.agent_name,
        )
        .details(json!({
            "process_id": self.id, "command": self.command, "host": self.host,
            "token_mac": token_mac(ledger_key, &self.token_sha256),
        }))
    }

    /// The event that ends this (running) process in `state`.
    pub fn ended_event(
        &self,
        state: ProcessState,
        exit_code: Option<i32>,
        reason: &str,
        now: i64,
    ) -> Option<NewEvent> {
        let kind = state.ending_event()?;
        Some(
            NewEvent::about(now, kind, &self.agent_id, &self.agent_name)
                .reason(reason)
                .details(json!({"process_id": self.id, "pid": self.pid, "exit_code": exit_code})),
        )
    }
}
