//! Agents: what one is, and every change to one as a pure decision — the new
//! record and the events that log it — so that each store backend only writes
//! what was decided (see `docs/ARCHITECTURE.md`, "Adding a store backend").

use crate::chain::token_mac;
use crate::event::{EventKind, NewEvent};
use serde_json::json;

crate::named::named_set! {
    /// What an agent may do. The names are the stored form.
    Scope {
        Execution => "execution",
        ReadOnly => "read-only",
    }
}

crate::named::named_set! {
    /// The names are the stored form.
    AgentState {
        Active => "active",
        Paused => "paused",
        Deleted => "deleted",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub streaming: bool,
    pub tools: bool,
    pub function_calling: bool,
    pub vision: bool,
}

impl Default for Caps {
    /// What an agent created without a word on capabilities may use:
    /// streaming, tools and function calling; vision only when asked for.
    fn default() -> Self {
        Self {
            streaming: true,
            tools: true,
            function_calling: true,
            vision: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub token_sha256: String,
    pub token_prefix: String,
    pub token_expires_at_ms: Option<i64>,
    pub token_ttl_seconds: i64,
    pub budget_micro: i64,
    pub spent_micro: i64,
    pub reserved_micro: i64,
    /// Provider-reported usage beyond reservations, never charged.
    pub overrun_micro: i64,
    pub rpm: u32,
    pub tpm: u64,
    pub max_concurrent: u32,
    pub allowed_models: Vec<String>,
    pub caps: Caps,
    pub scope: Scope,
    pub state: AgentState,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_activity_at_ms: Option<i64>,
    pub deleted_at_ms: Option<i64>,
}

impl AgentRecord {
    pub fn remaining_micro(&self) -> i64 {
        self.budget_micro - self.spent_micro - self.reserved_micro
    }
}

/// An agent's amounts as the store read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Funds {
    /// `budget - spent - reserved`.
    pub free_micro: i64,
    /// Not deleted: a deleted agent admits nothing new, though the calls
    /// its data planes already served are still recorded.
    pub live: bool,
}

#[derive(Debug, Clone)]
pub struct NewAgent {
    pub name: String,
    pub token_sha256: String,
    pub token_prefix: String,
    pub token_expires_at_ms: Option<i64>,
    pub token_ttl_seconds: i64,
    pub budget_micro: i64,
    pub rpm: u32,
    pub tpm: u64,
    pub max_concurrent: u32,
    pub allowed_models: Vec<String>,
    pub caps: Caps,
    pub scope: Scope,
}

impl NewAgent {
    /// An agent with `budget_micro` and no other limit: any model, the
    /// default capabilities, execution scope, a token that never expires.
    /// The caller sets the rest by struct update.
    pub fn new(name: &str, token_sha256: &str, budget_micro: i64) -> Self {
        Self {
            name: name.into(),
            token_sha256: token_sha256.into(),
            token_prefix: String::new(),
            token_expires_at_ms: None,
            token_ttl_seconds: 0,
            budget_micro,
            rpm: 0,
            tpm: 0,
            max_concurrent: 0,
            allowed_models: Vec::new(),
            caps: Caps::default(),
            scope: Scope::Execution,
        }
    }
}

/// Only the fields that are `Some` change.
#[derive(Debug, Clone, Default)]
pub struct AgentPatch {
    pub budget_micro: Option<i64>,
    pub top_up_micro: Option<i64>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u32>,
    pub allowed_models: Option<Vec<String>>,
    pub streaming: Option<bool>,
    pub tools: Option<bool>,
    pub function_calling: Option<bool>,
    pub vision: Option<bool>,
    pub scope: Option<Scope>,
}

impl AgentPatch {
    pub fn is_empty(&self) -> bool {
        self.budget_micro.is_none()
            && self.top_up_micro.is_none()
            && self.rpm.is_none()
            && self.tpm.is_none()
            && self.max_concurrent.is_none()
            && self.allowed_models.is_none()
            && self.streaming.is_none()
            && self.tools.is_none()
            && self.function_calling.is_none()
            && self.vision.is_none()
            && self.scope.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenChange {
    pub token_sha256: String,
    pub token_prefix: String,
    pub token_expires_at_ms: Option<i64>,
    pub token_ttl_seconds: i64,
}

/// A change refused because it would break an invariant of the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidChange(pub String);

/// What a store writes for one change: the agent's row as it is to be, and
/// the events that log the change, in order, in the same transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentWrite {
    pub agent: AgentRecord,
    pub events: Vec<NewEvent>,
}

/// A new agent, active, with nothing spent; `agent.created` carries every
/// setting and the commitment to its token, so the chain folds to its row.
pub fn create(id: String, n: NewAgent, now: i64, ledger_key: &[u8]) -> AgentWrite {
    let agent = AgentRecord {
        id,
        name: n.name,
        token_sha256: n.token_sha256,
        token_prefix: n.token_prefix,
        token_expires_at_ms: n.token_expires_at_ms,
        token_ttl_seconds: n.token_ttl_seconds,
        budget_micro: n.budget_micro,
        spent_micro: 0,
        reserved_micro: 0,
        overrun_micro: 0,
        rpm: n.rpm,
        tpm: n.tpm,
        max_concurrent: n.max_concurrent,
        allowed_models: n.allowed_models,
        caps: n.caps,
        scope: n.scope,
        state: AgentState::Active,
        created_at_ms: now,
        updated_at_ms: now,
        last_activity_at_ms: None,
        deleted_at_ms: None,
    };
    let details = json!({
        "rpm": agent.rpm, "tpm": agent.tpm, "max_concurrent": agent.max_concurrent,
        "allowed_models": agent.allowed_models, "scope": agent.scope.as_str(),
        "streaming": agent.caps.streaming, "tools": agent.caps.tools,
        "function_calling": agent.caps.function_calling, "vision": agent.caps.vision,
        "token_prefix": agent.token_prefix, "token_expires_at_ms": agent.token_expires_at_ms,
        "token_mac": token_mac(ledger_key, &agent.token_sha256),
        "token_ttl_seconds": agent.token_ttl_seconds,
    });
    let event = NewEvent::about(now, EventKind::AgentCreated, &agent.id, &agent.name)
        .amount(agent.budget_micro)
        .details(details);
    AgentWrite {
        agent,
        events: vec![event],
    }
}

/// Applies a patch, refusing what would break an invariant (a negative
/// budget, a budget below what was spent and what calls in flight may still
/// be charged, a top-up that adds nothing).
/// `None`: the patch changes nothing.
pub fn update(
    current: &AgentRecord,
    p: &AgentPatch,
    now: i64,
) -> Result<Option<AgentWrite>, InvalidChange> {
    let mut a = current.clone();
    let mut changed = serde_json::Map::new();
    let mut top_up = None;
    if let Some(b) = p.budget_micro {
        if b < 0 {
            return Err(InvalidChange("the budget cannot be negative".into()));
        }
        changed.insert(
            "budget_micro".into(),
            json!({"from": a.budget_micro, "to": b}),
        );
        a.budget_micro = b;
    }
    if let Some(t) = p.top_up_micro {
        if t <= 0 {
            return Err(InvalidChange("a top-up must add a positive amount".into()));
        }
        a.budget_micro = a
            .budget_micro
            .checked_add(t)
            .ok_or_else(|| InvalidChange("the budget would overflow".into()))?;
        top_up = Some(t);
    }
    if a.budget_micro < a.spent_micro {
        return Err(InvalidChange(format!(
            "a budget of {} µ is below what '{}' has already spent ({} µ)",
            a.budget_micro, a.name, a.spent_micro
        )));
    }
    // Calls in flight were admitted against the old budget and may be
    // charged up to their reservations: a budget below that would be
    // overspent by their settlements.
    let committed = a.spent_micro.saturating_add(a.reserved_micro);
    if a.budget_micro < committed {
        return Err(InvalidChange(format!(
            "a budget of {} µ is below what '{}' has spent ({} µ) plus what its calls in flight may \
             still be charged ({} µ): set at least {} µ, or lower it once they have settled \
             (`aexctl agent inspect {}` shows both)",
            a.budget_micro, a.name, a.spent_micro, a.reserved_micro, committed, a.name
        )));
    }
    macro_rules! set {
        ($field:ident, $target:expr) => {
            if let Some(v) = p.$field.clone() {
                changed.insert(stringify!($field).into(), json!({"from": $target, "to": v}));
                $target = v;
            }
        };
    }
    set!(rpm, a.rpm);
    set!(tpm, a.tpm);
    set!(max_concurrent, a.max_concurrent);
    set!(allowed_models, a.allowed_models);
    set!(streaming, a.caps.streaming);
    set!(tools, a.caps.tools);
    set!(function_calling, a.caps.function_calling);
    set!(vision, a.caps.vision);
    if let Some(s) = p.scope {
        changed.insert(
            "scope".into(),
            json!({"from": a.scope.as_str(), "to": s.as_str()}),
        );
        a.scope = s;
    }
    if changed.is_empty() && top_up.is_none() {
        return Ok(None);
    }
    a.updated_at_ms = now;
    // In the order they were applied (a new budget, then the top-up on it),
    // so the chain folds to the row. Older logs wrote the top-up first; the
    // audit's fold knows that order too.
    let mut events = Vec::new();
    if !changed.is_empty() {
        events.push(
            NewEvent::about(now, EventKind::AgentUpdated, &a.id, &a.name)
                .details(serde_json::Value::Object(changed)),
        );
    }
    if let Some(amount) = top_up {
        events.push(
            NewEvent::about(now, EventKind::AgentToppedUp, &a.id, &a.name)
                .amount(amount)
                .details(json!({"budget_micro": a.budget_micro, "order": "after_update"})),
        );
    }
    Ok(Some(AgentWrite { agent: a, events }))
}

/// A new token in place of the old one, committed to in the chain.
pub fn rotate_token(
    current: &AgentRecord,
    token: TokenChange,
    now: i64,
    ledger_key: &[u8],
) -> AgentWrite {
    let mut a = current.clone();
    let old_prefix = std::mem::replace(&mut a.token_prefix, token.token_prefix);
    a.token_sha256 = token.token_sha256;
    a.token_expires_at_ms = token.token_expires_at_ms;
    a.token_ttl_seconds = token.token_ttl_seconds;
    a.updated_at_ms = now;
    let details = json!({
        "old_token_prefix": old_prefix, "token_prefix": a.token_prefix,
        "token_expires_at_ms": a.token_expires_at_ms,
        "token_mac": token_mac(ledger_key, &a.token_sha256),
        "token_ttl_seconds": a.token_ttl_seconds,
    });
    let event = NewEvent::about(now, EventKind::AgentTokenRotated, &a.id, &a.name).details(details);
    AgentWrite {
        events: vec![event],
        agent: a,
    }
}

/// Pause or resume; `None` when the agent already is in that state.
/// (Deleting is [`delete`]: it is more than a state.)
pub fn set_state(current: &AgentRecord, state: AgentState, now: i64) -> Option<AgentWrite> {
    let kind = match state {
        AgentState::Active => EventKind::AgentResumed,
        AgentState::Paused => EventKind::AgentPaused,
        AgentState::Deleted => return Some(delete(current, now)),
    };
    if current.state == state {
        return None;
    }
    Some(paused_or_resumed(current, state, kind, now))
}

/// Paused by a kill order (`agent.killed`), logged even when it was paused.
pub fn kill(current: &AgentRecord, now: i64) -> AgentWrite {
    paused_or_resumed(current, AgentState::Paused, EventKind::AgentKilled, now)
}

fn paused_or_resumed(
    current: &AgentRecord,
    state: AgentState,
    kind: EventKind,
    now: i64,
) -> AgentWrite {
    let mut a = current.clone();
    a.state = state;
    a.updated_at_ms = now;
    AgentWrite {
        events: vec![NewEvent::about(now, kind, &a.id, &a.name)],
        agent: a,
    }
}

/// A tombstone: state `deleted`, its token unusable, its history kept.
pub fn delete(current: &AgentRecord, now: i64) -> AgentWrite {
    let mut a = current.clone();
    a.state = AgentState::Deleted;
    a.deleted_at_ms = Some(now);
    a.updated_at_ms = now;
    // Not a hex digest, so no presented token can ever hash to it; stays
    // unique per agent.
    a.token_sha256 = format!("revoked:{}", a.id);
    let details = json!({
        "budget_micro": a.budget_micro, "spent_micro": a.spent_micro,
        "reserved_micro": a.reserved_micro,
    });
    let event = NewEvent::about(now, EventKind::AgentDeleted, &a.id, &a.name).details(details);
    AgentWrite {
        events: vec![event],
        agent: a,
    }
}

/// The commitment to the token of an agent created before the chain
/// committed to tokens (see `docs/LEDGER.md`: trust on first use).
pub fn baseline(
    agent_id: &str,
    agent_name: &str,
    token_sha256: &str,
    now: i64,
    ledger_key: &[u8],
) -> NewEvent {
    NewEvent::about(now, EventKind::AgentBaseline, agent_id, agent_name)
        .reason("token_committed")
        .details(json!({"token_mac": token_mac(ledger_key, token_sha256)}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentRecord {
        create(
            "agt_1".into(),
            NewAgent {
                token_prefix: "aex_abc".into(),
                rpm: 60,
                ..NewAgent::new("dev", "h", 1_000)
            },
            1,
            &[7; 32],
        )
        .agent
    }

    #[test]
    fn an_update_logs_the_change_then_the_top_up() {
        let a = agent();
        let w = update(
            &a,
            &AgentPatch {
                budget_micro: Some(2_000),
                top_up_micro: Some(500),
                rpm: Some(10),
                ..Default::default()
            },
            5,
        )
        .unwrap()
        .unwrap();
        assert_eq!(w.agent.budget_micro, 2_500);
        assert_eq!(w.agent.rpm, 10);
        assert_eq!(w.agent.updated_at_ms, 5);
        let kinds: Vec<_> = w.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::AgentUpdated, EventKind::AgentToppedUp]);
        assert_eq!(w.events[1].amount_micro, 500);
        assert_eq!(w.events[0].details["rpm"], json!({"from": 60, "to": 10}));
    }

    #[test]
    fn a_budget_keeps_room_for_the_calls_in_flight() {
        let mut a = agent();
        a.spent_micro = 900;
        a.reserved_micro = 50;
        let to = |budget| {
            update(
                &a,
                &AgentPatch {
                    budget_micro: Some(budget),
                    ..Default::default()
                },
                2,
            )
        };
        let refused = to(949).unwrap_err().0;
        assert!(
            refused.contains("in flight") && refused.contains("950"),
            "{refused}"
        );
        assert_eq!(to(950).unwrap().unwrap().agent.budget_micro, 950);
    }

    #[test]
    fn invariants_are_kept() {
        let mut a = agent();
        a.spent_micro = 900;
        let refuse = |p: AgentPatch| update(&a, &p, 2).unwrap_err().0;
        assert!(
            refuse(AgentPatch {
                budget_micro: Some(899),
                ..Default::default()
            })
            .contains("already spent")
        );
        assert!(
            refuse(AgentPatch {
                top_up_micro: Some(0),
                ..Default::default()
            })
            .contains("positive")
        );
        assert!(
            refuse(AgentPatch {
                budget_micro: Some(-1),
                ..Default::default()
            })
            .contains("negative")
        );
        assert_eq!(update(&a, &AgentPatch::default(), 2), Ok(None));
    }

    #[test]
    fn state_changes_are_logged_once() {
        let a = agent();
        assert_eq!(set_state(&a, AgentState::Active, 2), None);
        let paused = set_state(&a, AgentState::Paused, 2).unwrap();
        assert_eq!(paused.events[0].kind, EventKind::AgentPaused);
        assert_eq!(set_state(&paused.agent, AgentState::Paused, 3), None);
        assert_eq!(
            kill(&paused.agent, 3).events[0].kind,
            EventKind::AgentKilled
        );
        let deleted = delete(&a, 4);
        assert_eq!(deleted.agent.token_sha256, "revoked:agt_1");
        assert_eq!(deleted.agent.deleted_at_ms, Some(4));
    }
}
