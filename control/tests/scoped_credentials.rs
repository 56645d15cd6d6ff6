//! Data-plane credentials scoped to a sidecar's agents (issue #31, finding
//! 8; docs/DEPLOY.md): with the fleet credential, the Watch stream carried every
//! agent's token hash and `Admit` took a hash, so one compromised sidecar
//! could admit and settle as any agent. Here a sidecar's credential is
//! driven as an attacker holding it would drive the gRPC API directly.

mod common;

use aex_core::secrets::token_sha256;
use aex_proto::v1 as pb;
use common::{Fixture, admit_request, admitted, bearer, denied};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

fn local_admission(agent_id: &str, n: u32) -> pb::ReportItem {
    pb::ReportItem {
        item: Some(pb::report_item::Item::Admitted(pb::LocalAdmission {
            grant_id: "grt_stolen".into(),
            reservation_id: format!("rsv_forged_{n}"),
            request_id: format!("forged-{n}"),
            agent_id: agent_id.into(),
            model: "llama3-local".into(),
            reserved_micro: 10,
            endpoint: pb::Endpoint::ChatCompletions as i32,
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_credential_acts_for_its_own_agents_only() {
    let f = Fixture::new().await;
    let mine = f.create("mine", 1_000_000, 600).await;
    let other = f.create("other", 1_000_000, 600).await;
    let other_id = f.agent("other").await.id;
    let sidecar = f.issue("pod-mine", &["mine"]).await;
    assert!(sidecar.starts_with("aexsc_"), "{sidecar}");
    let fleet = f.home.dataplane_token();

    // Its Watch shows its own agent only.
    let mut watch = f
        .admission()
        .watch(bearer(pb::WatchRequest {}, &sidecar))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::watch_event::Change::Snapshot(snapshot)) =
        watch.next().await.unwrap().unwrap().change
    else {
        panic!("the watch starts with a snapshot");
    };
    let names: Vec<&str> = snapshot.agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["mine"]);
    assert_eq!(snapshot.agents[0].token_sha256, token_sha256(&mine));
    assert!(matches!(
        watch.next().await.unwrap().unwrap().change,
        Some(pb::watch_event::Change::Models(_))
    ));

    // It admits for its agent; for another, the client gets a 403 that
    // names the rule, and the ledger a denial.
    let ok = f
        .admission()
        .admit(bearer(admit_request(&mine, "m1", 10), &sidecar))
        .await
        .unwrap()
        .into_inner();
    let my_reservation = admitted(&ok).reservation_id.clone();
    for endpoint in [pb::Endpoint::ChatCompletions, pb::Endpoint::Models] {
        let mut ask = admit_request(&other, "o1", 10);
        ask.endpoint = endpoint as i32;
        let refused = f
            .admission()
            .admit(bearer(ask, &sidecar))
            .await
            .unwrap()
            .into_inner();
        let d = denied(&refused);
        assert_eq!(
            (d.http_status, d.code.as_str(), d.denied_by.as_str()),
            (403, "agent_not_served", "data_plane"),
            "{endpoint:?}: {d:?}"
        );
        assert!(d.message.contains("'other'") && d.message.contains("'pod-mine'"));
    }
    let batch = f
        .admission()
        .admit_batch(bearer(
            pb::AdmitBatchRequest {
                admissions: vec![admit_request(&other, "o2", 10)],
            },
            &sidecar,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::admit_result::Result::Decided(d)) = &batch.results[0].result else {
        panic!("{batch:?}");
    };
    assert_eq!(denied(d).denied_by, "data_plane");

    // A call of the other agent, admitted through the fleet credential: the
    // sidecar can neither settle, extend nor re-admit it by its request id.
    let theirs = f
        .admission()
        .admit(bearer(admit_request(&other, "theirs", 10), &fleet))
        .await
        .unwrap()
        .into_inner();
    let their_reservation = admitted(&theirs).reservation_id.clone();
    let reserved_before = f.agent("other").await.reserved_micro;
    let settle = pb::SettleRequest {
        reservation_id: their_reservation.clone(),
        outcome: pb::SettleOutcome::Completed as i32,
        prompt_tokens: 1,
        completion_tokens: 1,
        usage_reported: true,
        ..Default::default()
    };
    let e = f
        .admission()
        .settle(bearer(settle.clone(), &sidecar))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("'other'"), "{}", e.message());
    let by_request = pb::SettleRequest {
        reservation_id: String::new(),
        request_id: "theirs".into(),
        ..settle.clone()
    };
    let batch = f
        .admission()
        .settle_batch(bearer(
            pb::SettleBatchRequest {
                settlements: vec![settle.clone(), by_request],
            },
            &sidecar,
        ))
        .await
        .unwrap()
        .into_inner();
    for r in &batch.results {
        let Some(pb::settle_result::Result::Error(e)) = &r.result else {
            panic!("{batch:?}");
        };
        assert_eq!(e.code, Code::PermissionDenied as i32);
    }
    let e = f
        .admission()
        .heartbeat(bearer(
            pb::HeartbeatRequest {
                reservation_ids: vec![my_reservation.clone(), their_reservation.clone()],
            },
            &sidecar,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let replay = f
        .admission()
        .admit(bearer(admit_request(&other, "theirs", 10), &sidecar))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied(&replay).denied_by, "data_plane");
    assert_eq!(f.agent("other").await.reserved_micro, reserved_before);

    // Reports: no admit recorded for the other agent, no grant issued for
    // it, and its grants are not the sidecar's to give back.
    let report = f
        .admission()
        .report(bearer(
            pb::ReportRequest {
                data_plane: "pod-mine".into(),
                items: vec![local_admission(&other_id, 1)],
                close: vec![pb::GrantRef {
                    grant_id: "grt_theirs".into(),
                    agent_id: other_id.clone(),
                }],
                asks: vec![pb::GrantAsk {
                    grant_id: "grt_wanted".into(),
                    agent_id: other_id.clone(),
                    worst_call_micro: 10,
                    spend_per_s_micro: 10,
                    calls_per_s: 1,
                    ..Default::default()
                }],
            },
            &sidecar,
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(pb::report_item_result::Result::Error(e)) = &report.results[0].result else {
        panic!("{report:?}");
    };
    assert_eq!(e.code, Code::PermissionDenied as i32);
    assert!(report.grants.is_empty(), "{report:?}");
    assert_eq!(report.refused[0].reason, "not_admissible");
    assert_eq!(f.agent("other").await.reserved_micro, reserved_before);

    // Its own call settles; the other agent's is still open for its own
    // data plane to settle.
    f.admission()
        .settle(bearer(
            pb::SettleRequest {
                reservation_id: my_reservation,
                ..settle.clone()
            },
            &sidecar,
        ))
        .await
        .unwrap();
    f.admission().settle(bearer(settle, &fleet)).await.unwrap();

    // Changes to the other agent never reach the sidecar's stream; its own do.
    let admin = f.home.admin_token();
    let mut agents =
        aex_proto::v1::agent_service_client::AgentServiceClient::new(f.channel.clone());
    for name in ["other", "mine"] {
        agents
            .pause_agent(bearer(pb::AgentRef { name: name.into() }, &admin))
            .await
            .unwrap();
    }
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::watch_event::Change::AgentUpserted(a)) = next.change else {
        panic!("{next:?}");
    };
    assert_eq!(a.name, "mine");

    let events = f.events("other").await;
    let refusals = events
        .iter()
        .filter(|e| e.kind == "deny" && e.reason == "data_plane")
        .count();
    assert_eq!(refusals, 4, "every refused admission is in the ledger");

    // Revoked: its stream ends, and it is refused from then on.
    f.credentials()
        .revoke_credential(bearer(
            pb::RevokeCredentialRequest {
                name: "pod-mine".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the stream of a revoked credential ends");
    let e = ended.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("revoked"), "{}", e.message());
    let e = f
        .admission()
        .admit(bearer(admit_request(&mine, "m2", 10), &sidecar))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn credentials_are_issued_by_admins_for_agents_that_exist() {
    let f = Fixture::new().await;
    f.create("known", 1_000_000, 60).await;
    let admin = f.home.admin_token();
    let create = |name: &str, agents: &[&str]| pb::CreateCredentialRequest {
        name: name.into(),
        agents: agents.iter().map(|a| a.to_string()).collect(),
    };
    let cases = [
        (
            create("pod", &["known", "typo"]),
            &admin,
            Code::NotFound,
            "typo",
        ),
        (
            create("pod", &[]),
            &admin,
            Code::InvalidArgument,
            "--agents",
        ),
        (
            create("bad name", &["known"]),
            &admin,
            Code::InvalidArgument,
            "credential name",
        ),
    ];
    for (request, credential, code, says) in cases {
        let e = f
            .credentials()
            .create_credential(bearer(request, credential))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    // The data-plane credential cannot issue credentials.
    let e = f
        .credentials()
        .create_credential(bearer(create("pod", &["known"]), &f.home.dataplane_token()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    f.issue("pod", &["known"]).await;
    let e = f
        .credentials()
        .create_credential(bearer(create("pod", &["known"]), &admin))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = f
        .credentials()
        .revoke_credential(bearer(
            pb::RevokeCredentialRequest {
                name: "nobody".into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let listed = f
        .credentials()
        .list_credentials(bearer(pb::ListCredentialsRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner()
        .credentials;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].agents, ["known"]);
    assert!(listed[0].secret_prefix.starts_with("aexsc_"));
}
