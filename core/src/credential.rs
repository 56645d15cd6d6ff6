//! Data-plane credentials scoped to the agents a data plane serves (docs/DEPLOY.md,
//! issue #31 finding 8). The fleet credential (`AEX_HOME/dataplane.token`)
//! serves every agent: a shared data plane on a laptop or a host. A sidecar
//! gets a scoped one (`aexctl dataplane credential create NAME --agents
//! a,b`), with which the control plane shows it only those agents (Watch)
//! and refuses to admit, settle, heartbeat or report for any other: a
//! compromised sidecar can spend only what its own agents could.
//!
//! A scope names agents, not agent ids: deleting an agent and creating it
//! again under its name keeps its sidecar working, as an operator expects of
//! a Kubernetes Secret that names the agent. Only an admin creates agents,
//! so a name cannot be taken over by the sidecar itself.

use crate::agent::InvalidChange;
use crate::chain::token_mac;
use crate::denial::{DenialCode, Rule};
use crate::event::{EventKind, NewEvent};
use crate::policy::Denial;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;

/// What a scoped credential looks like (`aexsc_…`): told apart at a glance
/// from the fleet credential (`aexdp_…`) and agent tokens (`aex_…`).
pub const SECRET_KIND: &str = "sc";

/// A scope is checked on every call; past this many agents an operator
/// wants the fleet credential (or, with groups, a group), not a list.
pub const MAX_AGENTS: usize = 256;

/// One scoped credential as stored. The secret itself is shown once, when
/// issued; the store keeps its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub name: String,
    pub secret_sha256: String,
    /// The first characters of the secret, to tell credentials apart.
    pub secret_prefix: String,
    /// The agents it serves, by name: sorted, each once.
    pub agents: Vec<String>,
    pub created_at_ms: i64,
    /// Set once, when revoked; a revoked credential serves nothing.
    pub revoked_at_ms: Option<i64>,
}

impl CredentialRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }
}

/// What a store writes for one change: the row as it is to be and the
/// events that log it, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialWrite {
    pub credential: CredentialRecord,
    pub events: Vec<NewEvent>,
}

/// A new credential for `agents` (names, already known to exist). The event
/// commits to the secret under the ledger key, as agent events commit to
/// tokens: an edit of the stored hash is named by audit.
pub fn issue(
    id: String,
    name: String,
    agents: &[String],
    secret_sha256: String,
    secret_prefix: String,
    now: i64,
    ledger_key: &[u8],
) -> Result<CredentialWrite, InvalidChange> {
    let agents: Vec<String> = agents
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if agents.is_empty() {
        return Err(InvalidChange(
            "a data-plane credential serves at least one agent: name them with --agents a,b \
             (a data plane serving every agent uses AEX_HOME/dataplane.token)"
                .into(),
        ));
    }
    if agents.len() > MAX_AGENTS {
        return Err(InvalidChange(format!(
            "{} agents named; a credential serves at most {MAX_AGENTS} (a data plane serving more \
             uses AEX_HOME/dataplane.token)",
            agents.len()
        )));
    }
    let credential = CredentialRecord {
        id,
        name,
        secret_sha256,
        secret_prefix,
        agents,
        created_at_ms: now,
        revoked_at_ms: None,
    };
    let event = NewEvent::ledger(
        now,
        EventKind::CredentialIssued,
        "",
        json!({
            "credential": credential.name,
            "credential_id": credential.id,
            "agents": credential.agents,
            "secret_mac": token_mac(ledger_key, &credential.secret_sha256),
        }),
    );
    Ok(CredentialWrite {
        credential,
        events: vec![event],
    })
}

/// Revokes `c`; `None` when it is revoked already (nothing to write).
pub fn revoke(c: &CredentialRecord, now: i64) -> Option<CredentialWrite> {
    if c.is_revoked() {
        return None;
    }
    let credential = CredentialRecord {
        revoked_at_ms: Some(now),
        ..c.clone()
    };
    let event = NewEvent::ledger(
        now,
        EventKind::CredentialRevoked,
        "",
        json!({"credential": c.name, "credential_id": c.id}),
    );
    Some(CredentialWrite {
        credential,
        events: vec![event],
    })
}

/// Which agents the data plane behind one RPC may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The fleet credential: every agent.
    Every,
    /// A scoped credential: these agents (by name) only.
    Agents {
        credential: String,
        names: Arc<BTreeSet<String>>,
    },
}

impl Served {
    pub fn scoped(c: &CredentialRecord) -> Self {
        Served::Agents {
            credential: c.name.clone(),
            names: Arc::new(c.agents.iter().cloned().collect()),
        }
    }

    pub fn serves(&self, agent_name: &str) -> bool {
        match self {
            Served::Every => true,
            Served::Agents { names, .. } => names.contains(agent_name),
        }
    }

    /// The credential's name, for logs and events (empty: the fleet one).
    pub fn credential(&self) -> &str {
        match self {
            Served::Every => "",
            Served::Agents { credential, .. } => credential,
        }
    }

    /// `Ok` when this data plane may act for `agent_name`; else the denial
    /// its client gets. The agent is named (the client holds its token);
    /// the agents the credential does serve are not.
    pub fn check(&self, agent_name: &str) -> Result<(), Denial> {
        if self.serves(agent_name) {
            return Ok(());
        }
        Err(Denial::forbidden(
            DenialCode::AgentNotServed,
            Rule::DataPlane,
            format!(
                "This data plane does not serve agent '{agent_name}': its credential '{}' is scoped \
                 to other agents. Call through agent '{agent_name}''s own data plane, or have an admin \
                 issue this data plane a credential that names it (`aexctl dataplane credential create`).",
                self.credential()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(agents: &[&str]) -> Result<CredentialWrite, InvalidChange> {
        let agents: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
        issue(
            "dpc_1".into(),
            "pod-a".into(),
            &agents,
            "ab".repeat(32),
            "aexsc_12".into(),
            1_000,
            b"key",
        )
    }

    #[test]
    fn a_scope_is_sorted_unique_and_never_empty() {
        let w = issued(&["b", " a", "b", ""]).unwrap();
        assert_eq!(w.credential.agents, ["a", "b"]);
        assert_eq!(w.events.len(), 1);
        assert_eq!(w.events[0].kind, EventKind::CredentialIssued);
        assert_eq!(w.events[0].agent_id, "", "a ledger event, of no one agent");
        let mac = w.events[0].details["secret_mac"].as_str().unwrap();
        assert_eq!(mac, token_mac(b"key", &"ab".repeat(32)));
        assert!(issued(&[" ", ""]).unwrap_err().0.contains("--agents"));
        let many: Vec<String> = (0..=MAX_AGENTS).map(|i| format!("a{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(issued(&refs).unwrap_err().0.contains("at most"));
    }

    #[test]
    fn revoked_once() {
        let c = issued(&["a"]).unwrap().credential;
        let r = revoke(&c, 2_000).unwrap();
        assert_eq!(r.credential.revoked_at_ms, Some(2_000));
        assert_eq!(r.events[0].kind, EventKind::CredentialRevoked);
        assert!(revoke(&r.credential, 3_000).is_none());
    }

    #[test]
    fn a_scoped_credential_serves_its_agents_only() {
        let c = issued(&["a", "b"]).unwrap().credential;
        let served = Served::scoped(&c);
        assert!(served.check("a").is_ok() && served.check("b").is_ok());
        let d = served.check("c").unwrap_err();
        assert_eq!(d.http_status, 403);
        assert_eq!(d.denied_by, Rule::DataPlane);
        assert_eq!(d.code, DenialCode::AgentNotServed);
        assert!(d.message.contains("'c'") && d.message.contains("'pod-a'"));
        assert!(!d.message.contains("'a'"), "the scope is not disclosed");
        assert!(Served::Every.check("anyone").is_ok());
    }
}
