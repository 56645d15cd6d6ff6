//! What every store backend must do, written once against the traits: a
//! backend's tests run the whole suite with
//! `crate::store_conformance!(open_fresh_store)`, where `open_fresh_store`
//! is an `async fn() -> (Guard, Backend)` opening an empty store keyed with
//! [`KEY`] (the guard keeps its database alive for the test), or
//! `-> Option<(Guard, Backend)>` for a backend that needs a server the
//! machine may lack.
//!
//! Seeded from the SQLite backend's own tests; concurrency claims are made
//! under real concurrency (tasks on a multi-threaded runtime).

use crate::audit::audit_store;
use crate::clock::now_ms;
use crate::ledger::audit::Check;
use crate::ledger::verify::ChainVerifier;
use crate::storage::*;
use aex_core::chain::{GENESIS, chain_hash};
use aex_core::money::{Pricing, TokenUsage};
use serde_json::json;
use std::sync::Arc;

pub const KEY: [u8; 32] = [7; 32];

/// One test per case for the backend `$open` opens.
#[macro_export]
macro_rules! store_conformance {
    ($open:path) => {
        $crate::store_conformance!(@cases $open;
            lifecycle_is_logged_in_an_intact_chain,
            concurrent_ledger_and_admin_writes_keep_one_chain_and_exact_money,
            a_failing_operation_leaves_the_others,
            a_job_of_many_answers_each_alone,
            budget_cannot_drop_below_spent,
            reservation_events_describe_their_rows_whatever_the_caller_adds,
            the_last_micro_goes_to_exactly_one_reservation,
            a_reservation_closes_once_in_the_state_its_charge_says,
            a_settlement_naming_another_agent_is_refused,
            events_hold_exactly_the_bytes_the_domain_decided,
            supervised_processes_start_end_and_take_orders,
            extending_names_the_reservations_already_closed,
            reports_add_up_from_the_counters,
            audit_passes_over_the_stores_own_writes,
            a_retried_admission_of_a_closed_reservation_reserves_nothing,
            a_reservation_for_an_unknown_agent_is_not_found_and_a_deleted_one_refused,
            a_reservation_is_refused_in_one_order,
            open_and_due_reservations_are_found_by_id_and_expiry,
            no_more_reservations_open_than_the_limit_under_concurrency,
            a_grant_holds_budget_that_calls_then_take,
            grants_for_every_data_plane_never_take_the_last_micro,
            a_grant_ends_once_and_an_expiry_charges_what_is_unreported,
            a_renewal_ends_the_old_grant_in_the_same_step,
            a_grant_for_an_unknown_or_deleted_agent_is_refused,
            calls_reported_after_their_grant_expired_are_recorded_from_its_charge,
            credentials_are_issued_once_per_name_and_revoked_once,
            a_retired_token_is_found_with_what_ended_it,
            a_request_s_story_is_found_by_its_id,
        );
    };
    (@cases $open:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                // `$open` may decline (a server the machine lacks): it
                // reports the test as skipped and returns None.
                let Some((_guard, store)) = $crate::storage::testing::conformance::Opened::opened($open().await) else {
                    return;
                };
                $crate::storage::testing::conformance::$case(std::sync::Arc::new(store)).await;
            }
        )*
    };
}

/// What an open function returns: a store, or maybe one.
pub trait Opened<G, S> {
    fn opened(self) -> Option<(G, S)>;
}

impl<G, S> Opened<G, S> for (G, S) {
    fn opened(self) -> Option<(G, S)> {
        Some(self)
    }
}

impl<G, S> Opened<G, S> for Option<(G, S)> {
    fn opened(self) -> Option<(G, S)> {
        self
    }
}

pub fn new_agent(name: &str, token_sha256: &str) -> NewAgent {
    NewAgent {
        token_prefix: "aex_abc".into(),
        rpm: 120,
        allowed_models: vec!["m".into()],
        ..NewAgent::new(name, token_sha256, 5_000_000)
    }
}

pub fn reservation(agent: &AgentRecord, n: usize, amount_micro: i64) -> NewReservation {
    NewReservation {
        record: ReservationRecord {
            id: format!("rsv_{n}"),
            request_id: format!("req_{n}"),
            agent_id: agent.id.clone(),
            model: "m".into(),
            amount_micro,
            // Cache prices apart from the input price, so every store is
            // seen to keep all four.
            pricing: Pricing::flat(1_000_000, 2_000_000).with_cache(100_000, 1_250_000),
            input_tokens_bound: 10,
            output_tokens_cap: 10,
            created_at_ms: now_ms(),
            expires_at_ms: now_ms() + 60_000,
        },
        agent_name: agent.name.clone(),
        max_open: 0,
        grant_id: None,
        log_budget_denial: true,
        details: json!({"n": n}),
        at_ms: now_ms(),
    }
}

/// A supervised process of `agent`, running, with its token's hash.
pub fn process(agent: &AgentRecord, id: &str, token_sha256: &str) -> ProcessRecord {
    ProcessRecord {
        id: id.into(),
        agent_id: agent.id.clone(),
        agent_name: agent.name.clone(),
        token_sha256: token_sha256.into(),
        pid: 0,
        command: "agent --loop".into(),
        host: "laptop".into(),
        state: ProcessState::Running.as_str().into(),
        started_at_ms: now_ms(),
        ended_at_ms: None,
        exit_code: None,
        reason: String::new(),
        kill_reason: None,
    }
}

pub fn settlement(agent: &AgentRecord, n: usize, charge_micro: i64) -> Settlement {
    Settlement {
        reservation_id: format!("rsv_{n}"),
        agent_id: agent.id.clone(),
        agent_name: agent.name.clone(),
        closing: Closing::Finished(Outcome::Completed),
        charge_micro,
        overrun_micro: 0,
        usage: TokenUsage::new(1, 1),
        extra_events: vec![],
        details: json!({}),
        at_ms: now_ms(),
    }
}

/// The extra event admission logs with a settlement whose reported usage
/// passed the reservation.
fn overrun() -> ExtraEvent {
    ExtraEvent {
        kind: EventKind::Overrun,
        reason: "usage_above_reservation".into(),
        details: json!({}),
    }
}

async fn all_events(s: &dyn Store) -> Vec<EventRecord> {
    s.list_events(EventFilter {
        limit: 10_000,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn assert_one_chain(events: &[EventRecord]) {
    let mut verifier = ChainVerifier::new(&KEY);
    for e in events {
        verifier.push(e);
    }
    let check = verifier.finish(events.len() as i64);
    assert!(check.passed, "{:?}", check.offenders);
}

fn kinds(events: &[EventRecord]) -> Vec<&str> {
    events.iter().map(|e| e.body.kind.as_str()).collect()
}

async fn spend(s: &dyn Store, agent: &AgentRecord, n: usize, micro: i64) {
    s.reserve(reservation(agent, n, micro)).await.unwrap();
    s.settle(settlement(agent, n, micro)).await.unwrap();
}

pub async fn lifecycle_is_logged_in_an_intact_chain(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("dev", "h1")).await.unwrap();
    assert!(matches!(
        s.create_agent(new_agent("dev", "h2")).await,
        Err(StoreError::DuplicateName(_))
    ));
    let up = s
        .update_agent(
            "dev",
            AgentPatch {
                top_up_micro: Some(1_000_000),
                rpm: Some(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(up.budget_micro, 6_000_000);
    assert_eq!(up.rpm, 60);
    assert!(matches!(
        s.update_agent(
            "dev",
            AgentPatch {
                top_up_micro: Some(-1),
                ..Default::default()
            }
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
    s.set_state("dev", AgentState::Paused).await.unwrap();
    s.set_state("dev", AgentState::Paused).await.unwrap(); // no second event
    s.delete_agent("dev").await.unwrap();
    assert!(s.agent_by_name("dev").await.unwrap().is_none());
    assert_eq!(s.list_agents(true).await.unwrap()[0].id, a.id);
    assert!(s.list_agents(false).await.unwrap().is_empty());
    assert!(matches!(
        s.set_state("dev", AgentState::Active).await,
        Err(StoreError::AgentNotFound(_))
    ));
    // The name is free again after the tombstone.
    s.create_agent(new_agent("dev", "h1")).await.unwrap();

    let events = all_events(s.as_ref()).await;
    assert_eq!(
        kinds(&events),
        [
            "agent.created",
            "agent.updated",
            "agent.topped_up",
            "agent.paused",
            "agent.deleted",
            "agent.created"
        ]
    );
    let mut prev = GENESIS.to_string();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.body.seq, i as i64 + 1);
        assert_eq!(e.prev_hash, prev);
        assert_eq!(e.hash, chain_hash(&KEY, &prev, &e.body));
        prev = e.hash.clone();
    }
    let by_name = s
        .list_events(EventFilter {
            agent_name: Some("dev".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_name.len(), 6, "a reused name shows both histories");
    let after = s
        .list_events(EventFilter {
            after_seq: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(kinds(&after), ["agent.deleted", "agent.created"]);
}

/// Ledger writes and admin writes all at once: one unbroken chain, and
/// money that adds up to the micro.
pub async fn concurrent_ledger_and_admin_writes_keep_one_chain_and_exact_money(s: Arc<dyn Store>) {
    let agent = s.create_agent(new_agent("busy", "h")).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..300 {
        let (s, agent) = (s.clone(), agent.clone());
        tasks.spawn(async move {
            let reserved = s.reserve(reservation(&agent, n, 100)).await.unwrap();
            assert!(matches!(reserved, ReserveOutcome::Reserved { .. }));
            // A retried admission is the same reservation, not a second.
            let again = s.reserve(reservation(&agent, n, 100)).await.unwrap();
            assert!(matches!(again, ReserveOutcome::AlreadyAdmitted(_)));
            let settle = settlement(&agent, n, (n % 7) as i64);
            let first = s.settle(settle.clone()).await.unwrap();
            assert!(matches!(first, SettleOutcome::Settled { .. }));
            assert_eq!(
                s.settle(settle).await.unwrap(),
                SettleOutcome::AlreadyClosed
            );
        });
    }
    for _ in 0..30 {
        let s = s.clone();
        tasks.spawn(async move {
            s.update_agent(
                "busy",
                AgentPatch {
                    top_up_micro: Some(1_000),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            s.record_denial(DenialRecord {
                agent_id: "nobody".into(),
                agent_name: "nobody".into(),
                reason: "rpm".into(),
                details: json!({}),
                count: 1,
                at_ms: now_ms(),
            })
            .await
            .unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let after = s.agent_by_name("busy").await.unwrap().unwrap();
    let charged: i64 = (0..300).map(|n| (n % 7) as i64).sum();
    assert_eq!(after.spent_micro, charged);
    assert_eq!(after.reserved_micro, 0);
    assert_eq!(after.budget_micro, 5_000_000 + 30 * 1_000);
    let events = all_events(s.as_ref()).await;
    // created + 300 × (admit, settle or release) + 30 × (top-up, deny)
    assert_eq!(events.len(), 1 + 600 + 60);
    assert_one_chain(&events);
}

/// One operation failing leaves every other one, and the chain, whole.
pub async fn a_failing_operation_leaves_the_others(s: Arc<dyn Store>) {
    let agent = s.create_agent(new_agent("busy", "h")).await.unwrap();
    s.reserve(reservation(&agent, 999, 10)).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let (s, agent) = (s.clone(), agent.clone());
        tasks.spawn(async move {
            let mut r = reservation(&agent, n, 10);
            if n % 10 == 0 {
                // The id of an existing reservation, for a new request.
                r.record.id = "rsv_999".into();
            }
            (n, s.reserve(r).await)
        });
    }
    let mut failed = 0;
    while let Some(done) = tasks.join_next().await {
        let (n, result) = done.unwrap();
        if n % 10 == 0 {
            assert!(
                matches!(result, Err(StoreError::Conflict(_))),
                "{n}: {result:?}"
            );
            failed += 1;
        } else {
            assert!(matches!(result, Ok(ReserveOutcome::Reserved { .. })), "{n}");
        }
    }
    assert_eq!(failed, 5);
    let after = s.agent_by_name("busy").await.unwrap().unwrap();
    assert_eq!(
        after.reserved_micro,
        46 * 10,
        "only the ones that succeeded"
    );
    let events = all_events(s.as_ref()).await;
    assert_eq!(events.len(), 1 + 46);
    assert_one_chain(&events);
}

/// `reserve_many` / `settle_many` (a data plane's report): one item that
/// fails leaves the others, an item sees the ones before it, and each is
/// answered in its place.
pub async fn a_job_of_many_answers_each_alone(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("many", "hm")).await.unwrap();
    let b = s.create_agent(new_agent("other", "hb")).await.unwrap();
    s.reserve(reservation(&a, 999, 10)).await.unwrap();
    let mut calls: Vec<_> = (0..20).map(|n| reservation(&a, n, 10)).collect();
    // The id of an existing reservation, for a new request.
    calls[5].record.id = "rsv_999".into();
    // Item 3 again, in the same job.
    calls.push(reservation(&a, 3, 10));
    let done = s.reserve_many(calls).await;
    assert_eq!(done.len(), 21);
    for (n, r) in done.iter().enumerate() {
        match n {
            5 => assert!(matches!(r, Err(StoreError::Conflict(_))), "{n}: {r:?}"),
            20 => assert!(
                matches!(r, Ok(ReserveOutcome::AlreadyAdmitted(_))),
                "{n}: {r:?}"
            ),
            _ => assert!(
                matches!(r, Ok(ReserveOutcome::Reserved { .. })),
                "{n}: {r:?}"
            ),
        }
    }
    let agent = s.agent_by_name("many").await.unwrap().unwrap();
    assert_eq!(agent.reserved_micro, 20 * 10, "rsv_999 and the 19 reserved");

    let mut settles: Vec<_> = (0..20)
        .filter(|n| *n != 5)
        .map(|n| settlement(&a, n, 7))
        .collect();
    // rsv_2, settled as another agent.
    settles[2].agent_id = b.id.clone();
    settles[2].agent_name = b.name.clone();
    // Never reserved; then rsv_0 again, closed earlier in this job.
    settles.push(settlement(&a, 5, 7));
    settles.push(settlement(&a, 0, 7));
    let done = s.settle_many(settles).await;
    assert_eq!(done.len(), 21);
    for (n, r) in done.iter().enumerate() {
        match n {
            2 => assert!(matches!(r, Err(StoreError::Invalid(_))), "{n}: {r:?}"),
            19 => assert!(
                matches!(r, Ok(SettleOutcome::UnknownReservation)),
                "{n}: {r:?}"
            ),
            20 => assert!(matches!(r, Ok(SettleOutcome::AlreadyClosed)), "{n}: {r:?}"),
            _ => assert!(
                matches!(
                    r,
                    Ok(SettleOutcome::Settled {
                        charged_micro: 7,
                        ..
                    })
                ),
                "{n}: {r:?}"
            ),
        }
    }
    let agent = s.agent_by_name("many").await.unwrap().unwrap();
    assert_eq!(
        (agent.reserved_micro, agent.spent_micro),
        (2 * 10, 18 * 7),
        "rsv_999 and rsv_2 still open; 18 settled"
    );
    let events = all_events(s.as_ref()).await;
    let count = |kind: &str| kinds(&events).iter().filter(|k| **k == kind).count();
    assert_eq!((count("admit"), count("settle")), (20, 18));
    assert_one_chain(&events);
    assert!(
        s.settle_many(vec![]).await.is_empty() && s.reserve_many(vec![]).await.is_empty(),
        "an empty job answers nothing"
    );
}

pub async fn budget_cannot_drop_below_spent(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    spend(s.as_ref(), &a, 1, 100).await;
    let e = s
        .update_agent(
            "a",
            AgentPatch {
                budget_micro: Some(99),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already spent"), "{e}");
    assert!(matches!(
        s.update_agent("nobody", AgentPatch::default()).await,
        Err(StoreError::AgentNotFound(_))
    ));
    let kept = s
        .update_agent(
            "a",
            AgentPatch {
                budget_micro: Some(100),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((kept.budget_micro, kept.spent_micro), (100, 100));
    assert_eq!(kept.remaining_micro(), 0);
    // A call in flight may still be charged its whole reservation: the
    // budget cannot drop below spent + reserved, or its settlement would
    // overspend.
    s.update_agent(
        "a",
        AgentPatch {
            budget_micro: Some(1_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.reserve(reservation(&a, 2, 300)).await.unwrap();
    let e = s
        .update_agent(
            "a",
            AgentPatch {
                budget_micro: Some(399),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("in flight"), "{e}");
    let lowered = s
        .update_agent(
            "a",
            AgentPatch {
                budget_micro: Some(400),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(lowered.remaining_micro(), 0);
    s.settle(settlement(&a, 2, 300)).await.unwrap();
    let after = s.agent_by_name("a").await.unwrap().unwrap();
    assert!(after.spent_micro <= after.budget_micro, "{after:?}");
}

/// Whatever details a caller passes, the admit and settle events say what
/// the reservation row holds, so audit's replay of a store's own writes
/// finds nothing (benchmarks seed with bare details).
pub async fn reservation_events_describe_their_rows_whatever_the_caller_adds(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("busy", "h1")).await.unwrap();
    for n in 0..3 {
        let mut r = reservation(&a, n, 100);
        r.details = json!({});
        s.reserve(r).await.unwrap();
    }
    for n in 0..2 {
        s.settle(Settlement {
            charge_micro: if n == 0 { 40 } else { 0 },
            overrun_micro: if n == 0 { 5 } else { 0 },
            usage: TokenUsage::new(u64::MAX, 7).with_cache(u64::MAX - 1, 3),
            extra_events: if n == 0 { vec![overrun()] } else { vec![] },
            details: serde_json::Value::Null,
            ..settlement(&a, n, 0)
        })
        .await
        .unwrap();
    }
    let data = s.audit_data(now_ms()).await.unwrap();
    let mut tally = crate::ledger::audit::LogTally::new(&KEY);
    for e in all_events(s.as_ref()).await {
        tally.push(&e);
    }
    let (offenders, differing) = tally.reservations_against(&data);
    assert_eq!(offenders, Vec::<String>::new());
    assert_eq!(differing, Vec::<String>::new());
    assert_eq!(data.open_reservation_rows.len(), 1);
    assert_eq!(
        data.open_reservation_rows[0].pricing,
        reservation(&a, 2, 100).record.pricing
    );
    let (settled, _) = s.reservation_history(&a.id).await.unwrap();
    let first = settled.iter().find(|r| r.facts.id == "rsv_0").unwrap();
    assert_eq!(
        (
            first.facts.cached_input_tokens,
            first.facts.cache_write_tokens
        ),
        (i64::MAX, 3),
        "cache token counts are stored, saturated like the others"
    );
}

/// Many admissions racing for one budget: exactly as many as it covers
/// are reserved, the rest are denied and logged, nothing is overdrawn.
pub async fn the_last_micro_goes_to_exactly_one_reservation(s: Arc<dyn Store>) {
    let mut n = new_agent("tight", "h");
    n.budget_micro = 1_000;
    let agent = s.create_agent(n).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64 {
        let (s, agent) = (s.clone(), agent.clone());
        tasks.spawn(async move { s.reserve(reservation(&agent, i, 30)).await.unwrap() });
    }
    let (mut reserved, mut denied) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            ReserveOutcome::Reserved { remaining_micro } => {
                assert!(remaining_micro >= 0);
                reserved += 1;
            }
            ReserveOutcome::InsufficientBudget { remaining_micro } => {
                assert!(remaining_micro < 30, "{remaining_micro}");
                denied += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((reserved, denied), (33, 31));
    let after = s.agent_by_name("tight").await.unwrap().unwrap();
    assert_eq!(after.reserved_micro, 990);
    let events = all_events(s.as_ref()).await;
    let budget_denials = events
        .iter()
        .filter(|e| e.body.kind == "deny" && e.body.reason == "budget")
        .count();
    assert_eq!(budget_denials, 31);
    assert_eq!(s.open_reservations().await.unwrap().len(), 33);
    assert_one_chain(&events);
}

/// A settlement must name the reservation's own agent: another agent's
/// is refused and changes nothing, and the right one then settles it.
pub async fn a_settlement_naming_another_agent_is_refused(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("owner", "ho")).await.unwrap();
    let b = s.create_agent(new_agent("other", "hx")).await.unwrap();
    s.reserve(reservation(&a, 1, 100)).await.unwrap();
    let wrong = Settlement {
        agent_id: b.id.clone(),
        agent_name: b.name.clone(),
        ..settlement(&a, 1, 40)
    };
    assert!(matches!(s.settle(wrong).await, Err(StoreError::Invalid(_))));
    let owner = s.agent_by_name("owner").await.unwrap().unwrap();
    assert_eq!((owner.reserved_micro, owner.spent_micro), (100, 0));
    assert!(matches!(
        s.settle(settlement(&a, 1, 40)).await.unwrap(),
        SettleOutcome::Settled {
            charged_micro: 40,
            ..
        }
    ));
}

pub async fn a_reservation_closes_once_in_the_state_its_charge_says(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    for n in 0..4 {
        s.reserve(reservation(&a, n, 100)).await.unwrap();
    }
    // Above the reservation: charged the reservation, never more.
    let over = s.settle(settlement(&a, 0, 500)).await.unwrap();
    assert_eq!(
        over,
        SettleOutcome::Settled {
            charged_micro: 100,
            remaining_micro: 5_000_000 - 100 - 300
        }
    );
    // Nothing charged: released.
    s.settle(settlement(&a, 1, 0)).await.unwrap();
    // A negative charge is no charge.
    s.settle(settlement(&a, 2, -50)).await.unwrap();
    let expired = Settlement {
        closing: Closing::Expired,
        ..settlement(&a, 3, 100)
    };
    s.settle(expired.clone()).await.unwrap();
    assert_eq!(
        s.settle(expired).await.unwrap(),
        SettleOutcome::AlreadyClosed
    );
    assert_eq!(
        s.settle(settlement(&a, 77, 1)).await.unwrap(),
        SettleOutcome::UnknownReservation
    );
    let after = s.agent_by_name("a").await.unwrap().unwrap();
    assert_eq!((after.spent_micro, after.reserved_micro), (200, 0));
    let data = s.audit_data(now_ms()).await.unwrap();
    assert!(data.open_reservation_rows.is_empty());
    let events = all_events(s.as_ref()).await;
    let closing: Vec<(&str, i64)> = events
        .iter()
        .filter(|e| !e.body.reservation_id.is_empty() && e.body.kind != "admit")
        .map(|e| (e.body.kind.as_str(), e.body.amount_micro))
        .collect();
    assert_eq!(
        closing,
        [
            ("settle", 100),
            ("release", 0),
            ("release", 0),
            ("expire", 100)
        ]
    );
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
}

/// A backend stores the events the domain built, byte for byte: the same
/// decision hashes the same whatever database holds it.
pub async fn events_hold_exactly_the_bytes_the_domain_decided(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("dev", "h1")).await.unwrap();
    let rotated = s
        .rotate_token(
            "dev",
            TokenChange {
                token_sha256: "h2".into(),
                token_prefix: "aex_new".into(),
                token_expires_at_ms: Some(1),
                token_ttl_seconds: 60,
            },
        )
        .await
        .unwrap();
    assert_eq!(rotated.token_sha256, "h2");
    let killed = s.kill_agent("dev").await.unwrap();
    assert_eq!(killed.state, AgentState::Paused);
    let events = all_events(s.as_ref()).await;
    assert_eq!(
        kinds(&events),
        ["agent.created", "agent.token_rotated", "agent.killed"]
    );
    let created = &events[0].body;
    let decided =
        aex_core::agent::create(a.id.clone(), new_agent("dev", "h1"), a.created_at_ms, &KEY);
    let expected = &decided.events[0];
    assert_eq!(created.ts_ms, expected.ts_ms);
    assert_eq!(created.amount_micro, expected.amount_micro);
    assert_eq!(created.details_json, expected.details.to_string());
    assert_eq!(decided.agent, a);
    let mac = aex_core::chain::token_mac(&KEY, "h2");
    assert!(events[1].body.details_json.contains(&mac));
    assert!(
        !events
            .iter()
            .any(|e| e.body.details_json.contains("\"h2\"")),
        "the chain commits to tokens, never carries their hashes"
    );
    assert_one_chain(&events);
}

/// What the ledger knows of tokens no agent holds (issue #33): each found
/// by its commitment, with the rotation or deletion that ended it; a
/// current token, or one never issued, is not retired.
pub async fn a_retired_token_is_found_with_what_ended_it(s: Arc<dyn Store>) {
    use aex_core::presented::Retired;
    let rotate = |name: &'static str, to: &'static str| {
        let s = s.clone();
        async move {
            s.rotate_token(
                name,
                TokenChange {
                    token_sha256: to.into(),
                    token_prefix: "aex_new".into(),
                    token_expires_at_ms: None,
                    token_ttl_seconds: 0,
                },
            )
            .await
            .unwrap()
        }
    };
    s.create_agent(new_agent("dev", "h1")).await.unwrap();
    let other = s.create_agent(new_agent("other", "o1")).await.unwrap();
    s.start_process(process(&other, "prc_1", "p1"))
        .await
        .unwrap();
    assert_eq!(s.retired_token("h1").await.unwrap(), None, "current");
    let first = rotate("dev", "h2").await;
    rotate("other", "o2").await;
    let second = rotate("dev", "h3").await;
    let deleted = s.delete_agent("dev").await.unwrap();
    let rotated_at = |a: &AgentRecord| a.updated_at_ms;
    assert_eq!(
        s.retired_token("h1").await.unwrap(),
        Some(Retired::Rotated {
            agent: "dev".into(),
            at_ms: rotated_at(&first)
        })
    );
    assert_eq!(
        s.retired_token("h2").await.unwrap(),
        Some(Retired::Rotated {
            agent: "dev".into(),
            at_ms: rotated_at(&second)
        })
    );
    assert_eq!(
        s.retired_token("h3").await.unwrap(),
        Some(Retired::Deleted {
            agent: "dev".into(),
            at_ms: deleted.deleted_at_ms.unwrap()
        })
    );
    assert!(matches!(
        s.retired_token("o1").await.unwrap(),
        Some(Retired::Rotated { agent, .. }) if agent == "other"
    ));
    assert_eq!(s.retired_token("o2").await.unwrap(), None, "current");
    assert!(matches!(
        s.retired_token("p1").await.unwrap(),
        Some(Retired::RunToken { agent, .. }) if agent == "other"
    ));
    assert_eq!(s.retired_token("never").await.unwrap(), None);
}

/// `aexctl events --request` (issue #33): the events of one call, found by
/// the request id its client received — a denial by the id it names, a
/// reservation's events through its row — and nobody else's.
pub async fn a_request_s_story_is_found_by_its_id(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("dev", "h1")).await.unwrap();
    for n in 1..=2 {
        s.reserve(reservation(&a, n, 100)).await.unwrap();
    }
    s.settle(settlement(&a, 1, 40)).await.unwrap();
    let denied = |request_id: &str| DenialRecord {
        agent_id: a.id.clone(),
        agent_name: a.name.clone(),
        reason: "rpm".into(),
        details: aex_core::policy::Denial::rpm("dev", 1, 900).event_details(
            request_id,
            aex_core::policy::Endpoint::ChatCompletions,
            "m",
        ),
        count: 1,
        at_ms: now_ms(),
    };
    s.record_denial(denied("req_9")).await.unwrap();
    s.record_denial(denied("req_10")).await.unwrap();
    // A budget refusal, logged by the store with the reservation it refused.
    let mut poor = reservation(&a, 3, 10_000_000);
    poor.details = json!({"endpoint": "Messages"});
    s.reserve(poor).await.unwrap();
    let story = |id: &str| {
        let s = s.clone();
        let id = id.to_string();
        async move {
            s.list_events(EventFilter {
                request_id: Some(id),
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    let settled = story("req_1").await;
    assert_eq!(kinds(&settled), ["admit", "settle"]);
    assert!(settled.iter().all(|e| e.body.reservation_id == "rsv_1"));
    assert_eq!(kinds(&story("req_2").await), ["admit"]);
    let rpm = story("req_9").await;
    assert_eq!(kinds(&rpm), ["deny"]);
    let details: serde_json::Value = serde_json::from_str(&rpm[0].body.details_json).unwrap();
    assert_eq!(
        details,
        json!({"request_id": "req_9", "status": 429, "code": "rate_limit_exceeded",
            "endpoint": "ChatCompletions", "model": "m", "retry_after_ms": 900})
    );
    let budget = story("req_3").await;
    assert_eq!(kinds(&budget), ["deny"]);
    let details: serde_json::Value = serde_json::from_str(&budget[0].body.details_json).unwrap();
    assert_eq!(
        (&details["status"], &details["code"], &details["endpoint"]),
        (&json!(402), &json!("budget_exceeded"), &json!("Messages"))
    );
    assert!(story("req_404").await.is_empty());
    // The other filters still apply.
    let after = s
        .list_events(EventFilter {
            request_id: Some("req_1".into()),
            after_seq: settled[0].body.seq,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(kinds(&after), ["settle"]);
}

pub async fn supervised_processes_start_end_and_take_orders(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("dev", "h1")).await.unwrap();
    let process = |id: &str, token: &str| process(&a, id, token);
    s.start_process(process("prc_1", "p1")).await.unwrap();
    s.start_process(process("prc_2", "p2")).await.unwrap();
    s.set_process_pid("prc_1", 4242).await.unwrap();
    assert_eq!(s.request_kill(&a.id, "budget exhausted").await.unwrap(), 2);
    let running = s.list_processes(false).await.unwrap();
    assert_eq!(running.len(), 2);
    assert_eq!(running[0].pid, 4242);
    assert_eq!(running[0].kill_reason.as_deref(), Some("budget exhausted"));
    let ended = s
        .end_process(
            "prc_1",
            ProcessState::Killed,
            Some(137),
            "budget exhausted",
            now_ms(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state(), Some(ProcessState::Killed));
    assert_eq!(ended.exit_code, Some(137));
    assert!(ended.ended_at_ms.is_some());
    assert_eq!(
        s.end_process("prc_1", ProcessState::Exited, Some(0), "", now_ms())
            .await
            .unwrap(),
        None,
        "ends once"
    );
    assert!(matches!(
        s.end_process("prc_2", ProcessState::Running, None, "", now_ms())
            .await,
        Err(StoreError::Invalid(_))
    ));
    s.end_process(
        "prc_2",
        ProcessState::Lost,
        None,
        "supervisor disconnected",
        now_ms(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(s.list_processes(false).await.unwrap().is_empty());
    assert_eq!(s.list_processes(true).await.unwrap().len(), 2);
    let events = all_events(s.as_ref()).await;
    assert_eq!(
        kinds(&events),
        [
            "agent.created",
            "process.started",
            "process.started",
            "process.killed",
            "process.lost"
        ]
    );
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
}

pub async fn extending_names_the_reservations_already_closed(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    for n in 0..3 {
        s.reserve(reservation(&a, n, 10)).await.unwrap();
    }
    s.settle(settlement(&a, 1, 5)).await.unwrap();
    let later = now_ms() + 3_600_000;
    let ids: Vec<String> = ["rsv_0", "rsv_1", "rsv_2", "rsv_none"]
        .map(String::from)
        .to_vec();
    let closed = s.extend_reservations(&ids, later).await.unwrap();
    assert_eq!(closed, ["rsv_1", "rsv_none"]);
    let open = s.open_reservations().await.unwrap();
    assert_eq!(open.len(), 2);
    assert!(open.iter().all(|r| r.expires_at_ms == later));
}

pub async fn reports_add_up_from_the_counters(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "ha")).await.unwrap();
    let b = s.create_agent(new_agent("b", "hb")).await.unwrap();
    spend(s.as_ref(), &a, 1, 40).await;
    spend(s.as_ref(), &b, 2, 2).await;
    s.reserve(reservation(&a, 3, 10)).await.unwrap();
    for _ in 0..2 {
        s.record_denial(DenialRecord {
            agent_id: a.id.clone(),
            agent_name: a.name.clone(),
            reason: "rpm".into(),
            details: json!({}),
            count: 1,
            at_ms: now_ms(),
        })
        .await
        .unwrap();
    }
    // Unauthenticated denials, aggregated: one event standing for 5.
    s.record_denial(DenialRecord {
        agent_id: String::new(),
        agent_name: String::new(),
        reason: "auth".into(),
        details: json!({"count": 5}),
        count: 5,
        at_ms: now_ms(),
    })
    .await
    .unwrap();
    let t = s.status_totals().await.unwrap();
    assert_eq!(t.agents, 2);
    assert_eq!(t.total_budget_micro, 10_000_000);
    assert_eq!(t.total_spent_micro, 42);
    assert_eq!(t.total_reserved_micro, 10);
    assert_eq!(t.open_reservations, 1);
    assert_eq!(t.counters.get("admit"), Some(&3));
    assert_eq!(t.counters.get("settle"), Some(&2));
    assert_eq!(t.counters.get("deny:rpm"), Some(&2));
    assert_eq!(t.counters.get("deny:auth"), Some(&5));
    let activity = s.activity(0, 0).await.unwrap();
    let of_a = &activity[&a.id];
    assert_eq!(of_a.charged_in_window, 40);
    assert_eq!((of_a.admitted, of_a.denied), (2, 2));
    assert_eq!(of_a.admitted_last_minute, 2);
    assert_eq!(activity[&b.id].charged_in_window, 2);
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
}

/// Everything a store writes through the traits, audited: every check
/// passes (a backend that logs an event its rows do not say fails here).
pub async fn audit_passes_over_the_stores_own_writes(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "ha")).await.unwrap();
    s.create_agent(new_agent("gone", "hg")).await.unwrap();
    s.update_agent(
        "a",
        AgentPatch {
            budget_micro: Some(9_000_000),
            top_up_micro: Some(1),
            allowed_models: Some(vec!["m".into(), "n".into()]),
            vision: Some(true),
            scope: Some(Scope::ReadOnly),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for n in 0..20 {
        s.reserve(reservation(&a, n, 100)).await.unwrap();
    }
    for n in 0..15 {
        s.settle(Settlement {
            overrun_micro: if n == 3 { 9 } else { 0 },
            extra_events: if n == 3 { vec![overrun()] } else { vec![] },
            ..settlement(&a, n, (n as i64) * 7)
        })
        .await
        .unwrap();
    }
    s.delete_agent("gone").await.unwrap();
    s.set_state("a", AgentState::Paused).await.unwrap();
    s.set_state("a", AgentState::Active).await.unwrap();
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
    assert_eq!(
        audit.events_checked,
        all_events(s.as_ref()).await.len() as u64
    );
    assert_eq!(audit.overruns.len(), 1);
}

/// A request id's reservation answers its retries while open; once closed
/// it reserves nothing again, for the same or a new reservation id.
pub async fn a_retried_admission_of_a_closed_reservation_reserves_nothing(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    s.reserve(reservation(&a, 1, 100)).await.unwrap();
    let again = s.reserve(reservation(&a, 1, 100)).await.unwrap();
    assert!(matches!(again, ReserveOutcome::AlreadyAdmitted(r) if r.id == "rsv_1"));
    s.settle(settlement(&a, 1, 40)).await.unwrap();
    let mut retried = reservation(&a, 1, 100);
    retried.record.id = "rsv_other".into();
    let closed = s.reserve(retried).await.unwrap();
    assert!(matches!(closed, ReserveOutcome::AlreadyClosed(r) if r.id == "rsv_1"));
    let after = s.agent_by_name("a").await.unwrap().unwrap();
    assert_eq!((after.spent_micro, after.reserved_micro), (40, 0));
    assert!(s.open_reservations().await.unwrap().is_empty());
    let events = all_events(s.as_ref()).await;
    assert_eq!(kinds(&events), ["agent.created", "admit", "settle"]);
}

/// An agent no store has a row of, otherwise like `a`.
fn unknown_like(a: &AgentRecord) -> AgentRecord {
    AgentRecord {
        id: "agt_never".into(),
        name: "never".into(),
        ..a.clone()
    }
}

/// Every store answers a reservation for an agent no row has with
/// `AgentNotFound` (nothing logged), and one for a deleted agent as out of
/// budget, logged like any budget refusal.
pub async fn a_reservation_for_an_unknown_agent_is_not_found_and_a_deleted_one_refused(
    s: Arc<dyn Store>,
) {
    let a = s.create_agent(new_agent("gone", "hg")).await.unwrap();
    s.delete_agent("gone").await.unwrap();
    let before = all_events(s.as_ref()).await.len();
    let unknown = unknown_like(&a);
    let answer = s.reserve(reservation(&unknown, 1, 10)).await;
    assert!(
        matches!(&answer, Err(StoreError::AgentNotFound(name)) if name == "never"),
        "{answer:?}"
    );
    assert_eq!(all_events(s.as_ref()).await.len(), before, "nothing logged");
    let answer = s.reserve(reservation(&a, 2, 10)).await.unwrap();
    assert_eq!(
        answer,
        ReserveOutcome::InsufficientBudget {
            remaining_micro: a.budget_micro
        }
    );
    let events = all_events(s.as_ref()).await;
    assert_eq!(kinds(&events[before..]), ["deny"]);
    assert_eq!(events[before].body.reason, "budget");
    assert!(s.open_reservations().await.unwrap().is_empty());
}

/// The order every store refuses in: a request id already reserved is
/// answered as it stands, however the agent's limits moved since; then the
/// limit on open reservations, before the budget.
pub async fn a_reservation_is_refused_in_one_order(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    let limited = |n, amount| {
        let mut r = reservation(&a, n, amount);
        r.max_open = 1;
        r
    };
    s.reserve(limited(1, a.budget_micro - 5)).await.unwrap();
    // At its limit and 5 µ left: the retry of the open one is answered.
    let again = s.reserve(limited(1, a.budget_micro - 5)).await.unwrap();
    assert!(matches!(again, ReserveOutcome::AlreadyAdmitted(r) if r.id == "rsv_1"));
    // Too many open and too little budget: the limit is what is said, and
    // nothing is logged for it.
    let before = all_events(s.as_ref()).await.len();
    assert_eq!(
        s.reserve(limited(2, 100)).await.unwrap(),
        ReserveOutcome::TooManyOpen
    );
    assert_eq!(all_events(s.as_ref()).await.len(), before);
    // Without the limit, the budget refuses it.
    assert_eq!(
        s.reserve(reservation(&a, 3, 100)).await.unwrap(),
        ReserveOutcome::InsufficientBudget { remaining_micro: 5 }
    );
    assert_eq!(
        s.reserve(reservation(&a, 4, 5)).await.unwrap(),
        ReserveOutcome::Reserved { remaining_micro: 0 }
    );
    let events = all_events(s.as_ref()).await;
    assert_eq!(kinds(&events), ["agent.created", "admit", "deny", "admit"]);
    assert_one_chain(&events);
}

/// What a control plane that did not admit a reservation reads to settle or
/// expire it: only open ones, by id, and the due ones by their expiry.
pub async fn open_and_due_reservations_are_found_by_id_and_expiry(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    for n in 0..3 {
        s.reserve(reservation(&a, n, 10)).await.unwrap();
    }
    s.settle(settlement(&a, 1, 5)).await.unwrap();
    let open = s.open_reservation("rsv_0").await.unwrap().unwrap();
    assert_eq!((open.amount_micro, open.request_id.as_str()), (10, "req_0"));
    assert!(
        s.open_reservation("rsv_1").await.unwrap().is_none(),
        "closed"
    );
    assert!(s.open_reservation("rsv_x").await.unwrap().is_none());
    let expires = open.expires_at_ms;
    s.extend_reservations(&["rsv_2".to_string()], expires + 60_000)
        .await
        .unwrap();
    let due: Vec<String> = s
        .due_reservations(expires)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(due, ["rsv_0"]);
    assert!(s.due_reservations(expires - 1).await.unwrap().is_empty());
    assert_eq!(s.due_reservations(expires + 60_000).await.unwrap().len(), 2);
}

/// The limit on open reservations is checked in the reservation's own step:
/// many at once against a limit of 3 leave exactly 3 open; one closing
/// frees a slot.
pub async fn no_more_reservations_open_than_the_limit_under_concurrency(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..40 {
        let (s, a) = (s.clone(), a.clone());
        tasks.spawn(async move {
            let mut r = reservation(&a, n, 10);
            r.max_open = 3;
            s.reserve(r).await.unwrap()
        });
    }
    let mut reserved = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            ReserveOutcome::Reserved { .. } => reserved.push(()),
            ReserveOutcome::TooManyOpen => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(reserved.len(), 3);
    let open = s.open_reservations().await.unwrap();
    assert_eq!(open.len(), 3);
    let after = s.agent_by_name("a").await.unwrap().unwrap();
    assert_eq!(after.reserved_micro, 30);
    let first = open[0]
        .id
        .trim_start_matches("rsv_")
        .parse::<usize>()
        .unwrap();
    s.settle(settlement(&a, first, 1)).await.unwrap();
    let mut again = reservation(&a, 100, 10);
    again.max_open = 3;
    assert!(matches!(
        s.reserve(again).await.unwrap(),
        ReserveOutcome::Reserved { .. }
    ));
    let events = all_events(s.as_ref()).await;
    assert_eq!(events.iter().filter(|e| e.body.kind == "admit").count(), 4);
    assert_one_chain(&events);
}

/// A grant for `agent` of data plane `dp`: worst call 100 µ, paced high, a
/// deadline a minute away.
pub fn grant(agent: &AgentRecord, id: &str, dp: &str) -> NewGrant {
    let now = now_ms();
    NewGrant {
        id: id.into(),
        agent_id: agent.id.clone(),
        agent_name: agent.name.clone(),
        data_plane: dp.into(),
        created_at_ms: now,
        deadline_ms: now + 60_000,
        requests: Some(50),
        ask: aex_core::grant::GrantAsk {
            free_micro: 0,
            worst_call_micro: 100,
            spend_per_s_micro: 10_000,
            data_planes: 1,
            lifetime_ms: 5_000,
            rpm_headroom: None,
            calls_per_s: 10,
        },
        replaces: None,
    }
}

fn issued(outcome: GrantOutcome) -> GrantRecord {
    match outcome {
        GrantOutcome::Issued(g) => g,
        other => panic!("no grant: {other:?}"),
    }
}

/// A call admitted from a grant is an ordinary reservation whose amount
/// came out of the grant: `reserved` holds the grant once, not twice.
pub async fn a_grant_holds_budget_that_calls_then_take(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    let g = issued(s.issue_grant(grant(&a, "gnt_1", "dp1")).await.unwrap());
    // 10,000 µ/s × 1 s, within the share of 5 M less the edge.
    assert_eq!(g.budget_micro, 10_000);
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!(after.reserved_micro, 10_000);
    for n in 0..3 {
        let outcome = s
            .reserve(NewReservation {
                grant_id: Some("gnt_1".into()),
                ..reservation(&a, n, 100)
            })
            .await
            .unwrap();
        assert!(
            matches!(outcome, ReserveOutcome::Reserved { .. }),
            "{outcome:?}"
        );
    }
    // Retried: the same reservation, nothing carved twice.
    let again = s
        .reserve(NewReservation {
            grant_id: Some("gnt_1".into()),
            ..reservation(&a, 0, 100)
        })
        .await
        .unwrap();
    assert!(
        matches!(again, ReserveOutcome::AlreadyAdmitted(_)),
        "{again:?}"
    );
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!(after.reserved_micro, 10_000);
    let open = s.open_grants(Some(&a.id)).await.unwrap();
    assert_eq!(
        (open.len(), open[0].used_micro, open[0].requests_used),
        (1, 300, 3)
    );
    // More than is left in it, or another agent's grant: not covered.
    let big = s
        .reserve(NewReservation {
            grant_id: Some("gnt_1".into()),
            ..reservation(&a, 10, 9_701)
        })
        .await
        .unwrap();
    assert!(matches!(big, ReserveOutcome::GrantNotCovered(_)), "{big:?}");
    let b = s.create_agent(new_agent("b", "hb")).await.unwrap();
    let theirs = s
        .reserve(NewReservation {
            grant_id: Some("gnt_1".into()),
            ..reservation(&b, 11, 100)
        })
        .await
        .unwrap();
    assert!(
        matches!(theirs, ReserveOutcome::GrantNotCovered(_)),
        "{theirs:?}"
    );
    // Settled as any reservation.
    s.settle(settlement(&a, 0, 40)).await.unwrap();
    // Returned: the unused 9,700 µ leave `reserved`; the two open calls stay.
    let ended = s
        .end_grant("gnt_1", &a.id, GrantEnd::Returned, now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, GrantState::Returned);
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!((after.reserved_micro, after.spent_micro), (200, 40));
    let late = s
        .reserve(NewReservation {
            grant_id: Some("gnt_1".into()),
            ..reservation(&a, 12, 100)
        })
        .await
        .unwrap();
    assert!(
        matches!(late, ReserveOutcome::GrantNotCovered(_)),
        "{late:?}"
    );
    // Resent (a report whose answer was lost): refused again, logged once.
    let again = s
        .reserve(NewReservation {
            grant_id: Some("gnt_1".into()),
            ..reservation(&a, 12, 100)
        })
        .await
        .unwrap();
    assert!(matches!(again, ReserveOutcome::GrantNotCovered(_)));
    let events = all_events(s.as_ref()).await;
    let grant_admits = events
        .iter()
        .filter(|e| e.body.kind == "admit" && e.body.details_json.contains("gnt_1"))
        .count();
    assert_eq!(grant_admits, 3);
    assert_eq!(
        kinds(&events)
            .into_iter()
            .filter(|k| k.starts_with("grant."))
            .collect::<Vec<_>>(),
        ["grant.issued", "grant.returned"]
    );
    assert_only_refusals_named(s.as_ref(), &["rsv_10", "rsv_11", "rsv_12"]).await;
}

/// Every store answers a grant asked for an agent it does not know, or
/// one deleted, the same way: refused as invalid, nothing written (the
/// memory store once failed the first with an error).
pub async fn a_grant_for_an_unknown_or_deleted_agent_is_refused(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("gone", "hg")).await.unwrap();
    s.delete_agent("gone").await.unwrap();
    let before = all_events(s.as_ref()).await.len();
    let unknown = unknown_like(&a);
    for (agent, id) in [(&unknown, "g-unknown"), (&a, "g-deleted")] {
        let answer = s.issue_grant(grant(agent, id, "dp")).await;
        assert!(
            matches!(
                answer,
                Ok(GrantOutcome::Refused(aex_core::grant::NoGrant::Invalid))
            ),
            "{}: {answer:?}",
            agent.name
        );
    }
    assert!(s.open_grants(None).await.unwrap().is_empty());
    assert_eq!(all_events(s.as_ref()).await.len(), before, "nothing logged");
}

/// Audit fails on exactly the refused report items `reservations` (each
/// logged once, amount and request id kept), and on nothing else.
async fn assert_only_refusals_named(s: &dyn Store, reservations: &[&str]) {
    let refused: Vec<EventRecord> = all_events(s)
        .await
        .into_iter()
        .filter(|e| e.body.kind == "report.refused")
        .collect();
    let ids: Vec<&str> = refused
        .iter()
        .map(|e| e.body.reservation_id.as_str())
        .collect();
    assert_eq!(ids, reservations);
    assert!(refused.iter().all(|e| e.body.amount_micro > 0));
    let audit = audit_store(s, &KEY).await.unwrap();
    let failed: Vec<&Check> = audit.checks.iter().filter(|c| !c.passed).collect();
    assert_eq!(failed.len(), 1, "{:?}", audit.failures());
    assert_eq!(failed[0].name, "reported_calls_recorded");
    assert_eq!(failed[0].offenders.len(), reservations.len());
    for (offender, id) in failed[0].offenders.iter().zip(reservations) {
        assert!(offender.contains(id), "{offender}");
    }
}

/// Grants asked for at once by many data planes, with central
/// reservations racing them: together they never pass the budget, and the
/// edge is left for central decisions.
pub async fn grants_for_every_data_plane_never_take_the_last_micro(s: Arc<dyn Store>) {
    let mut n = new_agent("tight", "h");
    n.budget_micro = 5_000;
    let a = s.create_agent(n).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let (s, a) = (s.clone(), a.clone());
        tasks.spawn(async move {
            if i % 2 == 0 {
                let g = s
                    .issue_grant(grant(&a, &format!("gnt_{i}"), &format!("dp{}", i % 6)))
                    .await
                    .unwrap();
                matches!(g, GrantOutcome::Issued(_))
            } else {
                let r = s.reserve(reservation(&a, i, 100)).await.unwrap();
                matches!(r, ReserveOutcome::Reserved { .. })
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert!(after.reserved_micro <= 5_000, "{after:?}");
    let granted: i64 = s
        .open_grants(Some(&a.id))
        .await
        .unwrap()
        .iter()
        .map(|g| g.budget_micro)
        .sum();
    let reserved_by_calls: i64 = s
        .open_reservations()
        .await
        .unwrap()
        .iter()
        .map(|r| r.amount_micro)
        .sum();
    assert_eq!(after.reserved_micro, granted + reserved_by_calls);
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
}

/// A grant ends exactly once; an expiry under the charge policy charges the
/// unused part (the data plane may have admitted calls it never reported),
/// under the release policy it charges nothing.
pub async fn a_grant_ends_once_and_an_expiry_charges_what_is_unreported(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    issued(s.issue_grant(grant(&a, "gnt_c", "dp1")).await.unwrap());
    issued(s.issue_grant(grant(&a, "gnt_r", "dp2")).await.unwrap());
    s.reserve(NewReservation {
        grant_id: Some("gnt_c".into()),
        ..reservation(&a, 1, 100)
    })
    .await
    .unwrap();
    let mut ends = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (s, id) = (s.clone(), a.id.clone());
        ends.spawn(async move {
            s.end_grant("gnt_c", &id, GrantEnd::Expired { charge: true }, now_ms())
                .await
                .unwrap()
        });
    }
    let mut ended = 0;
    while let Some(done) = ends.join_next().await {
        ended += usize::from(done.unwrap().is_some());
    }
    assert_eq!(ended, 1);
    let charged = s
        .end_grant(
            "gnt_r",
            &a.id,
            GrantEnd::Expired { charge: false },
            now_ms(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (charged.state, charged.charged_micro),
        (GrantState::Expired, 0)
    );
    assert!(
        s.end_grant("gnt_r", &a.id, GrantEnd::Returned, now_ms())
            .await
            .unwrap()
            .is_none()
    );
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    // gnt_c: 10,000 µ less the 100 µ call, charged; the call stays reserved.
    assert_eq!((after.spent_micro, after.reserved_micro), (9_900, 100));
    assert!(s.open_grants(None).await.unwrap().is_empty());
    // Ending another agent's grant changes nothing.
    let b = s.create_agent(new_agent("b", "hb")).await.unwrap();
    issued(s.issue_grant(grant(&b, "gnt_b", "dp1")).await.unwrap());
    assert!(
        s.end_grant("gnt_b", &a.id, GrantEnd::Returned, now_ms())
            .await
            .unwrap()
            .is_none()
    );
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
    let events = all_events(s.as_ref()).await;
    let expired: Vec<_> = events
        .iter()
        .filter(|e| e.body.kind == "grant.expired")
        .map(|e| (e.body.reason.as_str(), e.body.amount_micro))
        .collect();
    assert_eq!(expired, [("charge", 9_900), ("release", 0)]);
}

/// A renewal returns the old grant and issues the new one in one step, and
/// audit's fold of both agrees with their rows.
pub async fn a_renewal_ends_the_old_grant_in_the_same_step(s: Arc<dyn Store>) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    issued(s.issue_grant(grant(&a, "gnt_1", "dp1")).await.unwrap());
    let renewed = issued(
        s.issue_grant(NewGrant {
            replaces: Some("gnt_1".into()),
            ..grant(&a, "gnt_2", "dp1")
        })
        .await
        .unwrap(),
    );
    assert_eq!(renewed.state, GrantState::Open);
    let open = s.open_grants(Some(&a.id)).await.unwrap();
    assert_eq!(
        open.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
        ["gnt_2"]
    );
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
    let grants = audit
        .checks
        .iter()
        .find(|c| c.name == "grants_match_log")
        .unwrap();
    assert!(grants.passed);
}

/// Calls a data plane served from a grant and could only report after the
/// grant expired (the control plane was down, or the report was late) are
/// recorded all the same: each takes its amount back from what the expiry
/// charged for exactly such calls, and is then settled as any call. The
/// money adds up at every step, and audit agrees.
pub async fn calls_reported_after_their_grant_expired_are_recorded_from_its_charge(
    s: Arc<dyn Store>,
) {
    let a = s.create_agent(new_agent("a", "h")).await.unwrap();
    issued(s.issue_grant(grant(&a, "gnt_1", "dp1")).await.unwrap());
    let from = |n, amount| NewReservation {
        grant_id: Some("gnt_1".into()),
        ..reservation(&a, n, amount)
    };
    s.reserve(from(0, 100)).await.unwrap();
    s.end_grant("gnt_1", &a.id, GrantEnd::Expired { charge: true }, now_ms())
        .await
        .unwrap()
        .unwrap();
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!((after.spent_micro, after.reserved_micro), (9_900, 100));

    // Two late calls at once, and one of them again (a resent report).
    let mut late = tokio::task::JoinSet::new();
    for (n, amount) in [(1, 300), (2, 200), (1, 300)] {
        let (s, r) = (s.clone(), from(n, amount));
        late.spawn(async move { s.reserve(r).await.unwrap() });
    }
    let mut reserved = 0;
    while let Some(outcome) = late.join_next().await {
        match outcome.unwrap() {
            ReserveOutcome::Reserved { .. } => reserved += 1,
            ReserveOutcome::AlreadyAdmitted(_) => {}
            other => panic!("a late call was not recorded: {other:?}"),
        }
    }
    assert_eq!(reserved, 2);
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (after.spent_micro, after.reserved_micro),
        (9_400, 600),
        "500 µ back from the expiry's charge, into the two open calls"
    );
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());

    // Settled as any call: charged what they cost.
    s.settle(settlement(&a, 1, 40)).await.unwrap();
    s.settle(settlement(&a, 2, 200)).await.unwrap();
    let after = s.agent_by_id(&a.id).await.unwrap().unwrap();
    assert_eq!((after.spent_micro, after.reserved_micro), (9_640, 100));

    // Never more than the grant held: 10,000 − 600 used.
    let big = s.reserve(from(3, 9_401)).await.unwrap();
    assert!(matches!(big, ReserveOutcome::GrantNotCovered(_)), "{big:?}");
    // A returned grant's calls were all reported before its return.
    issued(s.issue_grant(grant(&a, "gnt_2", "dp2")).await.unwrap());
    s.end_grant("gnt_2", &a.id, GrantEnd::Returned, now_ms())
        .await
        .unwrap()
        .unwrap();
    let after_return = s
        .reserve(NewReservation {
            grant_id: Some("gnt_2".into()),
            ..reservation(&a, 4, 100)
        })
        .await
        .unwrap();
    assert!(
        matches!(after_return, ReserveOutcome::GrantNotCovered(_)),
        "{after_return:?}"
    );

    let events = all_events(s.as_ref()).await;
    let late_admits: Vec<i64> = events
        .iter()
        .filter(|e| e.body.kind == "admit" && e.body.details_json.contains("\"late\":true"))
        .map(|e| e.body.amount_micro)
        .collect();
    assert_eq!(late_admits.len(), 2);
    let grant = s.open_grants(None).await.unwrap();
    assert!(grant.iter().all(|g| g.id != "gnt_1"));
    assert_only_refusals_named(s.as_ref(), &["rsv_3", "rsv_4"]).await;
}

/// Data-plane credentials: one live per name, revoked once, each change an
/// event of the ledger itself committing to the secret; audit passes.
pub async fn credentials_are_issued_once_per_name_and_revoked_once(s: Arc<dyn Store>) {
    let issue = |name: &str, secret: &str| {
        aex_core::credential::issue(
            aex_core::secrets::new_id("dpc"),
            name.into(),
            &["b".into(), "a".into()],
            aex_core::secrets::token_sha256(secret),
            "aexsc_12".into(),
            now_ms(),
            &KEY,
        )
        .unwrap()
    };
    let first = s.insert_credential(issue("pod-a", "s1")).await.unwrap();
    assert_eq!(first.agents, ["a", "b"]);
    let again = s.insert_credential(issue("pod-a", "s2")).await;
    assert!(
        matches!(&again, Err(StoreError::Conflict(m)) if m.contains("revoke it first")),
        "{again:?}"
    );
    s.insert_credential(issue("pod-b", "s3")).await.unwrap();
    let live = s.list_credentials(false).await.unwrap();
    assert_eq!(
        live.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["pod-a", "pod-b"]
    );
    assert_eq!(live[0], first, "stored as issued");

    let revoked = s
        .revoke_credential("pod-a", now_ms())
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.is_revoked());
    assert!(
        s.revoke_credential("pod-a", now_ms())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.revoke_credential("nobody", now_ms())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.list_credentials(false).await.unwrap().len(), 1);
    assert_eq!(s.list_credentials(true).await.unwrap().len(), 2);
    // The name is free again once revoked.
    s.insert_credential(issue("pod-a", "s4")).await.unwrap();

    let events = all_events(s.as_ref()).await;
    assert_eq!(
        kinds(&events),
        [
            "credential.issued",
            "credential.issued",
            "credential.revoked",
            "credential.issued"
        ]
    );
    assert!(events.iter().all(|e| e.body.agent_id.is_empty()));
    let details: serde_json::Value = serde_json::from_str(&events[0].body.details_json).unwrap();
    assert_eq!(
        details["secret_mac"],
        json!(aex_core::chain::token_mac(
            &KEY,
            &aex_core::secrets::token_sha256("s1")
        ))
    );
    let audit = audit_store(s.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
}
