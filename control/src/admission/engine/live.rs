//! What the engine holds in memory: live agents, open reservations, the
//! tokens it knows; and admin changes applied to it (one at a time, after
//! the store) for the very next request and every watching data plane.

use super::*;

pub(super) struct LiveAgent {
    pub(super) record: AgentRecord,
    pub(super) rpm: Gcra,
    pub(super) tpm: TokenBucket,
    pub(super) open: u32,
    /// How long its calls take: what a concurrency refusal's wait is
    /// derived from (`aex_core::inflight`).
    pub(super) durations: CallDurations,
}

pub(super) struct OpenReservation {
    pub(super) record: ReservationRecord,
    pub(super) agent_name: String,
    pub(super) output_cap_injected: bool,
    /// Tokens debited from the TPM buckets at admission.
    pub(super) debited_tokens: u64,
    /// The model's tokens-per-minute limit when admitted (0 = none).
    pub(super) model_tpm_limit: u64,
}

#[derive(Default)]
pub(super) struct Live {
    pub(super) by_token: HashMap<String, String>,
    /// Tokens of supervised processes (`aexctl run`) → agent id; separate
    /// from `by_token` so rotating the agent's own token leaves them alone.
    pub(super) process_tokens: HashMap<String, String>,
    pub(super) agents: HashMap<String, LiveAgent>,
    pub(super) open: HashMap<String, OpenReservation>,
    pub(super) by_request: HashMap<String, String>,
    pub(super) model_tpm: HashMap<String, TokenBucket>,
}

impl Live {
    /// An agent's name as this control plane knows it ("" if it does not).
    pub(super) fn agent_name(&self, agent_id: &str) -> String {
        self.agents
            .get(agent_id)
            .map(|a| a.record.name.clone())
            .unwrap_or_default()
    }
}

impl AdmissionEngine {
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
    pub(super) async fn refresh_processes(&self, agent_id: &str) -> Result<()> {
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
    pub(super) fn agent_changed(&self, record: &AgentRecord) {
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
                        durations: CallDurations::default(),
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
}
