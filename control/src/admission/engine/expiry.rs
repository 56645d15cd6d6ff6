//! Expiry: reservations nobody settled in time are closed by policy
//! (charged or released); heartbeats keep long streams open.

use super::*;

impl AdmissionEngine {
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
                    // The clock at the close, as for any settlement: `now`
                    // says which reservations are due, not when they closed.
                    at_ms: now_ms(),
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
    pub(super) async fn drop_closed_elsewhere(&self, now: i64, store_due: &[ReservationRecord]) {
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
}
