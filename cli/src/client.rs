//! gRPC connection to the control plane, carrying the admin credential.

use crate::error::{CliError, Result};
use aex_core::home::Home;
use aex_proto::v1::{
    agent_service_client::AgentServiceClient, credential_service_client::CredentialServiceClient,
    ledger_service_client::LedgerServiceClient, model_service_client::ModelServiceClient,
    process_service_client::ProcessServiceClient,
};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone)]
pub struct AdminAuth(MetadataValue<Ascii>);

impl Interceptor for AdminAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, AdminAuth>;

pub struct Admin {
    pub agents: AgentServiceClient<Authed>,
    pub models: ModelServiceClient<Authed>,
    pub ledger: LedgerServiceClient<Authed>,
    pub processes: ProcessServiceClient<Authed>,
    pub credentials: CredentialServiceClient<Authed>,
    pub address: String,
}

/// The TLS files of this invocation (global flags or AEX_TLS_*), set once
/// by `commands::run` before any connection.
static TLS: std::sync::OnceLock<aex_proto::tls::ClientTls> = std::sync::OnceLock::new();

pub fn use_tls(tls: aex_proto::tls::ClientTls) {
    let _ = TLS.set(tls);
}

impl Admin {
    pub async fn connect(home: &Home, address: &str) -> Result<Self> {
        Self::connect_with_timeout(home, address, Duration::from_secs(30)).await
    }

    /// For calls that scan the whole ledger (audit): a long one grows with
    /// the log, about 20 s per million events on a small machine.
    pub async fn connect_with_timeout(
        home: &Home,
        address: &str,
        request_timeout: Duration,
    ) -> Result<Self> {
        let token = home.read_admin_token()?;
        let auth = AdminAuth(format!("Bearer {token}").parse().map_err(|_| {
            CliError::Failed(format!(
                "{} holds characters that cannot be sent; run `aexctl init --force`",
                home.admin_token_path().display()
            ))
        })?);
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| CliError::Usage(format!("--control '{address}' is not a URL: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(request_timeout);
        let endpoint = TLS
            .get()
            .cloned()
            .unwrap_or_default()
            .apply(endpoint, address)
            .map_err(CliError::Usage)?;
        let channel = endpoint.connect().await.map_err(|e| {
            CliError::Failed(format!(
                "cannot reach the AEX control plane at {address} ({}).\n\
                 Start it with `aex-control` (or pass --control / set AEX_CONTROL_ADDR if it runs elsewhere).",
                root_cause(&e)
            ))
        })?;
        Ok(Self {
            agents: AgentServiceClient::with_interceptor(channel.clone(), auth.clone()),
            models: ModelServiceClient::with_interceptor(channel.clone(), auth.clone()),
            ledger: LedgerServiceClient::with_interceptor(channel.clone(), auth.clone()),
            processes: ProcessServiceClient::with_interceptor(channel.clone(), auth.clone()),
            credentials: CredentialServiceClient::with_interceptor(channel, auth),
            address: address.to_string(),
        })
    }

    /// Another handle on the same connection (clients are cheap clones).
    pub fn clone_handles(&self) -> Admin {
        Admin {
            agents: self.agents.clone(),
            models: self.models.clone(),
            ledger: self.ledger.clone(),
            processes: self.processes.clone(),
            credentials: self.credentials.clone(),
            address: self.address.clone(),
        }
    }

    pub fn status(&self, status: tonic::Status) -> CliError {
        CliError::from_status(status, &self.address)
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
