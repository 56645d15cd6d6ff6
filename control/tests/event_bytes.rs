//! The bytes the ledger seals, pinned. A scripted run through the admission
//! engine and the embedded store writes an event of every kind the ledger
//! knows, and every event's sealed fields — kind, agent, reservation,
//! amount, reason and the exact details JSON — must be those in
//! `tests/golden/events.txt`. What the run cannot fix (generated ids, the
//! clock, the temporary directory, the chain's head hash) is named before
//! comparing (`<agent golden>`, `<rsv 3>`, `<time>`); everything else is
//! byte for byte, token commitments included.
//!
//! A change that would alter what the chain says — a renamed enum variant,
//! a details key, a number's form — fails here. When it is meant, audit's
//! folds and docs/LEDGER.md change with it, and the file is rewritten with
//! `AEX_BLESS=1 cargo test -p aex-control --test event_bytes`.

use aex_control::admission::engine::{
    AdmissionEngine, Decision, ExpiryPolicy, GrantAnswer, GrantRequest, LocalAdmit,
    LocalAdmitOutcome, Outcome, SettleInput,
};
use aex_control::admission::policy::{Ask, Endpoint};
use aex_control::clock::now_ms;
use aex_control::ledger::anchor::AnchorFile;
use aex_control::storage::sqlite::SqliteStore;
use aex_control::storage::{
    AgentPatch, AgentState, AgentStore, CredentialStore, EventFilter, EventKind, EventRecord,
    NewAgent, ProcessRecord, ProcessState, ProcessStore, ReservationRecord, Store, TokenChange,
};
use aex_core::config::{DEFAULT_MODELS_YAML, ModelsConfig};
use aex_core::credential::Served;
use aex_core::money::TokenUsage;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

const KEY: [u8; 32] = [5; 32];
const MODEL: &str = "llama3-local";
const TTL_MS: i64 = 60_000;
const GOLDEN: &str = "tests/golden/events.txt";

fn token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn agent(name: &str, token_n: u8, budget_micro: i64) -> NewAgent {
    NewAgent {
        token_prefix: format!("aex_{token_n:02x}"),
        rpm: 600,
        allowed_models: vec![MODEL.into()],
        ..NewAgent::new(name, &token(token_n), budget_micro)
    }
}

fn ask(endpoint: Endpoint, stream: bool) -> Ask<'static> {
    Ask {
        endpoint,
        model: MODEL,
        stream,
        uses_tools: false,
        uses_function_calling: false,
        uses_vision: false,
        input_tokens_bound: 10,
        requested_output_tokens: Some(10),
        output_multiplier: 1,
        unbounded_input: None,
    }
}

fn settle(reservation_id: &str, outcome: Outcome, usage: TokenUsage, status: u32) -> SettleInput {
    SettleInput {
        reservation_id: reservation_id.into(),
        outcome,
        usage,
        usage_reported: true,
        upstream_status: status,
        upstream_retry_after_ms: if status == 429 { 2_000 } else { 0 },
    }
}

struct Run {
    engine: AdmissionEngine,
    models: ModelsConfig,
    ids: HashMap<String, String>,
}

impl Run {
    async fn admit(&self, request_id: &str, token_n: u8, ask: &Ask<'_>) -> Decision {
        self.engine
            .admit(
                &self.models,
                request_id,
                &token(token_n),
                ask,
                &Served::Every,
                false,
            )
            .await
            .unwrap()
    }

    async fn admitted(&self, request_id: &str, token_n: u8, ask: &Ask<'_>) -> String {
        match self.admit(request_id, token_n, ask).await {
            Decision::Admitted(a) => a.reservation_id,
            Decision::Denied { denial, .. } => panic!("{request_id} denied: {}", denial.message),
        }
    }

    async fn denied(&self, request_id: &str, token_n: u8, ask: &Ask<'_>, rule: &str) {
        match self.admit(request_id, token_n, ask).await {
            Decision::Denied { denial, .. } => assert_eq!(denial.denied_by, rule, "{request_id}"),
            Decision::Admitted(_) => panic!("{request_id} admitted"),
        }
    }

    async fn settle(&self, s: SettleInput) {
        self.engine.settle(s).await.unwrap();
    }

    fn agent_id(&self, name: &str) -> String {
        self.ids[name].clone()
    }
}

/// A call reported by a data plane from its grant.
fn local(agent_id: &str, grant_id: &str, n: u32, models: &ModelsConfig) -> LocalAdmit {
    let now = now_ms();
    LocalAdmit {
        grant_id: grant_id.into(),
        record: ReservationRecord {
            id: format!("rsv_local_{n}"),
            request_id: format!("req-local-{n}"),
            agent_id: agent_id.into(),
            model: MODEL.into(),
            amount_micro: 30,
            pricing: models.models[MODEL].pricing,
            input_tokens_bound: 10,
            output_tokens_cap: 10,
            created_at_ms: now,
            expires_at_ms: now + TTL_MS,
        },
        output_cap_injected: true,
        endpoint: Endpoint::ChatCompletions,
        stream: false,
    }
}

async fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open_anchored(
        &dir.join("ledger.db"),
        KEY.to_vec(),
        &dir.join("ledger.head"),
    )
    .await
    .unwrap()
}

async fn all_events(store: &dyn Store) -> Vec<EventRecord> {
    store
        .list_events(EventFilter {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_kind_seals_the_bytes_it_always_has() {
    let started = now_ms();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()).await);
    let mut ids = HashMap::new();
    for (name, token_n, budget, tweak) in [
        ("golden", 1, 1_000_000, 0u8),
        ("tight", 2, 300, 1),
        ("limited", 3, 1_000_000, 2),
        ("liar", 4, 100_000, 0),
    ] {
        let mut a = agent(name, token_n, budget);
        match tweak {
            1 => {
                a.max_concurrent = 1;
                a.caps.tools = false;
            }
            2 => a.rpm = 1,
            _ => {}
        }
        let record = store.create_agent(a).await.unwrap();
        ids.insert(name.to_string(), record.id);
    }
    let engine = AdmissionEngine::load(store.clone() as Arc<dyn Store>, TTL_MS)
        .await
        .unwrap();
    let models = ModelsConfig::parse(DEFAULT_MODELS_YAML, Path::new("models.yaml")).unwrap();
    let run = Run {
        engine,
        models,
        ids,
    };
    let chat = ask(Endpoint::ChatCompletions, false);

    // Calls and how they end: settled, released, over the reservation,
    // refused upstream, failed upstream, expired.
    let r = run.admitted("req-1", 1, &chat).await;
    run.settle(settle(&r, Outcome::Completed, TokenUsage::new(8, 5), 200))
        .await;
    let r = run
        .admitted("req-2", 1, &ask(Endpoint::Responses, true))
        .await;
    run.settle(settle(
        &r,
        Outcome::ClientDisconnected,
        TokenUsage::new(0, 0),
        0,
    ))
    .await;
    let r = run
        .admitted("req-3", 1, &ask(Endpoint::Completions, false))
        .await;
    run.settle(settle(
        &r,
        Outcome::Completed,
        TokenUsage::new(10, 12).with_cache(4, 2),
        200,
    ))
    .await;
    let r = run.admitted("req-4", 1, &chat).await;
    run.settle(settle(
        &r,
        Outcome::UpstreamRateLimited,
        TokenUsage::new(0, 0),
        429,
    ))
    .await;
    let r = run
        .admitted("req-5", 1, &ask(Endpoint::Embeddings, false))
        .await;
    run.settle(settle(
        &r,
        Outcome::UpstreamError,
        TokenUsage::new(0, 0),
        502,
    ))
    .await;
    // Past the allowance: the agent is paused for its overruns.
    let r = run.admitted("req-6", 4, &chat).await;
    run.settle(settle(
        &r,
        Outcome::Completed,
        TokenUsage::new(10, 2_000),
        200,
    ))
    .await;
    run.admitted("req-7", 1, &chat).await;
    let swept = run
        .engine
        .expire_due(now_ms() + 2 * TTL_MS, ExpiryPolicy::Charge)
        .await
        .unwrap();
    assert_eq!(swept.expired, 1, "req-7's reservation");

    // Refusals, each by its rule.
    let held = run.admitted("req-8", 2, &chat).await;
    run.denied("req-9", 2, &chat, "concurrency").await;
    run.settle(settle(
        &held,
        Outcome::Completed,
        TokenUsage::new(1, 1),
        200,
    ))
    .await;
    let mut tools = ask(Endpoint::ChatCompletions, false);
    tools.uses_tools = true;
    run.denied("req-10", 2, &tools, "tools").await;
    let mut big = ask(Endpoint::ChatCompletions, false);
    big.input_tokens_bound = 1_000;
    run.denied("req-11", 2, &big, "budget").await;
    let mut other = ask(Endpoint::ChatCompletions, false);
    other.model = "simulated";
    run.denied("req-12", 1, &other, "model").await;
    run.admitted("req-13", 3, &chat).await;
    run.denied("req-14", 3, &chat, "rpm").await;
    run.denied("req-15", 9, &chat, "auth").await;
    run.engine.flush_unauthenticated().await.unwrap();

    // Grants: issued, calls recorded from one, returned, a call reported
    // after the return refused, another grant expired.
    let golden = run.agent_id("golden");
    let grant = |grant_id: &str| GrantRequest {
        grant_id: grant_id.into(),
        agent_id: golden.clone(),
        worst_call_micro: 30,
        spend_per_s_micro: 300,
        calls_per_s: 10,
    };
    assert!(matches!(
        run.engine
            .request_grant("dp-1", grant("grant-1"))
            .await
            .unwrap(),
        GrantAnswer::Issued { .. }
    ));
    let recorded = run
        .engine
        .admit_from_grants(vec![local(&golden, "grant-1", 1, &run.models)])
        .await;
    assert_eq!(recorded[0].as_ref().unwrap(), &LocalAdmitOutcome::Recorded);
    run.settle(settle(
        "rsv_local_1",
        Outcome::Completed,
        TokenUsage::new(9, 9),
        200,
    ))
    .await;
    run.engine.return_grant("grant-1", &golden).await.unwrap();
    let refused = run
        .engine
        .admit_from_grants(vec![local(&golden, "grant-1", 2, &run.models)])
        .await;
    assert!(matches!(
        refused[0].as_ref().unwrap(),
        LocalAdmitOutcome::NotCovered(_)
    ));
    assert!(matches!(
        run.engine
            .request_grant("dp-1", grant("grant-2"))
            .await
            .unwrap(),
        GrantAnswer::Issued { .. }
    ));
    assert_eq!(
        run.engine
            .expire_grants(now_ms() + 60_000, ExpiryPolicy::Charge)
            .await
            .unwrap(),
        1
    );

    // Supervised processes, ended three ways.
    for (n, (state, exit, reason)) in [
        (ProcessState::Exited, Some(0), "exited"),
        (ProcessState::Killed, Some(137), "budget exhausted"),
        (ProcessState::Lost, None, "supervisor gone"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("prc_{n}");
        store
            .start_process(ProcessRecord {
                id: id.clone(),
                agent_id: golden.clone(),
                agent_name: "golden".into(),
                token_sha256: token(20 + n as u8),
                pid: 4_000 + n as u32,
                command: "agent --loop".into(),
                host: "laptop".into(),
                state: ProcessState::Running.as_str().into(),
                started_at_ms: now_ms(),
                ended_at_ms: None,
                exit_code: None,
                reason: String::new(),
                kill_reason: None,
            })
            .await
            .unwrap();
        store
            .end_process(&id, state, exit, reason, now_ms())
            .await
            .unwrap();
    }

    // Data-plane credentials.
    let issued = aex_core::credential::issue(
        "dpc_1".into(),
        "sidecar-a".into(),
        &["golden".into(), "liar".into()],
        token(30),
        "aexsc_1e".into(),
        now_ms(),
        &KEY,
    )
    .unwrap();
    store.insert_credential(issued).await.unwrap();
    store
        .revoke_credential("sidecar-a", now_ms())
        .await
        .unwrap()
        .unwrap();

    // An operator's changes.
    let s = store.clone();
    run.engine
        .change_agent(|| async move {
            s.update_agent(
                "golden",
                AgentPatch {
                    rpm: Some(900),
                    allowed_models: Some(vec![MODEL.into(), "simulated".into()]),
                    top_up_micro: Some(5_000),
                    ..Default::default()
                },
            )
            .await
        })
        .await
        .unwrap();
    let s = store.clone();
    run.engine
        .change_agent(|| async move {
            s.rotate_token(
                "golden",
                TokenChange {
                    token_sha256: token(11),
                    token_prefix: "aex_0b".into(),
                    token_expires_at_ms: None,
                    token_ttl_seconds: 0,
                },
            )
            .await
        })
        .await
        .unwrap();
    for state in [AgentState::Paused, AgentState::Active] {
        let s = store.clone();
        run.engine
            .change_agent(|| async move { s.set_state("golden", state).await })
            .await
            .unwrap();
    }
    run.denied("req-16", 4, &chat, "paused").await;
    let s = store.clone();
    run.engine
        .change_agent(|| async move { s.kill_agent("limited").await })
        .await
        .unwrap();
    let s = store.clone();
    run.engine
        .change_agent(|| async move { s.delete_agent("tight").await })
        .await
        .unwrap();

    // A restart that finds the anchored head ahead of the database.
    let head = all_events(store.as_ref()).await.last().unwrap().clone();
    drop(run);
    drop(store);
    AnchorFile::open(&dir.path().join("ledger.head"), &KEY)
        .unwrap()
        .write(head.body.seq + 3, &"ab".repeat(32))
        .unwrap();
    let store = open(dir.path()).await;
    let events = all_events(&store).await;

    let mut lines = render(&events, &store, dir.path(), &head.hash, started).await;
    // Written by the store for agents an older AEX created (trust on first
    // use): no run of this version can make one, so the domain's event is
    // rendered as the store seals it.
    let mut head = aex_core::event::Head::genesis();
    let baseline = head.seal(
        &aex_core::chain::ChainKey::new(&KEY),
        &aex_core::agent::baseline("agt_legacy", "legacy", &token(40), 0, &KEY),
    );
    lines.push(line(&baseline));
    let kinds: BTreeSet<String> = events
        .iter()
        .map(|e| e.body.kind.clone())
        .chain([baseline.body.kind.clone()])
        .collect();
    let every: BTreeSet<String> = EventKind::ALL
        .iter()
        .map(|k| k.as_str().to_string())
        .collect();
    assert_eq!(
        every.difference(&kinds).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "kinds this run does not write: add a step that writes each"
    );
    compare(&lines.join("\n"));
}

/// One event's sealed fields but its time and position, ids as written.
fn line(e: &EventRecord) -> String {
    let b = &e.body;
    format!(
        "{} agent={}/{} reservation={} amount={} reason={} details={}",
        b.kind,
        b.agent_id,
        b.agent_name,
        b.reservation_id,
        b.amount_micro,
        b.reason,
        b.details_json
    )
}

/// Every event as a line, with what the run cannot fix named.
async fn render(
    events: &[EventRecord],
    store: &SqliteStore,
    dir: &Path,
    head_hash: &str,
    started: i64,
) -> Vec<String> {
    let mut names: Vec<(String, String)> = store
        .list_agents(true)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.id, format!("<agent {}>", a.name)))
        .collect();
    let mut reservations = Vec::new();
    for e in events {
        let id = &e.body.reservation_id;
        if id.starts_with("rsv_") && !id.starts_with("rsv_local") && !reservations.contains(id) {
            reservations.push(id.clone());
        }
    }
    names.extend(
        reservations
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, format!("<rsv {}>", i + 1))),
    );
    names.push((head_hash.to_string(), "<head hash>".into()));
    names.push((dir.display().to_string(), "<dir>".into()));
    let ended = now_ms();
    events
        .iter()
        .map(|e| {
            let mut l = line(e);
            for (from, to) in &names {
                l = l.replace(from.as_str(), to);
            }
            if e.body.kind == EventKind::Deny.as_str() {
                // How long a limit asks to wait depends on when the call came.
                l = number_named(&l, "\"retry_after_ms\":", "<wait>");
            }
            times_named(&l, started - 1_000, ended + 3_600_000)
        })
        .collect()
}

/// The number after `key` as `name`.
fn number_named(s: &str, key: &str, name: &str) -> String {
    let Some(at) = s.find(key).map(|i| i + key.len()) else {
        return s.to_string();
    };
    let end = s[at..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(s.len(), |i| at + i);
    format!("{}{name}{}", &s[..at], &s[end..])
}

/// Every 13-digit number within [from, to] (a time in ms) as `<time>`.
fn times_named(s: &str, from: i64, to: i64) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
            let end = (i..bytes.len())
                .find(|&j| !bytes[j].is_ascii_digit())
                .unwrap_or(bytes.len());
            let number = &s[i..end];
            match number.parse::<i64>() {
                Ok(t) if number.len() == 13 && (from..=to).contains(&t) => out.push_str("<time>"),
                _ => out.push_str(number),
            }
            i = end;
        } else {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn compare(rendered: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    let rendered = format!("{rendered}\n");
    if std::env::var_os("AEX_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (AEX_BLESS=1 writes it)", path.display()));
    for (i, (want, got)) in golden.lines().zip(rendered.lines()).enumerate() {
        assert_eq!(
            got,
            want,
            "event {} differs from {GOLDEN}: the ledger would say something else",
            i + 1
        );
    }
    assert_eq!(
        rendered.lines().count(),
        golden.lines().count(),
        "the run wrote another number of events than {GOLDEN}"
    );
}
