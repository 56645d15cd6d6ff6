//! Admitting a call: the policy and limits decided in memory, then the
//! worst case reserved in the store; a refusal near an edge recalls the
//! agent's grants and decides once more.

use super::decide::{Accepted, Refused};
use super::*;

impl AdmissionEngine {
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

    /// The provider route comes from the running config, so a reservation
    /// reloaded after a restart answers a retried Admit like a fresh one.
    pub(super) fn admitted_from(
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
}
