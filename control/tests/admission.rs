//! The data plane's gRPC API against a real `aex-control` process.

use aex_core::secrets::token_sha256;
use aex_proto::v1::{
    self as pb, admit_response::Outcome, agent_service_client::AgentServiceClient,
};
use aex_tests::ControlPlane;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request};

mod common;

use common::{Fixture, admit_request, admitted, bearer, denied};

#[tokio::test]
async fn admission_requires_the_data_plane_credential() {
    let f = Fixture::new().await;
    let token = f.create("a", 1_000_000, 60).await;
    for credential in [
        None,
        Some(f.home.admin_token()),
        Some("aexdp_wrong".to_string()),
    ] {
        let request = admit_request(&token, "r1", 10);
        let request = match &credential {
            Some(c) => bearer(request, c),
            None => Request::new(request),
        };
        let e = f.admission().admit(request).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{credential:?}");
    }
    assert_eq!(f.agent("a").await.reserved_micro, 0);
}

#[tokio::test]
async fn fifty_concurrent_admissions_against_a_budget_for_exactly_ten() {
    let f = Fixture::new().await;
    // Each reservation: 100 input × 1 µ + 50 output × 2 µ = 200 µ.
    let token = f.create("tight", 2_000, 10_000).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = f.admission();
        let request = bearer(
            admit_request(&token, &format!("req-{i}"), 50),
            &f.home.dataplane_token(),
        );
        tasks.push(tokio::spawn(async move {
            client.admit(request).await.unwrap().into_inner()
        }));
    }
    let mut reservations = Vec::new();
    let mut budget_denials = 0;
    for t in tasks {
        match t.await.unwrap().outcome.unwrap() {
            Outcome::Admitted(a) => {
                assert_eq!(a.reserved_micro, 200);
                reservations.push(a.reservation_id);
            }
            Outcome::Denied(d) => {
                assert_eq!(
                    (d.http_status, d.code.as_str(), d.denied_by.as_str()),
                    (402, "budget_exceeded", "budget")
                );
                assert!(d.message.contains("top up"), "{}", d.message);
                budget_denials += 1;
            }
        }
    }
    assert_eq!((reservations.len(), budget_denials), (10, 40));
    let agent = f.agent("tight").await;
    assert_eq!((agent.reserved_micro, agent.spent_micro), (2_000, 0));

    // Settle concurrently with real usage below the bound.
    let mut tasks = Vec::new();
    for id in reservations {
        let mut client = f.admission();
        let request = bearer(
            pb::SettleRequest {
                reservation_id: id,
                outcome: pb::SettleOutcome::Completed as i32,
                prompt_tokens: 90,
                completion_tokens: 20,
                usage_reported: true,
                ..Default::default()
            },
            &f.home.dataplane_token(),
        );
        tasks.push(tokio::spawn(async move {
            client.settle(request).await.unwrap().into_inner()
        }));
    }
    for t in tasks {
        let s = t.await.unwrap();
        assert_eq!(s.charged_micro, 130);
        assert!(!s.already_settled);
    }
    let agent = f.agent("tight").await;
    assert_eq!((agent.reserved_micro, agent.spent_micro), (0, 1_300));
    assert!(agent.spent_micro <= agent.budget_micro);

    let events = f.events("tight").await;
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count();
    assert_eq!((count("admit"), count("settle")), (10, 10));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "deny" && e.reason == "budget")
            .count(),
        40
    );
    let settled: i64 = events
        .iter()
        .filter(|e| e.kind == "settle")
        .map(|e| e.amount_micro)
        .sum();
    assert_eq!(settled, agent.spent_micro, "spent = sum of settle events");
}

#[tokio::test]
async fn admit_and_settle_are_idempotent_and_overruns_are_kept_apart() {
    let f = Fixture::new().await;
    let token = f.create("idem", 1_000_000, 60).await;
    let first = f.admit(&token, "same-request", 50).await;
    let again = f.admit(&token, "same-request", 50).await;
    assert_eq!(
        admitted(&first).reservation_id,
        admitted(&again).reservation_id
    );
    assert_eq!(f.agent("idem").await.reserved_micro, 200, "reserved once");

    let id = admitted(&first).reservation_id.clone();
    // The provider reports more than was reserved: the charge stops at the
    // reservation (spent never passes budget) and the rest is an overrun.
    let s = f.settle(&id, 100, 400).await;
    assert_eq!(
        (
            s.charged_micro,
            s.overrun,
            s.overrun_micro,
            s.already_settled
        ),
        (200, true, 700, false)
    );
    let s = f.settle(&id, 100, 400).await;
    assert!(s.already_settled);
    let agent = f.agent("idem").await;
    assert_eq!(
        (agent.spent_micro, agent.reserved_micro, agent.overrun_micro),
        (200, 0, 700)
    );
    let events = f.events("idem").await;
    let overruns: Vec<_> = events.iter().filter(|e| e.kind == "overrun").collect();
    assert_eq!(overruns.len(), 1);
    assert_eq!(overruns[0].amount_micro, 700);
    assert_eq!(events.iter().filter(|e| e.kind == "settle").count(), 1);
}

/// An Admit retried after its reservation closed (the first answer lost,
/// the reservation settled or expired meanwhile) must not let the call go
/// ahead on nothing: a 409 the SDKs retry as a new request.
#[tokio::test]
async fn an_admit_retried_after_its_reservation_closed_is_refused() {
    let f = Fixture::new().await;
    let token = f.create("late", 1_000_000, 60).await;
    let first = f.admit(&token, "lost-answer", 50).await;
    let id = admitted(&first).reservation_id.clone();
    f.settle(&id, 10, 10).await;
    let retried = f.admit(&token, "lost-answer", 50).await;
    let d = denied(&retried);
    assert_eq!(
        (d.http_status, d.code.as_str(), d.denied_by.as_str()),
        (409, "request_already_closed", "request")
    );
    let agent = f.agent("late").await;
    assert_eq!((agent.reserved_micro, agent.spent_micro), (0, 30));
}

#[tokio::test]
async fn rpm_burst_denials_match_the_ledger() {
    let f = Fixture::new().await;
    let token = f.create("bursty", 100_000_000, 120).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut client = f.admission();
        let request = bearer(
            admit_request(&token, &format!("b-{i}"), 1),
            &f.home.dataplane_token(),
        );
        tasks.push(tokio::spawn(async move {
            client.admit(request).await.unwrap().into_inner()
        }));
    }
    let mut limited = 0;
    for t in tasks {
        if let Some(Outcome::Denied(d)) = t.await.unwrap().outcome {
            assert_eq!((d.http_status, d.denied_by.as_str()), (429, "rpm"));
            assert!(d.retry_after_ms > 0 && d.retry_after_ms <= 60_000);
            limited += 1;
        }
    }
    assert!(
        limited >= 70,
        "a burst of 200 at RPM 120 must be limited, got {limited}"
    );
    let events = f.events("bursty").await;
    let in_ledger = events
        .iter()
        .filter(|e| e.kind == "deny" && e.reason == "rpm")
        .count();
    assert_eq!(in_ledger, limited);
}

#[tokio::test]
async fn policy_changes_apply_to_the_next_request_and_reach_watchers() {
    use tokio_stream::StreamExt;
    let f = Fixture::new().await;
    let token = f.create("watched", 1_000_000, 60).await;
    let mut watch = f
        .admission()
        .watch(bearer(pb::WatchRequest {}, &f.home.dataplane_token()))
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    let Some(pb::watch_event::Change::Snapshot(snapshot)) = first.change else {
        panic!("the watch starts with a snapshot: {first:?}");
    };
    assert_eq!(snapshot.agents.len(), 1);
    assert_eq!(snapshot.agents[0].token_sha256, token_sha256(&token));
    let second = watch.next().await.unwrap().unwrap();
    assert!(matches!(
        second.change,
        Some(pb::watch_event::Change::Models(_))
    ));

    let admin = f.home.admin_token();
    let mut agents = AgentServiceClient::new(f.channel.clone());
    agents
        .pause_agent(bearer(
            pb::AgentRef {
                name: "watched".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let paused = denied(&f.admit(&token, "p1", 10).await).clone();
    assert_eq!(
        (paused.http_status, paused.code.as_str()),
        (403, "agent_paused")
    );
    let change = tokio::time::timeout(Duration::from_secs(1), watch.next())
        .await
        .expect("the change reaches watchers within 1 s")
        .unwrap()
        .unwrap();
    let Some(pb::watch_event::Change::AgentUpserted(p)) = change.change else {
        panic!("{change:?}");
    };
    assert_eq!(p.state(), pb::AgentState::Paused);

    agents
        .resume_agent(bearer(
            pb::AgentRef {
                name: "watched".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    let rotated = agents
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                name: "watched".into(),
                ttl_seconds: None,
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let old = denied(&f.admit(&token, "p2", 10).await).clone();
    assert_eq!(
        (old.http_status, old.code.as_str()),
        (401, "invalid_api_key")
    );
    admitted(&f.admit(&rotated, "p3", 10).await);

    agents
        .delete_agent(bearer(
            pb::AgentRef {
                name: "watched".into(),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert_eq!(denied(&f.admit(&rotated, "p4", 10).await).http_status, 401);
}

#[tokio::test]
async fn a_control_plane_restart_keeps_open_reservations_settleable() {
    let f = Fixture::new().await;
    let token = f.create("durable", 1_000_000, 60).await;
    let id = admitted(&f.admit(&token, "before-restart", 50).await)
        .reservation_id
        .clone();
    let Fixture { home, cp, .. } = f;
    drop(cp); // SIGKILL
    let cp = home.start_control();
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let f = Fixture { home, cp, channel };
    assert_eq!(f.agent("durable").await.reserved_micro, 200);
    let s = f.settle(&id, 10, 10).await;
    assert_eq!((s.charged_micro, s.already_settled), (30, false));
    let agent = f.agent("durable").await;
    assert_eq!((agent.spent_micro, agent.reserved_micro), (30, 0));
}

impl Fixture {
    async fn create_with(&self, request: pb::CreateAgentRequest) -> String {
        AgentServiceClient::new(self.channel.clone())
            .create_agent(bearer(request, &self.home.admin_token()))
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

#[tokio::test]
async fn tpm_and_concurrency_limits_deny_with_their_rule() {
    let f = Fixture::new().await;
    // 300 tokens per minute; each request bounds 100 input tokens.
    let tpm = f
        .create_with(pb::CreateAgentRequest {
            name: "tpm".into(),
            budget_micro: 1_000_000,
            rpm: 1000,
            tpm: 300,
            ..Default::default()
        })
        .await;
    for i in 0..3 {
        admitted(&f.admit(&tpm, &format!("t{i}"), 1).await);
    }
    let d = denied(&f.admit(&tpm, "t3", 1).await).clone();
    assert_eq!((d.http_status, d.denied_by.as_str()), (429, "tpm"));
    assert!(
        d.retry_after_ms >= 1 && d.retry_after_ms <= 60_000,
        "{}",
        d.retry_after_ms
    );

    let conc = f
        .create_with(pb::CreateAgentRequest {
            name: "conc".into(),
            budget_micro: 1_000_000,
            rpm: 1000,
            max_concurrent: 2,
            ..Default::default()
        })
        .await;
    let first = admitted(&f.admit(&conc, "c0", 1).await)
        .reservation_id
        .clone();
    admitted(&f.admit(&conc, "c1", 1).await);
    let d = denied(&f.admit(&conc, "c2", 1).await).clone();
    assert_eq!((d.http_status, d.denied_by.as_str()), (429, "concurrency"));
    f.settle(&first, 1, 1).await;
    admitted(&f.admit(&conc, "c3", 1).await);
    let reasons: Vec<String> = f
        .events("conc")
        .await
        .into_iter()
        .filter(|e| e.kind == "deny")
        .map(|e| e.reason)
        .collect();
    assert_eq!(reasons, ["concurrency"]);
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let f = Fixture::new().await;
    let token = f
        .create_with(pb::CreateAgentRequest {
            name: "brief".into(),
            budget_micro: 1_000_000,
            rpm: 60,
            ttl_seconds: 1,
            ..Default::default()
        })
        .await;
    admitted(&f.admit(&token, "e0", 1).await);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let d = denied(&f.admit(&token, "e1", 1).await).clone();
    assert_eq!(
        (d.http_status, d.denied_by.as_str()),
        (401, "token_expired")
    );
    assert!(d.message.contains("rotate-token"), "{}", d.message);
}

#[tokio::test]
async fn an_admit_retried_after_a_restart_gets_its_reservation_and_route() {
    let f = Fixture::new().await;
    let token = f.create("retrier", 1_000_000, 60).await;
    let first = admitted(&f.admit(&token, "lost-answer", 50).await).clone();
    let Fixture { home, mut cp, .. } = f;
    cp.restart();
    let channel = Channel::from_shared(cp.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let f = Fixture { home, cp, channel };
    let again = admitted(&f.admit(&token, "lost-answer", 50).await).clone();
    assert_eq!(
        again.reservation_id, first.reservation_id,
        "not reserved twice"
    );
    assert_eq!(
        (again.provider.as_str(), again.provider_model.as_str()),
        ("local", "llama3")
    );
    assert!(
        again.output_cap_injected,
        "the reserved cap is sent upstream"
    );
    assert_eq!(
        f.agent("retrier").await.reserved_micro,
        first.reserved_micro
    );
}

/// SettleBatch settles each item exactly as Settle would, answers in the
/// order asked, and reports a bad item without failing the others.
#[tokio::test]
async fn settle_batch_answers_each_settlement_in_order() {
    use pb::settle_result::Result as Settled;
    let f = Fixture::new().await;
    let token = f.create("batch", 1_000_000, 600).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let r = f.admit(&token, &format!("batch-{n}"), 50).await;
        ids.push(admitted(&r).reservation_id.clone());
    }
    // Settled before the batch: its item must say so and change nothing.
    f.settle(&ids[0], 10, 10).await;
    let item = |id: &str, completion: u64| pb::SettleRequest {
        reservation_id: id.into(),
        outcome: pb::SettleOutcome::Completed as i32,
        prompt_tokens: 10,
        completion_tokens: completion,
        usage_reported: true,
        ..Default::default()
    };
    let mut settlements: Vec<_> = ids.iter().map(|id| item(id, 5)).collect();
    settlements.push(pb::SettleRequest::default()); // names no reservation
    settlements.push(pb::SettleRequest {
        request_id: "never-admitted".into(),
        ..Default::default()
    });
    let results = f
        .admission()
        .settle_batch(bearer(
            pb::SettleBatchRequest { settlements },
            &f.home.dataplane_token(),
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 22);
    let answer = |i: usize| results[i].result.clone().expect("an answer");
    assert!(matches!(answer(0), Settled::Settled(s) if s.already_settled));
    for i in 1..20 {
        // 10 input tokens at 1 µ + 5 output tokens at 2 µ.
        assert!(
            matches!(answer(i), Settled::Settled(ref s) if s.charged_micro == 20 && !s.already_settled),
            "item {i}: {:?}",
            answer(i)
        );
    }
    assert!(
        matches!(answer(20), Settled::Error(ref e) if e.code == Code::InvalidArgument as i32 && e.message.contains("reservation_id")),
        "{:?}",
        answer(20)
    );
    assert!(matches!(answer(21), Settled::Settled(s) if s.already_settled));

    let agent = f.agent("batch").await;
    // ids[0] settled alone at 10 + 2×10 = 30 µ, the other 19 at 20 µ each.
    assert_eq!((agent.spent_micro, agent.reserved_micro), (30 + 19 * 20, 0));
    let events = f.events("batch").await;
    assert_eq!(events.iter().filter(|e| e.kind == "settle").count(), 20);

    let too_many = f
        .admission()
        .settle_batch(bearer(
            pb::SettleBatchRequest {
                settlements: vec![item(&ids[1], 5); 1025],
            },
            &f.home.dataplane_token(),
        ))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("at most 1024 per SettleBatch"));
}

/// AdmitBatch decides each item as Admit would, all against one budget at
/// once, and answers in order; a bad item fails alone.
#[tokio::test]
async fn admit_batch_decides_each_item_in_order_against_one_budget() {
    use pb::admit_result::Result as Decided;
    let f = Fixture::new().await;
    // Each reservation: 100 input × 1 µ + 50 output × 2 µ = 200 µ.
    let token = f.create("batched", 2_000, 10_000).await;
    let mut admissions: Vec<_> = (0..50)
        .map(|i| admit_request(&token, &format!("batch-{i}"), 50))
        .collect();
    admissions.push(admit_request(&token, "", 50)); // no request id
    admissions.push(admit_request("not-a-token", "stranger", 50));
    let results = f
        .admission()
        .admit_batch(bearer(
            pb::AdmitBatchRequest { admissions },
            &f.home.dataplane_token(),
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 52);
    let (mut admitted, mut over_budget) = (Vec::new(), 0);
    for r in &results[..50] {
        match r.result.clone().expect("an answer") {
            Decided::Decided(d) => match d.outcome.unwrap() {
                Outcome::Admitted(a) => admitted.push(a.reservation_id),
                Outcome::Denied(d) => {
                    assert_eq!(d.denied_by, "budget");
                    over_budget += 1;
                }
            },
            Decided::Error(e) => panic!("item failed: {e:?}"),
        }
    }
    assert_eq!((admitted.len(), over_budget), (10, 40));
    assert!(
        matches!(results[50].result.clone(), Some(Decided::Error(e)) if e.code == Code::InvalidArgument as i32 && e.message.contains("request_id")),
        "{:?}",
        results[50]
    );
    assert!(
        matches!(results[51].result.clone(), Some(Decided::Decided(d)) if denied(&d).http_status == 401),
        "{:?}",
        results[51]
    );
    let agent = f.agent("batched").await;
    assert_eq!((agent.reserved_micro, agent.spent_micro), (2_000, 0));
    // The same request id again is the same reservation, not a second.
    let again = f.admit(&token, "batch-0", 50).await;
    assert!(matches!(
        again.outcome,
        Some(Outcome::Admitted(_)) | Some(Outcome::Denied(_))
    ));
    assert_eq!(f.agent("batched").await.reserved_micro, 2_000);
}

/// Before: one open reservation that could not be settled ("CHECK
/// constraint failed: reserved_micro >= 0") aborted every expiry sweep, so
/// other agents' expired reservations stayed open for good.
#[tokio::test]
async fn one_bad_open_reservation_does_not_stop_the_expiry_sweep() {
    let mut f = Fixture::new().await;
    let bad = f.create("edited", 1_000_000, 600).await;
    let good = f.create("honest", 1_000_000, 600).await;
    let bad_id = admitted(&f.admit(&bad, "req-bad", 10).await)
        .reservation_id
        .clone();
    admitted(&f.admit(&good, "req-good", 10).await);
    // With the daemon stopped, an edit leaves one reservation larger than
    // what its agent holds reserved, and both past their expiry.
    drop(f.channel);
    drop(f.cp);
    {
        let db =
            sqlx::SqlitePool::connect(&format!("sqlite://{}", f.home.file("aex.db").display()))
                .await
                .unwrap();
        sqlx::query("UPDATE reservations SET amount_micro = amount_micro + 1000 WHERE id = ?1")
            .bind(&bad_id)
            .execute(&db)
            .await
            .unwrap();
        sqlx::query("UPDATE reservations SET expires_at_ms = 1 WHERE state = 'open'")
            .execute(&db)
            .await
            .unwrap();
        db.close().await;
    }
    f.cp = ControlPlane::start_with(&f.home, &["--sweep-interval-ms", "50"]);
    let reserved = |name: &str| {
        f.cp.aexctl(&["agent", "inspect", name, "--json"]).json()["reserved_micro"]
            .as_i64()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reserved("honest") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the honest agent's expired reservation was never swept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reserved("edited") > 0,
        "the bad one is left open, not forced"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(f.home.file("logs/control.test.log")).unwrap();
    let reports = log
        .lines()
        .filter(|l| l.contains("cannot expire this reservation") && l.contains(&bad_id))
        .count();
    assert_eq!(reports, 1, "named once, not at every sweep:\n{log}");
    let audit = f.cp.aexctl(&["audit"]);
    assert_eq!(audit.code(), 1, "audit names the edit:\n{}", audit.stdout);
}
