//! Grants as folds of their events: `grant.issued` opens one, every `admit`
//! naming it takes its amount (and a request credit) from it,
//! `grant.returned` or `grant.expired` ends it; an `admit` reported late
//! takes its amount from an expired one, and back from its charge. Audit compares every grant
//! row with the fold, so a grant invented, enlarged, reopened or deleted in
//! the database — each a way to admit calls past a budget — is named.

use aex_core::event::{EventKind, EventRecord};
use aex_core::grant::{GrantRecord, GrantState};
use aex_core::grant::{LATE, UNCHARGED};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Folded {
    agent_id: String,
    data_plane: String,
    budget_micro: i64,
    used_micro: i64,
    requests: Option<i64>,
    requests_used: i64,
    deadline_ms: i64,
    state: GrantState,
    charged_micro: i64,
}

#[derive(Debug, Default)]
pub struct GrantFold {
    grants: BTreeMap<String, Folded>,
    problems: Vec<String>,
}

impl GrantFold {
    pub fn push(&mut self, e: &EventRecord) {
        let b = &e.body;
        let kind = EventKind::parse(&b.kind);
        let id = &b.reservation_id;
        match kind {
            Some(EventKind::GrantIssued) => {
                let details: Value = serde_json::from_str(&b.details_json).unwrap_or(Value::Null);
                let folded = Folded {
                    agent_id: b.agent_id.clone(),
                    data_plane: details["data_plane"].as_str().unwrap_or("").to_string(),
                    budget_micro: b.amount_micro,
                    used_micro: 0,
                    requests: details["requests"].as_i64(),
                    requests_used: 0,
                    deadline_ms: details["deadline_ms"].as_i64().unwrap_or(0),
                    state: GrantState::Open,
                    charged_micro: 0,
                };
                if self.grants.insert(id.clone(), folded).is_some() {
                    self.problems
                        .push(format!("grant {id} is issued twice in the log"));
                }
            }
            Some(EventKind::Admit) => {
                // Most admits are central: only those naming a grant count.
                if !b.details_json.contains("\"grant\"") {
                    return;
                }
                let details: Value = serde_json::from_str(&b.details_json).unwrap_or(Value::Null);
                let Some(grant) = details["grant"].as_str() else {
                    return;
                };
                // A call reported after its grant expired says so, and what
                // it took back from the expiry's charge
                // (`aex_core::grant::GrantRecord::carved`).
                let late = details[LATE].as_bool() == Some(true);
                let expected = if late {
                    GrantState::Expired
                } else {
                    GrantState::Open
                };
                match self.grants.get_mut(grant) {
                    Some(g) if g.state == expected && g.agent_id == b.agent_id => {
                        g.used_micro = g.used_micro.saturating_add(b.amount_micro);
                        g.requests_used += 1;
                        if late {
                            let uncharged = details[UNCHARGED].as_i64().unwrap_or(0);
                            g.charged_micro -= uncharged;
                            if uncharged < 0 || uncharged > b.amount_micro || g.charged_micro < 0
                            {
                                self.problems.push(format!(
                                    "event seq {} takes {uncharged} µ back from grant {grant}'s expiry charge, more than the call or the charge",
                                    b.seq
                                ));
                            }
                        }
                        if g.used_micro > g.budget_micro {
                            self.problems.push(format!(
                                "grant {grant}: calls admitted from it reserve {} µ, more than its {} µ",
                                g.used_micro, g.budget_micro
                            ));
                        }
                    }
                    _ => self.problems.push(format!(
                        "event seq {} admits reservation {} from grant {grant}, which was not {} for its agent",
                        b.seq,
                        b.reservation_id,
                        expected.as_str()
                    )),
                }
            }
            Some(EventKind::GrantReturned | EventKind::GrantExpired) => {
                let state = if kind == Some(EventKind::GrantReturned) {
                    GrantState::Returned
                } else {
                    GrantState::Expired
                };
                match self.grants.get_mut(id) {
                    Some(g) if g.state == GrantState::Open => {
                        g.state = state;
                        if state == GrantState::Expired {
                            g.charged_micro = b.amount_micro;
                        }
                    }
                    _ => self.problems.push(format!(
                        "event seq {} ends grant {id}, which was not open",
                        b.seq
                    )),
                }
            }
            _ => {}
        }
    }

    /// Every grant row against the fold: the offenders.
    pub fn compare(&self, rows: &[GrantRecord]) -> Vec<String> {
        let mut offenders = self.problems.clone();
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            seen.insert(row.id.as_str());
            let Some(f) = self.grants.get(&row.id) else {
                offenders.push(format!(
                    "grant {} has a row but no grant.issued event",
                    row.id
                ));
                continue;
            };
            let stored = Folded {
                agent_id: row.agent_id.clone(),
                data_plane: row.data_plane.clone(),
                budget_micro: row.budget_micro,
                used_micro: row.used_micro,
                requests: row.requests.map(i64::from),
                requests_used: i64::from(row.requests_used),
                deadline_ms: row.deadline_ms,
                state: row.state,
                charged_micro: row.charged_micro,
            };
            if &stored != f {
                offenders.push(format!(
                    "grant {}: the row says {} but its events say {}",
                    row.id,
                    describe(&stored),
                    describe(f)
                ));
            }
        }
        for id in self.grants.keys() {
            if !seen.contains(id.as_str()) {
                offenders.push(format!("grant {id} is in the log but its row was deleted"));
            }
        }
        offenders
    }
}

fn describe(g: &Folded) -> String {
    format!(
        "{} of agent {} for {} ({} µ, {} µ used, requests {:?}/{}, deadline {}, {} µ charged)",
        g.state.as_str(),
        g.agent_id,
        g.data_plane,
        g.budget_micro,
        g.used_micro,
        g.requests,
        g.requests_used,
        g.deadline_ms,
        g.charged_micro
    )
}
