//! Agents as folds of their events. Audit replays every `agent.*` event
//! and compares what the chain says each agent is with its row, so a budget
//! raised, a token swapped, an agent renamed, a policy or a state changed in
//! the database without `ledger.key` is named. Pure: events in, offenders out.

use super::token_mac;
use aex_core::agent::AgentRecord;
use aex_core::event::{EventKind, EventRecord};
use serde_json::Value;
use std::collections::HashMap;

/// What the chain says an agent is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Folded {
    name: String,
    budget_micro: i64,
    rpm: i64,
    tpm: i64,
    max_concurrent: i64,
    allowed_models: Vec<String>,
    streaming: bool,
    tools: bool,
    function_calling: bool,
    vision: bool,
    scope: String,
    state: &'static str,
    /// None: created before the chain committed to tokens (not compared).
    token_mac: Option<String>,
    token_expires_at_ms: Option<i64>,
    /// The previous event's kind, seq and time, for the legacy top-up order.
    last: (String, i64, i64),
    /// Whether the last top-up came from a log that wrote it before its update.
    legacy_top_up: bool,
}

#[derive(Debug, Default)]
pub struct AgentFold {
    agents: HashMap<String, Folded>,
    problems: Vec<String>,
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

impl AgentFold {
    pub fn push(&mut self, e: &EventRecord) {
        let b = &e.body;
        let Some(kind) = EventKind::parse(&b.kind).filter(|k| k.as_str().starts_with("agent."))
        else {
            return;
        };
        let details: Value = serde_json::from_str(&b.details_json).unwrap_or(Value::Null);
        if kind == EventKind::AgentCreated {
            let folded = Folded {
                name: b.agent_name.clone(),
                budget_micro: b.amount_micro,
                rpm: int(&details["rpm"]),
                tpm: int(&details["tpm"]),
                max_concurrent: int(&details["max_concurrent"]),
                allowed_models: serde_json::from_value(details["allowed_models"].clone())
                    .unwrap_or_default(),
                streaming: details["streaming"].as_bool().unwrap_or(false),
                tools: details["tools"].as_bool().unwrap_or(false),
                function_calling: details["function_calling"].as_bool().unwrap_or(false),
                vision: details["vision"].as_bool().unwrap_or(false),
                scope: details["scope"].as_str().unwrap_or("").to_string(),
                state: "active",
                token_mac: details["token_mac"].as_str().map(str::to_string),
                token_expires_at_ms: details["token_expires_at_ms"].as_i64(),
                last: (b.kind.clone(), b.seq, b.ts_ms),
                legacy_top_up: false,
            };
            if self.agents.insert(b.agent_id.clone(), folded).is_some() {
                self.problems.push(format!(
                    "agent id {} is created twice in the log",
                    b.agent_id
                ));
            }
            return;
        }
        let Some(a) = self.agents.get_mut(&b.agent_id) else {
            self.problems.push(format!(
                "event seq {} ({}) is for agent id {}, which the log never created",
                b.seq, b.kind, b.agent_id
            ));
            return;
        };
        match kind {
            EventKind::AgentToppedUp => {
                a.budget_micro = int(&details["budget_micro"]);
                a.legacy_top_up = details.get("order").is_none();
            }
            EventKind::AgentUpdated => {
                let to = |field: &str| details.get(field).map(|c| &c["to"]);
                // Older logs wrote a combined top-up before its update; the
                // top-up's total is then the final budget.
                let after_legacy_top_up = a.legacy_top_up
                    && a.last.0 == EventKind::AgentToppedUp.as_str()
                    && a.last.1 + 1 == b.seq
                    && a.last.2 == b.ts_ms;
                if let Some(v) = to("budget_micro")
                    && !after_legacy_top_up
                {
                    a.budget_micro = int(v);
                }
                if let Some(v) = to("rpm") {
                    a.rpm = int(v);
                }
                if let Some(v) = to("tpm") {
                    a.tpm = int(v);
                }
                if let Some(v) = to("max_concurrent") {
                    a.max_concurrent = int(v);
                }
                if let Some(v) = to("allowed_models") {
                    a.allowed_models = serde_json::from_value(v.clone()).unwrap_or_default();
                }
                for (field, target) in [
                    ("streaming", &mut a.streaming),
                    ("tools", &mut a.tools),
                    ("function_calling", &mut a.function_calling),
                    ("vision", &mut a.vision),
                ] {
                    if let Some(v) = to(field).and_then(Value::as_bool) {
                        *target = v;
                    }
                }
                if let Some(v) = to("scope").and_then(Value::as_str) {
                    a.scope = v.to_string();
                }
            }
            // `agent.baseline`: the chain's first commitment to the token of
            // an agent created before tokens were committed (written once at
            // start, see `storage/sqlite/baseline.rs`).
            EventKind::AgentTokenRotated | EventKind::AgentBaseline => {
                a.token_mac = details["token_mac"].as_str().map(str::to_string);
                a.token_expires_at_ms = details["token_expires_at_ms"].as_i64();
            }
            EventKind::AgentPaused | EventKind::AgentKilled => a.state = "paused",
            EventKind::AgentResumed => a.state = "active",
            EventKind::AgentDeleted => a.state = "deleted",
            _ => {}
        }
        a.last = (b.kind.clone(), b.seq, b.ts_ms);
    }

    /// Every row against the chain's fold: the offenders, named.
    pub fn compare(&self, rows: &[AgentRecord], ledger_key: &[u8]) -> Vec<String> {
        let mut offenders = self.problems.clone();
        for row in rows {
            let Some(f) = self.agents.get(&row.id) else {
                offenders.push(format!(
                    "agent '{}' (id {}) has a row but no agent.created event: invented",
                    row.name, row.id
                ));
                continue;
            };
            let mut differs = Vec::new();
            let mut check = |what: &str, row_value: String, log_value: String| {
                if row_value != log_value {
                    differs.push(format!(
                        "{what} is {row_value} but the log says {log_value}"
                    ));
                }
            };
            check("name", row.name.clone(), f.name.clone());
            check(
                "budget_micro",
                row.budget_micro.to_string(),
                f.budget_micro.to_string(),
            );
            check("rpm", row.rpm.to_string(), f.rpm.to_string());
            check("tpm", row.tpm.to_string(), f.tpm.to_string());
            check(
                "max_concurrent",
                row.max_concurrent.to_string(),
                f.max_concurrent.to_string(),
            );
            check(
                "allowed_models",
                format!("{:?}", row.allowed_models),
                format!("{:?}", f.allowed_models),
            );
            let logged_caps = aex_core::agent::Caps {
                streaming: f.streaming,
                tools: f.tools,
                function_calling: f.function_calling,
                vision: f.vision,
            };
            if row.caps != logged_caps {
                check(
                    "capabilities",
                    format!("{:?}", row.caps),
                    format!("{logged_caps:?}"),
                );
            }
            check("scope", row.scope.as_str().to_string(), f.scope.clone());
            check("state", row.state.as_str().to_string(), f.state.to_string());
            check(
                "token_expires_at_ms",
                format!("{:?}", row.token_expires_at_ms),
                format!("{:?}", f.token_expires_at_ms),
            );
            if f.state == "deleted" {
                if row.token_sha256 != format!("revoked:{}", row.id) {
                    differs.push("the token of a deleted agent was restored".to_string());
                }
            } else if let Some(mac) = &f.token_mac
                && token_mac(ledger_key, &row.token_sha256) != *mac
            {
                differs.push(
                    "its token is not the one the log issued: the token hash was replaced"
                        .to_string(),
                );
            }
            if !differs.is_empty() {
                offenders.push(format!("agent '{}': {}", row.name, differs.join("; ")));
            }
        }
        let with_rows: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.id.as_str()).collect();
        for (id, f) in &self.agents {
            if !with_rows.contains(id.as_str()) {
                offenders.push(format!(
                    "agent '{}' (id {id}) is in the log but its row was deleted",
                    f.name
                ));
            }
        }
        offenders.sort();
        offenders
    }
}
