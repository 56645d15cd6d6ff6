//! Storage behind a trait, so that callers never see which database holds
//! the ledger. SQLite (embedded, the default) now; the SQL is written to run
//! unchanged on PostgreSQL (`$N` parameters, no SQLite-only syntax).

pub mod sqlite;
mod sqlite_anchor;
mod sqlite_baseline;
mod sqlite_ledger;

use aex_core::chain::EventBody;
use async_trait::async_trait;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Execution,
    ReadOnly,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Execution => "execution",
            Scope::ReadOnly => "read-only",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "execution" => Some(Scope::Execution),
            "read-only" => Some(Scope::ReadOnly),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Active,
    Paused,
    Deleted,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Active => "active",
            AgentState::Paused => "paused",
            AgentState::Deleted => "deleted",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(AgentState::Active),
            "paused" => Some(AgentState::Paused),
            "deleted" => Some(AgentState::Deleted),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub streaming: bool,
    pub tools: bool,
    pub function_calling: bool,
    pub vision: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub token_sha256: String,
    pub token_prefix: String,
    pub token_expires_at_ms: Option<i64>,
    pub token_ttl_seconds: i64,
    pub budget_micro: i64,
    pub spent_micro: i64,
    pub reserved_micro: i64,
    /// Provider-reported usage beyond reservations, never charged.
    pub overrun_micro: i64,
    pub rpm: u32,
    pub tpm: u64,
    pub max_concurrent: u32,
    pub allowed_models: Vec<String>,
    pub caps: Caps,
    pub scope: Scope,
    pub state: AgentState,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_activity_at_ms: Option<i64>,
    pub deleted_at_ms: Option<i64>,
}

impl AgentRecord {
    pub fn remaining_micro(&self) -> i64 {
        self.budget_micro - self.spent_micro - self.reserved_micro
    }
}

#[derive(Debug, Clone)]
pub struct NewAgent {
    pub name: String,
    pub token_sha256: String,
    pub token_prefix: String,
    pub token_expires_at_ms: Option<i64>,
    pub token_ttl_seconds: i64,
    pub budget_micro: i64,
    pub rpm: u32,
    pub tpm: u64,
    pub max_concurrent: u32,
    pub allowed_models: Vec<String>,
    pub caps: Caps,
    pub scope: Scope,
}

/// Only the fields that are `Some` change.
#[derive(Debug, Clone, Default)]
pub struct AgentPatch {
    pub budget_micro: Option<i64>,
    pub top_up_micro: Option<i64>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub allowed_models: Option<Vec<String>>,
    pub streaming: Option<bool>,
    pub tools: Option<bool>,
    pub function_calling: Option<bool>,
    pub vision: Option<bool>,
    pub scope: Option<Scope>,
}

impl AgentPatch {
    pub fn is_empty(&self) -> bool {
        self.budget_micro.is_none()
            && self.top_up_micro.is_none()
            && self.rpm.is_none()
            && self.tpm.is_none()
            && self.max_concurrent.is_none()
            && self.allowed_models.is_none()
            && self.streaming.is_none()
            && self.tools.is_none()
            && self.function_calling.is_none()
            && self.vision.is_none()
            && self.scope.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenChange {
    pub token_sha256: String,
    pub token_prefix: String,
    pub token_expires_at_ms: Option<i64>,
    pub token_ttl_seconds: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub body: EventBody,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Events of agents with this name (a reused name shows both histories).
    pub agent_name: Option<String>,
    pub after_seq: i64,
    pub since_ms: i64,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationRecord {
    pub id: String,
    pub request_id: String,
    pub agent_id: String,
    pub model: String,
    pub amount_micro: i64,
    pub pricing: aex_core::money::Pricing,
    pub input_tokens_bound: u64,
    pub output_tokens_cap: u64,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A reservation to take, and the admit event's particulars.
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub record: ReservationRecord,
    pub agent_name: String,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved {
        remaining_micro: i64,
    },
    /// Nothing was reserved; a `deny` event with reason `budget` was logged.
    InsufficientBudget {
        remaining_micro: i64,
    },
    /// The request id was already admitted: this is that reservation.
    AlreadyAdmitted(ReservationRecord),
}

/// How a reservation ends.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub reservation_id: String,
    pub agent_name: String,
    /// `settled` (charged), `released` (nothing charged) or `expired`.
    pub state: &'static str,
    pub charge_micro: i64,
    /// Reported usage beyond the reservation (not charged).
    pub overrun_micro: i64,
    pub outcome: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Extra events to log with it, e.g. an overrun or an upstream denial.
    pub extra_events: Vec<(&'static str, String, serde_json::Value)>,
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Settled {
        charged_micro: i64,
        remaining_micro: i64,
    },
    /// Settled, released or expired before; nothing changed.
    AlreadyClosed,
    UnknownReservation,
}

/// A refused request, for the ledger.
#[derive(Debug, Clone)]
pub struct DenialRecord {
    pub agent_id: String,
    pub agent_name: String,
    pub reason: String,
    pub details: serde_json::Value,
    /// Denials this record stands for: 1, or a window of unauthenticated
    /// ones aggregated into one event (`details.count` says so too).
    pub count: u64,
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
    /// running | exited | killed | lost
    pub state: String,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub reason: String,
    /// A kill ordered and not yet carried out.
    pub kill_reason: Option<String>,
}

/// Raw material for `aexctl audit`; the checks themselves are pure
/// (`ledger::audit`).
#[derive(Debug, Clone, Default)]
pub struct AuditData {
    /// Every agent, deleted ones included.
    pub agents: Vec<AgentRecord>,
    /// Sum of open reservations per agent id.
    pub open_reserved: std::collections::HashMap<String, i64>,
    /// Sum of charged amounts (settle and expire events) per agent id.
    /// Filled from the log by [`crate::ledger::audit::LogTally`] while the
    /// chain is verified, not by the store.
    pub charged: std::collections::HashMap<String, i64>,
    /// Sum of overrun events' amounts per agent id (filled by the tally).
    pub overrun_logged: std::collections::HashMap<String, i64>,
    /// Open reservations past their expiry: (reservation id, agent id, expired at).
    pub overdue: Vec<(String, String, i64)>,
    /// (agent id, counter name) → value, from the counters table.
    pub counters: std::collections::HashMap<(String, String), i64>,
    /// (agent id, counter name) → events of that kind in the log (filled
    /// by the tally, like `charged`).
    pub event_counts: std::collections::HashMap<(String, String), i64>,
    /// The anchor file as read just before the snapshot (None: the store
    /// keeps no anchor), and the hash of the event at its seq in the snapshot.
    pub anchor: Option<crate::ledger::anchor::AnchorState>,
    /// The open reservation rows, compared one by one with the log.
    pub open_reservation_rows: Vec<crate::ledger::fold::ReservationRow>,
    /// The closed reservation rows, digested per agent (see
    /// `ledger::fold::reservations`): the history is never held in memory.
    pub closed_reservations: crate::ledger::fold::ClosedDigest,
    /// Every supervised process, ended ones included.
    pub processes: Vec<ProcessRecord>,
    pub hash_at_anchor: Option<String>,
    /// The newest event when the rest was read: everything above is one
    /// snapshot, and the audit checks the log up to this event.
    pub last_seq: i64,
}

/// Totals for `aexctl status`, from counters (never a scan of the log).
#[derive(Debug, Clone, Default)]
pub struct StatusTotals {
    pub agents: u32,
    pub total_budget_micro: i64,
    pub total_spent_micro: i64,
    pub total_reserved_micro: i64,
    pub total_overrun_micro: i64,
    /// Counter name → total over all agents.
    pub counters: std::collections::HashMap<String, i64>,
    pub open_reservations: u64,
    pub running_processes: u64,
}

/// Per-agent activity inside a time window, for `aexctl metrics`.
#[derive(Debug, Clone, Default)]
pub struct AgentActivity {
    pub charged_in_window: i64,
    pub admitted_last_minute: u32,
    pub admitted: i64,
    pub denied: i64,
}

/// The counter an event bumps: its kind, and for denials the rule too.
pub fn counter_name(kind: &str, reason: &str) -> String {
    if kind == "deny" {
        format!("deny:{reason}")
    } else {
        kind.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no agent named '{0}'")]
    AgentNotFound(String),
    #[error("an agent named '{0}' already exists")]
    DuplicateName(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The ledger could not commit (or its writer is gone); nothing of the
    /// operation happened, and retrying it is safe.
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database holds a value this AEX cannot read: {0}")]
    Corrupt(String),
}

/// Every mutation appends its event to the chain in the same transaction,
/// so the log and the state can never disagree.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_agent(&self, agent: NewAgent) -> Result<AgentRecord, StoreError>;
    async fn list_agents(&self, include_deleted: bool) -> Result<Vec<AgentRecord>, StoreError>;
    /// A live (not deleted) agent.
    async fn agent_by_name(&self, name: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// The live agent whose token hashes to `token_sha256`, if any.
    async fn agent_by_token(&self, token_sha256: &str) -> Result<Option<AgentRecord>, StoreError>;
    async fn update_agent(&self, name: &str, patch: AgentPatch) -> Result<AgentRecord, StoreError>;
    async fn rotate_token(&self, name: &str, token: TokenChange)
    -> Result<AgentRecord, StoreError>;
    /// Pause or resume. Setting the state it already has changes nothing.
    async fn set_state(&self, name: &str, state: AgentState) -> Result<AgentRecord, StoreError>;
    /// Tombstones the agent: state `deleted`, token unusable, history kept.
    async fn delete_agent(&self, name: &str) -> Result<AgentRecord, StoreError>;
    async fn list_events(&self, filter: EventFilter) -> Result<Vec<EventRecord>, StoreError>;

    /// Atomically: reserve if `budget - spent - reserved` covers the amount
    /// (else log the budget denial), insert the reservation, log the admit.
    async fn reserve(&self, reservation: NewReservation) -> Result<ReserveOutcome, StoreError>;
    /// Closes an open reservation exactly once: moves its amount out of
    /// `reserved` and charges `charge_micro` to `spent`.
    async fn settle(&self, settlement: Settlement) -> Result<SettleOutcome, StoreError>;
    async fn record_denial(&self, denial: DenialRecord) -> Result<(), StoreError>;
    async fn open_reservations(&self) -> Result<Vec<ReservationRecord>, StoreError>;
    /// Moves the expiry of the open ones among `ids`; returns the ids that
    /// are not open any more.
    async fn extend_reservations(
        &self,
        ids: &[String],
        expires_at_ms: i64,
    ) -> Result<Vec<String>, StoreError>;

    /// Pauses the agent and logs `agent.killed`.
    async fn kill_agent(&self, name: &str) -> Result<AgentRecord, StoreError>;
    async fn start_process(&self, process: ProcessRecord) -> Result<ProcessRecord, StoreError>;
    async fn set_process_pid(&self, id: &str, pid: u32) -> Result<(), StoreError>;
    /// Records a kill order on the agent's running processes; how many.
    async fn request_kill(&self, agent_id: &str, reason: &str) -> Result<u64, StoreError>;
    /// Ends a running process (`exited`, `killed` or `lost`) and logs it;
    /// `None` if it was not running.
    async fn end_process(
        &self,
        id: &str,
        state: &'static str,
        exit_code: Option<i32>,
        reason: &str,
    ) -> Result<Option<ProcessRecord>, StoreError>;
    async fn list_processes(&self, include_ended: bool) -> Result<Vec<ProcessRecord>, StoreError>;

    async fn audit_data(&self, now_ms: i64) -> Result<AuditData, StoreError>;
    /// One agent's reservation rows and its events, read in one snapshot:
    /// audit replays them to name the rows that differ from the log.
    async fn reservation_history(
        &self,
        agent_id: &str,
    ) -> Result<(Vec<crate::ledger::fold::ReservationRow>, Vec<EventRecord>), StoreError>;
    async fn status_totals(&self) -> Result<StatusTotals, StoreError>;
    /// Activity per agent id since `window_start_ms` (charges) and
    /// `minute_start_ms` (admissions).
    async fn activity(
        &self,
        window_start_ms: i64,
        minute_start_ms: i64,
    ) -> Result<std::collections::HashMap<String, AgentActivity>, StoreError>;
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
