//! The PostgreSQL backend: the conformance suite, each case on a database
//! of its own (`aex_tests::postgres`), skipped loudly without a server.

use super::PgStore;
use crate::storage::testing::conformance::KEY;
use aex_tests::postgres::TestDatabase;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    use crate::storage::testing::conformance::{new_agent, reservation, settlement};
    use crate::storage::{ReserveOutcome, SettleOutcome, Store};
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
                .extend_reservations(&ids, crate::clock::now_ms() + 60_000)
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
    let audit = crate::audit::audit_store(stores[0].as_ref(), &KEY)
        .await
        .unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
    assert_eq!(
        db.deadlocks().await,
        0,
        "deadlocks PostgreSQL detected and broke"
    );
}

/// The shared token bucket decides exactly as the in-memory one: the same
/// takes and corrections, at the same times, give the same answers, waits
/// and levels (seed printed; `AEX_BUCKET_SEED` replays a run).
#[tokio::test]
async fn the_shared_token_bucket_decides_as_the_in_memory_one() {
    use aex_core::limiter::TokenBucket;
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
    // Where the arithmetic would overflow int8 (a huge limit after a long
    // idle time, an absurd usage report), both saturate alike, no error.
    let (huge, mut memory, mut now) = (4_000_000_000_000u64, TokenBucket::default(), 0i64);
    for (tokens, gap) in [(1, 0), (1, 10_000_000_000), (3, 1)] {
        now += gap;
        let shared = rates.take_tokens("huge", huge, tokens, now).await.unwrap();
        assert_eq!(shared, memory.take(huge, tokens, now));
    }
    rates
        .adjust_tokens("huge", huge, i64::MAX, now)
        .await
        .unwrap();
    rates
        .adjust_tokens("huge", huge, i64::MIN, now + 1)
        .await
        .unwrap();
    pool.close().await;
}

/// A TCP proxy to the test server that, once armed, on every `every`-th
/// COMMIT a client sends, forwards it and then cuts the connection without
/// relaying the answer: the transaction commits, its client never hears so.
/// Returns its port, the cuts made, and the switch that arms it.
async fn commit_cutting_proxy(
    every: usize,
) -> (u16, Arc<AtomicUsize>, Arc<std::sync::atomic::AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let commits = Arc::new(AtomicUsize::new(0));
    let cuts = Arc::new(AtomicUsize::new(0));
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let o = aex_tests::postgres::TestDatabase::server_options();
        format!("{}:{}", o.get_host(), o.get_port())
    };
    let (commits2, cuts2, armed2) = (commits.clone(), cuts.clone(), armed.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&server).await else {
                continue;
            };
            let (commits, cuts, armed) = (commits2.clone(), cuts2.clone(), armed2.clone());
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut up_read, mut up_write) = upstream.into_split();
                let cut = Arc::new(tokio::sync::Notify::new());
                let answers = {
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            tokio::select! {
                                _ = cut.notified() => return,
                                n = up_read.read(&mut buf) => match n {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => if client_write.write_all(&buf[..n]).await.is_err() { return },
                                },
                            }
                        }
                    })
                };
                // The simple-query COMMIT: 'Q', length 11, "COMMIT\0".
                const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let commit = armed.load(Ordering::SeqCst)
                        && buf[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
                    let cut_here =
                        commit && (commits.fetch_add(1, Ordering::SeqCst) + 1) % every == 0;
                    if cut_here {
                        // No answer reaches the client from here on.
                        cut.notify_one();
                        answers.abort();
                    }
                    if up_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if cut_here {
                        // Let the server commit, then close.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        cuts.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
                answers.abort();
            });
        }
    });
    (port, cuts, armed)
}

/// The network loses the answer to every third COMMIT of the writer (a
/// proxy forwards it, then cuts the connection): the transaction committed,
/// so its operations must be answered as done. Every reservation answered
/// reserved is in the database and every one in the database was answered
/// reserved; without looking the outcome up, those batches were answered
/// unavailable while their reservations stayed, to be charged at expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_answered_as_it_happened() {
    use crate::storage::testing::conformance::{new_agent, reservation};
    use crate::storage::{ReserveOutcome, Store};
    let Some(db) = TestDatabase::fresh().await else {
        return;
    };
    let (port, cuts, armed) = commit_cutting_proxy(3).await;
    let store: Arc<dyn Store> = Arc::new(
        // In the clear, so that the proxy sees the COMMIT.
        PgStore::open(
            db.options()
                .port(port)
                .ssl_mode(sqlx::postgres::PgSslMode::Disable),
            KEY.to_vec(),
            None,
        )
        .await
        .unwrap(),
    );
    let agent = store.create_agent(new_agent("cut", "hc")).await.unwrap();
    armed.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    // One after another, so that each batch is one reservation.
    for n in 0..30 {
        let answered = store.reserve(reservation(&agent, n, 10)).await;
        answers.push((n, matches!(answered, Ok(ReserveOutcome::Reserved { .. }))));
    }
    let pool = sqlx::PgPool::connect_with(db.options()).await.unwrap();
    let stored: std::collections::HashSet<String> =
        sqlx::query_scalar("SELECT request_id FROM reservations")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let cuts = cuts.load(Ordering::SeqCst);
    assert!(cuts >= 5, "the proxy cut {cuts} COMMITs");
    for (n, reserved) in &answers {
        assert_eq!(
            *reserved,
            stored.contains(&format!("req_{n}")),
            "reservation {n}: answered reserved = {reserved} ({cuts} COMMIT answers lost)"
        );
    }
    assert_eq!(
        stored.len(),
        30,
        "each lost answer was a committed reservation"
    );
    let reserved: i64 = sqlx::query_scalar("SELECT reserved_micro FROM agents WHERE name = 'cut'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(reserved, 10 * 30);
    pool.close().await;
}
