//! The admission state machine. Policy, limits and idempotency are decided in
//! memory under one short lock (never held across an await); the only I/O on
//! the hot path is one database transaction to reserve and one to settle.

use super::limiter::{Gcra, TokenBucket};

pub use aex_proto::convert::endpoint_from_pb;
mod grants;
mod overruns;
mod served;
mod shared;
mod tokens;
use super::policy::{Ask, Denial, Rule, authenticate, plan};
use crate::error::Result;
use crate::in_order::InOrder;
use crate::storage::{
    AgentRecord, AgentState, Closing, DenialRecord, EventKind, ExtraEvent, NewReservation,
    ProcessRecord, ReservationRecord, ReserveOutcome, SettleOutcome, Settlement, Store, StoreError,
    now_ms,
};
use aex_core::config::ModelsConfig;
use aex_core::credential::Served;
use aex_core::secrets::new_id;
pub use grants::{GRANT_LIFETIME_MS, GrantAnswer, GrantRequest, LocalAdmit, LocalAdmitOutcome};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// What the watch stream tells data planes.
#[derive(Debug, Clone)]
pub enum Change {
    AgentUpserted(Box<AgentRecord>),
    AgentRemoved(String),
    Models(Arc<ModelsConfig>),
    /// Every data plane must give back the agent's grants (see
    /// `grants.rs`: a central decision near its edge needs them).
    GrantsRevoked(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub pricing: aex_core::money::Pricing,
    pub reservation_id: String,
    pub agent_id: String,
    pub agent_name: String,
    pub reserved_micro: i64,
    pub output_tokens_cap: u64,
    pub output_cap_injected: bool,
    pub remaining_micro: i64,
    pub expires_at_ms: i64,
    pub provider: String,
    pub provider_model: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Admitted(Admitted),
    Denied { denial: Denial, agent_name: String },
}

pub use aex_core::reservation::{ExpiryPolicy, Outcome};

#[derive(Debug, Clone)]
pub struct SettleInput {
    pub reservation_id: String,
    pub outcome: Outcome,
    pub usage: aex_core::money::TokenUsage,
    pub usage_reported: bool,
    pub upstream_status: u32,
    pub upstream_retry_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub charged_micro: i64,
    pub remaining_micro: i64,
    pub already_settled: bool,
    /// Reported usage beyond the reservation, recorded apart (0: none).
    pub overrun_micro: i64,
    /// The agent's overruns crossed their allowance: it is now paused.
    pub stopped_for_overruns: bool,
}

impl Settled {
    /// Closed before (or never open): nothing charged now.
    pub const ALREADY: Self = Self {
        charged_micro: 0,
        remaining_micro: 0,
        already_settled: true,
        overrun_micro: 0,
        stopped_for_overruns: false,
    };
}

/// The charge for a finished call: see [`aex_core::money::charge`].
pub fn charge_for(r: &ReservationRecord, s: &SettleInput) -> aex_core::money::Charge {
    aex_core::money::charge(
        r.pricing,
        r.amount_micro,
        s.usage,
        s.usage_reported,
        s.outcome == Outcome::CutOff,
    )
}

struct LiveAgent {
    record: AgentRecord,
    rpm: Gcra,
    tpm: TokenBucket,
    open: u32,
}

struct OpenReservation {
    record: ReservationRecord,
    agent_name: String,
    output_cap_injected: bool,
    /// Tokens debited from the TPM buckets at admission.
    debited_tokens: u64,
    /// The model's tokens-per-minute limit when admitted (0 = none).
    model_tpm_limit: u64,
}

#[derive(Default)]
struct Live {
    by_token: HashMap<String, String>,
    /// Tokens of supervised processes (`aexctl run`) → agent id; separate
    /// from `by_token` so rotating the agent's own token leaves them alone.
    process_tokens: HashMap<String, String>,
    agents: HashMap<String, LiveAgent>,
    open: HashMap<String, OpenReservation>,
    by_request: HashMap<String, String>,
    model_tpm: HashMap<String, TokenBucket>,
}

impl Live {
    /// An agent's name as this control plane knows it ("" if it does not).
    fn agent_name(&self, agent_id: &str) -> String {
        self.agents
            .get(agent_id)
            .map(|a| a.record.name.clone())
            .unwrap_or_default()
    }
}

/// What admission took in memory before the database said yes or no.
struct Tentative {
    agent_id: String,
    agent_name: String,
    rpm: u32,
    /// The RPM and TPM limits are the database's, shared with other control
    /// planes (taken after `decide`, see `shared.rs`), not this process's.
    shared: bool,
    /// Checked again by a shared store, for the reservations other control
    /// planes hold.
    max_concurrent: u32,
    tpm: u64,
    model_tpm: u64,
    debited_tokens: u64,
}

struct Accepted {
    tentative: Tentative,
    plan: super::policy::Plan,
}

struct Refused {
    denial: Denial,
    agent_id: String,
    agent_name: String,
}

/// What one expiry sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExpirySweep {
    pub expired: usize,
    /// Reservations that could not be settled: (id, why).
    pub failed: Vec<(String, String)>,
}

/// An order to the supervisors of an agent's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillOrder {
    pub agent_id: String,
    /// One process of the agent (an order found on its row), or `None`
    /// for every process the agent has now.
    pub process_id: Option<String>,
    pub reason: String,
}

pub struct AdmissionEngine {
    store: Arc<dyn Store>,
    live: Mutex<Live>,
    changes: broadcast::Sender<Change>,
    kills: broadcast::Sender<KillOrder>,
    /// When each agent's kill order was last written to the store: an
    /// exhausted agent that keeps calling writes it once a second at most.
    kills_recorded: Mutex<HashMap<String, i64>>,
    /// The processes (id → agent id) whose kill order, found on their rows,
    /// this control plane has passed on.
    kills_forwarded: Mutex<HashMap<String, String>>,
    reservation_ttl_ms: i64,
    /// Reservations an expiry sweep could not settle, so each is logged as
    /// an error once rather than at every sweep.
    unexpirable: Mutex<std::collections::HashSet<String>>,
    /// Denials of unknown tokens since the last flush.
    unauthenticated: Mutex<UnauthenticatedDenials>,
    /// Held across an admin change's write and its application here.
    admin_changes: tokio::sync::Mutex<()>,
    /// RPM limiters shared with the other control planes on the database.
    shared_rates: Option<Arc<dyn crate::storage::SharedRates>>,
    grants: Mutex<grants::GrantBook>,
    /// When overruns pause an agent (`overruns.rs`).
    overrun_limit: aex_core::overrun::OverrunLimit,
    /// Store lookups of tokens not known here (`tokens.rs`).
    token_lookups: Mutex<tokens::TokenLookups>,
}

/// Denials of tokens no agent has, gathered between two flushes.
#[derive(Debug, Default)]
struct UnauthenticatedDenials {
    by_reason: std::collections::BTreeMap<Rule, u64>,
    first_ms: i64,
    last_ms: i64,
    /// Enough to correlate repeated attempts; useless for forging one.
    token_prefixes: std::collections::BTreeSet<String>,
}

impl UnauthenticatedDenials {
    const PREFIXES_KEPT: usize = 16;

    fn add(&mut self, reason: Rule, token_sha256: &str, now: i64) {
        if self.by_reason.is_empty() {
            self.first_ms = now;
        }
        self.last_ms = now;
        *self.by_reason.entry(reason).or_default() += 1;
        if self.token_prefixes.len() < Self::PREFIXES_KEPT {
            self.token_prefixes
                .insert(token_sha256.get(..12).unwrap_or("").to_string());
        }
    }

    fn pending(&self) -> u64 {
        self.by_reason.values().sum()
    }
}

impl AdmissionEngine {
    /// Loads live agents and open reservations, so a restart picks up where
    /// the last process stopped.
    pub async fn load(store: Arc<dyn Store>, reservation_ttl_ms: i64) -> Result<Self> {
        let agents = store.list_agents(false).await?;
        let open = store.open_reservations().await?;
        let grants = grants::GrantBook::from_open(&store.open_grants(None).await?);
        let mut live = Live::default();
        for a in agents {
            live.by_token.insert(a.token_sha256.clone(), a.id.clone());
            live.agents.insert(
                a.id.clone(),
                LiveAgent {
                    record: a,
                    rpm: Gcra::default(),
                    tpm: TokenBucket::default(),
                    open: 0,
                },
            );
        }
        for r in open {
            let agent_name = match live.agents.get_mut(&r.agent_id) {
                Some(a) => {
                    a.open += 1;
                    a.record.name.clone()
                }
                None => String::new(),
            };
            live.by_request.insert(r.request_id.clone(), r.id.clone());
            live.open.insert(
                r.id.clone(),
                OpenReservation {
                    agent_name,
                    // Whether the client named its own cap is not stored;
                    // sending the cap the reservation was sized for is
                    // always within the bound.
                    output_cap_injected: true,
                    debited_tokens: r.input_tokens_bound,
                    model_tpm_limit: 0,
                    record: r,
                },
            );
        }
        for p in store.list_processes(false).await? {
            live.process_tokens.insert(p.token_sha256, p.agent_id);
        }
        let (changes, _) = broadcast::channel(1024);
        let (kills, _) = broadcast::channel(256);
        let shared_rates = store.shared_rates();
        Ok(Self {
            store,
            live: Mutex::new(live),
            changes,
            kills,
            kills_recorded: Mutex::default(),
            kills_forwarded: Mutex::default(),
            reservation_ttl_ms,
            unexpirable: Mutex::default(),
            unauthenticated: Mutex::default(),
            admin_changes: tokio::sync::Mutex::new(()),
            shared_rates,
            grants: Mutex::new(grants),
            overrun_limit: aex_core::overrun::OverrunLimit::DEFAULT,
            token_lookups: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().expect("admission state poisoned")
    }

    /// A count, so a panic elsewhere while holding it loses nothing worth
    /// refusing service for.
    fn unauthenticated(&self) -> std::sync::MutexGuard<'_, UnauthenticatedDenials> {
        self.unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// An admin change to an agent: `write` stores it, then it takes effect
    /// here for the very next request. One at a time: two changes racing
    /// (a pause and a resume, two rotations) would otherwise be applied
    /// here in the other order than the store applied them, leaving memory
    /// and every data plane's cache disagreeing with the store.
    pub async fn change_agent<F, Fut>(&self, write: F) -> Result<AgentRecord>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<AgentRecord, StoreError>>,
    {
        let _one_at_a_time = self.admin_changes.lock().await;
        let record = write().await?;
        self.agent_changed(&record);
        Ok(record)
    }

    /// Re-reads an agent changed through another control plane on the
    /// same database ([`crate::storage::EVERY_AGENT`]: every agent) and
    /// applies it as stored. Under the admin-change lock, so a local change
    /// and a refresh cannot apply an older row after a newer one.
    pub async fn refresh_agent(&self, agent_id: &str) -> Result<()> {
        let _one_at_a_time = self.admin_changes.lock().await;
        self.refresh_processes(agent_id).await?;
        if agent_id == crate::storage::EVERY_AGENT {
            for record in self.store.list_agents(true).await? {
                let known = self
                    .lock()
                    .agents
                    .get(&record.id)
                    .map(|a| a.record == record);
                // A tombstone this replica no longer holds is nothing new.
                let gone = record.state == AgentState::Deleted && known.is_none();
                if known != Some(true) && !gone {
                    self.agent_changed(&record);
                }
            }
            return Ok(());
        }
        if let Some(record) = self.store.agent_by_id(agent_id).await? {
            let unchanged = self
                .lock()
                .agents
                .get(agent_id)
                .is_some_and(|a| a.record == record);
            if !unchanged {
                self.agent_changed(&record);
            }
        }
        Ok(())
    }

    /// The supervised processes of an agent ([`crate::storage::EVERY_AGENT`]:
    /// of every agent) as stored: the tokens of those running sign in as
    /// it, the others' no longer do, and a kill order on one (from any
    /// control plane) is passed to the supervisors connected here.
    async fn refresh_processes(&self, agent_id: &str) -> Result<()> {
        let every = agent_id == crate::storage::EVERY_AGENT;
        let running: Vec<ProcessRecord> = self
            .store
            .list_processes(false)
            .await?
            .into_iter()
            .filter(|p| every || p.agent_id == agent_id)
            .collect();
        {
            let mut live = self.lock();
            live.process_tokens
                .retain(|_, owner| !every && owner != agent_id);
            for p in &running {
                live.process_tokens
                    .insert(p.token_sha256.clone(), p.agent_id.clone());
            }
        }
        // Each order on a row is passed on once by this control plane, to
        // that process's supervisor only: a row left running (its
        // supervisor gone with its replica) must not kill the agent's
        // later processes.
        let mut forwarded = self
            .kills_forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        forwarded.retain(|id, owner| {
            (!every && owner != agent_id) || running.iter().any(|p| &p.id == id)
        });
        for p in running {
            if let Some(reason) = p.kill_reason
                && forwarded.insert(p.id.clone(), p.agent_id.clone()).is_none()
            {
                let _ = self.kills.send(KillOrder {
                    agent_id: p.agent_id,
                    process_id: Some(p.id),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Applies an agent as stored; see [`AdmissionEngine::change_agent`].
    fn agent_changed(&self, record: &AgentRecord) {
        let mut live = self.lock();
        if record.state == AgentState::Deleted {
            live.by_token.retain(|_, id| id != &record.id);
            live.process_tokens.retain(|_, id| id != &record.id);
            live.agents.remove(&record.id);
            drop(live);
            let _ = self.changes.send(Change::AgentRemoved(record.id.clone()));
            return;
        }
        live.by_token.retain(|_, id| id != &record.id);
        live.by_token
            .insert(record.token_sha256.clone(), record.id.clone());
        match live.agents.get_mut(&record.id) {
            Some(a) => a.record = record.clone(),
            None => {
                live.agents.insert(
                    record.id.clone(),
                    LiveAgent {
                        record: record.clone(),
                        rpm: Gcra::default(),
                        tpm: TokenBucket::default(),
                        open: 0,
                    },
                );
            }
        }
        drop(live);
        let _ = self
            .changes
            .send(Change::AgentUpserted(Box::new(record.clone())));
    }

    pub fn models_changed(&self, models: Arc<ModelsConfig>) {
        let _ = self.changes.send(Change::Models(models));
    }

    /// A snapshot of every live agent's policy, and a receiver for what
    /// changes after it (subscribed under the same lock, so nothing is missed).
    pub fn subscribe(&self) -> (Vec<AgentRecord>, broadcast::Receiver<Change>) {
        let live = self.lock();
        let rx = self.changes.subscribe();
        let agents = live.agents.values().map(|a| a.record.clone()).collect();
        (agents, rx)
    }

    /// Decides one call for the data plane that asks, which may act only
    /// for the agents `served` names (its credential's scope).
    pub async fn admit(
        &self,
        models: &ModelsConfig,
        request_id: &str,
        token_sha256: &str,
        ask: &Ask<'_>,
        served: &Served,
    ) -> Result<Decision> {
        let now = now_ms();
        // A retry of a request this control plane admitted: the same
        // reservation, if the store still has it open (another control plane
        // may have settled or expired it since; the reserve below then
        // answers that it closed).
        let retried = {
            let live = self.lock();
            live.by_request
                .get(request_id)
                .and_then(|id| live.open.get(id))
                .filter(|o| served.serves(&o.agent_name))
                .map(|o| (o.record.id.clone(), self.admitted_from(o, 0, models)))
        };
        if let Some((id, admitted)) = retried {
            if self.store.open_reservation(&id).await?.is_some() {
                return Ok(Decision::Admitted(admitted));
            }
            let _ = self.forget(&id, None);
        }
        // Request credits held by the agent's grants are not free here: an
        // RPM refusal while some may be open recalls them and decides once
        // more (as a budget refusal does, below).
        let mut now = now;
        let mut recalled = false;
        let mut learned = false;
        let Accepted { tentative, plan } = loop {
            let refused = match self
                .decide_and_take(models, token_sha256, ask, served, now)
                .await?
            {
                Ok(accepted) => break accepted,
                Err(refused) => refused,
            };
            // A token created through another control plane on the
            // database, not yet heard of here (`tokens.rs`).
            if !learned && refused.denial.denied_by == Rule::Auth {
                learned = true;
                if self.learn_token(token_sha256).await? {
                    now = now_ms();
                    continue;
                }
            }
            if !recalled
                && refused.denial.denied_by == Rule::Rpm
                && self.may_hold_grants(&refused.agent_id, now)
            {
                recalled = true;
                if self.recall_grants(&refused.agent_id).await? {
                    now = now_ms();
                    continue;
                }
            }
            let Refused {
                denial,
                agent_id,
                agent_name,
            } = *refused;
            self.log_denial(&denial, &agent_id, &agent_name, ask, token_sha256)
                .await;
            return Ok(Decision::Denied { denial, agent_name });
        };
        let model = &models.models[ask.model];
        let record = ReservationRecord {
            id: new_id("rsv"),
            request_id: request_id.to_string(),
            agent_id: tentative.agent_id.clone(),
            model: ask.model.to_string(),
            amount_micro: plan.reserve_micro,
            pricing: model.pricing,
            input_tokens_bound: plan.input_tokens_bound,
            output_tokens_cap: plan.output_tokens_cap,
            created_at_ms: now,
            expires_at_ms: now + self.reservation_ttl_ms,
        };
        // The store adds what the reservation row holds (request id, model,
        // bounds, prices); these are the particulars only admission knows.
        let details = json!({
            "endpoint": ask.endpoint.as_str(), "stream": ask.stream,
            "output_cap_injected": plan.output_cap_injected,
        });
        // Budget held by the agent's grants is not free here: a refusal
        // while some may be open recalls them and decides once more, and
        // only the decision the client sees is logged.
        let may_hold_grants = self.may_hold_grants(&tentative.agent_id, now);
        let mut recalled = false;
        let outcome = loop {
            let outcome = self
                .store
                .reserve(NewReservation {
                    record: record.clone(),
                    agent_name: tentative.agent_name.clone(),
                    details: details.clone(),
                    // A store only this control plane uses is covered by the
                    // in-memory count in `decide`; a shared one counts again,
                    // for the reservations other replicas hold.
                    max_open: if self.shared_rates.is_some() {
                        tentative.max_concurrent
                    } else {
                        0
                    },
                    grant_id: None,
                    log_budget_denial: !may_hold_grants || recalled,
                })
                .await;
            if let Ok(ReserveOutcome::InsufficientBudget { remaining_micro }) = &outcome
                && may_hold_grants
                && !recalled
            {
                recalled = true;
                match self.recall_grants(&tentative.agent_id).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.log_budget_denial(&record, &tentative.agent_name, *remaining_micro)
                            .await
                    }
                    Err(e) => {
                        self.undo_all(&tentative, ask.model, now).await;
                        return Err(e);
                    }
                }
            }
            break outcome;
        };
        match outcome {
            Ok(ReserveOutcome::Reserved { remaining_micro }) => {
                let open = OpenReservation {
                    record,
                    agent_name: tentative.agent_name.clone(),
                    output_cap_injected: plan.output_cap_injected,
                    debited_tokens: tentative.debited_tokens,
                    model_tpm_limit: tentative.model_tpm,
                };
                let admitted = self.admitted_from(&open, remaining_micro, models);
                let mut live = self.lock();
                live.by_request
                    .insert(request_id.to_string(), open.record.id.clone());
                live.open.insert(open.record.id.clone(), open);
                Ok(Decision::Admitted(admitted))
            }
            Ok(ReserveOutcome::InsufficientBudget { remaining_micro }) => {
                self.undo_all(&tentative, ask.model, now).await;
                // Nothing in flight can free budget: the agent cannot go on.
                if self.open_count(&tentative.agent_id) == 0 {
                    self.order_kill(&tentative.agent_id, "budget exhausted");
                }
                Ok(Decision::Denied {
                    denial: Denial::budget(format!(
                        "Budget exceeded: agent '{}' has {} left and this request may cost up to {} \
                         ({} input tokens bound + {} output tokens). Lower max_tokens, or top up with \
                         `aexctl agent update {} --top-up USD`.",
                        tentative.agent_name,
                        aex_core::money::usd_with_micro(remaining_micro.max(0)),
                        aex_core::money::usd_with_micro(plan.reserve_micro),
                        plan.input_tokens_bound,
                        plan.output_tokens_cap,
                        tentative.agent_name,
                    )),
                    agent_name: tentative.agent_name,
                })
            }
            Ok(ReserveOutcome::AlreadyAdmitted(existing)) => {
                // A concurrent retry of the same request won the race.
                self.undo_all(&tentative, ask.model, now).await;
                let open = OpenReservation {
                    record: existing,
                    agent_name: tentative.agent_name,
                    output_cap_injected: plan.output_cap_injected,
                    debited_tokens: 0,
                    model_tpm_limit: 0,
                };
                Ok(Decision::Admitted(self.admitted_from(&open, 0, models)))
            }
            Ok(ReserveOutcome::TooManyOpen) => {
                self.undo_all(&tentative, ask.model, now).await;
                let denial = concurrency_denial(&tentative.agent_name, tentative.max_concurrent);
                self.log_denial(
                    &denial,
                    &tentative.agent_id,
                    &tentative.agent_name,
                    ask,
                    token_sha256,
                )
                .await;
                Ok(Decision::Denied {
                    denial,
                    agent_name: tentative.agent_name,
                })
            }
            Ok(ReserveOutcome::AlreadyClosed(closed)) => {
                self.undo_all(&tentative, ask.model, now).await;
                let denial = Denial::request_closed(format!(
                    "This request's reservation {} was already closed (settled or expired) when its \
                     admission was retried, so it cannot go ahead on it. Send the request again.",
                    closed.id
                ));
                self.log_denial(
                    &denial,
                    &tentative.agent_id,
                    &tentative.agent_name,
                    ask,
                    token_sha256,
                )
                .await;
                Ok(Decision::Denied {
                    denial,
                    agent_name: tentative.agent_name,
                })
            }
            Ok(ReserveOutcome::GrantNotCovered(why)) => {
                self.undo_all(&tentative, ask.model, now).await;
                Err(crate::error::Error::Internal(format!(
                    "a central reservation was answered as a grant's: {why}"
                )))
            }
            Err(e) => {
                self.undo_all(&tentative, ask.model, now).await;
                Err(e.into())
            }
        }
    }

    /// [`Self::decide`], then the limits a shared store holds.
    async fn decide_and_take(
        &self,
        models: &ModelsConfig,
        token_sha256: &str,
        ask: &Ask<'_>,
        served: &Served,
        now: i64,
    ) -> Result<Result<Accepted, Box<Refused>>> {
        let decided = {
            let mut live = self.lock();
            self.decide(&mut live, models, token_sha256, ask, served, now)
        };
        let accepted = match decided {
            Ok(accepted) => accepted,
            Err(refused) => return Ok(Err(refused)),
        };
        let Some(rates) = &self.shared_rates else {
            return Ok(Ok(accepted));
        };
        let t = &accepted.tentative;
        match shared::take(rates.as_ref(), t, ask.model, now).await {
            Ok(None) => Ok(Ok(accepted)),
            Ok(Some(denial)) => {
                self.undo(t, ask.model, now);
                Ok(Err(Box::new(Refused {
                    denial,
                    agent_id: t.agent_id.clone(),
                    agent_name: t.agent_name.clone(),
                })))
            }
            Err(e) => {
                self.undo(t, ask.model, now);
                Err(e.into())
            }
        }
    }

    fn decide(
        &self,
        live: &mut Live,
        models: &ModelsConfig,
        token_sha256: &str,
        ask: &Ask<'_>,
        served: &Served,
        now: i64,
    ) -> Result<Accepted, Box<Refused>> {
        let agent_id = live
            .by_token
            .get(token_sha256)
            .or_else(|| live.process_tokens.get(token_sha256))
            .cloned();
        let record = agent_id
            .as_ref()
            .and_then(|id| live.agents.get(id))
            .map(|a| &a.record);
        let agent = authenticate(record, now).map_err(|denial| {
            let (agent_id, agent_name) = record
                .map(|r| (r.id.clone(), r.name.clone()))
                .unwrap_or_default();
            Box::new(Refused {
                denial,
                agent_id,
                agent_name,
            })
        })?;
        let (id, name) = (agent.id.clone(), agent.name.clone());
        let deny = |denial: Denial| {
            Box::new(Refused {
                denial,
                agent_id: id.clone(),
                agent_name: name.clone(),
            })
        };
        // Before any limit is looked at: a data plane scoped to other agents
        // learns nothing of this one's state.
        served.check(&name).map_err(deny)?;
        let plan = plan(&agent.into(), models, ask).map_err(deny)?;
        let model = &models.models[ask.model];
        let tokens = plan.input_tokens_bound;
        let a = live.agents.get_mut(&id).expect("looked up above");
        let (rpm, tpm, max_concurrent) = (a.record.rpm, a.record.tpm, a.record.max_concurrent);
        let shared = self.shared_rates.is_some();
        // With a shared store every limit is taken from the database after
        // this (`shared.rs`), concurrency included: the store counts every
        // replica's open reservations in the reservation's own step, and
        // this process's count would also hold ones another replica has
        // settled since (a data plane moved).
        if !shared {
            if max_concurrent > 0 && a.open >= max_concurrent {
                return Err(deny(concurrency_denial(&name, max_concurrent)));
            }
            if let Err(wait) = a.rpm.take(rpm, now) {
                return Err(deny(rpm_denial(&name, rpm, wait)));
            }
            if tpm > 0
                && let Err(wait) = a.tpm.take(tpm, tokens, now)
            {
                a.rpm.give_back(rpm);
                return Err(deny(tpm_denial(&name, tpm, wait)));
            }
            let model_tpm = model.max_tokens_per_minute;
            if model_tpm > 0 {
                let bucket = live.model_tpm.entry(model.name.clone()).or_default();
                if let Err(wait) = bucket.take(model_tpm, tokens, now) {
                    let a = live.agents.get_mut(&id).expect("looked up above");
                    a.rpm.give_back(rpm);
                    if tpm > 0 {
                        a.tpm.adjust(tpm, -(tokens as i64), now);
                    }
                    return Err(deny(model_tpm_denial(&model.name, model_tpm, wait)));
                }
            }
        }
        live.agents.get_mut(&id).expect("looked up above").open += 1;
        Ok(Accepted {
            tentative: Tentative {
                agent_id: id.clone(),
                agent_name: name.clone(),
                rpm,
                shared,
                max_concurrent,
                tpm,
                model_tpm: model.max_tokens_per_minute,
                debited_tokens: tokens,
            },
            plan,
        })
    }

    /// [`Self::undo`], and the shared limits taken after `decide`.
    async fn undo_all(&self, t: &Tentative, model: &str, now: i64) {
        self.undo(t, model, now);
        if let Some(rates) = &self.shared_rates
            && t.shared
        {
            shared::give_back(rates.as_ref(), t, model, now).await;
        }
    }

    /// Returns what `decide` took for a request that did not go through.
    fn undo(&self, t: &Tentative, model: &str, now: i64) {
        let mut live = self.lock();
        if let Some(a) = live.agents.get_mut(&t.agent_id) {
            a.open = a.open.saturating_sub(1);
            if !t.shared {
                a.rpm.give_back(t.rpm);
                if t.tpm > 0 {
                    a.tpm.adjust(t.tpm, -(t.debited_tokens as i64), now);
                }
            }
        }
        if !t.shared
            && t.model_tpm > 0
            && let Some(b) = live.model_tpm.get_mut(model)
        {
            b.adjust(t.model_tpm, -(t.debited_tokens as i64), now);
        }
    }

    /// The provider route comes from the running config, so a reservation
    /// reloaded after a restart answers a retried Admit like a fresh one.
    fn admitted_from(
        &self,
        o: &OpenReservation,
        remaining_micro: i64,
        models: &ModelsConfig,
    ) -> Admitted {
        let model = models.models.get(&o.record.model);
        Admitted {
            pricing: o.record.pricing,
            reservation_id: o.record.id.clone(),
            agent_id: o.record.agent_id.clone(),
            agent_name: o.agent_name.clone(),
            reserved_micro: o.record.amount_micro,
            output_tokens_cap: o.record.output_tokens_cap,
            output_cap_injected: o.output_cap_injected,
            remaining_micro,
            expires_at_ms: o.record.expires_at_ms,
            provider: model.map(|m| m.provider.clone()).unwrap_or_default(),
            provider_model: model.map(|m| m.provider_model.clone()).unwrap_or_default(),
        }
    }

    pub(crate) async fn log_denial(
        &self,
        d: &Denial,
        agent_id: &str,
        agent_name: &str,
        ask: &Ask<'_>,
        token_sha256: &str,
    ) {
        if agent_id.is_empty() {
            // Anyone who reaches the port can send these: one chained event
            // each would let them grow the ledger without bound. They are
            // counted in memory and written as one event per sweep.
            self.unauthenticated()
                .add(d.denied_by, token_sha256, now_ms());
            return;
        }
        let mut details = json!({
            "status": d.http_status, "code": d.code.as_str(), "model": ask.model,
            "endpoint": ask.endpoint.as_str(),
        });
        if d.retry_after_ms > 0 {
            details["retry_after_ms"] = json!(d.retry_after_ms);
        }
        let record = DenialRecord {
            agent_id: agent_id.to_string(),
            agent_name: agent_name.to_string(),
            reason: d.denied_by.to_string(),
            details,
            count: 1,
        };
        if let Err(e) = self.store.record_denial(record).await {
            tracing::error!(error = %e, reason = %d.denied_by, "could not log a denial");
        }
    }

    /// The budget denial a reservation's own step did not log (see the
    /// recall in `admit`): the same event.
    async fn log_budget_denial(&self, r: &ReservationRecord, agent_name: &str, remaining: i64) {
        let record = DenialRecord {
            agent_id: r.agent_id.clone(),
            agent_name: agent_name.to_string(),
            reason: Rule::Budget.to_string(),
            details: json!({
                "model": r.model, "needed_micro": r.amount_micro, "remaining_micro": remaining,
                "request_id": r.request_id,
            }),
            count: 1,
        };
        if let Err(e) = self.store.record_denial(record).await {
            tracing::error!(error = %e, "could not log a budget denial");
        }
    }

    fn open_count(&self, agent_id: &str) -> u32 {
        self.lock().agents.get(agent_id).map_or(0, |a| a.open)
    }

    /// Tells the supervisors of the agent's processes to kill them: those
    /// connected here at once, and, through the order kept on the
    /// processes' rows, those connected to any other control plane on the
    /// store (its change feed passes it on) or reconnecting later.
    pub fn order_kill(&self, agent_id: &str, reason: &str) {
        self.tell_supervisors(agent_id, reason);
        let supervised = self.lock().process_tokens.values().any(|a| a == agent_id);
        let now = now_ms();
        if !supervised {
            return;
        }
        {
            let mut recorded = self
                .kills_recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            recorded.retain(|_, at| now - *at < 1000);
            if recorded.contains_key(agent_id) {
                return;
            }
            recorded.insert(agent_id.to_string(), now);
        }
        let (store, agent_id, reason) =
            (self.store.clone(), agent_id.to_string(), reason.to_string());
        tokio::spawn(async move {
            if let Err(e) = store.request_kill(&agent_id, &reason).await {
                tracing::error!(error = %e, agent = %agent_id, "could not record a kill order; supervisors connected elsewhere will not see it");
            }
        });
    }

    /// Tells the supervisors connected here, for an order already on the
    /// processes' rows.
    pub fn tell_supervisors(&self, agent_id: &str, reason: &str) {
        let _ = self.kills.send(KillOrder {
            agent_id: agent_id.to_string(),
            process_id: None,
            reason: reason.to_string(),
        });
    }

    pub fn kill_orders(&self) -> broadcast::Receiver<KillOrder> {
        self.kills.subscribe()
    }

    /// Lets a supervised process authenticate as its agent.
    pub fn add_process_token(&self, token_sha256: &str, agent_id: &str) {
        self.lock()
            .process_tokens
            .insert(token_sha256.to_string(), agent_id.to_string());
    }

    pub fn revoke_process_token(&self, token_sha256: &str) {
        self.lock().process_tokens.remove(token_sha256);
    }

    /// Whether the agent can still afford anything (remaining > 0); a
    /// process started for an agent with nothing left is killed at once.
    pub async fn exhausted(&self, agent_name: &str) -> Result<bool> {
        Ok(self
            .store
            .agent_by_name(agent_name)
            .await?
            .is_some_and(|a| a.budget_micro - a.spent_micro <= 0))
    }

    /// (open reservations, live agents), for gauges.
    pub fn counts(&self) -> (usize, usize) {
        let live = self.lock();
        (live.open.len(), live.agents.len())
    }

    /// See [`Live::agent_name`].
    fn agent_name(&self, agent_id: &str) -> String {
        self.lock().agent_name(agent_id)
    }

    /// The open reservation taken for `request_id`, if any.
    pub fn reservation_for_request(&self, request_id: &str) -> Option<String> {
        self.lock().by_request.get(request_id).cloned()
    }

    pub async fn settle(&self, s: SettleInput) -> Result<Settled> {
        self.settle_many(vec![s])
            .await
            .pop()
            .expect("one settlement, one answer")
    }

    /// Settles calls (a report's, a batch's) as one ledger job, each
    /// answered apart, in order.
    pub async fn settle_many(&self, inputs: Vec<SettleInput>) -> Vec<Result<Settled>> {
        let mut results = InOrder::new(inputs.len());
        let (mut settling, mut settlements) = (Vec::new(), Vec::new());
        for (i, s) in inputs.into_iter().enumerate() {
            match self.settlement_for(&s).await {
                Ok(Some((record, settlement))) => {
                    settling.push((i, record, s, settlement.overrun_micro));
                    settlements.push(settlement);
                }
                Ok(None) => results.put(i, Ok(Settled::ALREADY)),
                Err(e) => results.put(i, Err(e)),
            }
        }
        let outcomes = self.store.settle_many(settlements).await;
        for ((i, record, s, overrun_micro), outcome) in settling.into_iter().zip(outcomes) {
            let settled = match outcome {
                Ok(outcome) => self.settled(&record, &s, overrun_micro, outcome).await,
                Err(e) => Err(e.into()),
            };
            results.put(i, settled);
        }
        results.done()
    }

    /// What settling `s` writes, with the reservation it closes; `None`
    /// when that is not open anywhere.
    async fn settlement_for(
        &self,
        s: &SettleInput,
    ) -> Result<Option<(ReservationRecord, Settlement)>> {
        let open = {
            let live = self.lock();
            live.open
                .get(&s.reservation_id)
                .map(|o| (o.record.clone(), o.agent_name.clone()))
        };
        let open = match open {
            Some(open) => Some(open),
            // Not open here: admitted through another control plane on the
            // same database (one that died, say), settled before, or never
            // admitted. The store knows which.
            None => self
                .store
                .open_reservation(&s.reservation_id)
                .await?
                .map(|r| {
                    let name = self.agent_name(&r.agent_id);
                    (r, name)
                }),
        };
        let Some((record, agent_name)) = open else {
            return Ok(None);
        };
        let aex_core::money::Charge {
            charged_micro: charge,
            overrun_micro,
        } = charge_for(&record, s);
        let mut extra_events = Vec::new();
        if overrun_micro > 0 {
            // An alert as well as a record: a provider billed (or claims to
            // have billed) more than AEX let the call cost.
            tracing::warn!(
                reservation = %record.id, agent = %agent_name, reserved_micro = record.amount_micro,
                overrun_micro, "provider reported usage above the reservation; charged the reservation, overrun recorded apart"
            );
            extra_events.push(ExtraEvent {
                kind: EventKind::Overrun,
                reason: "usage_above_reservation".to_string(),
                details: json!({"reserved_micro": record.amount_micro, "charged_micro": charge,
                       "overrun_micro": overrun_micro,
                       "prompt_tokens": s.usage.input, "completion_tokens": s.usage.output,
                       "cached_input_tokens": s.usage.cached_input, "cache_write_tokens": s.usage.cache_write}),
            });
        }
        if s.upstream_status == 429 || s.outcome == Outcome::UpstreamRateLimited {
            extra_events.push(ExtraEvent {
                kind: EventKind::UpstreamDenied,
                reason: "upstream_429".to_string(),
                details: json!({"status": s.upstream_status, "retry_after_ms": s.upstream_retry_after_ms}),
            });
        } else if s.upstream_status >= 500
            || matches!(s.outcome, Outcome::UpstreamError | Outcome::UpstreamTimeout)
        {
            extra_events.push(ExtraEvent {
                kind: EventKind::UpstreamError,
                reason: s.outcome.as_str().to_string(),
                details: json!({"status": s.upstream_status}),
            });
        }
        let settlement = Settlement {
            reservation_id: record.id.clone(),
            agent_id: record.agent_id.clone(),
            agent_name,
            closing: Closing::Finished(s.outcome),
            charge_micro: charge,
            overrun_micro,
            usage: s.usage,
            extra_events,
            // The store adds the token counts the row stores.
            details: json!({
                "reserved_micro": record.amount_micro, "usage_reported": s.usage_reported,
                "upstream_status": s.upstream_status, "model": record.model,
            }),
        };
        Ok(Some((record, settlement)))
    }

    /// After the store closed `record` (or found it closed): its slot and
    /// token debit freed here, and the agent stopped if it ran out or its
    /// overruns crossed their allowance.
    async fn settled(
        &self,
        record: &ReservationRecord,
        s: &SettleInput,
        overrun_micro: i64,
        outcome: SettleOutcome,
    ) -> Result<Settled> {
        let correction = self.forget(
            &record.id,
            Some(s.usage.input.saturating_add(s.usage.output)),
        );
        if let (Some(rates), Some(correction)) = (&self.shared_rates, correction) {
            shared::correct(rates.as_ref(), &correction, now_ms()).await;
        }
        if let SettleOutcome::Settled {
            remaining_micro, ..
        } = outcome
            && remaining_micro <= 0
        {
            self.order_kill(&record.agent_id, "budget exhausted");
        }
        Ok(match outcome {
            SettleOutcome::Settled {
                charged_micro,
                remaining_micro,
            } => Settled {
                charged_micro,
                remaining_micro,
                already_settled: false,
                overrun_micro,
                stopped_for_overruns: overrun_micro > 0
                    && self
                        .stop_for_overruns(&record.agent_id, overrun_micro)
                        .await?,
            },
            SettleOutcome::AlreadyClosed | SettleOutcome::UnknownReservation => Settled::ALREADY,
        })
    }

    /// Drops a closed reservation from memory: frees its concurrency slot
    /// and corrects the TPM debit to the tokens really used (when known);
    /// with shared limits, returns that correction for the database's
    /// buckets instead (`shared::correct`).
    fn forget(&self, reservation_id: &str, used_tokens: Option<u64>) -> Option<shared::Correction> {
        let now = now_ms();
        let mut live = self.lock();
        let o = live.open.remove(reservation_id)?;
        live.by_request.remove(&o.record.request_id);
        let delta = used_tokens.map(|used| used as i64 - o.debited_tokens as i64);
        let mut agent_tpm = 0;
        if let Some(a) = live.agents.get_mut(&o.record.agent_id) {
            a.open = a.open.saturating_sub(1);
            agent_tpm = a.record.tpm;
        }
        let delta = delta?;
        if self.shared_rates.is_some() {
            return Some(shared::Correction {
                agent_id: o.record.agent_id,
                agent_tpm,
                model: o.record.model,
                model_tpm: o.model_tpm_limit,
                delta,
            });
        }
        if agent_tpm > 0
            && let Some(a) = live.agents.get_mut(&o.record.agent_id)
        {
            a.tpm.adjust(agent_tpm, delta, now);
        }
        if o.model_tpm_limit > 0
            && let Some(b) = live.model_tpm.get_mut(&o.record.model)
        {
            b.adjust(o.model_tpm_limit, delta, now);
        }
        None
    }

    /// Settles every open reservation past its expiry by `policy`: a data
    /// plane that died mid-call never settles, and the provider may have
    /// been paid, so by default the reserved amount is charged. Each is
    /// settled on its own: one that cannot be (a row edited out of line
    /// with its agent, say) is reported and skipped, never allowed to keep
    /// every other agent's expired reservations open.
    pub async fn expire_due(&self, now: i64, policy: ExpiryPolicy) -> Result<ExpirySweep> {
        // The store's expiry is the one every control plane heartbeats (a
        // data plane may have moved to another replica): only what is due
        // there expires, whichever replica holds it in memory.
        let store_due = self.store.due_reservations(now).await?;
        self.drop_closed_elsewhere(now, &store_due).await;
        let mut due: Vec<(ReservationRecord, String)> = Vec::new();
        {
            let live = self.lock();
            for r in store_due {
                match live.open.get(&r.id) {
                    Some(o) => due.push((r, o.agent_name.clone())),
                    // Only the store knows it: admitted through another
                    // control plane that stopped sweeping (killed, say). One
                    // TTL later than its own: the grace keeps a sweeper whose
                    // clock runs ahead (by less than a TTL) off a reservation
                    // its replica has just taken and not yet recorded as
                    // open. Settling is a compare-and-set, so two sweepers
                    // never both expire one.
                    None if r.expires_at_ms <= now - self.reservation_ttl_ms => {
                        let name = live.agent_name(&r.agent_id);
                        due.push((r, name));
                    }
                    None => {}
                }
            }
        }
        let mut sweep = ExpirySweep::default();
        for (r, agent_name) in due {
            let charge = match policy {
                ExpiryPolicy::Charge => r.amount_micro,
                ExpiryPolicy::Release => 0,
            };
            let settled = self
                .store
                .settle(Settlement {
                    reservation_id: r.id.clone(),
                    agent_id: r.agent_id.clone(),
                    agent_name: agent_name.clone(),
                    closing: Closing::Expired,
                    charge_micro: charge,
                    overrun_micro: 0,
                    usage: aex_core::money::TokenUsage::default(),
                    extra_events: Vec::new(),
                    details: json!({
                        "policy": policy.as_str(), "reserved_micro": r.amount_micro,
                        "expires_at_ms": r.expires_at_ms, "model": r.model,
                    }),
                })
                .await;
            let outcome = match settled {
                Ok(outcome) => outcome,
                Err(e) => {
                    // Left open and in memory: audit names it, and the next
                    // sweep tries again (after a repair, it succeeds).
                    let first = self
                        .unexpirable
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(r.id.clone());
                    if first {
                        tracing::error!(
                            reservation = %r.id, agent = %agent_name, error = %e,
                            "cannot expire this reservation; skipped it and went on with the others (run `aexctl audit`)"
                        );
                    }
                    sweep.failed.push((r.id.clone(), e.to_string()));
                    continue;
                }
            };
            let _ = self.forget(&r.id, None);
            if matches!(outcome, SettleOutcome::Settled { .. }) {
                tracing::warn!(reservation = %r.id, charged = charge, "reservation expired");
                sweep.expired += 1;
            }
        }
        Ok(sweep)
    }

    /// Writes the unauthenticated denials gathered since the last call as one
    /// event per reason (its `details.count` and counter increment are the
    /// number of denials). Called by the sweeper and at shutdown; a crash
    /// loses at most one sweep interval of these counts, never a decision
    /// about money. On failure they are kept for the next call.
    pub async fn flush_unauthenticated(&self) -> Result<()> {
        let gathered = std::mem::take(&mut *self.unauthenticated());
        let reasons: Vec<(Rule, u64)> = gathered.by_reason.iter().map(|(r, c)| (*r, *c)).collect();
        for (i, &(reason, count)) in reasons.iter().enumerate() {
            let record = DenialRecord {
                agent_id: String::new(),
                agent_name: String::new(),
                reason: reason.to_string(),
                details: json!({
                    "status": 401, "code": "invalid_api_key", "count": count,
                    "first_ts_ms": gathered.first_ms, "last_ts_ms": gathered.last_ms,
                    "token_sha256_prefixes": gathered.token_prefixes,
                }),
                count,
            };
            if let Err(e) = self.store.record_denial(record).await {
                // This reason and the ones not written yet go back.
                let mut pending = self.unauthenticated();
                if pending.by_reason.is_empty() {
                    pending.first_ms = gathered.first_ms;
                }
                pending.last_ms = pending.last_ms.max(gathered.last_ms);
                for &(reason, count) in &reasons[i..] {
                    *pending.by_reason.entry(reason).or_default() += count;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Unauthenticated denials not yet written (status adds them, so it
    /// counts exactly what clients saw).
    pub fn pending_unauthenticated(&self) -> u64 {
        self.unauthenticated().pending()
    }

    /// Extends open reservations of long streams; returns the ids that are
    /// closed (settled or expired).
    pub async fn heartbeat(&self, ids: &[String]) -> Result<(i64, Vec<String>)> {
        let expires = now_ms() + self.reservation_ttl_ms;
        let closed = self.store.extend_reservations(ids, expires).await?;
        {
            let mut live = self.lock();
            for id in ids {
                if let Some(o) = live.open.get_mut(id) {
                    o.record.expires_at_ms = expires;
                }
            }
        }
        // Closed through another control plane: nothing of it is open here.
        for id in &closed {
            let _ = self.forget(id, None);
        }
        Ok((expires, closed))
    }

    /// Reservations this process holds open past their expiry as it knows
    /// it, that the store does not list as due: heartbeated, settled or
    /// expired through another control plane (a data plane moved). Each is
    /// looked up once; a closed one is dropped from memory (freeing its
    /// slot), an open one takes the store's expiry.
    async fn drop_closed_elsewhere(&self, now: i64, store_due: &[ReservationRecord]) {
        let due: std::collections::HashSet<&str> =
            store_due.iter().map(|r| r.id.as_str()).collect();
        let stale: Vec<String> = {
            let live = self.lock();
            live.open
                .values()
                .filter(|o| o.record.expires_at_ms <= now)
                .filter(|o| !due.contains(o.record.id.as_str()))
                .map(|o| o.record.id.clone())
                .collect()
        };
        for id in stale {
            match self.store.open_reservation(&id).await {
                Ok(None) => {
                    let _ = self.forget(&id, None);
                }
                Ok(Some(r)) => {
                    if let Some(o) = self.lock().open.get_mut(&id) {
                        o.record.expires_at_ms = r.expires_at_ms;
                    }
                }
                // Asked again at the next sweep; the expiries go on.
                Err(e) => {
                    tracing::warn!(reservation = %id, error = %e, "cannot tell whether a reservation was closed elsewhere");
                }
            }
        }
    }

    /// `Endpoint::Models` needs authentication only: no reservation.
    pub fn authenticate_only(
        &self,
        token_sha256: &str,
    ) -> std::result::Result<AgentRecord, Denial> {
        let live = self.lock();
        let record = live
            .by_token
            .get(token_sha256)
            .or_else(|| live.process_tokens.get(token_sha256))
            .and_then(|id| live.agents.get(id))
            .map(|a| &a.record);
        authenticate(record, now_ms()).cloned()
    }
}

fn concurrency_denial(agent_name: &str, max_concurrent: u32) -> Denial {
    Denial::rate_limited(
        Rule::Concurrency,
        1000,
        format!(
            "Rate limit reached: agent '{agent_name}' already has {max_concurrent} request(s) in flight \
             (its concurrency limit). Retry when one finishes."
        ),
    )
}

fn rpm_denial(agent_name: &str, rpm: u32, wait_ms: u64) -> Denial {
    Denial::rate_limited(
        Rule::Rpm,
        wait_ms,
        format!(
            "Rate limit reached: agent '{agent_name}' is limited to {rpm} requests per minute. Retry in {wait_ms} ms."
        ),
    )
}

fn tpm_denial(agent_name: &str, tpm: u64, wait_ms: u64) -> Denial {
    Denial::rate_limited(
        Rule::Tpm,
        wait_ms,
        format!(
            "Rate limit reached: agent '{agent_name}' is limited to {tpm} tokens per minute. Retry in {wait_ms} ms."
        ),
    )
}

fn model_tpm_denial(model: &str, model_tpm: u64, wait_ms: u64) -> Denial {
    Denial::rate_limited(
        Rule::ModelTpm,
        wait_ms,
        format!(
            "Rate limit reached: model '{model}' is limited to {model_tpm} tokens per minute across all agents. Retry in {wait_ms} ms."
        ),
    )
}
