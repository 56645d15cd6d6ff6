//! Recalling an agent's grants: a central decision near the agent's edge
//! needs what its grants hold, so every data plane holding one is told to
//! give it back, and the decision waits a moment for them.

use super::AdmissionEngine;
use crate::clock::now_ms;
use crate::error::Result;
use std::time::Duration;

/// How long a central decision waits for recalled grants to come back.
const RECALL_PATIENCE: Duration = Duration::from_secs(1);

impl AdmissionEngine {
    /// Whether a central refusal for `agent_id`'s budget may be caused by
    /// budget its grants hold, so that it must recall them first.
    pub(super) fn may_hold_grants(&self, agent_id: &str, now: i64) -> bool {
        // Another control plane on a shared store may have issued some.
        self.shared_rates.is_some()
            || self
                .grant_book()
                .issued_until
                .get(agent_id)
                .is_some_and(|until| *until >= now)
    }

    /// Takes back an agent's grants for a central decision near its edge:
    /// tells every data plane to stop admitting from them and give them
    /// back, and waits (at most [`RECALL_PATIENCE`]) until they have.
    /// Returns whether there were any, i.e. whether deciding again may
    /// find more free budget.
    pub(super) async fn recall_grants(&self, agent_id: &str) -> Result<bool> {
        let open = self.store.open_grants(Some(agent_id)).await?;
        if open.is_empty() {
            return Ok(false);
        }
        {
            let mut book = self.grant_book();
            book.recalled_at.insert(agent_id.to_string(), now_ms());
            book.recalls += 1;
        }
        let _ = self
            .changes
            .send(super::Change::GrantsRevoked(agent_id.to_string()));
        // The data planes of the other control planes on the database.
        if let Err(e) = self.store.announce_grants_recalled(agent_id).await {
            tracing::warn!(error = %e, agent = %agent_id, "could not tell the other control planes to recall grants; theirs go back at their deadline");
        }
        let started = tokio::time::Instant::now();
        while started.elapsed() < RECALL_PATIENCE {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if self.store.open_grants(Some(agent_id)).await?.is_empty() {
                break;
            }
        }
        Ok(true)
    }

    /// Takes back the agent's grants before an admin change to its budget
    /// or limits, which is then decided on what is really free.
    pub async fn recall_grants_of(&self, agent_id: &str) -> Result<()> {
        self.recall_grants(agent_id).await.map(|_| ())
    }

    /// Another control plane recalled the agent's grants: this one's data
    /// planes give theirs back, and it issues none for a while either.
    pub fn grants_recalled_elsewhere(&self, agent_id: &str) {
        self.grant_book()
            .recalled_at
            .insert(agent_id.to_string(), now_ms());
        let _ = self
            .changes
            .send(super::Change::GrantsRevoked(agent_id.to_string()));
    }
}
