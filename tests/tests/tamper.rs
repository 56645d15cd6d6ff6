//! Database edits made without `ledger.key`, with the daemons stopped: each
//! kind is applied to its own copy of one ledger, the control plane started
//! on it, and `aexctl audit` must fail naming the check that caught it; on
//! SQLite and on PostgreSQL (`AEX_TEST_DATABASE_URL`). Then random edits of
//! the columns the chain covers, the seed printed (`AEX_TAMPER_SEED`
//! replays a run).

use aex_tests::postgres::TestDatabase;
use aex_tests::{ControlPlane, MOCK_PROVIDER_KEY, Stack, TestHome};
use reqwest::Client;
use serde_json::{Value, json};
use std::time::Duration;

/// The control plane's arguments for the ledger on `pg` (None: SQLite in
/// its home).
fn control_args(pg: Option<&TestDatabase>) -> Vec<String> {
    pg.map(|db| vec!["--database-url".to_string(), db.url()])
        .unwrap_or_default()
}

/// One ledger with agents, settled calls, admin changes and a paused agent
/// as its newest event; returns the stopped stack's home.
async fn ledger(pg: Option<&TestDatabase>) -> TestHome {
    let args = control_args(pg);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stack = Stack::start_full(&args, &[]).await;
    let token = stack.agent("victim", "5", "600", &[]);
    stack.agent("bystander", "1", "600", &[]);
    let body = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let r = Client::new()
            .post(stack.url("/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A supervised process: its row holds a token that authenticates as
    // the agent, so it is part of what audit compares.
    let run = std::process::Command::new(aex_tests::bin("aexctl"))
        .args(["run", "--agent", "victim", "--grace", "1", "--", "true"])
        .env("AEX_HOME", stack.home.path())
        .env("AEX_CONTROL_ADDR", stack.control.url())
        .env("AEX_DATAPLANE_ADDR", stack.data.addr.to_string())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "aexctl run: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    stack
        .control
        .aexctl(&["agent", "update", "victim", "--top-up", "1", "--rpm", "100"])
        .assert_ok();
    stack
        .control
        .aexctl(&["agent", "rotate-token", "bystander"])
        .assert_ok();
    // A sidecar's credential, and one revoked.
    for name in ["pod-victim", "pod-old"] {
        stack
            .control
            .aexctl(&[
                "dataplane",
                "credential",
                "create",
                name,
                "--agents",
                "victim",
            ])
            .assert_ok();
    }
    stack
        .control
        .aexctl(&["dataplane", "credential", "revoke", "pod-old"])
        .assert_ok();
    stack
        .control
        .aexctl(&["agent", "pause", "bystander"])
        .assert_ok();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stack.inspect("victim")["reserved_micro"] != 0 {
        assert!(std::time::Instant::now() < deadline, "not settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let audit = stack.control.aexctl(&["audit"]);
    assert_eq!(
        audit.code(),
        0,
        "the untouched ledger passes:\n{}",
        audit.stdout
    );
    let Stack {
        data,
        control,
        mock,
        home,
    } = stack;
    drop(data);
    drop(control); // SIGKILL: the WAL and the anchor stay as a crash leaves them
    drop(mock);
    home
}

async fn exec(home: &TestHome, pg: Option<&TestDatabase>, statements: &[&str]) {
    match pg {
        None => {
            let pool =
                sqlx::SqlitePool::connect(&format!("sqlite://{}", home.file("aex.db").display()))
                    .await
                    .unwrap();
            for s in statements {
                sqlx::query(s)
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            pool.close().await;
        }
        Some(db) => {
            let pool = sqlx::PgPool::connect_with(db.options()).await.unwrap();
            for s in statements {
                sqlx::query(s)
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
            pool.close().await;
        }
    }
}

/// The head anchor in `home`: `ledger.head` for its own SQLite file,
/// `ledger-<hash>.head` for a PostgreSQL database.
fn anchor_file(home: &TestHome) -> std::path::PathBuf {
    std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("ledger") && name.ends_with(".head")
        })
        .expect("a head anchor in AEX_HOME")
}

/// The names of the audit checks that failed on `home`.
fn failed_checks(home: &TestHome, pg: Option<&TestDatabase>) -> (Vec<String>, String) {
    let args = control_args(pg);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = ControlPlane::start_with(home, &args);
    let out = cp.aexctl(&["audit", "--json"]);
    let report: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "audit printed no JSON:\n{}\n{}",
            out.stdout,
            out.stderr_text()
        )
    });
    let failed = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    (failed, out.stdout)
}

enum Edit {
    Sql(&'static [&'static str]),
    DeleteAnchor,
    ForgeAnchor,
    /// The statements, then the anchor's newest slot zeroed (the one with
    /// the higher counter), leaving the older slot valid.
    SqlAndZeroNewestSlot(&'static [&'static str]),
}

fn kinds() -> Vec<(&'static str, Edit, &'static str)> {
    use Edit::*;
    vec![
        (
            "consistent tail truncation (the last event removed, state and counters rolled back)",
            Sql(&[
                "DELETE FROM events WHERE seq = (SELECT MAX(seq) FROM events)",
                "UPDATE agents SET state = 'active' WHERE name = 'bystander'",
                "UPDATE counters SET value = value - 1 WHERE name = 'agent.paused'",
            ]),
            "head_anchored",
        ),
        (
            "budget raise",
            Sql(&["UPDATE agents SET budget_micro = budget_micro * 10 WHERE name = 'victim'"]),
            "agents_match_log",
        ),
        (
            "token swap",
            Sql(&[
                "UPDATE agents SET token_sha256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' WHERE name = 'victim'",
            ]),
            "agents_match_log",
        ),
        (
            "full wipe",
            Sql(&[
                "DELETE FROM events",
                "DELETE FROM agents",
                "DELETE FROM reservations",
                "DELETE FROM counters",
            ]),
            "head_anchored",
        ),
        (
            "rename",
            Sql(&["UPDATE agents SET name = 'renamed' WHERE name = 'victim'"]),
            "agents_match_log",
        ),
        (
            "policy edit (rpm, allowed models)",
            Sql(&[
                "UPDATE agents SET rpm = 999999, allowed_models = '[\"mock-model\"]' WHERE name = 'victim'",
            ]),
            "agents_match_log",
        ),
        (
            "settled reservations deleted",
            Sql(&["DELETE FROM reservations WHERE state = 'settled'"]),
            "reservations_match_log",
        ),
        (
            "spent rolled back",
            Sql(&["UPDATE agents SET spent_micro = 0 WHERE name = 'victim'"]),
            "spent_matches_settle_events",
        ),
        (
            "an event in the middle deleted",
            Sql(&["DELETE FROM events WHERE seq = 4"]),
            "chain_intact",
        ),
        (
            "an event's amount edited",
            Sql(&["UPDATE events SET amount_micro = 1 WHERE kind = 'settle'"]),
            "chain_intact",
        ),
        (
            "two events reordered",
            Sql(&[
                "UPDATE events SET seq = -1 WHERE seq = 3",
                "UPDATE events SET seq = 3 WHERE seq = 4",
                "UPDATE events SET seq = 4 WHERE seq = -1",
            ]),
            "chain_intact",
        ),
        (
            "a forged event inserted",
            Sql(&[
                "INSERT INTO events (seq, ts_ms, kind, agent_id, agent_name, reservation_id, amount_micro, reason, details, prev_hash, hash) \
                 SELECT MAX(seq) + 1, 0, 'agent.topped_up', '', 'victim', '', 1000000, '', '{}', 'x', 'y' FROM events",
            ]),
            "chain_intact",
        ),
        (
            "a counter edited",
            Sql(&["UPDATE counters SET value = value + 5 WHERE name = 'admit'"]),
            "counters_match_events",
        ),
        (
            "reserved edited",
            Sql(&["UPDATE agents SET reserved_micro = 500 WHERE name = 'victim'"]),
            "reserved_matches_open_reservations",
        ),
        (
            "the last commit removed and the newest anchor slot zeroed (issue #31)",
            SqlAndZeroNewestSlot(&[
                "DELETE FROM events WHERE seq = (SELECT MAX(seq) FROM events)",
                "UPDATE agents SET state = 'active' WHERE name = 'bystander'",
                "UPDATE counters SET value = value - 1 WHERE name = 'agent.paused'",
            ]),
            "head_anchored",
        ),
        ("the anchor deleted", DeleteAnchor, "head_anchored"),
        ("the anchor forged", ForgeAnchor, "head_anchored"),
        (
            "a paused agent resumed",
            Sql(&["UPDATE agents SET state = 'active' WHERE name = 'bystander'"]),
            "agents_match_log",
        ),
        (
            "a capability granted",
            Sql(&["UPDATE agents SET cap_vision = NOT cap_vision WHERE name = 'victim'"]),
            "agents_match_log",
        ),
        (
            "a reservation invented",
            Sql(&[
                "INSERT INTO reservations (id, request_id, agent_id, model, amount_micro, input_pico_per_token, output_pico_per_token, input_tokens_bound, output_tokens_cap, state, created_at_ms, expires_at_ms, charged_micro) \
                 SELECT 'rsv_forged', 'req_forged', id, 'mock-model', 0, 0, 0, 0, 0, 'released', 0, 0, 0 FROM agents WHERE name = 'victim'",
            ]),
            "reservations_match_log",
        ),
        (
            "a reservation's charge edited",
            Sql(&[
                "UPDATE reservations SET charged_micro = charged_micro + 7 WHERE state = 'settled'",
            ]),
            "reservations_match_log",
        ),
        (
            "a charge moved between two settled reservations (the agent's totals kept)",
            Sql(&[
                "UPDATE reservations SET charged_micro = charged_micro + 1 WHERE id = (SELECT MIN(id) FROM reservations WHERE state = 'settled')",
                "UPDATE reservations SET charged_micro = charged_micro - 1 WHERE id = (SELECT MAX(id) FROM reservations WHERE state = 'settled')",
            ]),
            "reservations_match_log",
        ),
        (
            "a reservation's outcome and token counts rewritten",
            Sql(&[
                "UPDATE reservations SET outcome = 'client_disconnected', completion_tokens = 0 WHERE id = (SELECT MIN(id) FROM reservations)",
            ]),
            "reservations_match_log",
        ),
        (
            "a settled reservation reopened",
            Sql(&[
                "UPDATE reservations SET state = 'open', charged_micro = NULL, settled_at_ms = NULL WHERE id = (SELECT MIN(id) FROM reservations)",
            ]),
            "reservations_match_log",
        ),
        (
            "a running process invented with an attacker's token",
            Sql(&[
                "INSERT INTO processes (id, agent_id, token_sha256, pid, command, host, state, started_at_ms) \
                 SELECT 'prc_forged', id, 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', 1, 'sh', 'h', 'running', 0 FROM agents WHERE name = 'victim'",
            ]),
            "processes_match_log",
        ),
        (
            "a process's token swapped",
            Sql(&[
                "UPDATE processes SET token_sha256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
            ]),
            "processes_match_log",
        ),
        (
            "an ended process set running again",
            Sql(&["UPDATE processes SET state = 'running', ended_at_ms = NULL"]),
            "processes_match_log",
        ),
        (
            "an overrun edited",
            Sql(&["UPDATE agents SET overrun_micro = 123 WHERE name = 'victim'"]),
            "overruns_match_events",
        ),
        (
            "an agent row deleted",
            Sql(&["DELETE FROM agents WHERE name = 'bystander'"]),
            "agents_match_log",
        ),
        (
            "a token's expiry extended",
            Sql(&["UPDATE agents SET token_expires_at_ms = 4102444800000 WHERE name = 'victim'"]),
            "agents_match_log",
        ),
        (
            "a sidecar credential's scope widened",
            Sql(&[
                "UPDATE credentials SET agents = '[\"bystander\",\"victim\"]' WHERE name = 'pod-victim'",
            ]),
            "credentials_match_log",
        ),
        (
            "a sidecar credential's secret swapped",
            Sql(&[
                "UPDATE credentials SET secret_sha256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855' WHERE name = 'pod-victim'",
            ]),
            "credentials_match_log",
        ),
        (
            "a revoked sidecar credential made live again",
            Sql(&["UPDATE credentials SET revoked_at_ms = NULL WHERE name = 'pod-old'"]),
            "credentials_match_log",
        ),
        (
            "a sidecar credential invented",
            Sql(&[
                "INSERT INTO credentials (id, name, secret_sha256, secret_prefix, agents, created_at_ms) \
                 VALUES ('dpc_forged', 'pod-forged', 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', 'aexsc_x', '[\"victim\"]', 0)",
            ]),
            "credentials_match_log",
        ),
        (
            "scope edited",
            Sql(&["UPDATE agents SET scope = 'read-only' WHERE name = 'victim'"]),
            "agents_match_log",
        ),
    ]
}

async fn apply(home: &TestHome, pg: Option<&TestDatabase>, edit: &Edit) {
    match edit {
        Edit::Sql(statements) => exec(home, pg, statements).await,
        Edit::DeleteAnchor => std::fs::remove_file(anchor_file(home)).unwrap(),
        Edit::ForgeAnchor => std::fs::write(anchor_file(home), [0x41u8; 256]).unwrap(),
        Edit::SqlAndZeroNewestSlot(statements) => {
            exec(home, pg, statements).await;
            let path = anchor_file(home);
            let mut bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 256, "both slots written");
            let counter = |slot: usize| {
                u64::from_be_bytes(bytes[slot * 128 + 8..slot * 128 + 16].try_into().unwrap())
            };
            let newest = if counter(1) > counter(0) { 1 } else { 0 };
            bytes[newest * 128..(newest + 1) * 128].fill(0);
            std::fs::write(&path, &bytes).unwrap();
        }
    }
}

/// Every kind of edit on its own copy of one ledger, each named by the
/// check `kinds` expects; the untouched copy passes.
async fn every_kind_is_named(pg: Option<&TestDatabase>) {
    let original = ledger(pg).await;
    // PostgreSQL: each edit on a copy of the database under the original's
    // name, so that the control plane finds its anchor for it.
    // And in the original's home: the chain knows its anchor by its path.
    let pristine = match pg {
        Some(db) => Some((db.copy().await, TestHome::copy_of(&original))),
        None => None,
    };
    assert!(MOCK_PROVIDER_KEY.starts_with("sk-"));
    let kinds = kinds();
    let mut caught = 0;
    for (what, edit, check) in &kinds {
        let copy;
        let home = match (pg, &pristine) {
            (Some(db), Some((pristine_db, pristine_home))) => {
                db.reset_from(pristine_db).await;
                original.reset_from(pristine_home);
                &original
            }
            _ => {
                copy = TestHome::copy_of(&original);
                &copy
            }
        };
        apply(home, pg, edit).await;
        let (failed, report) = failed_checks(home, pg);
        assert!(
            failed.iter().any(|f| f == check),
            "{what}: expected {check} to fail, failed: {failed:?}\n{report}"
        );
        caught += 1;
    }
    let on = if pg.is_some() { "PostgreSQL" } else { "SQLite" };
    println!(
        "tamper on {on}: {caught}/{} edit kinds named by audit",
        kinds.len()
    );
    // Untouched, the copy still passes: the checks name edits, not copies.
    if let (Some(db), Some((pristine_db, pristine_home))) = (pg, &pristine) {
        db.reset_from(pristine_db).await;
        original.reset_from(pristine_home);
    }
    let (failed, report) = failed_checks(&TestHome::copy_of(&original), pg);
    assert!(failed.is_empty(), "{report}");
}

#[tokio::test]
async fn every_kind_of_database_edit_is_named_by_audit() {
    every_kind_is_named(None).await;
}

#[tokio::test]
async fn every_kind_of_database_edit_is_named_by_audit_on_postgres() {
    let Some(db) = TestDatabase::fresh().await else {
        return;
    };
    every_kind_is_named(Some(&db)).await;
}

/// On PostgreSQL every control plane keeps its own anchor: one started
/// with a new AEX_HOME (a new pod) on a ledger others anchored starts its
/// own, and audit passes there; its anchor deleted afterwards is named.
#[tokio::test]
async fn a_new_replica_anchors_on_its_own_and_its_anchor_counts_from_then() {
    let Some(db) = TestDatabase::fresh().await else {
        return;
    };
    let original = ledger(Some(&db)).await;
    // The same secrets (ledger.key, tokens), a new AEX_HOME and no anchor.
    let new_replica = || {
        let home = TestHome::copy_of(&original);
        std::fs::remove_file(anchor_file(&home)).unwrap();
        home
    };
    let home = new_replica();
    let (failed, report) = failed_checks(&home, Some(&db));
    assert!(failed.is_empty(), "a new replica's audit: {report}");
    // The same replica restarted without its anchor: deleted, not new.
    std::fs::remove_file(anchor_file(&home)).unwrap();
    let (failed, report) = failed_checks(&home, Some(&db));
    assert!(
        failed.iter().any(|f| f == "head_anchored"),
        "a deleted anchor: {report}"
    );
    let (failed, _) = failed_checks(&new_replica(), Some(&db));
    assert!(
        failed.iter().any(|f| f == "head_anchored"),
        "the mismatch stays in the chain for every replica"
    );
}

#[tokio::test]
async fn random_edits_of_covered_columns_are_named() {
    let seed = aex_tests::rng::seed_from_env("AEX_TAMPER_SEED");
    println!("tamper: seed {seed} (replay with AEX_TAMPER_SEED={seed})");
    let original = ledger(None).await;
    let columns = [
        ("agents", "budget_micro", "budget_micro + 1"),
        ("agents", "spent_micro", "spent_micro + 1"),
        ("agents", "rpm", "rpm + 1"),
        ("agents", "tpm", "tpm + 1"),
        ("agents", "max_concurrent", "max_concurrent + 1"),
        ("agents", "name", "name || 'x'"),
        ("agents", "token_sha256", "token_sha256 || 'x'"),
        ("agents", "cap_tools", "NOT cap_tools"),
        ("agents", "cap_streaming", "NOT cap_streaming"),
        ("agents", "overrun_micro", "overrun_micro + 1"),
        ("reservations", "charged_micro", "charged_micro + 1"),
        ("reservations", "amount_micro", "amount_micro + 1"),
        ("reservations", "outcome", "outcome || 'x'"),
        ("reservations", "prompt_tokens", "prompt_tokens + 1"),
        ("reservations", "model", "model || 'x'"),
        ("processes", "token_sha256", "token_sha256 || 'x'"),
        ("processes", "state", "'running'"),
        ("credentials", "agents", "'[\"bystander\"]'"),
        ("credentials", "secret_sha256", "secret_sha256 || 'x'"),
        ("events", "amount_micro", "amount_micro + 1"),
        ("events", "details", "details || ' '"),
        ("events", "agent_name", "agent_name || 'x'"),
        ("counters", "value", "value + 1"),
    ];
    let mut rng = aex_tests::rng::Rng(seed);
    for _ in 0..6 {
        let (table, column, value) = *rng.pick(&columns);
        let home = TestHome::copy_of(&original);
        let pool =
            sqlx::SqlitePool::connect(&format!("sqlite://{}", home.file("aex.db").display()))
                .await
                .unwrap();
        // One row, chosen by the seed among those the edit changes.
        let rowids: Vec<i64> = sqlx::query_scalar(&format!("SELECT rowid FROM {table}"))
            .fetch_all(&pool)
            .await
            .unwrap();
        let rowid = *rng.pick(&rowids);
        sqlx::query(&format!(
            "UPDATE {table} SET {column} = {value} WHERE rowid = {rowid}"
        ))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let (failed, report) = failed_checks(&home, None);
        assert!(
            !failed.is_empty(),
            "seed {seed}: {table}.{column} of row {rowid} edited and audit passed:\n{report}"
        );
    }
}
