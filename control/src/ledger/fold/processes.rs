//! Supervised processes (`aexctl run`) as folds of their events. A running
//! process's token authenticates as its agent, so a process row invented
//! or given another token in the database is a way in: audit names it.

use super::token_mac;
use aex_core::event::{EventKind, EventRecord};
use aex_core::process::{ProcessRecord, ProcessState};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Folded {
    agent_id: String,
    command: String,
    host: String,
    /// None: started before the chain committed to process tokens.
    token_mac: Option<String>,
    state: String,
    ended_at_ms: Option<i64>,
    exit_code: Option<i64>,
    reason: String,
}

#[derive(Debug, Default)]
pub struct ProcessFold {
    processes: BTreeMap<String, Folded>,
    problems: Vec<String>,
}

impl ProcessFold {
    pub fn push(&mut self, e: &EventRecord) {
        let b = &e.body;
        let ended_state = match EventKind::parse(&b.kind) {
            Some(EventKind::ProcessStarted) => None,
            Some(EventKind::ProcessExited) => Some(ProcessState::Exited),
            Some(EventKind::ProcessKilled) => Some(ProcessState::Killed),
            Some(EventKind::ProcessLost) => Some(ProcessState::Lost),
            _ => return,
        };
        let details: Value = serde_json::from_str(&b.details_json).unwrap_or(Value::Null);
        let id = details["process_id"].as_str().unwrap_or("").to_string();
        let Some(state) = ended_state else {
            let folded = Folded {
                agent_id: b.agent_id.clone(),
                command: details["command"].as_str().unwrap_or("").to_string(),
                host: details["host"].as_str().unwrap_or("").to_string(),
                token_mac: details["token_mac"].as_str().map(str::to_string),
                state: ProcessState::Running.as_str().to_string(),
                ended_at_ms: None,
                exit_code: None,
                reason: String::new(),
            };
            if self.processes.insert(id.clone(), folded).is_some() {
                self.problems
                    .push(format!("process {id} is started twice in the log"));
            }
            return;
        };
        match self.processes.get_mut(&id) {
            Some(p) if p.state == ProcessState::Running.as_str() => {
                p.state = state.as_str().to_string();
                p.ended_at_ms = Some(b.ts_ms);
                p.exit_code = details["exit_code"].as_i64();
                p.reason = b.reason.clone();
            }
            _ => self.problems.push(format!(
                "event seq {} ({}) ends process {id}, which the log has not running",
                b.seq, b.kind
            )),
        }
    }

    /// Every process row against the fold: the offenders, named. The pid
    /// (set after the start, when the child is spawned) and a pending kill
    /// order are not logged and not compared.
    pub fn compare(&self, rows: &[ProcessRecord], ledger_key: &[u8]) -> Vec<String> {
        let mut offenders = self.problems.clone();
        for row in rows {
            let Some(f) = self.processes.get(&row.id) else {
                offenders.push(format!(
                    "process {} of agent '{}' ({}) has a row but no process.started event: invented (its token would authenticate as the agent)",
                    row.id, row.agent_name, row.state
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
            check("agent", row.agent_id.clone(), f.agent_id.clone());
            check("command", row.command.clone(), f.command.clone());
            check("host", row.host.clone(), f.host.clone());
            check("state", row.state.clone(), f.state.clone());
            check(
                "ended_at_ms",
                format!("{:?}", row.ended_at_ms),
                format!("{:?}", f.ended_at_ms),
            );
            check(
                "exit_code",
                format!("{:?}", row.exit_code.map(i64::from)),
                format!("{:?}", f.exit_code),
            );
            check("reason", row.reason.clone(), f.reason.clone());
            if let Some(mac) = &f.token_mac
                && token_mac(ledger_key, &row.token_sha256) != *mac
            {
                differs.push(
                    "its token is not the one the log issued: the token hash was replaced"
                        .to_string(),
                );
            }
            if !differs.is_empty() {
                offenders.push(format!("process {}: {}", row.id, differs.join("; ")));
            }
        }
        let with_rows: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.id.as_str()).collect();
        for (id, f) in &self.processes {
            if !with_rows.contains(id.as_str()) {
                offenders.push(format!(
                    "process {id} (agent id {}) is in the log but its row was deleted",
                    f.agent_id
                ));
            }
        }
        offenders
    }
}
