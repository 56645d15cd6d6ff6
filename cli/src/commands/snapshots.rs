//! The human output of the read commands, pinned: a change to a table, a
//! label or an alignment shows up as a snapshot diff to review
//! (`cargo insta review`, or accept by renaming the `.snap.new` file).
//! The renderers are pure; fixed inputs make fixed text.

use super::{agent, audit, doctor, status};
use crate::output::rendered;
use aex_proto::v1 as pb;

/// 2026-02-20T11:29:40Z.
const T: i64 = 1_771_586_980_000;

fn agent(name: &str) -> pb::Agent {
    pb::Agent {
        id: format!("agt_{name}"),
        name: name.into(),
        budget_micro: 5_000_000,
        spent_micro: 1_234_567,
        reserved_micro: 8_200,
        rpm: 60,
        tpm: 0,
        max_concurrent: 4,
        allowed_models: vec![],
        capabilities: Some(pb::Capabilities {
            streaming: true,
            tools: true,
            function_calling: true,
            vision: false,
        }),
        scope: pb::Scope::Execution as i32,
        state: pb::AgentState::Active as i32,
        token_prefix: "aex_3f9a".into(),
        token_expires_at_ms: None,
        created_at_ms: T,
        updated_at_ms: T,
        last_activity_at_ms: Some(T + 61_000),
        deleted_at_ms: None,
        overrun_micro: 0,
        open_grants: vec![],
    }
}

fn paused_reader() -> pb::Agent {
    pb::Agent {
        budget_micro: 250_000,
        spent_micro: 250_000,
        reserved_micro: 0,
        rpm: 10,
        tpm: 20_000,
        max_concurrent: 0,
        allowed_models: vec!["llama3-local".into(), "gpt-4o-mini".into()],
        scope: pb::Scope::ReadOnly as i32,
        state: pb::AgentState::Paused as i32,
        token_expires_at_ms: Some(T + 86_400_000),
        last_activity_at_ms: None,
        overrun_micro: 4_100,
        ..agent("reader")
    }
}

#[test]
fn agent_list() {
    let agents = [agent("dev"), paused_reader()];
    insta::assert_snapshot!(rendered(|out| agent::write_list(out, &agents)));
}

#[test]
fn agent_list_empty() {
    insta::assert_snapshot!(rendered(|out| agent::write_list(out, &[])));
}

#[test]
fn agent_inspect() {
    insta::assert_snapshot!(rendered(|out| agent::write_inspect(out, &agent("dev"))));
}

#[test]
fn agent_inspect_with_grants() {
    let mut busy = agent("busy");
    busy.reserved_micro = 60_000;
    busy.open_grants = vec![
        pb::AgentGrant {
            grant_id: "grt_1".into(),
            data_plane: "pod-a".into(),
            budget_micro: 40_000,
            used_micro: 12_345,
            requests: 40,
            requests_used: 11,
            created_at_ms: T,
            deadline_ms: T + 5_000,
        },
        pb::AgentGrant {
            grant_id: "grt_2".into(),
            data_plane: "pod-b".into(),
            budget_micro: 20_000,
            used_micro: 0,
            requests: 0,
            requests_used: 0,
            created_at_ms: T,
            deadline_ms: T + 5_000,
        },
    ];
    insta::assert_snapshot!(rendered(|out| agent::write_inspect(out, &busy)));
}

#[test]
fn agent_inspect_paused_with_overrun() {
    insta::assert_snapshot!(rendered(|out| agent::write_inspect(out, &paused_reader())));
}

fn status() -> pb::Status {
    pb::Status {
        agents: 2,
        total_budget_micro: 5_250_000,
        total_spent_micro: 1_484_567,
        total_reserved_micro: 8_200,
        total_remaining_micro: 3_757_233,
        requests_served: 1_042,
        denials_by_reason: [("budget", 7), ("rpm", 12), ("auth", 3), ("model", 1)]
            .into_iter()
            .map(|(r, n)| (r.to_string(), n))
            .collect(),
        upstream_denials: 2,
        upstream_errors: 1,
        policy_violations: 1,
        overruns: 1,
        open_reservations: 3,
        expired_reservations: 0,
        version: "0.1.0".into(),
        pid: 4242,
        started_at_ms: T,
        database: "sqlite".into(),
        data_planes: 1,
        processes_active: 1,
        processes_killed: 0,
        total_overrun_micro: 4_100,
    }
}

#[test]
fn status_with_a_running_data_plane() {
    insta::assert_snapshot!(rendered(|out| status::write_status(
        out,
        &status(),
        "http://127.0.0.1:9001",
        "127.0.0.1:9000",
        &Ok(200)
    )));
}

#[test]
fn status_with_the_data_plane_down() {
    insta::assert_snapshot!(rendered(|out| status::write_status(
        out,
        &status(),
        "http://127.0.0.1:9001",
        "127.0.0.1:9000",
        &Err("connection refused".into())
    )));
}

fn check(name: &str, passed: bool, detail: &str, offenders: &[&str]) -> pb::AuditCheck {
    pb::AuditCheck {
        name: name.into(),
        passed,
        detail: detail.into(),
        offenders: offenders.iter().map(|o| o.to_string()).collect(),
    }
}

#[test]
fn audit_passed() {
    let report = pb::AuditReport {
        checks: vec![
            check(
                "chain_intact",
                true,
                "every event's keyed hash links to the one before",
                &[],
            ),
            check(
                "spent_within_budget",
                true,
                "no agent spent more than its budget",
                &[],
            ),
        ],
        events_checked: 5_310,
        overruns: vec!["agent dev: $0.004100 reported beyond reservations".into()],
        duration_ms: 38,
    };
    insta::assert_snapshot!(rendered(|out| audit::write_report(out, &report)));
}

#[test]
fn audit_failed() {
    let report = pb::AuditReport {
        checks: vec![
            check(
                "chain_intact",
                false,
                "the chain is broken",
                &["event seq 42: hash does not match its content"],
            ),
            check(
                "spent_within_budget",
                true,
                "no agent spent more than its budget",
                &[],
            ),
        ],
        events_checked: 120,
        overruns: vec![],
        duration_ms: 3,
    };
    insta::assert_snapshot!(rendered(|out| audit::write_report(out, &report)));
}

#[test]
fn doctor() {
    let lines = [
        doctor::line(true, "AEX_HOME", "/home/dev/.aex", ""),
        doctor::line(true, "control plane", "running (PID 4242)", ""),
        doctor::line(
            false,
            "provider local",
            "http://localhost:11434/v1 not reachable (connection refused)",
            "start the provider (e.g. `ollama serve`) or fix base_url in models.yaml",
        ),
    ];
    insta::assert_snapshot!(rendered(|out| doctor::write_lines(out, "0.1.0", &lines)));
}
