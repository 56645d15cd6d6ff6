use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::service::convert::{agent_to_pb, grant_to_pb, scope_from_pb};
use crate::state::ControlState;
use crate::storage::{
    AgentPatch, AgentRecord, AgentState, Caps, NewAgent, Scope, StoreError, TokenChange,
};
use aex_core::config::ModelsConfig;
use aex_core::secrets::{new_agent_token, token_prefix, token_sha256};
use aex_proto::v1::{self as pb, agent_service_server::AgentService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const MAX_NAME_LEN: usize = 64;

/// Agent names appear in tables, metrics labels and file names: keep them
/// to a safe alphabet.
pub fn validate_agent_name(name: &str) -> Result<()> {
    validate_name("agent", name)
}

/// A name of `what` (an agent, a credential): 1-64 of a safe alphabet.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid {what} name '{}': use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit",
            aex_core::policy::echoed(name)
        )))
    }
}

fn validate_budget(micro: i64) -> Result<()> {
    if micro < 0 {
        return Err(Error::InvalidArgument(
            "the budget cannot be negative".into(),
        ));
    }
    Ok(())
}

fn validate_rpm(rpm: u32) -> Result<()> {
    if rpm == 0 {
        return Err(Error::InvalidArgument(
            "RPM must be at least 1 (requests per minute the agent may make)".into(),
        ));
    }
    Ok(())
}

/// Every allowed model must be configured now; a typo would otherwise
/// silently lock the agent out.
fn validate_models(models: &[String], config: &ModelsConfig) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(models.len());
    for m in models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
        if !config.models.contains_key(m) {
            let known: Vec<_> = config.models.keys().map(String::as_str).collect();
            return Err(Error::InvalidArgument(format!(
                "model '{m}' is not configured (configured: {}); check the name or add it to {}",
                known.join(", "),
                config.source.display()
            )));
        }
        if !out.iter().any(|x| x == m) {
            out.push(m.to_string());
        }
    }
    Ok(out)
}

fn expiry(ttl_seconds: u64) -> Result<Option<i64>> {
    if ttl_seconds == 0 {
        return Ok(None);
    }
    let ms = i64::try_from(ttl_seconds)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .and_then(|ms| ms.checked_add(now_ms()))
        .ok_or_else(|| Error::InvalidArgument("the token TTL is too long".into()))?;
    Ok(Some(ms))
}

pub struct AgentsApi {
    state: Arc<ControlState>,
}

impl AgentsApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }

    async fn create(&self, r: pb::CreateAgentRequest) -> Result<pb::AgentWithToken> {
        validate_agent_name(&r.name)?;
        validate_budget(r.budget_micro)?;
        validate_rpm(r.rpm)?;
        let allowed_models = validate_models(&r.allowed_models, &self.state.models())?;
        let caps = r.capabilities.map_or_else(Caps::default, |c| Caps {
            streaming: c.streaming,
            tools: c.tools,
            function_calling: c.function_calling,
            vision: c.vision,
        });
        let scope = scope_from_pb(r.scope()).unwrap_or(Scope::Execution);
        let token = new_agent_token();
        let new_agent = NewAgent {
            name: r.name,
            token_sha256: token_sha256(&token),
            token_prefix: token_prefix(&token),
            token_expires_at_ms: expiry(r.ttl_seconds)?,
            token_ttl_seconds: r.ttl_seconds as i64,
            budget_micro: r.budget_micro,
            rpm: r.rpm,
            tpm: r.tpm,
            max_concurrent: r.max_concurrent,
            allowed_models,
            caps,
            scope,
        };
        let record = self
            .state
            .admission
            .change_agent(|| self.state.store.create_agent(new_agent))
            .await?;
        tracing::info!(agent = %record.name, "agent created");
        Ok(pb::AgentWithToken {
            agent: Some(agent_to_pb(&record)),
            token,
        })
    }

    async fn update(&self, r: pb::UpdateAgentRequest) -> Result<AgentRecord> {
        if let Some(b) = r.budget_micro {
            validate_budget(b)?;
        }
        if let Some(rpm) = r.rpm {
            validate_rpm(rpm)?;
        }
        let allowed_models = match &r.allowed_models {
            Some(list) => Some(validate_models(&list.values, &self.state.models())?),
            None => None,
        };
        let patch = AgentPatch {
            budget_micro: r.budget_micro,
            top_up_micro: r.top_up_micro,
            rpm: r.rpm,
            tpm: r.tpm,
            max_concurrent: r.max_concurrent,
            allowed_models,
            streaming: r.streaming,
            tools: r.tools,
            function_calling: r.function_calling,
            vision: r.vision,
            scope: scope_from_pb(r.scope()),
        };
        if patch.is_empty() {
            return Err(Error::InvalidArgument(
                "nothing to update: name at least one field to change".into(),
            ));
        }
        // A new budget or limit is checked against what is free: budget and
        // credits held by grants come back first.
        let limits_change = r.budget_micro.is_some()
            || r.rpm.is_some()
            || r.tpm.is_some()
            || r.max_concurrent.is_some();
        if limits_change && let Some(agent) = self.state.store.agent_by_name(&r.name).await? {
            self.state.admission.recall_grants_of(&agent.id).await?;
        }
        self.state
            .admission
            .change_agent(|| self.state.store.update_agent(&r.name, patch))
            .await
    }

    async fn rotate(&self, r: pb::RotateTokenRequest) -> Result<pb::AgentWithToken> {
        let current = self
            .state
            .store
            .agent_by_name(&r.name)
            .await?
            .ok_or_else(|| crate::storage::StoreError::AgentNotFound(r.name.clone()))?;
        let ttl = r
            .ttl_seconds
            .unwrap_or(current.token_ttl_seconds.max(0) as u64);
        let token = new_agent_token();
        let change = TokenChange {
            token_sha256: token_sha256(&token),
            token_prefix: token_prefix(&token),
            token_expires_at_ms: expiry(ttl)?,
            token_ttl_seconds: ttl as i64,
        };
        let record = self
            .state
            .admission
            .change_agent(|| self.state.store.rotate_token(&r.name, change))
            .await?;
        tracing::info!(agent = %record.name, "token rotated");
        Ok(pb::AgentWithToken {
            agent: Some(agent_to_pb(&record)),
            token,
        })
    }
}

fn ok(a: AgentRecord) -> Result<Response<pb::Agent>, Status> {
    Ok(Response::new(agent_to_pb(&a)))
}

impl AgentsApi {
    async fn changed<F, Fut>(&self, write: F) -> Result<Response<pb::Agent>, Status>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<AgentRecord, StoreError>>,
    {
        ok(self.state.admission.change_agent(write).await?)
    }
}

#[tonic::async_trait]
impl AgentService for AgentsApi {
    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::AgentWithToken>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .state
            .store
            .list_agents(request.into_inner().include_deleted)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_pb).collect(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::AgentRef>,
    ) -> Result<Response<pb::Agent>, Status> {
        let name = request.into_inner().name;
        match self
            .state
            .store
            .agent_by_name(&name)
            .await
            .map_err(Error::from)?
        {
            Some(a) => {
                let grants = self
                    .state
                    .admission
                    .open_grants(Some(&a.id))
                    .await
                    .map_err(Status::from)?;
                let mut agent = agent_to_pb(&a);
                agent.open_grants = grants.iter().map(grant_to_pb).collect();
                Ok(Response::new(agent))
            }
            None => Err(Error::from(crate::storage::StoreError::AgentNotFound(name)).into()),
        }
    }

    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        ok(self.update(request.into_inner()).await?)
    }

    async fn rotate_token(
        &self,
        request: Request<pb::RotateTokenRequest>,
    ) -> Result<Response<pb::AgentWithToken>, Status> {
        Ok(Response::new(self.rotate(request.into_inner()).await?))
    }

    async fn pause_agent(
        &self,
        request: Request<pb::AgentRef>,
    ) -> Result<Response<pb::Agent>, Status> {
        let name = request.into_inner().name;
        let store = &self.state.store;
        self.changed(|| store.set_state(&name, AgentState::Paused))
            .await
    }

    async fn resume_agent(
        &self,
        request: Request<pb::AgentRef>,
    ) -> Result<Response<pb::Agent>, Status> {
        let name = request.into_inner().name;
        let store = &self.state.store;
        self.changed(|| store.set_state(&name, AgentState::Active))
            .await
    }

    async fn kill_agent(
        &self,
        request: Request<pb::AgentRef>,
    ) -> Result<Response<pb::KillAgentResponse>, Status> {
        let name = request.into_inner().name;
        let agent = self
            .state
            .admission
            .change_agent(|| self.state.store.kill_agent(&name))
            .await?;
        let running = self
            .state
            .store
            .request_kill(&agent.id, "agent killed")
            .await
            .map_err(Error::from)?;
        self.state
            .admission
            .tell_supervisors(&agent.id, "agent killed");
        tracing::warn!(agent = %agent.name, processes = running, "agent killed");
        Ok(Response::new(pb::KillAgentResponse {
            agent: Some(agent_to_pb(&agent)),
            processes_signalled: running as u32,
        }))
    }

    async fn delete_agent(
        &self,
        request: Request<pb::AgentRef>,
    ) -> Result<Response<pb::Agent>, Status> {
        let name = request.into_inner().name;
        let store = &self.state.store;
        self.changed(|| store.delete_agent(&name)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["dev", "rw-20260220-112921-a00", "a.b_c", "9lives"] {
            assert!(validate_agent_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "has space", "ünï", "a/b", &"x".repeat(65)] {
            assert!(validate_agent_name(bad).is_err(), "{bad}");
        }
    }
}
