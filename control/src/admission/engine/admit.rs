//! Admitting a call, as the sequence of its decisions: a retry gets its
//! reservation back; otherwise the call is decided in memory (`decide.rs`),
//! its worst case is reserved in the store, and the store's answer is the
//! client's. A refusal that budget or request credits held by the agent's
//! grants may have caused recalls them and decides once more; only the
//! decision the client sees is logged.

use super::decide::{Accepted, Refused};
use super::*;

/// A call decided in memory, on its way to the store.
struct Reserving<'a> {
    tentative: Tentative,
    plan: crate::admission::policy::Plan,
    record: ReservationRecord,
    ask: &'a Ask<'a>,
    token_sha256: &'a str,
    /// The data plane waits for a slot if refused for one (`waits_for_slot`).
    waits: bool,
    /// When it was decided (after any recall).
    now: i64,
}

/// Whether a refusal is one the data plane waits out rather than answers
/// (issue #33): a concurrency refusal of a call whose data plane waits for
/// a slot. It asks again when one may have freed, and its last ask, once
/// its wait is over, is logged if refused; so the ledger holds the
/// refusals clients saw, not each look at a full set of slots.
fn waits_for_slot(denial: &Denial, waits: bool) -> bool {
    waits && denial.denied_by == Rule::Concurrency
}

impl AdmissionEngine {
    /// Decides one call for the data plane that asks, which may act only
    /// for the agents `served` names (its credential's scope). `waits`: the
    /// data plane waits for a concurrency slot if refused for one, and asks
    /// again (such a refusal is not logged: [`waits_for_slot`]).
    pub async fn admit(
        &self,
        models: &ModelsConfig,
        request_id: &str,
        token_sha256: &str,
        ask: &Ask<'_>,
        served: &Served,
        waits: bool,
    ) -> Result<Decision> {
        if let Some(admitted) = self.retried(models, request_id, served).await? {
            return Ok(Decision::Admitted(admitted));
        }
        let (Accepted { tentative, plan }, now) = match self
            .decide_recalling(models, request_id, token_sha256, ask, served, waits)
            .await?
        {
            Ok(decided) => decided,
            Err(denied) => return Ok(denied),
        };
        let record = ReservationRecord {
            id: new_id("rsv"),
            request_id: request_id.to_string(),
            agent_id: tentative.agent_id.clone(),
            model: ask.model.to_string(),
            amount_micro: plan.reserve_micro,
            pricing: models.models[ask.model].pricing,
            input_tokens_bound: plan.input_tokens_bound,
            output_tokens_cap: plan.output_tokens_cap,
            created_at_ms: now,
            expires_at_ms: now + self.reservation_ttl_ms,
        };
        let call = Reserving {
            tentative,
            plan,
            record,
            ask,
            token_sha256,
            waits,
            now,
        };
        let outcome = self.reserve_recalling(&call).await;
        self.answer(call, outcome, models).await
    }

    /// A retry of a request this control plane admitted: the same
    /// reservation, if the store still has it open (another control plane
    /// may have settled or expired it since; the reserve then answers that
    /// it closed).
    async fn retried(
        &self,
        models: &ModelsConfig,
        request_id: &str,
        served: &Served,
    ) -> Result<Option<Admitted>> {
        let retried = {
            let live = self.lock();
            live.by_request
                .get(request_id)
                .and_then(|id| live.open.get(id))
                .filter(|o| served.serves(&o.agent_name))
                .map(|o| (o.record.id.clone(), self.admitted_from(o, 0, models)))
        };
        let Some((id, admitted)) = retried else {
            return Ok(None);
        };
        if self.store.open_reservation(&id).await?.is_some() {
            return Ok(Some(admitted));
        }
        let _ = self.forget(&id, None);
        Ok(None)
    }

    /// The in-memory decision, taken once more after learning a token
    /// created through another control plane (`tokens.rs`), or after
    /// recalling the grants that may hold the request credits an RPM
    /// refusal lacked. A refusal is logged and answered; an acceptance
    /// comes with the time it was decided at.
    async fn decide_recalling(
        &self,
        models: &ModelsConfig,
        request_id: &str,
        token_sha256: &str,
        ask: &Ask<'_>,
        served: &Served,
        waits: bool,
    ) -> Result<std::result::Result<(Accepted, i64), Decision>> {
        let mut now = now_ms();
        let (mut learned, mut recalled) = (false, false);
        loop {
            let refused = match self
                .decide_and_take(models, token_sha256, ask, served, now)
                .await?
            {
                Ok(accepted) => return Ok(Ok((accepted, now))),
                Err(refused) => refused,
            };
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
                mut denial,
                agent_id,
                agent_name,
            } = *refused;
            if denial.denied_by == Rule::Auth
                && agent_id.is_empty()
                && let Some(retired) = self.retired_denial(token_sha256).await
            {
                denial = retired;
            }
            if denial.denied_by == Rule::Concurrency
                && !waits
                && let Some(told) = self.concurrency_denial(&agent_id, now)
            {
                denial = told;
            }
            if !waits_for_slot(&denial, waits) {
                self.log_denial(
                    &denial,
                    &agent_id,
                    &agent_name,
                    ask,
                    request_id,
                    token_sha256,
                )
                .await;
            }
            return Ok(Err(Decision::Denied { denial, agent_name }));
        }
    }

    /// The reservation in the store, taken once more after recalling the
    /// grants that may hold the budget it lacked. On an error the limits
    /// taken in memory are given back.
    async fn reserve_recalling(
        &self,
        call: &Reserving<'_>,
    ) -> Result<std::result::Result<ReserveOutcome, StoreError>> {
        let t = &call.tentative;
        // The store adds what the reservation row holds (request id, model,
        // bounds, prices); these are the particulars only admission knows.
        let details = json!({
            "endpoint": call.ask.endpoint.as_str(), "stream": call.ask.stream,
            "output_cap_injected": call.plan.output_cap_injected,
        });
        let may_hold_grants = self.may_hold_grants(&t.agent_id, call.now);
        let mut recalled = false;
        loop {
            let outcome = self
                .store
                .reserve(NewReservation {
                    record: call.record.clone(),
                    agent_name: t.agent_name.clone(),
                    details: details.clone(),
                    // A store only this control plane uses is covered by the
                    // in-memory count in `decide`; a shared one counts again,
                    // for the reservations other replicas hold.
                    max_open: if self.shared_rates.is_some() {
                        t.max_concurrent
                    } else {
                        0
                    },
                    grant_id: None,
                    log_budget_denial: !may_hold_grants || recalled,
                    at_ms: now_ms(),
                })
                .await;
            if let Ok(ReserveOutcome::InsufficientBudget { remaining_micro }) = &outcome
                && may_hold_grants
                && !recalled
            {
                recalled = true;
                match self.recall_grants(&t.agent_id).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.log_budget_denial(
                            &call.record,
                            &t.agent_name,
                            call.ask.endpoint,
                            *remaining_micro,
                        )
                        .await
                    }
                    Err(e) => {
                        self.undo_all(t, call.ask.model, call.now).await;
                        return Err(e);
                    }
                }
            }
            return Ok(outcome);
        }
    }

    /// What the store's answer means for the client; anything but a new
    /// reservation gives back the limits taken in memory.
    async fn answer(
        &self,
        call: Reserving<'_>,
        outcome: Result<std::result::Result<ReserveOutcome, StoreError>>,
        models: &ModelsConfig,
    ) -> Result<Decision> {
        let Reserving {
            tentative: t,
            plan,
            record,
            ask,
            token_sha256,
            waits,
            now,
        } = call;
        let outcome = outcome?;
        if !matches!(outcome, Ok(ReserveOutcome::Reserved { .. })) {
            // Anything but a new reservation gives back what was taken in
            // memory.
            self.undo_all(&t, ask.model, now).await;
        }
        let denial = match outcome {
            Ok(ReserveOutcome::Reserved { remaining_micro }) => {
                let open = OpenReservation {
                    record,
                    agent_name: t.agent_name.clone(),
                    output_cap_injected: plan.output_cap_injected,
                    debited_tokens: t.debited_tokens,
                    model_tpm_limit: t.model_tpm,
                };
                let admitted = self.admitted_from(&open, remaining_micro, models);
                let mut live = self.lock();
                live.by_request
                    .insert(open.record.request_id.clone(), open.record.id.clone());
                live.open.insert(open.record.id.clone(), open);
                return Ok(Decision::Admitted(admitted));
            }
            Ok(ReserveOutcome::InsufficientBudget { remaining_micro }) => {
                // Nothing in flight can free budget: the agent cannot go on.
                if self.open_count(&t.agent_id) == 0 {
                    self.order_kill(&t.agent_id, "budget exhausted");
                }
                // Logged by the store, or after the recall.
                return Ok(Decision::Denied {
                    denial: Denial::budget_exceeded(&t.agent_name, remaining_micro, &plan),
                    agent_name: t.agent_name,
                });
            }
            Ok(ReserveOutcome::AlreadyAdmitted(existing)) => {
                // A concurrent retry of the same request won the race.
                let open = OpenReservation {
                    record: existing,
                    agent_name: t.agent_name,
                    output_cap_injected: plan.output_cap_injected,
                    debited_tokens: 0,
                    model_tpm_limit: 0,
                };
                return Ok(Decision::Admitted(self.admitted_from(&open, 0, models)));
            }
            Ok(ReserveOutcome::TooManyOpen) if !waits => self
                .concurrency_denial(&t.agent_id, now_ms())
                .unwrap_or_else(|| {
                    let wait = aex_core::inflight::UNKNOWN_WAIT_MS;
                    Denial::concurrency(&t.agent_name, t.max_concurrent, wait)
                }),
            Ok(ReserveOutcome::TooManyOpen) => {
                let wait = aex_core::inflight::UNKNOWN_WAIT_MS;
                Denial::concurrency(&t.agent_name, t.max_concurrent, wait)
            }
            Ok(ReserveOutcome::AlreadyClosed(closed)) => Denial::retried_after_close(&closed.id),
            Ok(ReserveOutcome::GrantNotCovered(why)) => {
                return Err(crate::error::Error::Internal(format!(
                    "a central reservation was answered as a grant's: {why}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if !waits_for_slot(&denial, waits) {
            self.log_denial(
                &denial,
                &t.agent_id,
                &t.agent_name,
                ask,
                &record.request_id,
                token_sha256,
            )
            .await;
        }
        Ok(Decision::Denied {
            denial,
            agent_name: t.agent_name,
        })
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
