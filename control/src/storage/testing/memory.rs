//! A store held in memory, for tests: the whole contract (it runs the
//! conformance suite) with none of a database's I/O, so property tests can
//! drive thousands of admissions through the real admission code, and edit
//! the log directly to see that audit catches it.
//!
//! Every operation runs under one lock, which makes each atomic and gives
//! the chain its one appender, as SQLite's writer thread does. The head is
//! also kept apart from the log after each write (the anchor), as the
//! anchored SQLite store keeps it in `ledger.head`: an edit of the log alone
//! cannot move it.

use crate::clock::now_ms;
use crate::ledger::anchor::{Anchor, AnchorState};
use crate::ledger::fold::{ClosedDigest, ReservationFacts, ReservationRow};
use crate::storage::rows::stored_u64;
use crate::storage::{
    AgentActivity, AgentChange, AgentRecord, AgentStore, AgentWrite, AuditData, CredentialRecord,
    CredentialStore, CredentialWrite, DenialRecord, EventFilter, EventKind, EventRecord, GrantEnd,
    GrantOutcome, GrantRecord, GrantState, GrantStore, LedgerStore, NewEvent, NewGrant,
    NewReservation, ProcessRecord, ProcessState, ProcessStore, ReportStore, ReservationRecord,
    ReservationState, ReserveOutcome, Settle, SettleOutcome, Settlement, StatusTotals, StoreError,
};
use aex_core::agent::Funds;
use aex_core::chain::{ChainKey, GENESIS};
use aex_core::event::Head;
use aex_core::reservation::Held;
use aex_core::reserve::{Reserve, ReserveRead, Take, counts_open, decide};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

pub struct MemoryStore {
    ledger_key: Vec<u8>,
    chain_key: ChainKey,
    tables: Mutex<Tables>,
}

#[derive(Default)]
struct Tables {
    /// In creation order, deleted ones included.
    agents: Vec<AgentRecord>,
    reservations: HashMap<String, StoredReservation>,
    /// Request id → reservation id.
    by_request: HashMap<String, String>,
    processes: Vec<ProcessRecord>,
    grants: HashMap<String, GrantRecord>,
    /// In issue order, revoked ones included.
    credentials: Vec<CredentialRecord>,
    events: Vec<EventRecord>,
    /// (agent id, counter name) → value.
    counters: HashMap<(String, String), i64>,
    /// Where the next event goes: the chain as this store last wrote it,
    /// whatever has been done to `events` since.
    head: Option<Head>,
}

#[derive(Debug, Clone)]
struct StoredReservation {
    row: ReservationRow,
    expires_at_ms: i64,
}

impl StoredReservation {
    fn is_open(&self) -> bool {
        self.row.facts.state == ReservationState::Open.as_str()
    }

    fn record(&self) -> ReservationRecord {
        let f = &self.row.facts;
        ReservationRecord {
            id: f.id.clone(),
            request_id: f.request_id.clone(),
            agent_id: f.agent_id.clone(),
            model: f.model.clone(),
            amount_micro: f.amount_micro,
            pricing: self.row.pricing,
            input_tokens_bound: f.input_tokens_bound as u64,
            output_tokens_cap: f.output_tokens_cap as u64,
            created_at_ms: f.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

impl Tables {
    fn head(&self) -> Head {
        self.head.clone().unwrap_or_else(Head::genesis)
    }

    fn append(&mut self, key: &ChainKey, events: &[NewEvent]) {
        let mut head = self.head();
        for event in events {
            let sealed = head.seal(key, event);
            let counter = (sealed.body.agent_id.clone(), event.counter_name());
            *self.counters.entry(counter).or_default() += event.count;
            self.events.push(sealed);
        }
        self.head = Some(head);
    }

    /// What [`decide`] needs, as the SQL stores read it.
    fn reserve_read(&self, n: &NewReservation) -> ReserveRead {
        let r = &n.record;
        if let Some(existing) = self.by_request.get(&r.request_id) {
            let existing = &self.reservations[existing];
            let state = ReservationState::parse(&existing.row.facts.state)
                .expect("the store writes only known states");
            return ReserveRead {
                existing: Some((existing.record(), state)),
                ..Default::default()
            };
        }
        let funds = self
            .agents
            .iter()
            .find(|a| a.id == r.agent_id)
            .map(|a| Funds {
                free_micro: a.remaining_micro(),
                live: a.deleted_at_ms.is_none(),
            });
        let grant = n
            .grant_id
            .as_ref()
            .and_then(|id| self.grants.get(id))
            .cloned();
        let open = if counts_open(n) {
            self.reservations
                .values()
                .filter(|o| o.is_open() && o.row.facts.agent_id == r.agent_id)
                .count() as u64
        } else {
            0
        };
        ReserveRead {
            existing: None,
            funds,
            grant,
            open,
        }
    }

    /// The grant it came from, the agent's amounts, the reservation's row
    /// and its admit event.
    fn write_take(&mut self, key: &ChainKey, take: &Take<'_>) -> Result<(), StoreError> {
        let r = &take.reservation.record;
        if self.reservations.contains_key(&r.id) {
            return Err(StoreError::Conflict(format!(
                "reservation id {} is taken",
                r.id
            )));
        }
        if let Some(g) = &take.grant_after {
            self.grants.insert(g.id.clone(), g.clone());
        }
        let agent = self.agent(&r.agent_id).expect("decided with its funds");
        agent.reserved_micro += take.reserved_delta;
        agent.spent_micro += take.spent_delta;
        agent.last_activity_at_ms = Some(r.created_at_ms);
        let stored = StoredReservation {
            row: ReservationRow {
                facts: ReservationFacts {
                    id: r.id.clone(),
                    agent_id: r.agent_id.clone(),
                    request_id: r.request_id.clone(),
                    model: r.model.clone(),
                    amount_micro: r.amount_micro,
                    input_tokens_bound: stored_u64(r.input_tokens_bound),
                    output_tokens_cap: stored_u64(r.output_tokens_cap),
                    created_at_ms: r.created_at_ms,
                    state: ReservationState::Open.as_str().into(),
                    ..Default::default()
                },
                pricing: r.pricing,
            },
            expires_at_ms: r.expires_at_ms,
        };
        self.by_request.insert(r.request_id.clone(), r.id.clone());
        self.reservations.insert(r.id.clone(), stored);
        self.append(key, std::slice::from_ref(&take.event));
        Ok(())
    }

    /// Data planes other than `data_plane` holding open grants of the agent.
    fn other_data_planes(&self, agent_id: &str, data_plane: &str) -> u32 {
        let planes: std::collections::HashSet<&str> = self
            .grants
            .values()
            .filter(|g| g.state == GrantState::Open && g.agent_id == agent_id)
            .map(|g| g.data_plane.as_str())
            .filter(|p| *p != data_plane)
            .collect();
        planes.len() as u32
    }

    fn end_grant(
        &mut self,
        key: &ChainKey,
        grant_id: &str,
        agent_id: &str,
        end: GrantEnd,
        agent_name: &str,
        now: i64,
    ) -> Option<GrantRecord> {
        let grant = self
            .grants
            .get(grant_id)
            .filter(|g| g.agent_id == agent_id)?;
        let ending = grant.end(end, agent_name, now)?;
        let agent = self.agent(agent_id)?;
        agent.reserved_micro += ending.reserved_delta;
        agent.spent_micro += ending.spent_delta;
        self.grants
            .insert(grant_id.to_string(), ending.after.clone());
        self.append(key, &[ending.event]);
        Some(ending.after)
    }

    fn live_agent(&self, name: &str) -> Option<usize> {
        self.agents
            .iter()
            .position(|a| a.name == name && a.deleted_at_ms.is_none())
    }

    fn agent(&mut self, id: &str) -> Option<&mut AgentRecord> {
        self.agents.iter_mut().find(|a| a.id == id)
    }

    /// The checks SQLite's schema makes on an agent row.
    fn check_row(&self, a: &AgentRecord, replacing: Option<usize>) -> Result<(), StoreError> {
        let others = || {
            self.agents
                .iter()
                .enumerate()
                .filter(move |(i, _)| Some(*i) != replacing)
                .map(|(_, other)| other)
        };
        if others().any(|o| o.token_sha256 == a.token_sha256) {
            return Err(StoreError::Conflict(
                "another agent already has this token; issue a new one".into(),
            ));
        }
        if a.deleted_at_ms.is_none()
            && others().any(|o| o.name == a.name && o.deleted_at_ms.is_none())
        {
            return Err(StoreError::DuplicateName(a.name.clone()));
        }
        if others().any(|o| o.id == a.id) {
            return Err(StoreError::Conflict(format!("agent id {} is taken", a.id)));
        }
        if a.budget_micro < 0 || a.spent_micro < 0 || a.reserved_micro < 0 {
            return Err(StoreError::Conflict(
                "an agent's budget, spent and reserved are never negative".into(),
            ));
        }
        Ok(())
    }

    fn process_with_name(&self, p: &ProcessRecord) -> ProcessRecord {
        let name = self
            .agents
            .iter()
            .find(|a| a.id == p.agent_id)
            .map(|a| a.name.clone())
            .unwrap_or_default();
        ProcessRecord {
            agent_name: name,
            ..p.clone()
        }
    }

    fn anchor(&self) -> AnchorState {
        let head = self.head();
        AnchorState::Present(Anchor {
            seq: head.seq,
            hash: head.hash,
            written_at_ms: now_ms(),
        })
    }
}

impl MemoryStore {
    pub fn new(ledger_key: Vec<u8>) -> Self {
        Self {
            chain_key: ChainKey::new(&ledger_key),
            ledger_key,
            tables: Mutex::new(Tables::default()),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log as stored, to edit as someone without `ledger.key` could:
    /// the anchor stays where this store's last write put it.
    pub fn edit_events<T>(&self, edit: impl FnOnce(&mut Vec<EventRecord>) -> T) -> T {
        edit(&mut self.tables().events)
    }

    /// Every open reservation's id, for a test to check against.
    pub fn open_reservation_ids(&self) -> Vec<String> {
        let t = self.tables();
        let mut ids: Vec<String> = t
            .reservations
            .values()
            .filter(|r| r.is_open())
            .map(|r| r.row.facts.id.clone())
            .collect();
        ids.sort();
        ids
    }
}

/// Lets a test yield to the runtime around each operation, as a real
/// store's I/O would, so concurrent callers really interleave.
async fn io_point() {
    tokio::task::yield_now().await;
}

#[async_trait]
impl AgentStore for MemoryStore {
    fn ledger_key(&self) -> &[u8] {
        &self.ledger_key
    }

    async fn insert_agent(&self, write: AgentWrite) -> Result<AgentRecord, StoreError> {
        io_point().await;
        // Built apart so the lock is released before the reply's await.
        let out = (|| -> Result<AgentRecord, StoreError> {
            let mut t = self.tables();
            t.check_row(&write.agent, None)?;
            t.agents.push(write.agent.clone());
            t.append(&self.chain_key, &write.events);
            Ok(write.agent)
        })();
        io_point().await;
        out
    }

    async fn change_agent(
        &self,
        name: &str,
        change: Box<AgentChange>,
    ) -> Result<AgentRecord, StoreError> {
        io_point().await;
        // Built apart so the lock is released before the reply's await.
        let out = (|| -> Result<AgentRecord, StoreError> {
            let mut t = self.tables();
            let i = t
                .live_agent(name)
                .ok_or_else(|| StoreError::AgentNotFound(name.to_string()))?;
            let current = t.agents[i].clone();
            let Some(w) = change(&current)? else {
                return Ok(current);
            };
            // As SQLite's UPDATE: only the settable columns; the money the hot
            // path moves, the name and the creation time stay the row's.
            let agent = AgentRecord {
                name: current.name.clone(),
                created_at_ms: current.created_at_ms,
                spent_micro: current.spent_micro,
                reserved_micro: current.reserved_micro,
                overrun_micro: current.overrun_micro,
                last_activity_at_ms: current.last_activity_at_ms,
                ..w.agent.clone()
            };
            t.check_row(&agent, Some(i))?;
            t.agents[i] = agent;
            t.append(&self.chain_key, &w.events);
            Ok(w.agent)
        })();
        io_point().await;
        out
    }

    async fn list_agents(&self, include_deleted: bool) -> Result<Vec<AgentRecord>, StoreError> {
        io_point().await;
        let mut agents: Vec<AgentRecord> = self
            .tables()
            .agents
            .iter()
            .filter(|a| include_deleted || a.deleted_at_ms.is_none())
            .cloned()
            .collect();
        agents.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(agents)
    }

    async fn agent_by_name(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        io_point().await;
        let t = self.tables();
        Ok(t.live_agent(name).map(|i| t.agents[i].clone()))
    }

    async fn agent_by_id(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        io_point().await;
        Ok(self.tables().agents.iter().find(|a| a.id == id).cloned())
    }

    async fn agent_by_token(&self, token_sha256: &str) -> Result<Option<AgentRecord>, StoreError> {
        io_point().await;
        Ok(self
            .tables()
            .agents
            .iter()
            .find(|a| a.token_sha256 == token_sha256 && a.deleted_at_ms.is_none())
            .cloned())
    }

    async fn retired_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<aex_core::presented::Retired>, StoreError> {
        use aex_core::presented::Retired;
        io_point().await;
        let mac = aex_core::chain::token_mac(self.ledger_key(), token_sha256);
        let t = self.tables();
        let kind_of = |e: &EventRecord, set: &[EventKind]| {
            EventKind::parse(&e.body.kind).filter(|k| set.contains(k))
        };
        let issued = t.events.iter().rev().find_map(|e| {
            let kind = kind_of(e, Retired::ISSUED_BY)?;
            let details: serde_json::Value = serde_json::from_str(&e.body.details_json).ok()?;
            (details["token_mac"] == mac.as_str()).then_some((e, kind))
        });
        let Some((issued, kind)) = issued else {
            return Ok(None);
        };
        let ended = t.events.iter().find_map(|e| {
            (e.body.agent_id == issued.body.agent_id && e.body.seq > issued.body.seq)
                .then(|| kind_of(e, Retired::ENDED_BY).map(|k| (k, e.body.ts_ms)))
                .flatten()
        });
        Ok(Retired::of(
            &issued.body.agent_name,
            (kind, issued.body.ts_ms),
            ended,
        ))
    }
}

#[async_trait]
impl LedgerStore for MemoryStore {
    async fn reserve(&self, n: NewReservation) -> Result<ReserveOutcome, StoreError> {
        io_point().await;
        // Built apart so the lock is released before the reply's await.
        let out = (|| -> Result<ReserveOutcome, StoreError> {
            let mut t = self.tables();
            match decide(&n, t.reserve_read(&n)) {
                Reserve::Answer { outcome, event } => {
                    if let Some(event) = event {
                        t.append(&self.chain_key, &[event]);
                    }
                    Ok(outcome)
                }
                Reserve::NotCovered { why, event } => {
                    let logged = t.events.iter().any(|e| {
                        e.body.kind == EventKind::ReportRefused.as_str()
                            && e.body.reservation_id == n.record.id
                    });
                    if !logged {
                        t.append(&self.chain_key, &[event]);
                    }
                    Ok(ReserveOutcome::GrantNotCovered(why))
                }
                Reserve::UnknownAgent => Err(StoreError::AgentNotFound(n.agent_name.clone())),
                Reserve::Take(take) => {
                    t.write_take(&self.chain_key, &take)?;
                    Ok(take.outcome())
                }
            }
        })();
        io_point().await;
        out
    }

    async fn settle(&self, st: Settlement) -> Result<SettleOutcome, StoreError> {
        io_point().await;
        // Built apart so the lock is released before the reply's await.
        let out = (|| -> Result<SettleOutcome, StoreError> {
            let mut t = self.tables();
            let held = t.reservations.get(&st.reservation_id).map(|stored| Held {
                agent_id: stored.row.facts.agent_id.clone(),
                amount_micro: stored.row.facts.amount_micro,
                state: ReservationState::parse(&stored.row.facts.state)
                    .expect("the store writes only known states"),
            });
            let close = match st.decide(held) {
                Settle::Answer(outcome) => return Ok(outcome),
                Settle::AnotherAgent => return Err(StoreError::settled_as_another_agent(&st)),
                Settle::Close(close) => close,
            };
            let agent = t.agent(&close.agent_id).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "reservation {} belongs to no agent",
                    st.reservation_id
                ))
            })?;
            agent.reserved_micro -= close.reserved_micro;
            agent.spent_micro += close.charge_micro;
            agent.overrun_micro = agent.overrun_micro.saturating_add(close.overrun_micro);
            agent.last_activity_at_ms = Some(st.at_ms);
            let remaining = agent.remaining_micro();
            let facts = &mut t
                .reservations
                .get_mut(&st.reservation_id)
                .expect("looked up above")
                .row
                .facts;
            facts.state = close.state.as_str().into();
            facts.settled_at_ms = Some(st.at_ms);
            facts.charged_micro = Some(close.charge_micro);
            facts.outcome = Some(st.closing.as_str().to_string());
            facts.prompt_tokens = Some(stored_u64(st.usage.input));
            facts.completion_tokens = Some(stored_u64(st.usage.output));
            facts.cached_input_tokens = stored_u64(st.usage.cached_input);
            facts.cache_write_tokens = stored_u64(st.usage.cache_write);
            facts.overrun_micro = close.overrun_micro;
            t.append(&self.chain_key, &close.events);
            Ok(SettleOutcome::Settled {
                charged_micro: close.charge_micro,
                remaining_micro: remaining,
            })
        })();
        io_point().await;
        out
    }

    async fn record_denial(&self, d: DenialRecord) -> Result<(), StoreError> {
        io_point().await;
        self.tables().append(&self.chain_key, &[d.event()]);
        Ok(())
    }

    async fn open_reservations(&self) -> Result<Vec<ReservationRecord>, StoreError> {
        io_point().await;
        let mut open: Vec<ReservationRecord> = self
            .tables()
            .reservations
            .values()
            .filter(|r| r.is_open())
            .map(StoredReservation::record)
            .collect();
        open.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(open)
    }

    async fn extend_reservations(
        &self,
        ids: &[String],
        expires_at_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        io_point().await;
        let mut t = self.tables();
        let mut closed = Vec::new();
        for id in ids {
            match t.reservations.get_mut(id) {
                Some(r) if r.is_open() => r.expires_at_ms = expires_at_ms,
                _ => closed.push(id.clone()),
            }
        }
        Ok(closed)
    }
}

#[async_trait]
impl GrantStore for MemoryStore {
    async fn issue_grant(&self, g: NewGrant) -> Result<GrantOutcome, StoreError> {
        io_point().await;
        let out = (|| -> Result<GrantOutcome, StoreError> {
            let mut t = self.tables();
            // As the SQL stores: an agent it does not know has no grant to
            // end and gets none.
            let Some(agent) = t.agents.iter().find(|a| a.id == g.agent_id).cloned() else {
                return Ok(GrantOutcome::Refused(aex_core::grant::NoGrant::Invalid));
            };
            if let Some(old) = &g.replaces {
                t.end_grant(
                    &self.chain_key,
                    old,
                    &g.agent_id,
                    GrantEnd::Returned,
                    &agent.name,
                    g.created_at_ms,
                );
            }
            let others = t.other_data_planes(&g.agent_id, &g.data_plane);
            let funds = t.agents.iter().find(|a| a.id == g.agent_id).map(|a| Funds {
                free_micro: a.remaining_micro(),
                live: a.deleted_at_ms.is_none(),
            });
            let grant = match g.decide(funds, others) {
                GrantOutcome::Issued(grant) => grant,
                refused => return Ok(refused),
            };
            let a = t.agent(&g.agent_id).expect("read above");
            a.reserved_micro += grant.budget_micro;
            t.grants.insert(grant.id.clone(), grant.clone());
            t.append(
                &self.chain_key,
                &[grant.issued_event(&g.agent_name, g.replaces.as_deref())],
            );
            Ok(GrantOutcome::Issued(grant))
        })();
        io_point().await;
        out
    }

    async fn end_grant(
        &self,
        grant_id: &str,
        agent_id: &str,
        end: GrantEnd,
        now_ms: i64,
    ) -> Result<Option<GrantRecord>, StoreError> {
        io_point().await;
        let out = {
            let mut t = self.tables();
            let name = t
                .agents
                .iter()
                .find(|a| a.id == agent_id)
                .map(|a| a.name.clone())
                .unwrap_or_default();
            t.end_grant(&self.chain_key, grant_id, agent_id, end, &name, now_ms)
        };
        io_point().await;
        Ok(out)
    }

    async fn open_grants(&self, agent_id: Option<&str>) -> Result<Vec<GrantRecord>, StoreError> {
        io_point().await;
        let mut open: Vec<GrantRecord> = self
            .tables()
            .grants
            .values()
            .filter(|g| g.state == GrantState::Open)
            .filter(|g| agent_id.is_none_or(|a| g.agent_id == a))
            .cloned()
            .collect();
        open.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(open)
    }
}

#[async_trait]
impl CredentialStore for MemoryStore {
    async fn insert_credential(&self, w: CredentialWrite) -> Result<CredentialRecord, StoreError> {
        io_point().await;
        let mut t = self.tables();
        let c = &w.credential;
        if t.credentials
            .iter()
            .any(|x| x.secret_sha256 == c.secret_sha256 || (x.name == c.name && !x.is_revoked()))
        {
            return Err(StoreError::duplicate_credential(&c.name));
        }
        t.credentials.push(c.clone());
        t.append(&self.chain_key, &w.events);
        Ok(c.clone())
    }

    async fn revoke_credential(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        io_point().await;
        let mut t = self.tables();
        let Some(i) = t
            .credentials
            .iter()
            .position(|c| c.name == name && !c.is_revoked())
        else {
            return Ok(None);
        };
        let Some(w) = aex_core::credential::revoke(&t.credentials[i], now_ms) else {
            return Ok(None);
        };
        t.credentials[i] = w.credential.clone();
        t.append(&self.chain_key, &w.events);
        Ok(Some(w.credential))
    }

    async fn list_credentials(
        &self,
        include_revoked: bool,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        io_point().await;
        Ok(self
            .tables()
            .credentials
            .iter()
            .filter(|c| include_revoked || !c.is_revoked())
            .cloned()
            .collect())
    }
}

#[async_trait]
impl ProcessStore for MemoryStore {
    async fn start_process(&self, p: ProcessRecord) -> Result<ProcessRecord, StoreError> {
        io_point().await;
        let mut t = self.tables();
        if t.processes
            .iter()
            .any(|o| o.id == p.id || o.token_sha256 == p.token_sha256)
        {
            return Err(StoreError::Conflict(format!(
                "process {} or its token is already registered",
                p.id
            )));
        }
        let stored = ProcessRecord {
            state: ProcessState::Running.as_str().into(),
            ..p.clone()
        };
        t.processes.push(stored);
        t.append(&self.chain_key, &[p.started_event(&self.ledger_key)]);
        Ok(p)
    }

    async fn set_process_pid(&self, id: &str, pid: u32) -> Result<(), StoreError> {
        io_point().await;
        if let Some(p) = self.tables().processes.iter_mut().find(|p| p.id == id) {
            p.pid = pid;
        }
        Ok(())
    }

    async fn request_kill(&self, agent_id: &str, reason: &str) -> Result<u64, StoreError> {
        io_point().await;
        let mut ordered = 0;
        for p in self.tables().processes.iter_mut() {
            if p.agent_id == agent_id && p.state() == Some(ProcessState::Running) {
                p.kill_reason = Some(reason.to_string());
                ordered += 1;
            }
        }
        Ok(ordered)
    }

    async fn end_process(
        &self,
        id: &str,
        state: ProcessState,
        exit_code: Option<i32>,
        reason: &str,
        now: i64,
    ) -> Result<Option<ProcessRecord>, StoreError> {
        io_point().await;
        if state == ProcessState::Running {
            return Err(StoreError::Invalid(
                "a process ends as exited, killed or lost, not running".into(),
            ));
        }
        let mut t = self.tables();
        let Some(p) = t
            .processes
            .iter_mut()
            .find(|p| p.id == id && p.state() == Some(ProcessState::Running))
        else {
            return Ok(None);
        };
        p.state = state.as_str().into();
        p.ended_at_ms = Some(now);
        p.exit_code = exit_code;
        p.reason = reason.to_string();
        let ended = p.clone();
        let ended = t.process_with_name(&ended);
        if let Some(event) = ended.ended_event(state, exit_code, reason, now) {
            t.append(&self.chain_key, &[event]);
        }
        Ok(Some(ended))
    }

    async fn list_processes(&self, include_ended: bool) -> Result<Vec<ProcessRecord>, StoreError> {
        io_point().await;
        let t = self.tables();
        let mut processes: Vec<ProcessRecord> = t
            .processes
            .iter()
            .filter(|p| include_ended || p.state() == Some(ProcessState::Running))
            .map(|p| t.process_with_name(p))
            .collect();
        processes.sort_by_key(|p| p.started_at_ms);
        Ok(processes)
    }
}

#[async_trait]
impl ReportStore for MemoryStore {
    async fn list_events(&self, f: EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        io_point().await;
        let t = self.tables();
        // The same story a database finds for a request: denials and refused
        // reports naming it, and its reservation's events.
        let story = f.request_id.as_ref().map(|request_id| {
            let reservation = t
                .reservations
                .values()
                .find(|r| r.row.facts.request_id == *request_id)
                .map(|r| r.row.facts.id.clone());
            (request_id, reservation)
        });
        let mut events: Vec<EventRecord> = t
            .events
            .iter()
            .filter(|e| f.matches(e))
            .filter(|e| match &story {
                None => true,
                Some((request_id, reservation)) => {
                    let names_it =
                        matches!(
                            EventKind::parse(&e.body.kind),
                            Some(EventKind::Deny | EventKind::ReportRefused)
                        ) && serde_json::from_str::<serde_json::Value>(&e.body.details_json)
                            .is_ok_and(|d| d["request_id"] == request_id.as_str());
                    names_it
                        || reservation
                            .as_ref()
                            .is_some_and(|id| *id == e.body.reservation_id)
                }
            })
            .cloned()
            .collect();
        // By seq, as a database's ORDER BY returns them, whatever order the
        // stored rows are in.
        events.sort_by_key(|e| e.body.seq);
        events.truncate(f.page_size() as usize);
        Ok(events)
    }

    async fn audit_data(&self, now_ms: i64) -> Result<AuditData, StoreError> {
        io_point().await;
        let t = self.tables();
        let mut data = AuditData {
            agents: t.agents.clone(),
            closed_reservations: ClosedDigest::new(&self.ledger_key),
            processes: t.processes.iter().map(|p| t.process_with_name(p)).collect(),
            last_seq: t.events.iter().map(|e| e.body.seq).max().unwrap_or(0),
            anchor: Some(t.anchor()),
            counters: t.counters.clone(),
            grants: t.grants.values().cloned().collect(),
            credentials: t.credentials.clone(),
            now_ms,
            ..Default::default()
        };
        data.agents
            .sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        for r in t.reservations.values() {
            let f = &r.row.facts;
            if r.is_open() {
                *data.open_reserved.entry(f.agent_id.clone()).or_default() += f.amount_micro;
                if r.expires_at_ms < now_ms {
                    data.overdue
                        .push((f.id.clone(), f.agent_id.clone(), r.expires_at_ms));
                }
                data.open_reservation_rows.push(r.row.clone());
            } else {
                data.closed_reservations.add(f);
            }
        }
        let head = t.head();
        data.hash_at_anchor = if head.seq == 0 {
            Some(GENESIS.to_string())
        } else {
            t.events
                .iter()
                .find(|e| e.body.seq == head.seq)
                .map(|e| e.hash.clone())
        };
        Ok(data)
    }

    async fn reservation_history(
        &self,
        agent_id: &str,
    ) -> Result<(Vec<ReservationRow>, Vec<EventRecord>), StoreError> {
        io_point().await;
        let t = self.tables();
        let rows = t
            .reservations
            .values()
            .filter(|r| r.row.facts.agent_id == agent_id)
            .map(|r| r.row.clone())
            .collect();
        let mut events: Vec<EventRecord> = t
            .events
            .iter()
            .filter(|e| e.body.agent_id == agent_id)
            .filter(|e| EventKind::parse(&e.body.kind).is_some_and(|k| k.is_about_reservations()))
            .cloned()
            .collect();
        events.sort_by_key(|e| e.body.seq);
        Ok((rows, events))
    }

    async fn status_totals(&self) -> Result<StatusTotals, StoreError> {
        io_point().await;
        let t = self.tables();
        let live: Vec<&AgentRecord> = t
            .agents
            .iter()
            .filter(|a| a.deleted_at_ms.is_none())
            .collect();
        let total = |pick: fn(&AgentRecord) -> i64| {
            live.iter().map(|a| pick(a)).fold(0i64, i64::saturating_add)
        };
        let mut counters = HashMap::<String, i64>::new();
        for ((_, name), value) in &t.counters {
            let c = counters.entry(name.clone()).or_default();
            *c = c.saturating_add(*value);
        }
        Ok(StatusTotals {
            agents: live.len() as u32,
            total_budget_micro: total(|a| a.budget_micro),
            total_spent_micro: total(|a| a.spent_micro),
            total_reserved_micro: total(|a| a.reserved_micro),
            total_overrun_micro: total(|a| a.overrun_micro),
            counters,
            open_reservations: t.reservations.values().filter(|r| r.is_open()).count() as u64,
            running_processes: t
                .processes
                .iter()
                .filter(|p| p.state() == Some(ProcessState::Running))
                .count() as u64,
        })
    }

    async fn activity(
        &self,
        window_start_ms: i64,
        minute_start_ms: i64,
    ) -> Result<HashMap<String, AgentActivity>, StoreError> {
        io_point().await;
        let t = self.tables();
        let mut out: HashMap<String, AgentActivity> = HashMap::new();
        for e in &t.events {
            let b = &e.body;
            let kind = EventKind::parse(&b.kind);
            if b.ts_ms >= window_start_ms
                && matches!(kind, Some(EventKind::Settle | EventKind::Expire))
            {
                out.entry(b.agent_id.clone()).or_default().charged_in_window += b.amount_micro;
            }
            if b.ts_ms >= minute_start_ms && kind == Some(EventKind::Admit) {
                out.entry(b.agent_id.clone())
                    .or_default()
                    .admitted_last_minute += 1;
            }
        }
        for ((agent, name), value) in &t.counters {
            if name == "admit" {
                out.entry(agent.clone()).or_default().admitted += value;
            } else if name.starts_with("deny:") {
                out.entry(agent.clone()).or_default().denied += value;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::MemoryStore;
    use crate::storage::testing::conformance::KEY;

    async fn store() -> ((), MemoryStore) {
        ((), MemoryStore::new(KEY.to_vec()))
    }

    crate::store_conformance!(store);
}
