//! Data-plane credentials as folds of their events: `credential.issued`
//! opens one (its name, its agents, a commitment to its secret),
//! `credential.revoked` ends it. Audit compares every credential row with
//! the fold, so a scope widened, a secret swapped, a revocation undone or a
//! credential invented in the database — each a way to act for agents a
//! sidecar should not — is named.

use aex_core::chain::token_mac;
use aex_core::credential::CredentialRecord;
use aex_core::event::{EventKind, EventRecord};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Folded {
    name: String,
    agents: Vec<String>,
    secret_mac: String,
    revoked: bool,
}

#[derive(Debug, Default)]
pub struct CredentialFold {
    credentials: BTreeMap<String, Folded>,
    problems: Vec<String>,
}

impl CredentialFold {
    pub fn push(&mut self, e: &EventRecord) {
        let b = &e.body;
        let kind = EventKind::parse(&b.kind);
        if !matches!(
            kind,
            Some(EventKind::CredentialIssued | EventKind::CredentialRevoked)
        ) {
            return;
        }
        let details: Value = serde_json::from_str(&b.details_json).unwrap_or(Value::Null);
        let id = details["credential_id"].as_str().unwrap_or("").to_string();
        if kind == Some(EventKind::CredentialIssued) {
            let folded = Folded {
                name: details["credential"].as_str().unwrap_or("").to_string(),
                agents: details["agents"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|n| n.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                secret_mac: details["secret_mac"].as_str().unwrap_or("").to_string(),
                revoked: false,
            };
            if self.credentials.insert(id.clone(), folded).is_some() {
                self.problems
                    .push(format!("credential {id} is issued twice in the log"));
            }
            return;
        }
        match self.credentials.get_mut(&id) {
            Some(c) if !c.revoked => c.revoked = true,
            _ => self.problems.push(format!(
                "event seq {} revokes credential {id}, which was not live",
                b.seq
            )),
        }
    }

    /// Every credential row against the fold: the offenders.
    pub fn compare(&self, rows: &[CredentialRecord], ledger_key: &[u8]) -> Vec<String> {
        let mut offenders = self.problems.clone();
        let mut seen = std::collections::HashSet::new();
        for row in rows {
            seen.insert(row.id.as_str());
            let Some(f) = self.credentials.get(&row.id) else {
                offenders.push(format!(
                    "data-plane credential '{}' ({}) has a row but no credential.issued event",
                    row.name, row.id
                ));
                continue;
            };
            let stored = Folded {
                name: row.name.clone(),
                agents: row.agents.clone(),
                secret_mac: token_mac(ledger_key, &row.secret_sha256),
                revoked: row.is_revoked(),
            };
            if stored.secret_mac != f.secret_mac {
                offenders.push(format!(
                    "data-plane credential '{}' ({}): its stored secret is not the one issued",
                    row.name, row.id
                ));
            }
            if (&stored.name, &stored.agents, stored.revoked) != (&f.name, &f.agents, f.revoked) {
                offenders.push(format!(
                    "data-plane credential {}: the row says {} but its events say {}",
                    row.id,
                    describe(&stored),
                    describe(f)
                ));
            }
        }
        for (id, f) in &self.credentials {
            if !seen.contains(id.as_str()) {
                offenders.push(format!(
                    "data-plane credential '{}' ({id}) is in the log but its row was deleted",
                    f.name
                ));
            }
        }
        offenders
    }
}

fn describe(c: &Folded) -> String {
    format!(
        "'{}' serving [{}]{}",
        c.name,
        c.agents.join(", "),
        if c.revoked { ", revoked" } else { ", live" }
    )
}
