//! Data-plane credentials scoped to agents (`aex_core::credential`): issue,
//! list, revoke. Admin RPCs.

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::service::agents::validate_name;
use crate::state::ControlState;
use crate::storage::{CredentialRecord, StoreError};
use aex_core::secrets::{new_credential, new_id, token_prefix, token_sha256};
use aex_proto::v1::{self as pb, credential_service_server::CredentialService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CredentialsApi {
    state: Arc<ControlState>,
}

impl CredentialsApi {
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }

    async fn create(&self, r: pb::CreateCredentialRequest) -> Result<pb::CredentialWithSecret> {
        validate_name("credential", &r.name)?;
        // A typo would issue a credential that serves nobody; an unknown
        // name is more likely a mistake than a plan.
        for agent in r.agents.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
            if self.state.store.agent_by_name(agent).await?.is_none() {
                return Err(Error::Store(StoreError::AgentNotFound(agent.to_string())));
            }
        }
        let secret = new_credential(aex_core::credential::SECRET_KIND);
        let write = aex_core::credential::issue(
            new_id("dpc"),
            r.name,
            &r.agents,
            token_sha256(&secret),
            token_prefix(&secret),
            now_ms(),
            self.state.store.ledger_key(),
        )
        .map_err(|e| Error::InvalidArgument(e.0))?;
        let credential = self
            .state
            .store
            .insert_credential(write)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => Error::AlreadyExists(m),
                e => e.into(),
            })?;
        self.state.credentials.reload().await?;
        Ok(pb::CredentialWithSecret {
            credential: Some(credential_to_pb(&credential)),
            secret,
        })
    }

    async fn revoke(&self, r: pb::RevokeCredentialRequest) -> Result<pb::Credential> {
        let revoked = self
            .state
            .store
            .revoke_credential(&r.name, now_ms())
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no live data-plane credential named '{}'; `aexctl dataplane credential list` shows them",
                    aex_core::policy::echoed(&r.name)
                ))
            })?;
        self.state.credentials.reload().await?;
        Ok(credential_to_pb(&revoked))
    }
}

fn credential_to_pb(c: &CredentialRecord) -> pb::Credential {
    pb::Credential {
        id: c.id.clone(),
        name: c.name.clone(),
        secret_prefix: c.secret_prefix.clone(),
        agents: c.agents.clone(),
        created_at_ms: c.created_at_ms,
        revoked_at_ms: c.revoked_at_ms.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl CredentialService for CredentialsApi {
    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> std::result::Result<Response<pb::CredentialWithSecret>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> std::result::Result<Response<pb::ListCredentialsResponse>, Status> {
        let all = self
            .state
            .store
            .list_credentials(request.into_inner().include_revoked)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: all.iter().map(credential_to_pb).collect(),
        }))
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> std::result::Result<Response<pb::Credential>, Status> {
        Ok(Response::new(self.revoke(request.into_inner()).await?))
    }
}
