//! The admission engine: every model call decided, reserved, settled or
//! expired. Policy, limits and idempotency are decided in memory under one
//! short lock (never held across an await); the only I/O on the hot path is
//! one database transaction to reserve and one to settle. A file per
//! concern: what it answers (`types.rs`), what it holds (`live.rs`),
//! admitting (`admit.rs`, deciding in memory in `decide.rs`), refusing
//! (`denials.rs`), settling (`settle.rs`), expiring (`expiry.rs`), kill
//! orders (`kill.rs`), grants (`grants.rs`; the calls reported from them in
//! `reported.rs`, their recall in `recall.rs`), and the smaller rules
//! beside them.

mod admit;
mod decide;
mod denials;
mod expiry;
mod grants;
mod kill;
mod live;
mod overruns;
mod recall;
mod reported;
mod served;
mod settle;
mod shared;
mod tokens;
mod types;

use super::policy::{Ask, Denial, Rule, authenticate, plan};
use crate::clock::now_ms;
use crate::error::Result;
use crate::in_order::InOrder;
use crate::storage::{
    AgentRecord, AgentState, Closing, DenialRecord, EventKind, ExtraEvent, NewReservation,
    ProcessRecord, ReservationRecord, ReserveOutcome, SettleOutcome, Settlement, Store, StoreError,
};
use aex_core::config::ModelsConfig;
use aex_core::credential::Served;
use aex_core::inflight::CallDurations;
use aex_core::limiter::{Gcra, TokenBucket};
use aex_core::secrets::new_id;
use decide::Tentative;
use denials::UnauthenticatedDenials;
use live::{Live, LiveAgent, OpenReservation};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

pub use aex_core::reservation::{ExpiryPolicy, Outcome};
pub use aex_proto::convert::endpoint_from_pb;
pub use grants::{GrantAnswer, GrantRequest};
pub use reported::{LocalAdmit, LocalAdmitOutcome};
pub use settle::charge_for;
pub use types::{Admitted, Change, Decision, ExpirySweep, KillOrder, SettleInput, Settled};

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
                    durations: CallDurations::default(),
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

    fn open_count(&self, agent_id: &str) -> u32 {
        self.lock().agents.get(agent_id).map_or(0, |a| a.open)
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
}
