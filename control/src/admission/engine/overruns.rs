//! Overruns that stop an agent (`aex_core::overrun`): after a settlement
//! recorded usage past its reservation, the agent is paused once its
//! overruns cross their allowance — through the store, atomically with
//! what it holds now, and applied here and on every data plane like an
//! admin's pause (its grants go back, its calls are refused at once).

use super::AdmissionEngine;
use crate::clock::now_ms;
use crate::error::Result;
use aex_core::overrun::{OverrunLimit, pause_for_overruns};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

impl AdmissionEngine {
    /// Sets when overruns pause an agent ([`OverrunLimit::DEFAULT`]
    /// unless told otherwise).
    pub fn with_overrun_limit(mut self, limit: OverrunLimit) -> Self {
        self.overrun_limit = limit;
        self
    }

    /// Pauses the agent if the overrun of `added` µ just recorded crossed
    /// its allowance; returns whether it did.
    pub(super) async fn stop_for_overruns(&self, agent_id: &str, added: i64) -> Result<bool> {
        let name = self.agent_name(agent_id);
        if name.is_empty() {
            return Ok(false);
        }
        let limit = self.overrun_limit;
        // The store may run the change more than once (a retried batch):
        // the last run is the one written.
        let paused = Arc::new(AtomicBool::new(false));
        let seen = paused.clone();
        let store = self.store.clone();
        let agent = self
            .change_agent(|| {
                store.change_agent(
                    &name,
                    Box::new(move |a| {
                        let write = pause_for_overruns(a, limit, added, now_ms());
                        seen.store(write.is_some(), Ordering::SeqCst);
                        Ok(write)
                    }),
                )
            })
            .await?;
        let paused = paused.load(Ordering::SeqCst);
        if paused {
            tracing::error!(
                agent = %agent.name, overrun_micro = agent.overrun_micro,
                allowance_micro = limit.allowance_micro(agent.budget_micro),
                "agent paused: its provider reported usage past its reservations beyond the allowance; \
                 check the provider and its models.yaml entry, then `aexctl agent resume {}`",
                agent.name
            );
        }
        Ok(paused)
    }
}
