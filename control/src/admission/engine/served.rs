//! What a scoped data plane may act for (`aex_core::credential`): admit
//! checks the scope where it resolves the token (`decide`); the calls that
//! name an agent or a reservation instead of a token check it here.

use super::AdmissionEngine;
use crate::error::{Error, Result};
use aex_core::credential::Served;

impl AdmissionEngine {
    /// The name of agent `agent_id`: live here, or in the store (deleted,
    /// or created through another control plane a moment ago).
    async fn name_of(&self, agent_id: &str) -> Result<Option<String>> {
        let live = self.agent_name(agent_id);
        if !live.is_empty() {
            return Ok(Some(live));
        }
        Ok(self.store.agent_by_id(agent_id).await?.map(|a| a.name))
    }

    /// `Ok` when the data plane may act for agent `agent_id`.
    pub async fn check_serves_agent(&self, served: &Served, agent_id: &str) -> Result<()> {
        if matches!(served, Served::Every) {
            return Ok(());
        }
        match self.name_of(agent_id).await? {
            Some(name) if served.serves(&name) => Ok(()),
            name => Err(not_served(served, name.as_deref())),
        }
    }

    /// `Ok` when the data plane may act for the agent of every open one of
    /// `reservation_ids`; one not open anywhere has nothing left to act on.
    pub async fn check_serves_reservations(
        &self,
        served: &Served,
        reservation_ids: &[String],
    ) -> Result<()> {
        if matches!(served, Served::Every) {
            return Ok(());
        }
        for id in reservation_ids {
            let here = {
                let live = self.lock();
                live.open
                    .get(id)
                    .map(|o| (o.record.agent_id.clone(), o.agent_name.clone()))
            };
            let name = match here {
                Some((_, name)) if !name.is_empty() => Some(name),
                Some((agent_id, _)) => self.name_of(&agent_id).await?,
                None => match self.store.open_reservation(id).await? {
                    Some(r) => self.name_of(&r.agent_id).await?,
                    None => continue,
                },
            };
            match name {
                Some(name) if served.serves(&name) => {}
                name => return Err(not_served(served, name.as_deref())),
            }
        }
        Ok(())
    }
}

fn not_served(served: &Served, agent: Option<&str>) -> Error {
    let agent = agent.map_or_else(
        || "an agent AEX does not know".into(),
        |a| format!("agent '{a}'"),
    );
    Error::PermissionDenied(format!(
        "the data-plane credential '{}' does not serve {agent}; only a data plane with the fleet \
         credential or one scoped to that agent may act for it",
        served.credential()
    ))
}
