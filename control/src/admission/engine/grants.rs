//! Grants on the control plane (docs/GRANTS.md): issuing them to data
//! planes, taking them back, and expiring those whose data plane stopped
//! reporting (the calls admitted from them: `reported.rs`; recalls:
//! `recall.rs`). Every amount is moved by the store, in the same step as its
//! event; this file decides when.

use super::AdmissionEngine;
use crate::clock::now_ms;
use crate::error::Result;
use aex_core::grant::{
    GrantAsk, GrantEnd, GrantOutcome, GrantRecord, GrantRefusal, LIFETIME_MS, NewGrant, NoGrant,
    request_share,
};
use std::collections::{HashMap, HashSet};

/// After a recall, asks for the agent's grants are refused this long: the
/// agent is near an edge, and its calls are decided centrally meanwhile
/// (its data planes stop asking as long).
pub(super) const NO_GRANT_AFTER_RECALL_MS: i64 =
    aex_core::grant::QUIET_AFTER_REFUSAL.as_millis() as i64;

/// What this control plane remembers about grants, beyond the store.
#[derive(Default)]
pub(super) struct GrantBook {
    /// The latest deadline of a grant this control plane issued, by agent:
    /// until then a central refusal must ask the store whether the agent's
    /// budget is held by grants.
    pub(super) issued_until: HashMap<String, i64>,
    /// When the agent's grants were last recalled.
    pub(super) recalled_at: HashMap<String, i64>,
    /// Recalls since start, for the metrics.
    pub(super) recalls: u64,
    /// The data planes that admitted calls of each agent lately, and when
    /// last: a grant is a fair share among them.
    serving: HashMap<String, HashMap<String, i64>>,
}

/// How long a data plane counts as serving an agent after its last call.
const SERVING_WINDOW_MS: i64 = 10_000;

impl GrantBook {
    /// What a control plane starting over a store knows: the grants open
    /// there may hold budget its refusals must recall.
    pub(super) fn from_open(open: &[GrantRecord]) -> Self {
        let mut book = Self::default();
        for g in open {
            let until = book.issued_until.entry(g.agent_id.clone()).or_default();
            *until = (*until).max(g.deadline_ms);
        }
        book
    }

    fn note_serving(&mut self, agent_id: &str, data_plane: &str, now: i64) {
        let planes = self.serving.entry(agent_id.to_string()).or_default();
        planes.insert(data_plane.to_string(), now);
    }

    fn serving(&self, agent_id: &str, now: i64) -> u32 {
        self.serving.get(agent_id).map_or(0, |planes| {
            planes
                .values()
                .filter(|at| now - **at < SERVING_WINDOW_MS)
                .count() as u32
        })
    }
}

/// A data plane's ask for a grant.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub grant_id: String,
    pub agent_id: String,
    pub worst_call_micro: i64,
    pub spend_per_s_micro: i64,
    pub calls_per_s: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantAnswer {
    Issued {
        grant: GrantRecord,
        /// The agent's budget left outside its grants and reservations.
        remaining_micro: i64,
    },
    Refused(GrantRefusal),
}

impl AdmissionEngine {
    /// Issues a grant for `data_plane`, or says why not. Idempotent by the
    /// grant id the data plane chose: an ask resent after a lost answer
    /// gets the grant the first one issued.
    pub async fn request_grant(&self, data_plane: &str, ask: GrantRequest) -> Result<GrantAnswer> {
        let now = now_ms();
        let agent = self
            .lock()
            .agents
            .get(&ask.agent_id)
            .map(|a| a.record.clone());
        let Some(agent) = agent else {
            return Ok(GrantAnswer::Refused(GrantRefusal::NotAdmissible));
        };
        let open = self.store.open_grants(Some(&agent.id)).await?;
        if let Some(existing) = open.iter().find(|g| g.id == ask.grant_id) {
            let remaining_micro = self.remaining(&agent.id).await?;
            return Ok(GrantAnswer::Issued {
                grant: existing.clone(),
                remaining_micro,
            });
        }
        let refusal = if aex_core::policy::admissible(&(&agent).into(), now).is_err() {
            Some(GrantRefusal::NotAdmissible)
        } else if agent.tpm > 0 || agent.max_concurrent > 0 {
            Some(GrantRefusal::Limits)
        } else if self
            .grant_book()
            .recalled_at
            .get(&agent.id)
            .is_some_and(|at| now - at < NO_GRANT_AFTER_RECALL_MS)
        {
            Some(GrantRefusal::Recalled)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return Ok(GrantAnswer::Refused(refusal));
        }
        let other_planes: HashSet<&str> = open
            .iter()
            .filter(|g| g.data_plane != data_plane)
            .map(|g| g.data_plane.as_str())
            .collect();
        // Every data plane that holds a grant of the agent or served it
        // lately gets a fair share, whether or not it has asked yet.
        let planes = {
            let mut book = self.grant_book();
            book.note_serving(&agent.id, data_plane, now);
            (other_planes.len() as u32 + 1).max(book.serving(&agent.id, now))
        };
        let requests = match self
            .take_credits(&agent.id, agent.rpm, planes, ask.calls_per_s, now)
            .await?
        {
            Ok(requests) => requests,
            Err(no) => return Ok(GrantAnswer::Refused(GrantRefusal::from(no))),
        };
        let deadline_ms = now + LIFETIME_MS;
        let outcome = self
            .store
            .issue_grant(NewGrant {
                id: ask.grant_id.clone(),
                agent_id: agent.id.clone(),
                agent_name: agent.name.clone(),
                data_plane: data_plane.to_string(),
                created_at_ms: now,
                deadline_ms,
                requests,
                ask: GrantAsk {
                    // The store's, read in the issuing step.
                    free_micro: 0,
                    data_planes: planes,
                    worst_call_micro: ask.worst_call_micro,
                    spend_per_s_micro: ask.spend_per_s_micro,
                    lifetime_ms: LIFETIME_MS,
                    rpm_headroom: None,
                    calls_per_s: ask.calls_per_s,
                },
                replaces: None,
            })
            .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                self.give_back_credits(&agent.id, agent.rpm, requests).await;
                return Err(e.into());
            }
        };
        match outcome {
            GrantOutcome::Issued(grant) => {
                {
                    let mut book = self.grant_book();
                    let until = book.issued_until.entry(agent.id.clone()).or_default();
                    *until = (*until).max(grant.deadline_ms);
                }
                let remaining_micro = self.remaining(&agent.id).await?;
                Ok(GrantAnswer::Issued {
                    grant,
                    remaining_micro,
                })
            }
            GrantOutcome::Refused(no) => {
                self.give_back_credits(&agent.id, agent.rpm, requests).await;
                Ok(GrantAnswer::Refused(GrantRefusal::from(no)))
            }
        }
    }

    async fn remaining(&self, agent_id: &str) -> Result<i64> {
        Ok(self
            .store
            .agent_by_id(agent_id)
            .await?
            .map_or(0, |a| a.remaining_micro()))
    }

    /// Takes the request credits of a grant from the agent's RPM limiter
    /// (`Ok(None)`: it has no RPM limit), or says why there are none.
    async fn take_credits(
        &self,
        agent_id: &str,
        rpm: u32,
        planes: u32,
        calls_per_s: u32,
        now: i64,
    ) -> Result<Result<Option<u32>, NoGrant>> {
        if rpm == 0 {
            return Ok(Ok(None));
        }
        if let Some(rates) = &self.shared_rates {
            let key = super::shared::rpm_key(agent_id);
            let headroom = rates.headroom(&key, rpm, now).await?;
            let n = match request_share(headroom, planes, calls_per_s, LIFETIME_MS) {
                Ok(n) => n,
                Err(no) => return Ok(Err(no)),
            };
            // Another replica may have taken some since the read.
            return Ok(match rates.take_n(&key, rpm, n, now).await? {
                Ok(()) => Ok(Some(n)),
                Err(_) => Err(NoGrant::RpmEdge),
            });
        }
        let mut live = self.lock();
        let Some(a) = live.agents.get_mut(agent_id) else {
            return Ok(Err(NoGrant::Invalid));
        };
        let headroom = a.rpm.headroom(rpm, now);
        Ok(
            match request_share(headroom, planes, calls_per_s, LIFETIME_MS) {
                Ok(n) => match a.rpm.take_n(rpm, n, now) {
                    Ok(()) => Ok(Some(n)),
                    Err(_) => Err(NoGrant::RpmEdge),
                },
                Err(no) => Err(no),
            },
        )
    }

    /// Returns request credits a grant did not use to the RPM limiter.
    async fn give_back_credits(&self, agent_id: &str, rpm: u32, credits: Option<u32>) {
        let Some(n) = credits.filter(|n| *n > 0 && rpm > 0) else {
            return;
        };
        if let Some(rates) = &self.shared_rates {
            let key = super::shared::rpm_key(agent_id);
            if let Err(e) = rates.give_back_n(&key, rpm, n).await {
                tracing::warn!(error = %e, agent = %agent_id, "could not give back a grant's request credits");
            }
            return;
        }
        if let Some(a) = self.lock().agents.get_mut(agent_id) {
            a.rpm.give_back_n(rpm, n);
        }
    }

    /// Gives a grant back: what it did not use returns to the budget, and
    /// its unused request credits to the RPM limiter. Nothing happens to a
    /// grant already ended.
    pub async fn return_grant(&self, grant_id: &str, agent_id: &str) -> Result<()> {
        let ended = self
            .store
            .end_grant(grant_id, agent_id, GrantEnd::Returned, now_ms())
            .await?;
        if let Some(g) = ended {
            let rpm = self.lock().agents.get(agent_id).map_or(0, |a| a.record.rpm);
            let unused = g.requests.map(|r| r.saturating_sub(g.requests_used));
            self.give_back_credits(agent_id, rpm, unused).await;
        }
        Ok(())
    }

    /// Notes that `data_plane` admitted a call of the agent centrally.
    pub fn note_serving(&self, agent_id: &str, data_plane: &str, now: i64) {
        if data_plane.is_empty() {
            return;
        }
        self.grant_book().note_serving(agent_id, data_plane, now);
    }

    /// Ends the grants past their deadline: their data plane stopped
    /// reporting (killed, cut off). What they did not report is charged by
    /// the expiry policy, as one event each. Returns how many ended.
    pub async fn expire_grants(&self, now: i64, policy: super::ExpiryPolicy) -> Result<usize> {
        let due: Vec<GrantRecord> = self
            .store
            .open_grants(None)
            .await?
            .into_iter()
            .filter(|g| g.deadline_ms <= now)
            .collect();
        let mut ended = 0;
        for g in due {
            let end = GrantEnd::Expired {
                charge: policy == super::ExpiryPolicy::Charge,
            };
            // The clock at the end, as for any return: `now` says which are due.
            match self
                .store
                .end_grant(&g.id, &g.agent_id, end, now_ms())
                .await
            {
                Ok(Some(_)) => ended += 1,
                Ok(None) => {}
                Err(e) => tracing::error!(grant = %g.id, error = %e, "could not expire a grant"),
            }
        }
        let mut book = self.grant_book();
        book.issued_until.retain(|_, until| *until >= now);
        book.serving.retain(|_, planes| {
            planes.retain(|_, at| now - *at < SERVING_WINDOW_MS);
            !planes.is_empty()
        });
        book.recalled_at
            .retain(|_, at| now - *at < NO_GRANT_AFTER_RECALL_MS);
        Ok(ended)
    }

    /// The open grants of an agent (or of all), for `agent inspect`.
    pub async fn open_grants(&self, agent_id: Option<&str>) -> Result<Vec<GrantRecord>> {
        Ok(self.store.open_grants(agent_id).await?)
    }

    /// How many times grants were recalled since start.
    pub fn grant_recalls(&self) -> u64 {
        self.grant_book().recalls
    }

    pub fn reservation_ttl_ms(&self) -> i64 {
        self.reservation_ttl_ms
    }

    pub(super) fn grant_book(&self) -> std::sync::MutexGuard<'_, GrantBook> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }
}
