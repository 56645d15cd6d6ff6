//! Drives a real `aex-control` process with raw gRPC clients.

use aex_control::storage::{AgentRecord, AgentStore, StoreError, sqlite::SqliteStore};
use aex_core::secrets::token_sha256;
use aex_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use aex_tests::{ControlPlane, TestHome};
use tonic::transport::Channel;
use tonic::{Code, Request};

async fn channel(cp: &ControlPlane) -> Channel {
    Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_bearer<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn create_request(name: &str) -> pb::CreateAgentRequest {
    pb::CreateAgentRequest {
        name: name.into(),
        budget_micro: 1_200_000,
        rpm: 120,
        allowed_models: vec!["simulated".into()],
        ..Default::default()
    }
}

async fn ledger_store(home: &TestHome) -> SqliteStore {
    let key = aex_core::home::Home::new(home.path())
        .read_ledger_key()
        .unwrap();
    SqliteStore::open(&home.file("aex.db"), key).await.unwrap()
}

/// The live agent whose stored token hash is `token_sha256`, as admission
/// would find it.
async fn live_agent_with_token(
    store: &SqliteStore,
    token_sha256: &str,
) -> Result<Option<AgentRecord>, StoreError> {
    let agents = store.list_agents(false).await?;
    Ok(agents.into_iter().find(|a| a.token_sha256 == token_sha256))
}

#[tokio::test]
async fn admin_rpcs_require_the_admin_credential() {
    let home = TestHome::new();
    let cp = home.start_control();
    let mut agents = AgentServiceClient::new(channel(&cp).await);

    let none = agents
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    assert!(none.message().contains("admin.token"), "{}", none.message());

    let wrong = agents
        .create_agent(with_bearer(create_request("x"), "aexadm_wrong"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);

    // The data-plane credential is not an admin credential.
    let dp = agents
        .create_agent(with_bearer(create_request("x"), &home.dataplane_token()))
        .await
        .unwrap_err();
    assert_eq!(dp.code(), Code::Unauthenticated);

    let mut models = pb::model_service_client::ModelServiceClient::new(channel(&cp).await);
    assert_eq!(
        models
            .list_models(pb::ListModelsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut ledger = pb::ledger_service_client::LedgerServiceClient::new(channel(&cp).await);
    assert_eq!(
        ledger
            .list_events(pb::ListEventsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    // Nothing was created by the refused calls.
    let listed = agents
        .list_agents(with_bearer(
            pb::ListAgentsRequest::default(),
            &home.admin_token(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.agents.is_empty());
}

#[tokio::test]
async fn reflection_lists_the_services_and_health_is_serving() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let home = TestHome::new();
    let cp = home.start_control();
    let ch = channel(&cp).await;

    let mut reflection = ServerReflectionClient::new(ch.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "aex.v1.AgentService",
        "aex.v1.ModelService",
        "aex.v1.LedgerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut health = HealthClient::new(ch);
    for service in [
        "",
        "aex.v1.AgentService",
        "aex.v1.ModelService",
        "aex.v1.LedgerService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service '{service}'");
    }
}

#[tokio::test]
async fn agent_lifecycle_over_raw_grpc() {
    let home = TestHome::new();
    let cp = home.start_control();
    let admin = home.admin_token();
    let mut agents = AgentServiceClient::new(channel(&cp).await);

    let created = agents
        .create_agent(with_bearer(create_request("raw"), &admin))
        .await
        .unwrap()
        .into_inner();
    let token = created.token.clone();
    assert!(token.starts_with("aex_") && token.len() == 47, "{token}");
    let agent = created.agent.unwrap();
    assert_eq!(agent.budget_micro, 1_200_000);
    assert!(token.starts_with(&agent.token_prefix));
    assert!(agent.token_prefix.len() < token.len());
    assert_eq!(agent.state(), pb::AgentState::Active);
    assert_eq!(agent.scope(), pb::Scope::Execution);

    let dup = agents
        .create_agent(with_bearer(create_request("raw"), &admin))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    let listed = agents
        .list_agents(with_bearer(pb::ListAgentsRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "raw");

    let got = agents
        .get_agent(with_bearer(pb::AgentRef { name: "raw".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, agent.id);

    // The stored token is a hash of the issued token; rotation replaces it.
    let store = ledger_store(&home).await;
    assert_eq!(
        live_agent_with_token(&store, &token_sha256(&token))
            .await
            .unwrap()
            .unwrap()
            .id,
        agent.id
    );
    let rotated = agents
        .rotate_token(with_bearer(
            pb::RotateTokenRequest {
                name: "raw".into(),
                ttl_seconds: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.token, token);
    assert!(
        live_agent_with_token(&store, &token_sha256(&token))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        live_agent_with_token(&store, &token_sha256(&rotated.token))
            .await
            .unwrap()
            .unwrap()
            .id,
        agent.id
    );

    let paused = agents
        .pause_agent(with_bearer(pb::AgentRef { name: "raw".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.state(), pb::AgentState::Paused);

    let deleted = agents
        .delete_agent(with_bearer(pb::AgentRef { name: "raw".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.state(), pb::AgentState::Deleted);
    assert!(
        live_agent_with_token(&store, &token_sha256(&rotated.token))
            .await
            .unwrap()
            .is_none()
    );
    let missing = agents
        .get_agent(with_bearer(pb::AgentRef { name: "raw".into() }, &admin))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Every admin change is an event, in order.
    let mut ledger = pb::ledger_service_client::LedgerServiceClient::new(channel(&cp).await);
    let events = ledger
        .list_events(with_bearer(
            pb::ListEventsRequest {
                agent_name: "raw".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "agent.created",
            "agent.token_rotated",
            "agent.paused",
            "agent.deleted"
        ]
    );
}

#[tokio::test]
async fn bad_requests_get_clear_invalid_argument() {
    let home = TestHome::new();
    let cp = home.start_control();
    let admin = home.admin_token();
    let mut agents = AgentServiceClient::new(channel(&cp).await);
    let cases = [
        (
            pb::CreateAgentRequest {
                budget_micro: -1,
                ..create_request("neg")
            },
            "negative",
        ),
        (
            pb::CreateAgentRequest {
                rpm: 0,
                ..create_request("zero")
            },
            "RPM",
        ),
        (
            pb::CreateAgentRequest {
                name: "bad name".into(),
                ..create_request("")
            },
            "invalid agent name",
        ),
        (
            pb::CreateAgentRequest {
                allowed_models: vec!["gpt-99".into()],
                ..create_request("m")
            },
            "'gpt-99' is not configured",
        ),
    ];
    for (request, needle) in cases {
        let e = agents
            .create_agent(with_bearer(request, &admin))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(needle), "{}", e.message());
    }
    let e = agents
        .update_agent(with_bearer(
            pb::UpdateAgentRequest {
                name: "nobody".into(),
                rpm: Some(5),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
