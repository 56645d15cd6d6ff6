//! Settling a call: the charge by the one rule both planes apply, the
//! store's close (a report's many in one job), then the slot and token debit
//! freed here and the agent stopped if it ran out or overran.

use super::*;

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

impl AdmissionEngine {
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
    pub(super) async fn settlement_for(
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
            at_ms: now_ms(),
        };
        Ok(Some((record, settlement)))
    }

    /// After the store closed `record` (or found it closed): its slot and
    /// token debit freed here, and the agent stopped if it ran out or its
    /// overruns crossed their allowance.
    pub(super) async fn settled(
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
    pub(super) fn forget(
        &self,
        reservation_id: &str,
        used_tokens: Option<u64>,
    ) -> Option<shared::Correction> {
        let now = now_ms();
        let mut live = self.lock();
        let o = live.open.remove(reservation_id)?;
        live.by_request.remove(&o.record.request_id);
        let delta = used_tokens.map(|used| used as i64 - o.debited_tokens as i64);
        let mut agent_tpm = 0;
        if let Some(a) = live.agents.get_mut(&o.record.agent_id) {
            a.open = a.open.saturating_sub(1);
            agent_tpm = a.record.tpm;
            // A call that ended (settled with its usage): how long calls take.
            if used_tokens.is_some() {
                a.durations.record(now - o.record.created_at_ms);
            }
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
}
