//! Grants (docs/GRANTS.md), one list of scenarios run on both ledgers: on
//! SQLite one control plane and three data planes, on PostgreSQL two
//! control planes with data planes on the first, the second and both
//! (`aex_tests::cluster`). Real processes; the PostgreSQL runs are reported
//! skipped without `AEX_TEST_DATABASE_URL`. What only one ledger has (a
//! control plane restarted on its SQLite file, both replicas down, the
//! 30-second load on PostgreSQL) stays in `dataplane/tests/grants.rs` and
//! `grants_on_postgres.rs`.

use aex_tests::cluster::{Cluster, Ledger, Place};
use aex_tests::load::{
    CostlyCall, count, local_admissions, plane_metric, run_calls_on, run_until_dead,
    until_every_plane_holds_a_grant, until_refused_everywhere,
};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Each scenario once per ledger: `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_ledgers {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(aex_tests::cluster::Ledger::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(aex_tests::cluster::Ledger::Postgres).await;
                }
            )*
        }
    };
}

on_both_ledgers!(
    budgets_and_limits_stay_exact_on_every_data_plane,
    a_pause_reaches_every_data_plane_holding_grants_within_a_second,
    a_data_plane_killed_mid_load_costs_at_most_its_grants,
);

/// Held by the scenarios whose claims depend on timing (limits per
/// minute), so that the two ledgers' runs never overlap: under load grants
/// still held request credits when a run ended (971 of 1,000 admitted in
/// one CI run).
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn kinds(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["kind"] == kind).count()
}

fn amount(e: &Value) -> i64 {
    e["amount_micro"].as_i64().expect("an amount")
}

/// Budgets and requests per minute hold as exactly as when every call is
/// a round trip, with grants on every data plane: every success is one
/// admit, every refusal one denial, and every grant comes back.
async fn budgets_and_limits_stay_exact_on_every_data_plane(ledger: Ledger) {
    let _alone = MACHINE.lock().await;
    let Some(c) = Cluster::for_grants(ledger).start().await else {
        return;
    };
    let planes = c.planes();
    let control = c.control();
    let call = CostlyCall::new();

    // A budget for exactly 50 worst-case calls, 300 requests.
    let token = control.agent("fifty", &call.budget_for(50), "100000", &[]);
    let statuses = run_calls_on(&planes, &token, &call, 300, 24).await;
    let local = local_admissions(&planes).await;
    println!(
        "budget 50: {} admitted, {local} from grants",
        count(&statuses, 200)
    );
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 402)),
        (50, 250),
        "{statuses:?}"
    );
    let agent = c.settled("fifty", Duration::from_secs(15)).await;
    assert_eq!(agent["spent_micro"], 50 * call.cost_micro, "{agent}");

    // 60 requests per minute, 120 at once.
    let token = control.agent("sixty", &call.budget_for(10_000), "60", &[]);
    let started = Instant::now();
    let statuses = run_calls_on(&planes, &token, &call, 120, 120).await;
    let elapsed = started.elapsed();
    let sixty_ok = count(&statuses, 200);
    println!("rpm 60: {sixty_ok} admitted in {elapsed:?}");
    assert_eq!(sixty_ok + count(&statuses, 429), 120, "{statuses:?}");
    // The GCRA refills one request a second: exactly 60, plus one per
    // second the burst took.
    assert!(
        sixty_ok >= 60 && sixty_ok <= 60 + elapsed.as_secs() as usize,
        "{sixty_ok} admitted in {elapsed:?}"
    );

    // A budget for 300, 900 requests: enough per data plane for grants.
    let token = control.agent("three-hundred", &call.budget_for(300), "100000", &[]);
    let before = local_admissions(&planes).await;
    let statuses = run_calls_on(&planes, &token, &call, 900, 12).await;
    let local = local_admissions(&planes).await - before;
    println!(
        "budget 300: {} admitted, {local} from grants",
        count(&statuses, 200)
    );
    assert_eq!(
        (count(&statuses, 200), count(&statuses, 402)),
        (300, 600),
        "{statuses:?}"
    );
    assert!(local > 0.0, "no grant was used");
    let agent = c.settled("three-hundred", Duration::from_secs(15)).await;
    assert_eq!(agent["spent_micro"], 300 * call.cost_micro, "{agent}");
    let ev = c.events("three-hundred");
    assert_eq!(kinds(&ev, "admit"), 300, "one admit per success");
    assert_eq!(kinds(&ev, "grant.expired"), 0, "every grant came back");

    // 1,000 requests per minute, 1,500 requests: the grants take request
    // credits; none is admitted past the limit, and none refused while a
    // grant held credits (it is recalled first).
    let token = control.agent("thousand", &call.budget_for(100_000), "1000", &[]);
    let before = local_admissions(&planes).await;
    let started = Instant::now();
    let statuses = run_calls_on(&planes, &token, &call, 1_500, 12).await;
    let elapsed = started.elapsed();
    let ok = count(&statuses, 200);
    let local = local_admissions(&planes).await - before;
    println!("rpm 1000: {ok} admitted in {elapsed:?}, {local} from grants");
    assert_eq!(ok + count(&statuses, 429), 1_500, "{statuses:?}");
    assert!(local > 0.0, "no grant was used");
    // 1,000 at once, then one more every 60 ms.
    let refilled = (elapsed.as_millis() as usize).div_ceil(60);
    assert!(
        ok >= 1_000 && ok <= 1_000 + refilled,
        "{ok} admitted in {elapsed:?}"
    );
    for name in ["fifty", "three-hundred", "sixty", "thousand"] {
        c.settled(name, Duration::from_secs(15)).await;
    }
    for (name, calls, ok) in [("sixty", 120, sixty_ok), ("thousand", 1_500, ok)] {
        let ev = c.events(name);
        let limited = ev
            .iter()
            .filter(|e| e["kind"] == "deny" && e["reason"] == "rpm")
            .count();
        // Every success the clients saw is in the ledger: none was served
        // from a grant without its admit recorded.
        assert_eq!(kinds(&ev, "admit"), ok, "{name}: one admit per success");
        assert_eq!(
            kinds(&ev, "admit") + limited,
            calls,
            "{name}: one event per decision"
        );
    }
    c.audit_passes();
}

/// A pause through the last control plane reaches every data plane (on
/// PostgreSQL, those of the other control plane through the database's
/// change feed): they stop admitting from their grants within a second,
/// and the ledger holds exactly the calls the clients saw succeed.
async fn a_pause_reaches_every_data_plane_holding_grants_within_a_second(ledger: Ledger) {
    let Some(c) = Cluster::for_grants(ledger).start().await else {
        return;
    };
    let planes = c.planes();
    let call = CostlyCall::new();
    let token = c
        .control()
        .agent("fleet", &call.budget_for(100_000), "100000", &[]);
    let warm_up = match ledger {
        Ledger::Sqlite => Duration::from_secs(15),
        Ledger::Postgres => Duration::from_secs(20),
    };
    // Every success the clients see, before and after the pause.
    let mut ok = until_every_plane_holds_a_grant(&planes, &token, &call, warm_up).await;
    c.other_control()
        .aexctl(&["agent", "pause", "fleet"])
        .assert_ok();
    let paused_at = Instant::now();
    ok += until_refused_everywhere(
        &planes,
        &token,
        &call,
        403,
        paused_at,
        Duration::from_secs(1),
    )
    .await;
    // Nothing more is admitted from the grants anywhere.
    let statuses = run_calls_on(&planes, &token, &call, 30, 6).await;
    assert_eq!(count(&statuses, 403), 30, "{statuses:?}");
    // Once every report is in, the ledger holds exactly the calls the
    // clients saw succeed: none admitted and not served, none served and
    // not recorded.
    let reported = match ledger {
        Ledger::Sqlite => Duration::from_secs(3),
        Ledger::Postgres => Duration::from_secs(5),
    };
    c.settled("fleet", reported).await;
    let ev = c.events("fleet");
    assert_eq!(kinds(&ev, "admit"), ok, "one admit per success");
    assert_eq!(kinds(&ev, "grant.expired"), 0, "every grant came back");
    c.audit_passes();
}

/// kill -9 of a data plane holding a grant, mid-load (on PostgreSQL, one
/// on the second control plane only): the others carry on, and its grants
/// expire at their deadline, charged at most what they held.
async fn a_data_plane_killed_mid_load_costs_at_most_its_grants(ledger: Ledger) {
    // Reservations the victim reported and never settled expire within
    // the test (on PostgreSQL with a TTL's grace on a replica that did not
    // admit them).
    let (ttl, within) = match ledger {
        Ledger::Sqlite => ("2000", Duration::from_secs(10)),
        Ledger::Postgres => ("3000", Duration::from_secs(20)),
    };
    let Some(c) = Cluster::for_grants(ledger)
        .control_args(&["--reservation-ttl-ms", ttl])
        .start()
        .await
    else {
        return;
    };
    let mut victim = c.start_plane(Place::Last, &["--id", "victim"]);
    let call = CostlyCall::new();
    let token = c
        .control()
        .agent("mid-load", &call.budget_for(100_000), "100000", &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while plane_metric(
        &victim,
        "aex_dataplane_grants_total",
        &[("event", "installed")],
    )
    .await
        == 0.0
    {
        assert!(Instant::now() < deadline, "the victim never got a grant");
        run_calls_on(&[&victim], &token, &call, 30, 3).await;
    }
    let survivors = [&c.planes[0], &c.planes[2]];
    let (on_survivors, on_victim, ()) = tokio::join!(
        run_calls_on(&survivors, &token, &call, 400, 6),
        run_until_dead(victim.url("/v1/chat/completions"), &token, &call, 10_000),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            victim.kill();
        },
    );
    assert_eq!(
        count(&on_survivors, 200),
        400,
        "the others stopped: {on_survivors:?}"
    );
    assert!(on_victim.contains(&0), "the victim was not killed mid-load");
    println!("victim: {} served before it died", count(&on_victim, 200));
    // Its grants expire at their deadline (5 s) and a sweep later.
    let agent = c.settled("mid-load", within).await;
    let ev = c.events("mid-load");
    let closed: i64 = ev
        .iter()
        .filter(|e| e["kind"] == "settle" || e["kind"] == "expire")
        .map(amount)
        .sum();
    let expired: Vec<&Value> = ev.iter().filter(|e| e["kind"] == "grant.expired").collect();
    assert!(!expired.is_empty(), "the victim's grant did not expire");
    for e in &expired {
        assert_eq!(e["details"]["data_plane"], "victim", "{e}");
    }
    let charged: i64 = expired.iter().map(|e| amount(e)).sum();
    let victims_grants: i64 = ev
        .iter()
        .filter(|e| e["kind"] == "grant.issued" && e["details"]["data_plane"] == "victim")
        .map(amount)
        .sum();
    assert!(
        charged <= victims_grants,
        "charged {charged} beyond its grants {victims_grants}"
    );
    // Issue #31, finding 8: a grant holds about a second of the agent's
    // spend (`aex_core::grant::PACED_SPEND_MS`), so the expiry charges at
    // most about that. The victim served at about its pace for 300 ms.
    println!(
        "expiry charged {charged} µ = {} calls; the victim served {} in its last 300 ms",
        charged / call.cost_micro,
        count(&on_victim, 200)
    );
    assert_eq!(agent["spent_micro"].as_i64().unwrap(), closed + charged);
    // Every success on a live data plane was reported and charged.
    let completed = ev
        .iter()
        .filter(|e| e["kind"] == "settle" && e["reason"] == "completed")
        .count();
    assert!(
        completed >= count(&on_survivors, 200),
        "{completed} settlements"
    );
    c.audit_passes();
}
