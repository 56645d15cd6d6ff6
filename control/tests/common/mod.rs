//! What the tests of the data plane's gRPC API share: a real `aex-control`
//! process, its credentials, and requests shaped as a data plane sends them.
// Each test file uses part of it.
#![allow(dead_code)]

use aex_core::secrets::token_sha256;
use aex_proto::v1::{
    self as pb, admission_service_client::AdmissionServiceClient, admit_response::Outcome,
    agent_service_client::AgentServiceClient, credential_service_client::CredentialServiceClient,
    ledger_service_client::LedgerServiceClient,
};
use aex_tests::{ControlPlane, TestHome};
use tonic::Request;
use tonic::transport::Channel;

pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub struct Fixture {
    pub home: TestHome,
    pub cp: ControlPlane,
    pub channel: Channel,
}

impl Fixture {
    pub async fn new() -> Self {
        let home = TestHome::new();
        let cp = home.start_control();
        let channel = Channel::from_shared(cp.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self { home, cp, channel }
    }

    pub fn admission(&self) -> AdmissionServiceClient<Channel> {
        AdmissionServiceClient::new(self.channel.clone())
    }

    pub async fn create(&self, name: &str, budget_micro: i64, rpm: u32) -> String {
        AgentServiceClient::new(self.channel.clone())
            .create_agent(bearer(
                pb::CreateAgentRequest {
                    name: name.into(),
                    budget_micro,
                    rpm,
                    ..Default::default()
                },
                &self.home.admin_token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .token
    }

    pub async fn admit(&self, token: &str, request_id: &str, max_tokens: u64) -> pb::AdmitResponse {
        self.admission()
            .admit(bearer(
                admit_request(token, request_id, max_tokens),
                &self.home.dataplane_token(),
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn settle(
        &self,
        reservation_id: &str,
        prompt: u64,
        completion: u64,
    ) -> pb::SettleResponse {
        self.admission()
            .settle(bearer(
                pb::SettleRequest {
                    reservation_id: reservation_id.into(),
                    outcome: pb::SettleOutcome::Completed as i32,
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    usage_reported: true,
                    ..Default::default()
                },
                &self.home.dataplane_token(),
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub fn credentials(&self) -> CredentialServiceClient<Channel> {
        CredentialServiceClient::new(self.channel.clone())
    }

    /// A data-plane credential serving `agents`; its secret.
    pub async fn issue(&self, name: &str, agents: &[&str]) -> String {
        self.credentials()
            .create_credential(bearer(
                pb::CreateCredentialRequest {
                    name: name.into(),
                    agents: agents.iter().map(|a| a.to_string()).collect(),
                },
                &self.home.admin_token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .secret
    }

    pub async fn agent(&self, name: &str) -> pb::Agent {
        AgentServiceClient::new(self.channel.clone())
            .get_agent(bearer(
                pb::AgentRef { name: name.into() },
                &self.home.admin_token(),
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn events(&self, name: &str) -> Vec<pb::Event> {
        LedgerServiceClient::new(self.channel.clone())
            .list_events(bearer(
                pb::ListEventsRequest {
                    agent_name: name.into(),
                    limit: 10_000,
                    ..Default::default()
                },
                &self.home.admin_token(),
            ))
            .await
            .unwrap()
            .into_inner()
            .events
    }
}

/// llama3-local costs 1 µ per input token and 2 µ per output token.
pub fn admit_request(token: &str, request_id: &str, max_tokens: u64) -> pb::AdmitRequest {
    pb::AdmitRequest {
        request_id: request_id.into(),
        token_sha256: token_sha256(token),
        endpoint: pb::Endpoint::ChatCompletions as i32,
        model: "llama3-local".into(),
        input_tokens_bound: 100,
        requested_output_tokens: Some(max_tokens),
        ..Default::default()
    }
}

pub fn admitted(r: &pb::AdmitResponse) -> &pb::Admission {
    match &r.outcome {
        Some(Outcome::Admitted(a)) => a,
        other => panic!("expected admission, got {other:?}"),
    }
}

pub fn denied(r: &pb::AdmitResponse) -> &pb::Denial {
    match &r.outcome {
        Some(Outcome::Denied(d)) => d,
        other => panic!("expected denial, got {other:?}"),
    }
}
