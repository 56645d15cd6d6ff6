//! Kill orders: telling the supervisors of an agent's processes (`aexctl
//! run`) to stop them, and the process tokens they run with.

use super::*;

impl AdmissionEngine {
    /// Tells the supervisors of the agent's processes to kill them: those
    /// connected here at once, and, through the order kept on the
    /// processes' rows, those connected to any other control plane on the
    /// store (its change feed passes it on) or reconnecting later.
    pub fn order_kill(&self, agent_id: &str, reason: &str) {
        self.tell_supervisors(agent_id, reason);
        let supervised = self.lock().process_tokens.values().any(|a| a == agent_id);
        let now = now_ms();
        if !supervised {
            return;
        }
        {
            let mut recorded = self
                .kills_recorded
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            recorded.retain(|_, at| now - *at < 1000);
            if recorded.contains_key(agent_id) {
                return;
            }
            recorded.insert(agent_id.to_string(), now);
        }
        let (store, agent_id, reason) =
            (self.store.clone(), agent_id.to_string(), reason.to_string());
        tokio::spawn(async move {
            if let Err(e) = store.request_kill(&agent_id, &reason).await {
                tracing::error!(error = %e, agent = %agent_id, "could not record a kill order; supervisors connected elsewhere will not see it");
            }
        });
    }

    /// Tells the supervisors connected here, for an order already on the
    /// processes' rows.
    pub fn tell_supervisors(&self, agent_id: &str, reason: &str) {
        let _ = self.kills.send(KillOrder {
            agent_id: agent_id.to_string(),
            process_id: None,
            reason: reason.to_string(),
        });
    }

    pub fn kill_orders(&self) -> broadcast::Receiver<KillOrder> {
        self.kills.subscribe()
    }

    /// Lets a supervised process authenticate as its agent.
    pub fn add_process_token(&self, token_sha256: &str, agent_id: &str) {
        self.lock()
            .process_tokens
            .insert(token_sha256.to_string(), agent_id.to_string());
    }

    pub fn revoke_process_token(&self, token_sha256: &str) {
        self.lock().process_tokens.remove(token_sha256);
    }
}
