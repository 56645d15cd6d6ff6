//! The PostgreSQL backend: the conformance suite, each case on a database
//! of its own (`aex_tests::postgres`), skipped loudly without a server.

use super::PgStore;
use crate::storage::conformance::KEY;
use aex_tests::postgres::TestDatabase;

async fn store() -> Option<(TestDatabase, PgStore)> {
    let db = TestDatabase::fresh().await?;
    let store = PgStore::open(db.options(), KEY.to_vec(), None)
        .await
        .unwrap();
    Some((db, store))
}

crate::store_conformance!(store);

/// Two writers (two control planes) on one database, many agents, the
/// operations of each batch in no particular agent order, and heartbeats
/// that touch many agents' reservations at once: nothing fails, the money
/// is exact, the chain is one, and PostgreSQL never had to break a
/// deadlock (each batch locks its agents up front, in one order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_on_many_agents_never_deadlock() {
    use crate::storage::conformance::{new_agent, reservation, settlement};
    use crate::storage::{ReserveOutcome, SettleOutcome, Store};
    use std::sync::Arc;
    let Some(db) = TestDatabase::fresh().await else {
        return;
    };
    let open = || PgStore::open(db.options(), KEY.to_vec(), None);
    let stores: [Arc<dyn Store>; 2] = [
        Arc::new(open().await.unwrap()),
        Arc::new(open().await.unwrap()),
    ];
    let mut agents = Vec::new();
    for i in 0..16 {
        agents.push(
            stores[0]
                .create_agent(new_agent(&format!("a{i}"), &format!("h{i}")))
                .await
                .unwrap(),
        );
    }
    const CALLS: usize = 1600;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..CALLS {
        // Agents visited in a different order by each writer's batches.
        let agent = agents[(n * 7 + n / 16) % agents.len()].clone();
        let (s, other) = (stores[n % 2].clone(), stores[(n + 1) % 2].clone());
        tasks.spawn(async move {
            let reserved = s.reserve(reservation(&agent, n, 100)).await.unwrap();
            assert!(matches!(reserved, ReserveOutcome::Reserved { .. }));
            // A heartbeat naming reservations of several agents, on the
            // other writer.
            let ids: Vec<String> = (n.saturating_sub(40)..=n)
                .rev()
                .map(|m| format!("rsv_{m}"))
                .collect();
            other
                .extend_reservations(&ids, crate::storage::now_ms() + 60_000)
                .await
                .unwrap();
            let settled = other.settle(settlement(&agent, n, 3)).await.unwrap();
            assert!(matches!(settled, SettleOutcome::Settled { .. }));
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let mut spent = 0;
    for a in &agents {
        let row = stores[1].agent_by_id(&a.id).await.unwrap().unwrap();
        assert_eq!(row.reserved_micro, 0);
        spent += row.spent_micro;
    }
    assert_eq!(spent, 3 * CALLS as i64);
    let audit = crate::ledger::run::audit_store(stores[0].as_ref(), &KEY)
        .await
        .unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
    // The server's own count; its statistics are flushed within a second.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let pool = sqlx::PgPool::connect_with(db.options()).await.unwrap();
    let deadlocks: i64 = sqlx::query_scalar(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!(deadlocks, 0, "deadlocks PostgreSQL detected and broke");
}

/// The shared token bucket decides exactly as the in-memory one: the same
/// takes and corrections, at the same times, give the same answers, waits
/// and levels (seed printed; `AEX_BUCKET_SEED` replays a run).
#[tokio::test]
async fn the_shared_token_bucket_decides_as_the_in_memory_one() {
    use crate::admission::limiter::TokenBucket;
    let Some((db, store)) = store().await else {
        return;
    };
    let seed = aex_tests::rng::seed_from_env("AEX_BUCKET_SEED");
    println!("token bucket: seed {seed} (replay with AEX_BUCKET_SEED={seed})");
    let mut rng = aex_tests::rng::Rng(seed);
    let rates = crate::storage::LedgerStore::shared_rates(&store).expect("shared on PostgreSQL");
    let per_minute = 1_000;
    let mut memory = TokenBucket::default();
    let mut now = 1_700_000_000_000i64;
    let pool = sqlx::PgPool::connect_with(db.options()).await.unwrap();
    for step in 0..400 {
        now += rng.below(400) as i64;
        if step == 0 || rng.chance(70) {
            let tokens = rng.below(600);
            let shared = rates
                .take_tokens("k", per_minute, tokens, now)
                .await
                .unwrap();
            assert_eq!(
                shared,
                memory.take(per_minute, tokens, now),
                "step {step}: take {tokens} at {now} (seed {seed})"
            );
        } else {
            let delta = rng.below(400) as i64 - 200;
            rates
                .adjust_tokens("k", per_minute, delta, now)
                .await
                .unwrap();
            memory.adjust(per_minute, delta, now);
        }
        let level: i64 =
            sqlx::query_scalar("SELECT level_milli FROM token_buckets WHERE key = 'k'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(level, memory.level_milli(), "step {step} (seed {seed})");
    }
    pool.close().await;
}
