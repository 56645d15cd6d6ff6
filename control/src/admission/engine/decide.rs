//! The in-memory decision: who is calling, the policy, and the limits
//! this control plane holds (RPM, TPM, concurrency), taken under one short
//! lock and given back when the store says no; with a shared store the
//! limits are then taken from the database (`shared.rs`).

use super::*;

/// What admission took in memory before the database said yes or no.
pub(super) struct Tentative {
    pub(super) agent_id: String,
    pub(super) agent_name: String,
    pub(super) rpm: u32,
    /// The RPM and TPM limits are the database's, shared with other control
    /// planes (taken after `decide`, see `shared.rs`), not this process's.
    pub(super) shared: bool,
    /// Checked again by a shared store, for the reservations other control
    /// planes hold.
    pub(super) max_concurrent: u32,
    pub(super) tpm: u64,
    pub(super) model_tpm: u64,
    pub(super) debited_tokens: u64,
}

pub(super) struct Accepted {
    pub(super) tentative: Tentative,
    pub(super) plan: crate::admission::policy::Plan,
}

pub(super) struct Refused {
    pub(super) denial: Denial,
    pub(super) agent_id: String,
    pub(super) agent_name: String,
}

impl AdmissionEngine {
    /// [`Self::decide`], then the limits a shared store holds.
    pub(super) async fn decide_and_take(
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

    pub(super) fn decide(
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
                // The wait is worked out only for a refusal a client will see
                // (`concurrency_denial`).
                let wait = aex_core::inflight::UNKNOWN_WAIT_MS;
                return Err(deny(Denial::concurrency(&name, max_concurrent, wait)));
            }
            if let Err(wait) = a.rpm.take(rpm, now) {
                return Err(deny(Denial::rpm(&name, rpm, wait)));
            }
            if tpm > 0
                && let Err(wait) = a.tpm.take(tpm, tokens, now)
            {
                a.rpm.give_back(rpm);
                return Err(deny(Denial::tpm(&name, tpm, wait)));
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
                    return Err(deny(Denial::model_tpm(&model.name, model_tpm, wait)));
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
    pub(super) async fn undo_all(&self, t: &Tentative, model: &str, now: i64) {
        self.undo(t, model, now);
        if let Some(rates) = &self.shared_rates
            && t.shared
        {
            shared::give_back(rates.as_ref(), t, model, now).await;
        }
    }

    /// Returns what `decide` took for a request that did not go through.
    pub(super) fn undo(&self, t: &Tentative, model: &str, now: i64) {
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

    /// The concurrency refusal a client will see: its wait is when one of
    /// the agent's calls in flight here is expected to end
    /// (`aex_core::inflight`), found by a scan of the open reservations —
    /// made for these only, not for the asks of a call waiting for a slot.
    pub(super) fn concurrency_denial(&self, agent_id: &str, now: i64) -> Option<Denial> {
        let live = self.lock();
        let a = live.agents.get(agent_id)?;
        let started = live
            .open
            .values()
            .filter(|o| o.record.agent_id == agent_id)
            .map(|o| o.record.created_at_ms);
        let wait = a.durations.slot_wait_ms(started, now);
        Some(Denial::concurrency(
            &a.record.name,
            a.record.max_concurrent,
            wait,
        ))
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
