//! Any single edit, deletion, reordering or tail truncation of the event
//! log, made without `ledger.key`, is caught by audit. The log is a real
//! one (agents, calls settled, released, expired and overrun, denials,
//! top-ups, a supervised process, a deletion), written through the store
//! traits into the in-memory store, whose head anchor the edit leaves where
//! the last write put it (as `ledger.head` outside the database).
//! `tests/tests/tamper.rs` does the same through the running daemons and
//! SQLite, for a fixed list of edits of the whole database.

use crate::audit::audit_store;
use crate::clock::now_ms;
use crate::storage::testing::conformance::{KEY, new_agent, reservation, settlement};
use crate::storage::testing::memory::MemoryStore;
use crate::storage::{
    AgentPatch, AgentState, AgentStore, Closing, DenialRecord, EventKind, EventRecord, ExtraEvent,
    LedgerStore, ProcessRecord, ProcessState, ProcessStore, Settlement,
};
use aex_core::chain::ChainKey;
use proptest::prelude::*;
use serde_json::json;

async fn history() -> MemoryStore {
    let s = MemoryStore::new(KEY.to_vec());
    let a = s.create_agent(new_agent("a", "ha")).await.unwrap();
    let b = s.create_agent(new_agent("b", "hb")).await.unwrap();
    for n in 0..6 {
        s.reserve(reservation(if n % 2 == 0 { &a } else { &b }, n, 500))
            .await
            .unwrap();
    }
    s.settle(settlement(&a, 0, 120)).await.unwrap();
    s.settle(settlement(&b, 1, 0)).await.unwrap();
    s.settle(Settlement {
        overrun_micro: 77,
        extra_events: vec![ExtraEvent {
            kind: EventKind::Overrun,
            reason: "usage_above_reservation".into(),
            details: json!({}),
        }],
        ..settlement(&a, 2, 900)
    })
    .await
    .unwrap();
    s.settle(Settlement {
        closing: Closing::Expired,
        ..settlement(&b, 3, 500)
    })
    .await
    .unwrap();
    s.update_agent(
        "a",
        AgentPatch {
            top_up_micro: Some(1_000),
            rpm: Some(30),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.record_denial(DenialRecord {
        agent_id: b.id.clone(),
        agent_name: b.name.clone(),
        reason: "rpm".into(),
        details: json!({"status": 429}),
        count: 1,
        at_ms: now_ms(),
    })
    .await
    .unwrap();
    s.start_process(ProcessRecord {
        id: "prc_1".into(),
        agent_id: a.id.clone(),
        agent_name: a.name.clone(),
        token_sha256: "pt".into(),
        pid: 42,
        command: "agent".into(),
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
    s.end_process("prc_1", ProcessState::Exited, Some(0), "", now_ms())
        .await
        .unwrap();
    s.create_agent(new_agent("gone", "hg")).await.unwrap();
    s.delete_agent("gone").await.unwrap();
    s.set_state("b", AgentState::Paused).await.unwrap();
    s
}

/// One change to the log, as generated; applied modulo its length.
#[derive(Debug, Clone)]
enum Edit {
    /// A field of one event set to another value.
    Field {
        at: usize,
        field: Field,
    },
    Delete {
        at: usize,
    },
    /// Two events change places; the seqs stay in order (a row's seq
    /// moved with it would read back in the same order).
    Reorder {
        at: usize,
        with: usize,
    },
    /// The newest `count` events removed.
    Truncate {
        count: usize,
    },
    /// Every event from `at` on re-hashed into a valid chain under a key
    /// that is not `ledger.key`, after an edit of its amount.
    Reseal {
        at: usize,
        amount: i64,
    },
}

#[derive(Debug, Clone)]
enum Field {
    Seq(i64),
    Ts(i64),
    Kind(usize),
    AgentId(String),
    AgentName(String),
    ReservationId(String),
    Amount(i64),
    Reason(String),
    Details(String),
    PrevHash(String),
    Hash(String),
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9_{}\":]{1,12}"]
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        (-3i64..=3).prop_map(Field::Seq),
        any::<i64>().prop_map(Field::Ts),
        (0..EventKind::ALL.len()).prop_map(Field::Kind),
        text().prop_map(Field::AgentId),
        text().prop_map(Field::AgentName),
        text().prop_map(Field::ReservationId),
        prop_oneof![-1_000i64..=1_000, any::<i64>()].prop_map(Field::Amount),
        text().prop_map(Field::Reason),
        text().prop_map(Field::Details),
        "[0-9a-f]{64}".prop_map(Field::PrevHash),
        "[0-9a-f]{64}".prop_map(Field::Hash),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), field()).prop_map(|(at, field)| Edit::Field { at, field }),
        any::<usize>().prop_map(|at| Edit::Delete { at }),
        (any::<usize>(), any::<usize>()).prop_map(|(at, with)| Edit::Reorder { at, with }),
        (1usize..5).prop_map(|count| Edit::Truncate { count }),
        (any::<usize>(), 1i64..1_000).prop_map(|(at, amount)| Edit::Reseal { at, amount }),
    ]
}

/// Applies `edit`; false when it would change nothing (a field set to the
/// value it has, an event swapped with itself).
fn apply(edit: &Edit, events: &mut Vec<EventRecord>) -> bool {
    let n = events.len();
    match edit.clone() {
        Edit::Field { at, field } => {
            let e = &mut events[at % n];
            let before = e.clone();
            let b = &mut e.body;
            match field {
                Field::Seq(delta) => b.seq += delta,
                Field::Ts(ts) => b.ts_ms = ts,
                Field::Kind(k) => b.kind = EventKind::ALL[k].as_str().to_string(),
                Field::AgentId(v) => b.agent_id = v,
                Field::AgentName(v) => b.agent_name = v,
                Field::ReservationId(v) => b.reservation_id = v,
                Field::Amount(v) => b.amount_micro = v,
                Field::Reason(v) => b.reason = v,
                Field::Details(v) => b.details_json = v,
                Field::PrevHash(v) => e.prev_hash = v,
                Field::Hash(v) => e.hash = v,
            }
            *e != before
        }
        Edit::Delete { at } => {
            events.remove(at % n);
            true
        }
        Edit::Reorder { at, with } => {
            let (i, j) = (at % n, with % n);
            let (si, sj) = (events[i].body.seq, events[j].body.seq);
            events.swap(i, j);
            events[i].body.seq = si;
            events[j].body.seq = sj;
            i != j
        }
        Edit::Truncate { count } => {
            events.truncate(n - count.min(n));
            true
        }
        Edit::Reseal { at, amount } => {
            let at = at % n;
            events[at].body.amount_micro += amount;
            let forged = ChainKey::new(b"not the ledger key");
            for i in at..n {
                let prev = if i == 0 {
                    aex_core::chain::GENESIS.to_string()
                } else {
                    events[i - 1].hash.clone()
                };
                events[i].hash = forged.hash(&prev, &events[i].body);
                events[i].prev_hash = prev;
            }
            true
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_unedited_history_passes() {
    runtime().block_on(async {
        let s = history().await;
        let audit = audit_store(&s, &KEY).await.unwrap();
        assert!(audit.passed(), "{:?}", audit.failures());
        assert!(audit.events_checked > 20, "{}", audit.events_checked);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_single_edit_of_the_log_fails_the_audit(edit in edit()) {
        let rt = runtime();
        let s = rt.block_on(history());
        let changed = s.edit_events(|events| apply(&edit, events));
        prop_assume!(changed);
        let audit = rt.block_on(audit_store(&s, &KEY)).unwrap();
        prop_assert!(!audit.passed(), "audit passed after {edit:?}");
    }
}
