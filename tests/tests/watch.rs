//! The watch stream at fleet size (issue #31, finding 6): one snapshot
//! message over 4 MiB (23,001 agents) failed to decode in every newly
//! started data plane, which then answered 502 "still loading" with
//! nothing logged by either daemon. Real processes; the ledger is seeded
//! through the store, as `aexctl agent create` 30,000 times would take
//! minutes.

use aex_control::storage::sqlite::SqliteStore;
use aex_control::storage::{NewAgent, Store};
use aex_core::home::Home;
use aex_tests::{DataPlane, Stack};
use std::sync::Arc;
use std::time::{Duration, Instant};

const AGENTS: usize = 30_000;

fn seeded(i: usize) -> NewAgent {
    // A fleet's names and allow-lists: about 230 bytes of policy each, so
    // one message would hold about 7 MB. Never a real token's hash: these
    // agents only make the snapshot big.
    NewAgent {
        token_prefix: "aex_seed".into(),
        rpm: 60,
        allowed_models: vec![
            "mock-model".into(),
            "cached-model".into(),
            "dead-model".into(),
            "sim".into(),
        ],
        ..NewAgent::new(
            &format!("fleet-team-{:03}-agent-{i:05}", i % 100),
            &format!("{i:064x}"),
            1_000_000,
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_started_against_thirty_thousand_agents_serves() {
    let mut stack = Stack::start().await;
    let token = stack.agent("real", "1", "6000", &[]);
    let home = Home::new(stack.home.path());
    let started = Instant::now();
    {
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&home.db_path(), home.read_ledger_key().unwrap())
                .await
                .unwrap(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..16 {
            let store = store.clone();
            tasks.spawn(async move {
                for i in (worker..AGENTS).step_by(16) {
                    store.create_agent(seeded(i)).await.unwrap();
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    }
    println!("seeded {AGENTS} agents in {:?}", started.elapsed());
    // The control plane loads them at start; the data plane already running
    // reconnects to the new process and gets them all.
    stack.control.restart();
    let fresh = DataPlane::start(&stack.home, &stack.control.url(), &[]);
    let body =
        serde_json::json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]});
    for plane in [&stack.data, &fresh] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = reqwest::Client::new()
                .post(plane.url("/v1/chat/completions"))
                .bearer_auth(&token)
                .json(&body)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a data plane fed {AGENTS} agents still answers {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Loaded, not loading: a token nobody holds is a 401, not a 502.
    let r = reqwest::Client::new()
        .post(fresh.url("/v1/chat/completions"))
        .bearer_auth("aex_not-a-token")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}
