//! The admission state machine (reserve → settle, release or expire) driven
//! by random interleavings against the in-memory store: concurrent admits
//! and their retries, settlements (some retried, some from a provider that
//! reports more than was reserved), expiry sweeps racing them, heartbeats,
//! top-ups, pauses, and crashes of the control plane with calls in flight.
//! After every step: no agent has spent more than its budget, `reserved` is
//! the sum of its open reservations, every reservation closed exactly once
//! at a charge within it, and the control plane's memory agrees with the
//! store. At the end, every reservation expires and audit passes.
//!
//! The seed is printed; `AEX_ADMISSION_SEED=<seed>` replays a run (the
//! operations replay exactly; their interleaving is the runtime's).

use crate::admission::engine::{AdmissionEngine, Decision, ExpiryPolicy, Outcome, SettleInput};
use crate::admission::policy::{Ask, Endpoint};
use crate::audit::audit_store;
use crate::clock::now_ms;
use crate::storage::testing::conformance::new_agent;
use crate::storage::testing::memory::MemoryStore;
use crate::storage::{
    AgentPatch, AgentState, AgentStore, EventFilter, EventKind, LedgerStore, NewAgent, ReportStore,
    Store,
};
use aex_core::config::{DEFAULT_MODELS_YAML, ModelsConfig};
use aex_core::credential::Served;
use aex_core::money::TokenUsage;
use aex_tests::rng::{Rng, seed_from_env};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use tokio::task::JoinSet;

const KEY: [u8; 32] = [9; 32];
const TTL_MS: i64 = 1_000;
const MODEL: &str = "llama3-local";

struct TestAgent {
    name: String,
    token_sha256: String,
}

/// A reservation a data plane was told about and has not settled yet.
#[derive(Clone)]
struct Held {
    reservation_id: String,
    request_id: String,
    input_tokens_bound: u64,
    output_tokens_cap: u64,
}

/// What callers were told, to hold the ledger to.
#[derive(Default)]
struct Told {
    /// Reservation id → the charge a settle call was answered with (a
    /// settle that found it closed is answered `already_settled`).
    settled: HashMap<String, i64>,
    /// Reservation id → its amount, for every admission answered.
    admitted: HashMap<String, i64>,
}

struct World {
    rng: Rng,
    store: Arc<MemoryStore>,
    core: Arc<AdmissionEngine>,
    models: Arc<ModelsConfig>,
    agents: Vec<TestAgent>,
    held: Vec<Held>,
    told: Told,
    expiry: ExpiryPolicy,
    next_request: u64,
    crashes: u32,
    /// Reservations closed when the current step began.
    closed_before_step: std::collections::HashSet<String>,
}

/// The default models, the one these runs call given cache prices on
/// both sides of its input price, so cache parts of a usage move charges.
fn models() -> Arc<ModelsConfig> {
    let priced = "      input_micro: 1\n      output_micro: 2\n";
    assert!(DEFAULT_MODELS_YAML.contains(priced));
    let yaml = DEFAULT_MODELS_YAML.replacen(
        priced,
        "      input_micro: 1\n      cached_input_micro: 0.1\n      cache_write_micro: 1.25\n      output_micro: 2\n",
        1,
    );
    Arc::new(ModelsConfig::parse(&yaml, Path::new("models.yaml")).unwrap())
}

fn ask(input_tokens_bound: u64, max_tokens: Option<u64>, stream: bool) -> Ask<'static> {
    Ask {
        endpoint: Endpoint::ChatCompletions,
        model: MODEL,
        stream,
        uses_tools: false,
        uses_function_calling: false,
        uses_vision: false,
        input_tokens_bound,
        requested_output_tokens: max_tokens,
        output_multiplier: 1,
        unbounded_input: None,
    }
}

/// One operation of a step; the operations of a step run concurrently.
enum Op {
    Admit {
        agent: usize,
        request_id: String,
        input_tokens_bound: u64,
        max_tokens: Option<u64>,
    },
    Settle {
        held: Held,
        input: SettleInput,
    },
    Expire {
        ahead_ms: i64,
    },
    Heartbeat {
        ids: Vec<String>,
    },
    TopUp {
        agent: usize,
        micro: i64,
    },
    SetState {
        agent: usize,
        state: AgentState,
    },
}

/// What a finished operation tells the world.
enum Done {
    Admitted {
        held: Held,
        amount_micro: i64,
    },
    Denied,
    Settled {
        reservation_id: String,
        charged_micro: i64,
        already_settled: bool,
    },
    Other,
}

impl World {
    async fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let store = Arc::new(MemoryStore::new(KEY.to_vec()));
        let mut agents = Vec::new();
        for i in 0..3 {
            let token_sha256 = format!("{:064x}", i + 1);
            let record = store
                .create_agent(NewAgent {
                    budget_micro: 5_000 + rng.below(60_000) as i64,
                    rpm: 0,
                    // One agent with a concurrency limit, whose slots must
                    // come back however its calls end.
                    max_concurrent: if i == 2 { 3 } else { 0 },
                    allowed_models: vec![],
                    ..new_agent(&format!("agent-{i}"), &token_sha256)
                })
                .await
                .unwrap();
            agents.push(TestAgent {
                name: record.name,
                token_sha256,
            });
        }
        let core = Arc::new(
            AdmissionEngine::load(store.clone() as Arc<dyn Store>, TTL_MS)
                .await
                .unwrap(),
        );
        let expiry = if rng.chance(50) {
            ExpiryPolicy::Charge
        } else {
            ExpiryPolicy::Release
        };
        Self {
            rng,
            store,
            core,
            models: models(),
            agents,
            held: Vec::new(),
            told: Told::default(),
            expiry,
            next_request: 0,
            crashes: 0,
            closed_before_step: Default::default(),
        }
    }

    fn random_op(&mut self) -> Op {
        let r = &mut self.rng;
        match r.below(100) {
            0..=39 => {
                let agent = r.below(self.agents.len() as u64) as usize;
                // Sometimes a client's retry of a request it sent before.
                let request_id = if self.next_request > 0 && r.chance(15) {
                    format!("req-{}", r.below(self.next_request))
                } else {
                    self.next_request += 1;
                    format!("req-{}", self.next_request - 1)
                };
                Op::Admit {
                    agent,
                    request_id,
                    input_tokens_bound: 1 + r.below(3_000),
                    max_tokens: (!r.chance(20)).then(|| 1 + r.below(2_000)),
                }
            }
            40..=74 if !self.held.is_empty() => {
                let i = r.below(self.held.len() as u64) as usize;
                // A retried settlement keeps the reservation held, so the
                // same settle comes again later (or concurrently).
                let held = if r.chance(20) {
                    self.held[i].clone()
                } else {
                    self.held.swap_remove(i)
                };
                let outcome = *r.pick(&[
                    Outcome::Completed,
                    Outcome::Completed,
                    Outcome::CutOff,
                    Outcome::ClientDisconnected,
                    Outcome::UpstreamError,
                    Outcome::UpstreamRateLimited,
                    Outcome::UpstreamTimeout,
                ]);
                // A lying provider now and then: usage beyond the bound.
                let lie = r.chance(10);
                let prompt_tokens = if lie {
                    held.input_tokens_bound * (2 + r.below(5))
                } else {
                    r.below(held.input_tokens_bound + 1)
                };
                let completion_tokens = if lie {
                    held.output_tokens_cap + 1 + r.below(10_000)
                } else {
                    r.below(held.output_tokens_cap + 1)
                };
                let input = SettleInput {
                    reservation_id: held.reservation_id.clone(),
                    outcome,
                    // Cache parts now and then, a lie beyond the input too.
                    usage: TokenUsage::new(prompt_tokens, completion_tokens).with_cache(
                        if r.chance(30) {
                            r.below(prompt_tokens + 2)
                        } else {
                            0
                        },
                        if r.chance(30) {
                            r.below(prompt_tokens + 2)
                        } else {
                            0
                        },
                    ),
                    usage_reported: r.chance(80),
                    upstream_status: match outcome {
                        Outcome::UpstreamRateLimited => 429,
                        Outcome::UpstreamError => 502,
                        _ => 200,
                    },
                    upstream_retry_after_ms: 0,
                };
                Op::Settle { held, input }
            }
            // Time moved on by up to 1.5 TTL: what this control plane holds
            // expires; what only the store holds needs a TTL more (see
            // `expire_due`), which a reservation taken this instant never has.
            75..=84 => Op::Expire {
                ahead_ms: *r.pick(&[0, TTL_MS / 2, TTL_MS * 3 / 2]),
            },
            85..=89 if !self.held.is_empty() => {
                let n = 1 + r.below(3) as usize;
                let ids = (0..n)
                    .map(|_| r.pick(&self.held).reservation_id.clone())
                    .collect();
                Op::Heartbeat { ids }
            }
            90..=95 => Op::TopUp {
                agent: r.below(self.agents.len() as u64) as usize,
                micro: 1 + r.below(20_000) as i64,
            },
            _ => Op::SetState {
                agent: r.below(self.agents.len() as u64) as usize,
                state: if r.chance(70) {
                    AgentState::Active
                } else {
                    AgentState::Paused
                },
            },
        }
    }

    fn spawn(&self, tasks: &mut JoinSet<Done>, op: Op) {
        let (core, store, models) = (self.core.clone(), self.store.clone(), self.models.clone());
        let expiry = self.expiry;
        let agent_of = |i: usize| {
            let a = &self.agents[i];
            (a.name.clone(), a.token_sha256.clone())
        };
        match op {
            Op::Admit {
                agent,
                request_id,
                input_tokens_bound,
                max_tokens,
            } => {
                let (_, token) = agent_of(agent);
                tasks.spawn(async move {
                    let ask = ask(input_tokens_bound, max_tokens, false);
                    match core
                        .admit(&models, &request_id, &token, &ask, &Served::Every, false)
                        .await
                        .unwrap()
                    {
                        Decision::Admitted(a) => Done::Admitted {
                            amount_micro: a.reserved_micro,
                            held: Held {
                                reservation_id: a.reservation_id,
                                request_id,
                                input_tokens_bound,
                                output_tokens_cap: a.output_tokens_cap,
                            },
                        },
                        Decision::Denied { .. } => Done::Denied,
                    }
                });
            }
            Op::Settle { held, input } => {
                tasks.spawn(async move {
                    let s = core.settle(input).await.unwrap();
                    Done::Settled {
                        reservation_id: held.reservation_id,
                        charged_micro: s.charged_micro,
                        already_settled: s.already_settled,
                    }
                });
            }
            Op::Expire { ahead_ms } => {
                tasks.spawn(async move {
                    let sweep = core.expire_due(now_ms() + ahead_ms, expiry).await.unwrap();
                    assert!(sweep.failed.is_empty(), "{:?}", sweep.failed);
                    Done::Other
                });
            }
            Op::Heartbeat { ids } => {
                tasks.spawn(async move {
                    core.heartbeat(&ids).await.unwrap();
                    Done::Other
                });
            }
            Op::TopUp { agent, micro } => {
                let (name, _) = agent_of(agent);
                tasks.spawn(async move {
                    let patch = AgentPatch {
                        top_up_micro: Some(micro),
                        ..Default::default()
                    };
                    core.change_agent(|| store.update_agent(&name, patch))
                        .await
                        .unwrap();
                    Done::Other
                });
            }
            Op::SetState { agent, state } => {
                let (name, _) = agent_of(agent);
                tasks.spawn(async move {
                    core.change_agent(|| store.set_state(&name, state))
                        .await
                        .unwrap();
                    Done::Other
                });
            }
        }
    }

    fn record(&mut self, done: Done) {
        match done {
            Done::Admitted { held, amount_micro } => {
                // A data plane told to go ahead must hold an open
                // reservation: one closed before it asked pays for nothing.
                assert!(
                    !self.closed_before_step.contains(&held.reservation_id),
                    "{} ({}) was closed before this admission, which answered with it",
                    held.reservation_id,
                    held.request_id
                );
                if let Some(before) = self
                    .told
                    .admitted
                    .insert(held.reservation_id.clone(), amount_micro)
                {
                    assert_eq!(
                        before, amount_micro,
                        "a retried admission is the same reservation"
                    );
                }
                // A retry answered with a reservation already held is held once.
                if !self
                    .held
                    .iter()
                    .any(|h| h.reservation_id == held.reservation_id)
                    && !self.told.settled.contains_key(&held.reservation_id)
                {
                    self.held.push(held);
                }
            }
            Done::Settled {
                reservation_id,
                charged_micro,
                already_settled,
            } => {
                if !already_settled {
                    let first = self
                        .told
                        .settled
                        .insert(reservation_id.clone(), charged_micro);
                    assert!(first.is_none(), "{reservation_id} was settled twice");
                } else {
                    assert_eq!(charged_micro, 0, "a repeated settle charges nothing");
                }
            }
            Done::Denied | Done::Other => {}
        }
    }

    /// One step: a few operations at once, all finished before the checks.
    async fn step(&mut self) {
        let mut tasks = JoinSet::new();
        for _ in 0..1 + self.rng.below(6) {
            let op = self.random_op();
            self.spawn(&mut tasks, op);
        }
        while let Some(done) = tasks.join_next().await {
            self.record(done.expect("an operation panicked"));
        }
        self.check().await;
    }

    /// A control plane killed with calls in flight: whatever had reached
    /// the store stays, the rest never happened; a new one loads the store.
    async fn crash(&mut self) {
        let mut tasks = JoinSet::new();
        for _ in 0..1 + self.rng.below(6) {
            let op = self.random_op();
            self.spawn(&mut tasks, op);
        }
        for _ in 0..self.rng.below(4) {
            tokio::task::yield_now().await;
        }
        tasks.abort_all();
        while let Some(done) = tasks.join_next().await {
            // An answer that arrived before the crash was seen by its caller.
            if let Ok(done) = done {
                self.record(done);
            }
        }
        // The answers lost with the process: the data planes retry those
        // admissions (same request ids) or their reservations expire.
        self.core = Arc::new(
            AdmissionEngine::load(self.store.clone() as Arc<dyn Store>, TTL_MS)
                .await
                .unwrap(),
        );
        self.crashes += 1;
        self.check().await;
    }

    async fn check(&mut self) {
        let agents = self.store.list_agents(true).await.unwrap();
        let open = self.store.open_reservations().await.unwrap();
        let events = self
            .store
            .list_events(EventFilter {
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(events.len() < 10_000, "the checks below read the whole log");
        for a in &agents {
            assert!(
                a.spent_micro <= a.budget_micro,
                "{} spent {} of a budget of {}",
                a.name,
                a.spent_micro,
                a.budget_micro
            );
            let open_sum: i64 = open
                .iter()
                .filter(|r| r.agent_id == a.id)
                .map(|r| r.amount_micro)
                .sum();
            assert_eq!(a.reserved_micro, open_sum, "{}: reserved = Σ open", a.name);
            if a.max_concurrent > 0 {
                let in_flight = open.iter().filter(|r| r.agent_id == a.id).count();
                assert!(
                    in_flight <= a.max_concurrent as usize,
                    "{}: {in_flight} open over a limit of {}",
                    a.name,
                    a.max_concurrent
                );
            }
        }
        // Every reservation closed exactly once, within its amount; the
        // ones a settle call was answered for closed at that charge.
        let mut admitted: HashMap<&str, i64> = HashMap::new();
        let mut closed: HashMap<&str, (EventKind, i64)> = HashMap::new();
        let mut spent: HashMap<&str, i64> = HashMap::new();
        for e in &events {
            let b = &e.body;
            let kind = EventKind::parse(&b.kind).expect("a known kind");
            match kind {
                EventKind::Admit => {
                    assert!(
                        admitted.insert(&b.reservation_id, b.amount_micro).is_none(),
                        "{} admitted twice",
                        b.reservation_id
                    );
                }
                EventKind::Settle | EventKind::Release | EventKind::Expire => {
                    let amount = admitted[b.reservation_id.as_str()];
                    assert!(
                        (0..=amount).contains(&b.amount_micro),
                        "charge within the reservation"
                    );
                    if kind == EventKind::Expire {
                        let expected = match self.expiry {
                            ExpiryPolicy::Charge => amount,
                            ExpiryPolicy::Release => 0,
                        };
                        assert_eq!(b.amount_micro, expected, "expiry by its policy");
                    }
                    let again = closed.insert(&b.reservation_id, (kind, b.amount_micro));
                    assert!(again.is_none(), "{} closed twice", b.reservation_id);
                    *spent.entry(&b.agent_id).or_default() += b.amount_micro;
                }
                _ => {}
            }
        }
        for a in &agents {
            assert_eq!(
                a.spent_micro,
                spent.get(a.id.as_str()).copied().unwrap_or(0),
                "{}: spent is what the closings charged",
                a.name
            );
        }
        for r in &open {
            assert!(
                admitted.contains_key(r.id.as_str()),
                "{} has no admit",
                r.id
            );
            assert!(
                !closed.contains_key(r.id.as_str()),
                "{} open and closed",
                r.id
            );
        }
        assert_eq!(admitted.len(), open.len() + closed.len());
        for (id, charged) in &self.told.settled {
            assert_eq!(
                closed.get(id.as_str()).map(|c| c.1),
                Some(*charged),
                "{id}: the ledger charged what the settle call answered"
            );
        }
        for (id, amount) in &self.told.admitted {
            assert_eq!(
                admitted.get(id.as_str()),
                Some(amount),
                "{id}: told, not logged"
            );
        }
        self.closed_before_step = closed.keys().map(|id| id.to_string()).collect();
        // The control plane's memory: the same open reservations.
        assert_eq!(self.core.counts().0, open.len(), "open in memory vs store");
        for r in &open {
            assert_eq!(
                self.core.reservation_for_request(&r.request_id).as_deref(),
                Some(r.id.as_str())
            );
        }
        // An admin change is in memory as it is in the store.
        let (live, _) = self.core.subscribe();
        for a in agents.iter().filter(|a| a.deleted_at_ms.is_none()) {
            let mine = live
                .iter()
                .find(|l| l.id == a.id)
                .expect("a live agent in memory");
            assert_eq!(
                (mine.state, mine.budget_micro, &mine.token_sha256),
                (a.state, a.budget_micro, &a.token_sha256),
                "{}: memory agrees with the store",
                a.name
            );
        }
    }

    /// Everything still open expires; nothing is left reserved and the
    /// audit of the whole run passes.
    async fn finish(&mut self) {
        let sweep = self
            .core
            .expire_due(now_ms() + 10 * TTL_MS, self.expiry)
            .await
            .unwrap();
        assert!(sweep.failed.is_empty());
        for held in std::mem::take(&mut self.held) {
            // A data plane settling after its reservation expired is told
            // it was settled, and charged nothing more.
            let s = self
                .core
                .settle(SettleInput {
                    reservation_id: held.reservation_id,
                    outcome: Outcome::Completed,
                    usage: TokenUsage::new(1, 1),
                    usage_reported: true,
                    upstream_status: 200,
                    upstream_retry_after_ms: 0,
                })
                .await
                .unwrap();
            assert!(s.already_settled && s.charged_micro == 0);
        }
        self.check().await;
        for a in self.store.list_agents(true).await.unwrap() {
            assert_eq!(a.reserved_micro, 0, "{}", a.name);
        }
        assert!(self.store.open_reservation_ids().is_empty());
        let audit = audit_store(self.store.as_ref(), &KEY).await.unwrap();
        assert!(audit.passed(), "{:?}", audit.failures());
    }
}

async fn run(seed: u64) {
    let mut world = World::new(seed).await;
    for _ in 0..80 {
        if world.rng.chance(4) {
            world.crash().await;
        } else {
            world.step().await;
        }
    }
    world.finish().await;
    println!(
        "  {} crashes, {} requests",
        world.crashes, world.next_request
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_keep_the_ledger_exact() {
    let base = seed_from_env("AEX_ADMISSION_SEED");
    let runs = if std::env::var("AEX_ADMISSION_SEED").is_ok() {
        1
    } else {
        40
    };
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        println!("admission state machine: seed {seed} (replay: AEX_ADMISSION_SEED={seed})");
        eprintln!("admission state machine: seed {seed} (replay: AEX_ADMISSION_SEED={seed})");
        run(seed).await;
    }
}

/// One store with `agent` (allowed every model), and two control planes
/// over it, as two replicas over one database.
async fn two_replicas(agent: NewAgent) -> (Arc<MemoryStore>, AdmissionEngine, AdmissionEngine) {
    let store = Arc::new(MemoryStore::new(KEY.to_vec()));
    store
        .create_agent(NewAgent {
            allowed_models: vec![],
            ..agent
        })
        .await
        .unwrap();
    let open = || AdmissionEngine::load(store.clone() as Arc<dyn Store>, TTL_MS);
    let (first, second) = (open().await.unwrap(), open().await.unwrap());
    (store, first, second)
}

/// Two control planes over one store: a stream admitted through one and
/// kept alive by heartbeats through the other (its data plane moved) is not
/// expired by the first, whose memory still holds the old expiry; once the
/// heartbeats stop, either expires it, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_through_another_replica_keeps_a_reservation_alive() {
    let token = format!("{:064x}", 7);
    let (store, first, second) = two_replicas(new_agent("streamer", &token)).await;
    let models = models();
    let Decision::Admitted(a) = first
        .admit(
            &models,
            "stream-1",
            &token,
            &ask(100, Some(50), true),
            &Served::Every,
            false,
        )
        .await
        .unwrap()
    else {
        panic!("admitted")
    };
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    let (extended_to, closed) = second
        .heartbeat(std::slice::from_ref(&a.reservation_id))
        .await
        .unwrap();
    assert!(closed.is_empty());
    // Past the expiry the first replica holds, before the extended one.
    let between = a.expires_at_ms + (extended_to - a.expires_at_ms) / 2;
    assert!(between > a.expires_at_ms && between < extended_to);
    let sweep = first
        .expire_due(between, ExpiryPolicy::Charge)
        .await
        .unwrap();
    assert_eq!(
        sweep.expired, 0,
        "expired a reservation heartbeated elsewhere"
    );
    assert_eq!(
        store.open_reservation_ids(),
        std::slice::from_ref(&a.reservation_id)
    );
    // The heartbeats stop: the replica that holds it expires it at the
    // extended expiry; the other finds it closed.
    let after = extended_to + 1;
    let (one, other) = tokio::join!(
        first.expire_due(after, ExpiryPolicy::Charge),
        second.expire_due(after + TTL_MS, ExpiryPolicy::Charge)
    );
    assert_eq!(one.unwrap().expired + other.unwrap().expired, 1);
    assert!(store.open_reservation_ids().is_empty());
    let audit = audit_store(store.as_ref(), &KEY).await.unwrap();
    assert!(audit.passed(), "{:?}", audit.failures());
}

/// A reservation settled through another control plane is closed for the
/// one that admitted it too: a retried admission of its request is refused
/// (409), not answered from memory, and its concurrency slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_settled_through_another_replica_is_closed_for_its_admitter() {
    let token = format!("{:064x}", 8);
    let (_store, first, second) = two_replicas(NewAgent {
        max_concurrent: 1,
        ..new_agent("single", &token)
    })
    .await;
    let models = models();
    let Decision::Admitted(a) = first
        .admit(
            &models,
            "once",
            &token,
            &ask(100, Some(50), false),
            &Served::Every,
            false,
        )
        .await
        .unwrap()
    else {
        panic!("admitted")
    };
    let settled = second
        .settle(SettleInput {
            reservation_id: a.reservation_id.clone(),
            outcome: Outcome::Completed,
            usage: TokenUsage::new(10, 5),
            usage_reported: true,
            upstream_status: 200,
            upstream_retry_after_ms: 0,
        })
        .await
        .unwrap();
    assert!(!settled.already_settled && settled.charged_micro > 0);
    match first
        .admit(
            &models,
            "once",
            &token,
            &ask(100, Some(50), false),
            &Served::Every,
            false,
        )
        .await
        .unwrap()
    {
        Decision::Denied { denial, .. } => assert_eq!(denial.http_status, 409),
        Decision::Admitted(again) => panic!("answered from memory: {again:?}"),
    }
    // Its one slot is free again on the replica that admitted it.
    assert!(matches!(
        first
            .admit(
                &models,
                "next",
                &token,
                &ask(100, Some(50), false),
                &Served::Every,
                false,
            )
            .await
            .unwrap(),
        Decision::Admitted(_)
    ));
}
