//! Storage behind traits, so that callers never see which database holds
//! the ledger. Every decision — the new row, the events that log it, a
//! reservation's closing state — is made above the store by `aex_core`'s
//! domain (`agent`, `reservation`, `process`, `event`); a backend makes each
//! step atomic and durable and seals the decided events onto the chain with
//! [`aex_core::event::Head::seal`]. SQLite (embedded, the default) is
//! `sqlite/`; `conformance` is what any backend must pass.
//!
//! Where the chain's order comes from: one appender at a time. In SQLite
//! that is its single writer (one thread runs every write, see
//! `sqlite/writer.rs`); another backend must keep the same property (or
//! chain per agent, which the several-nodes issue designs).

mod database;
pub mod postgres;
mod rows;
mod sql_errors;
mod sql_reads;
pub mod sqlite;
#[cfg(test)]
pub mod testing;

use crate::clock::now_ms;
pub use crate::ledger::snapshot::AuditData;
pub use aex_core::agent::{
    AgentPatch, AgentRecord, AgentState, AgentWrite, Caps, InvalidChange, NewAgent, Scope,
    TokenChange,
};
pub use aex_core::credential::{CredentialRecord, CredentialWrite};
pub use aex_core::event::{EventKind, EventRecord, NewEvent};
pub use aex_core::grant::{GrantEnd, GrantOutcome, GrantRecord, GrantState, NewGrant};
pub use aex_core::process::{ProcessRecord, ProcessState};
pub use aex_core::reservation::{
    Closing, DenialRecord, ExtraEvent, Held, NewReservation, Outcome, ReservationRecord,
    ReservationState, ReserveOutcome, Settle, SettleOutcome, Settlement,
};
use async_trait::async_trait;
pub use database::Database;

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Events of agents with this name (a reused name shows both histories).
    pub agent_name: Option<String>,
    pub after_seq: i64,
    pub since_ms: i64,
    pub limit: u32,
    /// Only the events of the call the client saw this `x-aex-request-id`
    /// on (its denial, or its reservation's admit, closing, overruns and
    /// provider answers), with the filters above.
    pub request_id: Option<String>,
}

impl EventFilter {
    /// At most this many events a page: `limit`, 1000 when 0, never past
    /// 10 000.
    pub fn page_size(&self) -> u32 {
        if self.limit == 0 {
            1000
        } else {
            self.limit.min(10_000)
        }
    }

    /// Whether the filter's agent, seq and time keep `e`.
    pub fn matches(&self, e: &EventRecord) -> bool {
        e.body.seq > self.after_seq
            && e.body.ts_ms >= self.since_ms
            && self
                .agent_name
                .as_ref()
                .is_none_or(|n| *n == e.body.agent_name)
    }

    /// `events` (in seq order) as the filter's other fields keep them.
    pub fn keep(&self, events: Vec<EventRecord>) -> Vec<EventRecord> {
        events
            .into_iter()
            .filter(|e| self.matches(e))
            .take(self.page_size() as usize)
            .collect()
    }
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

/// What went wrong, in terms any backend can say; each backend maps its
/// own errors into these (SQLite's: `sqlite/errors.rs`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no agent named '{0}'")]
    AgentNotFound(String),
    #[error("an agent named '{0}' already exists")]
    DuplicateName(String),
    /// A write that collides with what is stored (a reused id, say).
    #[error("{0}")]
    Conflict(String),
    /// The change would break an invariant; nothing was written.
    #[error("{0}")]
    Invalid(String),
    /// The ledger could not commit (or its writer is gone, or the database
    /// is busy); nothing of the operation happened, and retrying it is safe.
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
    #[error("the database holds a value this AEX cannot read: {0}")]
    Corrupt(String),
    /// Anything else the backend reported.
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// A settlement naming another agent than its reservation's: refused by
    /// every store, before anything is written.
    pub fn settled_as_another_agent(st: &Settlement) -> Self {
        StoreError::Invalid(format!(
            "reservation {} does not belong to agent '{}' ({}); settle it as its own agent",
            st.reservation_id, st.agent_name, st.agent_id
        ))
    }
}

impl StoreError {
    /// A live credential has the name (every backend says it this way).
    pub fn duplicate_credential(name: &str) -> Self {
        StoreError::Conflict(format!(
            "a data-plane credential named '{name}' exists; revoke it first \
             (`aexctl dataplane credential revoke {name}`) or choose another name"
        ))
    }
}

impl StoreError {
    /// The head anchor file could not be read or written.
    pub fn anchor(path: &std::path::Path, e: std::io::Error) -> Self {
        StoreError::Unavailable(format!("ledger head anchor {}: {e}", path.display()))
    }
}

impl From<InvalidChange> for StoreError {
    fn from(e: InvalidChange) -> Self {
        StoreError::Invalid(e.0)
    }
}

/// What a store's change feed says changed ([`AgentStore::changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// One agent (by id), or its supervised processes.
    Agent(String),
    /// The feed had a gap: anything may have changed.
    Everything,
    /// models.yaml was reloaded through some control plane.
    ModelsReloaded,
    /// A control plane recalled the agent's (by id) grants: every data
    /// plane must give them back (docs/GRANTS.md).
    GrantsRecalled(String),
    /// A data-plane credential was issued or revoked.
    Credentials,
}

/// See [`AgentStore::changes`].
pub type ChangeFeed = tokio::sync::mpsc::Receiver<StoreChange>;

/// `AdmissionEngine::refresh_agent`'s argument for every agent.
pub const EVERY_AGENT: &str = "*";

/// Decides one change to an agent from its current row: what to write, or
/// `None` for nothing. A backend calls it inside the transaction that reads
/// the row (and may call it again if it retries that transaction).
pub type AgentChange = dyn Fn(&AgentRecord) -> Result<Option<AgentWrite>, StoreError> + Send + Sync;

/// Agents. A backend implements the first five; the changes below are the
/// domain's (`aex_core::agent`), written through `change_agent`.
#[async_trait]
pub trait AgentStore: Send + Sync + 'static {
    /// The key this store seals the chain with; events commit to tokens under it.
    fn ledger_key(&self) -> &[u8];
    /// Writes a new agent and its events; `DuplicateName` if a live agent
    /// has its name.
    async fn insert_agent(&self, write: AgentWrite) -> Result<AgentRecord, StoreError>;
    /// Atomically: reads the live agent `name` (`AgentNotFound`), asks
    /// `change` what to write, writes the row and logs the events. Returns
    /// the agent as it is after.
    async fn change_agent(
        &self,
        name: &str,
        change: Box<AgentChange>,
    ) -> Result<AgentRecord, StoreError>;
    async fn list_agents(&self, include_deleted: bool) -> Result<Vec<AgentRecord>, StoreError>;
    /// A live (not deleted) agent.
    async fn agent_by_name(&self, name: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// The agent with this id, deleted or not.
    async fn agent_by_id(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// The live agent whose token hashes to this (the unique index).
    async fn agent_by_token(&self, token_sha256: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// What the ledger knows of a token no live agent holds: rotated away,
    /// its agent deleted, or a run's (the events that committed to it, by
    /// `details.token_mac`); `None` when it never knew the token.
    async fn retired_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<aex_core::presented::Retired>, StoreError>;

    /// What changed through any control plane on this database (this
    /// one's included), as it commits: agents, their processes, models
    /// reloads; `None` for a store only one control plane uses. After a gap
    /// in the feed (a lost connection) the store sends
    /// [`StoreChange::Everything`].
    async fn changes(&self) -> Result<Option<ChangeFeed>, StoreError> {
        Ok(None)
    }

    /// Tells every control plane on the database that models.yaml was
    /// reloaded here, so that each reloads its own (a store only one
    /// control plane uses has no one to tell).
    async fn announce_models_reloaded(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Tells every control plane on the database to have its data planes
    /// give the agent's grants back (one alone has told its own).
    async fn announce_grants_recalled(&self, _agent_id: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn create_agent(&self, agent: NewAgent) -> Result<AgentRecord, StoreError> {
        let id = aex_core::secrets::new_id("agt");
        let write = aex_core::agent::create(id, agent, now_ms(), self.ledger_key());
        self.insert_agent(write).await
    }

    async fn update_agent(&self, name: &str, patch: AgentPatch) -> Result<AgentRecord, StoreError> {
        self.change_agent(
            name,
            Box::new(move |a| Ok(aex_core::agent::update(a, &patch, now_ms())?)),
        )
        .await
    }

    async fn rotate_token(
        &self,
        name: &str,
        token: TokenChange,
    ) -> Result<AgentRecord, StoreError> {
        let key = self.ledger_key().to_vec();
        self.change_agent(
            name,
            Box::new(move |a| {
                let now = now_ms();
                Ok(Some(aex_core::agent::rotate_token(
                    a,
                    token.clone(),
                    now,
                    &key,
                )))
            }),
        )
        .await
    }

    /// Pause or resume (or delete). Setting the state it already has
    /// changes nothing.
    async fn set_state(&self, name: &str, state: AgentState) -> Result<AgentRecord, StoreError> {
        self.change_agent(
            name,
            Box::new(move |a| Ok(aex_core::agent::set_state(a, state, now_ms()))),
        )
        .await
    }

    /// Tombstones the agent: state `deleted`, token unusable, history kept.
    async fn delete_agent(&self, name: &str) -> Result<AgentRecord, StoreError> {
        self.change_agent(
            name,
            Box::new(|a| Ok(Some(aex_core::agent::delete(a, now_ms())))),
        )
        .await
    }

    /// Pauses the agent and logs `agent.killed`.
    async fn kill_agent(&self, name: &str) -> Result<AgentRecord, StoreError> {
        self.change_agent(
            name,
            Box::new(|a| Ok(Some(aex_core::agent::kill(a, now_ms())))),
        )
        .await
    }
}

/// Rate limiters shared by every control plane on one database, so a limit
/// holds across replicas: requests per minute (the arithmetic of
/// [`aex_core::limiter::Gcra`]) and tokens per minute (of
/// [`aex_core::limiter::TokenBucket`]). Each take is atomic.
#[async_trait]
pub trait SharedRates: Send + Sync + 'static {
    /// Admits one request under `key`'s limit if it allows, recording it;
    /// `Err(wait_ms)` when refused (nothing recorded).
    async fn take(
        &self,
        key: &str,
        per_minute: u32,
        now_ms: i64,
    ) -> Result<aex_core::limiter::Check, StoreError> {
        self.take_n(key, per_minute, 1, now_ms).await
    }
    /// Admits `n` requests at once (a grant's credits), or none.
    async fn take_n(
        &self,
        key: &str,
        per_minute: u32,
        n: u32,
        now_ms: i64,
    ) -> Result<aex_core::limiter::Check, StoreError>;
    /// How many requests `key`'s limit would admit now, at once.
    async fn headroom(&self, key: &str, per_minute: u32, now_ms: i64) -> Result<u32, StoreError>;
    /// Gives back a request taken and not used.
    async fn give_back(&self, key: &str, per_minute: u32) -> Result<(), StoreError> {
        self.give_back_n(key, per_minute, 1).await
    }
    async fn give_back_n(&self, key: &str, per_minute: u32, n: u32) -> Result<(), StoreError>;
    /// Debits `tokens` from `key`'s bucket of `per_minute` if they fit, as
    /// [`aex_core::limiter::TokenBucket::take`]; `Err(wait_ms)` when
    /// refused (nothing debited).
    async fn take_tokens(
        &self,
        key: &str,
        per_minute: u64,
        tokens: u64,
        now_ms: i64,
    ) -> Result<aex_core::limiter::Check, StoreError>;
    /// Corrects an earlier debit by `delta` tokens (negative: a refund), as
    /// [`aex_core::limiter::TokenBucket::adjust`].
    async fn adjust_tokens(
        &self,
        key: &str,
        per_minute: u64,
        delta: i64,
        now_ms: i64,
    ) -> Result<(), StoreError>;
}

/// The hot path: reservations, settlements, denials.
#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Limiters shared with other control planes on the same database;
    /// `None` exactly where one control plane owns the store (its in-memory
    /// limiters and counts are then exact, and admission relies on that).
    fn shared_rates(&self) -> Option<std::sync::Arc<dyn SharedRates>> {
        None
    }

    /// Atomically: returns the reservation already taken for this request
    /// id, or reserves if `budget - spent - reserved` covers the amount and
    /// logs [`aex_core::reservation::admit_event`], or logs
    /// [`aex_core::reservation::budget_denial_event`] and reserves nothing.
    /// No two reservations may both take the last micro, on any number of
    /// nodes.
    async fn reserve(&self, reservation: NewReservation) -> Result<ReserveOutcome, StoreError>;
    /// Closes an open reservation exactly once, however often retried: moves
    /// its amount out of `reserved`, charges [`Settlement::charge_within`]
    /// to `spent`, adds the overrun, stores [`Settlement::final_state`] and
    /// logs [`Settlement::events`].
    async fn settle(&self, settlement: Settlement) -> Result<SettleOutcome, StoreError>;
    /// Every one of `reservations` as [`LedgerStore::reserve`], in order,
    /// as one job of the ledger writer: committed together, each alone (one
    /// that fails leaves the others, and gets its own error). A data
    /// plane's report is a thousand calls at a time; as many jobs, each
    /// with its task and answer, cost the control plane more than the
    /// writes themselves.
    async fn reserve_many(
        &self,
        reservations: Vec<NewReservation>,
    ) -> Vec<Result<ReserveOutcome, StoreError>> {
        let mut done = Vec::with_capacity(reservations.len());
        for n in reservations {
            done.push(self.reserve(n).await);
        }
        done
    }
    /// Every one of `settlements` as [`LedgerStore::settle`], as one job:
    /// see [`LedgerStore::reserve_many`].
    async fn settle_many(
        &self,
        settlements: Vec<Settlement>,
    ) -> Vec<Result<SettleOutcome, StoreError>> {
        let mut done = Vec::with_capacity(settlements.len());
        for st in settlements {
            done.push(self.settle(st).await);
        }
        done
    }
    async fn record_denial(&self, denial: DenialRecord) -> Result<(), StoreError>;
    async fn open_reservations(&self) -> Result<Vec<ReservationRecord>, StoreError>;
    /// The reservation `id` if it is open, whichever control plane admitted
    /// it (one that died leaves its reservations to the others).
    async fn open_reservation(&self, id: &str) -> Result<Option<ReservationRecord>, StoreError> {
        Ok(self
            .open_reservations()
            .await?
            .into_iter()
            .find(|r| r.id == id))
    }
    /// Open reservations whose expiry is at or before `now_ms`, whichever
    /// control plane admitted them.
    async fn due_reservations(&self, now_ms: i64) -> Result<Vec<ReservationRecord>, StoreError> {
        let mut open = self.open_reservations().await?;
        open.retain(|r| r.expires_at_ms <= now_ms);
        Ok(open)
    }
    /// Moves the expiry of the open ones among `ids`; returns the ids that
    /// are not open any more.
    async fn extend_reservations(
        &self,
        ids: &[String],
        expires_at_ms: i64,
    ) -> Result<Vec<String>, StoreError>;
}

/// Grants (docs/GRANTS.md): budget and request credits held
/// for one data plane. A call admitted from one is an ordinary reservation
/// naming it ([`NewReservation::grant_id`], taken by [`LedgerStore::reserve`]).
#[async_trait]
pub trait GrantStore: Send + Sync + 'static {
    /// Atomically: ends `replaces` (returned) if named and open, reads the
    /// agent's free budget (`budget - spent - reserved`) and the other data
    /// planes holding its open grants, sizes the grant
    /// ([`NewGrant::size`]), and if there is one, writes it, adds it to the
    /// agent's `reserved` and logs `grant.issued`.
    async fn issue_grant(&self, grant: NewGrant) -> Result<GrantOutcome, StoreError>;
    /// Ends an open grant exactly once: its unused part leaves `reserved`
    /// (and is charged to `spent` for an expiry under the `charge`
    /// policy); logs `grant.returned` or `grant.expired`. `None` if it was
    /// not open (or not `agent_id`'s).
    async fn end_grant(
        &self,
        grant_id: &str,
        agent_id: &str,
        end: GrantEnd,
        now_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError>;
    /// Open grants, of one agent or of all.
    async fn open_grants(&self, agent_id: Option<&str>) -> Result<Vec<GrantRecord>, StoreError>;
}

/// Data-plane credentials scoped to agents (`aex_core::credential`).
#[async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    /// Writes a new credential and its event; `Conflict` when a live one
    /// has its name (or, astronomically unlikely, its secret). Every
    /// control plane on the database hears of it ([`StoreChange::Credentials`]).
    async fn insert_credential(
        &self,
        write: CredentialWrite,
    ) -> Result<CredentialRecord, StoreError>;
    /// Revokes the live credential `name` and logs it, told to every control
    /// plane like an issue; `None` when no live credential has the name.
    async fn revoke_credential(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Option<CredentialRecord>, StoreError>;
    /// Live credentials, and revoked ones when asked, oldest first.
    async fn list_credentials(
        &self,
        include_revoked: bool,
    ) -> Result<Vec<CredentialRecord>, StoreError>;
}

/// Supervised processes (`aexctl run`).
#[async_trait]
pub trait ProcessStore: Send + Sync + 'static {
    /// Stores a running process and logs [`ProcessRecord::started_event`].
    async fn start_process(&self, process: ProcessRecord) -> Result<ProcessRecord, StoreError>;
    async fn set_process_pid(&self, id: &str, pid: u32) -> Result<(), StoreError>;
    /// Records a kill order on the agent's running processes; how many.
    async fn request_kill(&self, agent_id: &str, reason: &str) -> Result<u64, StoreError>;
    /// Ends a running process and logs [`ProcessRecord::ended_event`];
    /// `None` if it was not running.
    async fn end_process(
        &self,
        id: &str,
        state: ProcessState,
        exit_code: Option<i32>,
        reason: &str,
        now_ms: i64,
    ) -> Result<Option<ProcessRecord>, StoreError>;
    async fn list_processes(&self, include_ended: bool) -> Result<Vec<ProcessRecord>, StoreError>;
}

/// What `events`, `audit`, `status` and `metrics` read.
#[async_trait]
pub trait ReportStore: Send + Sync + 'static {
    async fn list_events(&self, filter: EventFilter) -> Result<Vec<EventRecord>, StoreError>;
    async fn audit_data(&self, now_ms: i64) -> Result<AuditData, StoreError>;
    /// One agent's reservation rows and its events about reservations,
    /// read in one snapshot: audit replays them to name the rows that
    /// differ from the log.
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

/// A whole backend. Every mutation logs its events in its own transaction,
/// so the log and the state can never disagree.
pub trait Store:
    AgentStore + LedgerStore + GrantStore + CredentialStore + ProcessStore + ReportStore
{
}

impl<T: AgentStore + LedgerStore + GrantStore + CredentialStore + ProcessStore + ReportStore> Store
    for T
{
}

/// The results of a ledger job of many items: each item's own or, when the
/// job failed as a whole (nothing of it was committed), that failure for
/// each, as unavailable: sending them again is safe.
pub(crate) fn each_or_all<T>(
    done: Result<Vec<Result<T, StoreError>>, StoreError>,
    items: usize,
) -> Vec<Result<T, StoreError>> {
    match done {
        Ok(each) => each,
        Err(e) => {
            let why = match e {
                StoreError::Unavailable(why) => why,
                other => other.to_string(),
            };
            (0..items)
                .map(|_| Err(StoreError::Unavailable(why.clone())))
                .collect()
        }
    }
}
