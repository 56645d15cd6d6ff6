//! Rate limits shared with the other control planes on the database:
//! requests per minute, the agent's tokens per minute and each model's,
//! taken from the store (`storage::SharedRates`, one atomic statement
//! each) after `decide` accepted a request, in the order `decide` checks
//! them in memory when the store is this process's alone. A refusal gives
//! back what was taken before it; a settlement corrects the token debit to
//! the usage reported.

use super::Tentative;
use crate::admission::policy::Denial;
use crate::storage::{SharedRates, StoreError};

/// The shared limiter of an agent's requests per minute.
pub(super) fn rpm_key(agent_id: &str) -> String {
    format!("rpm:{agent_id}")
}

/// The shared bucket of an agent's tokens per minute.
fn tpm_key(agent_id: &str) -> String {
    format!("tpm:{agent_id}")
}

/// The shared bucket of a model's tokens per minute, across all agents.
fn model_tpm_key(model: &str) -> String {
    format!("model_tpm:{model}")
}

/// Takes every shared limit `t` is under; `Some(denial)` (with nothing
/// left taken) when one refuses. On an error, what was taken before it is
/// given back as far as the database lets us.
pub(super) async fn take(
    rates: &dyn SharedRates,
    t: &Tentative,
    model: &str,
    now: i64,
) -> Result<Option<Denial>, StoreError> {
    let rpm = rpm_key(&t.agent_id);
    if let Err(wait) = rates.take(&rpm, t.rpm, now).await? {
        return Ok(Some(Denial::rpm(&t.agent_name, t.rpm, wait)));
    }
    let tokens = t.debited_tokens;
    let refund = -(tokens as i64);
    if t.tpm > 0 {
        let taken = rates
            .take_tokens(&tpm_key(&t.agent_id), t.tpm, tokens, now)
            .await;
        if !matches!(taken, Ok(Ok(()))) {
            let _ = rates.give_back(&rpm, t.rpm).await;
        }
        if let Err(wait) = taken? {
            return Ok(Some(Denial::tpm(&t.agent_name, t.tpm, wait)));
        }
    }
    if t.model_tpm > 0 {
        let taken = rates
            .take_tokens(&model_tpm_key(model), t.model_tpm, tokens, now)
            .await;
        if !matches!(taken, Ok(Ok(()))) {
            let _ = rates.give_back(&rpm, t.rpm).await;
            if t.tpm > 0 {
                let _ = rates
                    .adjust_tokens(&tpm_key(&t.agent_id), t.tpm, refund, now)
                    .await;
            }
        }
        if let Err(wait) = taken? {
            return Ok(Some(Denial::model_tpm(model, t.model_tpm, wait)));
        }
    }
    Ok(None)
}

/// Gives back what [`take`] took for a request that did not go through.
/// A failure leaves the limit counted for at most its window.
pub(super) async fn give_back(rates: &dyn SharedRates, t: &Tentative, model: &str, now: i64) {
    let refund = -(t.debited_tokens as i64);
    let mut result = rates.give_back(&rpm_key(&t.agent_id), t.rpm).await;
    if t.tpm > 0 && result.is_ok() {
        result = rates
            .adjust_tokens(&tpm_key(&t.agent_id), t.tpm, refund, now)
            .await;
    }
    if t.model_tpm > 0 && result.is_ok() {
        result = rates
            .adjust_tokens(&model_tpm_key(model), t.model_tpm, refund, now)
            .await;
    }
    if let Err(e) = result {
        tracing::warn!(error = %e, agent = %t.agent_name, "could not give back a shared rate limit");
    }
}

/// A settled request's token debit, to correct to the usage reported.
pub(super) struct Correction {
    pub agent_id: String,
    pub agent_tpm: u64,
    pub model: String,
    pub model_tpm: u64,
    /// Tokens used minus tokens debited at admission.
    pub delta: i64,
}

pub(super) async fn correct(rates: &dyn SharedRates, c: &Correction, now: i64) {
    let mut result = Ok(());
    if c.agent_tpm > 0 {
        result = rates
            .adjust_tokens(&tpm_key(&c.agent_id), c.agent_tpm, c.delta, now)
            .await;
    }
    if c.model_tpm > 0 && result.is_ok() {
        result = rates
            .adjust_tokens(&model_tpm_key(&c.model), c.model_tpm, c.delta, now)
            .await;
    }
    if let Err(e) = result {
        // The debit stays at the admission's bound: the next requests see
        // the bucket as it was sized, not as it was used.
        tracing::warn!(error = %e, "could not correct a shared token bucket");
    }
}
