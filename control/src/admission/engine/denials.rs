//! Denials: what a refusal says (its prose, in one place) and how it is
//! logged; unknown tokens counted in memory and written as one event per
//! sweep, so anyone reaching the port cannot grow the ledger.

use super::*;

/// Denials of tokens no agent has, gathered between two flushes.
#[derive(Debug, Default)]
pub(super) struct UnauthenticatedDenials {
    pub(super) by_reason: std::collections::BTreeMap<Rule, u64>,
    pub(super) first_ms: i64,
    pub(super) last_ms: i64,
    /// Enough to correlate repeated attempts; useless for forging one.
    pub(super) token_prefixes: std::collections::BTreeSet<String>,
}

impl UnauthenticatedDenials {
    const PREFIXES_KEPT: usize = 16;

    pub(super) fn add(&mut self, reason: Rule, token_sha256: &str, now: i64) {
        if self.by_reason.is_empty() {
            self.first_ms = now;
        }
        self.last_ms = now;
        *self.by_reason.entry(reason).or_default() += 1;
        // No prefix for a request that presented no token.
        if !token_sha256.is_empty() && self.token_prefixes.len() < Self::PREFIXES_KEPT {
            self.token_prefixes
                .insert(token_sha256.get(..12).unwrap_or("").to_string());
        }
    }

    pub(super) fn pending(&self) -> u64 {
        self.by_reason.values().sum()
    }
}

impl AdmissionEngine {
    /// A count, so a panic elsewhere while holding it loses nothing worth
    /// refusing service for.
    pub(super) fn unauthenticated(&self) -> std::sync::MutexGuard<'_, UnauthenticatedDenials> {
        self.unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn log_denial(
        &self,
        d: &Denial,
        agent_id: &str,
        agent_name: &str,
        ask: &Ask<'_>,
        request_id: &str,
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
        let record = DenialRecord {
            agent_id: agent_id.to_string(),
            agent_name: agent_name.to_string(),
            reason: d.denied_by.to_string(),
            details: d.event_details(request_id, ask.endpoint, ask.model),
            count: 1,
            at_ms: now_ms(),
        };
        if let Err(e) = self.store.record_denial(record).await {
            tracing::error!(error = %e, reason = %d.denied_by, "could not log a denial");
        }
    }

    /// The budget denial a reservation's own step did not log (see the
    /// recall in `admit`): the same event.
    pub(super) async fn log_budget_denial(
        &self,
        r: &ReservationRecord,
        agent_name: &str,
        endpoint: aex_core::policy::Endpoint,
        remaining: i64,
    ) {
        let record = DenialRecord {
            agent_id: r.agent_id.clone(),
            agent_name: agent_name.to_string(),
            reason: Rule::Budget.to_string(),
            details: aex_core::reservation::budget_denial_details(r, endpoint.as_str(), remaining),
            count: 1,
            at_ms: now_ms(),
        };
        if let Err(e) = self.store.record_denial(record).await {
            tracing::error!(error = %e, "could not log a budget denial");
        }
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
                at_ms: now_ms(),
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
}
