//! How agents are shown: the `--json` shape and the tables of `list` and
//! `inspect`.

use crate::output::{rfc3339, rfc3339_opt, table};
use aex_core::money::{usd, usd_with_micro};
use aex_proto::v1 as pb;
use serde_json::json;
use std::fmt::{self, Write};

pub(super) fn remaining(a: &pb::Agent) -> i64 {
    a.budget_micro - a.spent_micro - a.reserved_micro
}

pub(super) fn limit(n: u64) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

fn scope_text(a: &pb::Agent) -> &'static str {
    match a.scope() {
        pb::Scope::ReadOnly => "read-only",
        _ => "execution",
    }
}

fn state_text(a: &pb::Agent) -> &'static str {
    match a.state() {
        pb::AgentState::Paused => "paused",
        pb::AgentState::Deleted => "deleted",
        _ => "active",
    }
}

pub(super) fn models_text(a: &pb::Agent) -> String {
    if a.allowed_models.is_empty() {
        "all configured models".into()
    } else {
        a.allowed_models.join(", ")
    }
}

pub(super) fn caps_text(a: &pb::Agent) -> String {
    let c = a.capabilities.unwrap_or_default();
    let mark = |on: bool, name: &str| format!("{name} {}", if on { "on" } else { "off" });
    [
        mark(c.streaming, "streaming"),
        mark(c.tools, "tools"),
        mark(c.function_calling, "function-calling"),
        mark(c.vision, "vision"),
    ]
    .join(", ")
}

pub(super) fn expires(a: &pb::Agent) -> String {
    a.token_expires_at_ms
        .map(rfc3339)
        .unwrap_or_else(|| "never".into())
}

/// The number without a `$`, 6 decimals: table cells.
fn dollars(micro: i64) -> String {
    usd(micro).replacen('$', "", 1)
}

pub fn agent_json(a: &pb::Agent) -> serde_json::Value {
    let c = a.capabilities.unwrap_or_default();
    json!({
        "id": a.id,
        "name": a.name,
        "state": state_text(a),
        "scope": scope_text(a),
        "budget_micro": a.budget_micro,
        "spent_micro": a.spent_micro,
        "reserved_micro": a.reserved_micro,
        "overrun_micro": a.overrun_micro,
        "remaining_micro": remaining(a),
        "budget_usd": dollars(a.budget_micro),
        "spent_usd": dollars(a.spent_micro),
        "remaining_usd": dollars(remaining(a)),
        "rpm": a.rpm,
        "tpm": a.tpm,
        "max_concurrent": a.max_concurrent,
        "allowed_models": a.allowed_models,
        "capabilities": {
            "streaming": c.streaming,
            "tools": c.tools,
            "function_calling": c.function_calling,
            "vision": c.vision,
        },
        "token_prefix": a.token_prefix,
        "token_expires_at": rfc3339_opt(a.token_expires_at_ms),
        "created_at": rfc3339(a.created_at_ms),
        "updated_at": rfc3339(a.updated_at_ms),
        "last_activity_at": rfc3339_opt(a.last_activity_at_ms),
        "deleted_at": rfc3339_opt(a.deleted_at_ms),
        "open_grants": a.open_grants.iter().map(|g| json!({
            "grant_id": g.grant_id,
            "data_plane": g.data_plane,
            "budget_micro": g.budget_micro,
            "used_micro": g.used_micro,
            "requests": (g.requests > 0).then_some(g.requests),
            "requests_used": g.requests_used,
            "created_at": rfc3339(g.created_at_ms),
            "deadline": rfc3339(g.deadline_ms),
        })).collect::<Vec<_>>(),
    })
}

pub(in crate::commands) fn write_list(out: &mut impl Write, agents: &[pb::Agent]) -> fmt::Result {
    if agents.is_empty() {
        writeln!(
            out,
            "No agents. Create one with `aexctl agent create NAME BUDGET_USD RPM`."
        )?;
        return Ok(());
    }
    let mut t = table(&[
        "Name",
        "State",
        "Budget ($)",
        "Spent ($)",
        "Reserved ($)",
        "Remaining ($)",
        "RPM",
        "Scope",
        "Models",
        "Last Activity",
    ]);
    for a in agents {
        t.add_row(vec![
            a.name.clone(),
            state_text(a).to_string(),
            dollars(a.budget_micro),
            dollars(a.spent_micro),
            dollars(a.reserved_micro),
            dollars(remaining(a)),
            a.rpm.to_string(),
            scope_text(a).to_string(),
            if a.allowed_models.is_empty() {
                "all".into()
            } else {
                a.allowed_models.join(",")
            },
            a.last_activity_at_ms
                .map(rfc3339)
                .unwrap_or_else(|| "never".into()),
        ]);
    }
    writeln!(out, "AEX Agents")?;
    writeln!(out, "{t}")?;
    Ok(())
}

pub(in crate::commands) fn write_inspect(out: &mut impl Write, a: &pb::Agent) -> fmt::Result {
    let c = a.capabilities.unwrap_or_default();
    let tick = |on: bool| if on { "✅" } else { "❌" };
    writeln!(out, "Agent: {} ({})", a.name, state_text(a))?;
    writeln!(out, "  ID:          {}", a.id)?;
    writeln!(out, "  Budget:      {}", usd_with_micro(a.budget_micro))?;
    writeln!(out, "  Spent:       {}", usd_with_micro(a.spent_micro))?;
    writeln!(out, "  Reserved:    {}", usd_with_micro(a.reserved_micro))?;
    writeln!(out, "  Remaining:   {}", usd_with_micro(remaining(a)))?;
    if a.overrun_micro > 0 {
        writeln!(
            out,
            "  Overrun:     {}  (reported by providers beyond reservations; not charged, see `aexctl events --agent {}`)",
            aex_core::money::overrun_text(a.overrun_micro),
            a.name
        )?;
    }
    writeln!(out, "  RPM Limit:   {}", a.rpm)?;
    writeln!(out, "  TPM Limit:   {}", limit(a.tpm))?;
    writeln!(out, "  Concurrency: {}", limit(u64::from(a.max_concurrent)))?;
    writeln!(
        out,
        "  Last:        {}",
        a.last_activity_at_ms
            .map(rfc3339)
            .unwrap_or_else(|| "never".into())
    )?;
    writeln!(out)?;
    writeln!(out, "Capabilities:")?;
    writeln!(out, "  Streaming:        {}", tick(c.streaming))?;
    writeln!(out, "  Tools:            {}", tick(c.tools))?;
    writeln!(out, "  Function Calling: {}", tick(c.function_calling))?;
    writeln!(out, "  Vision:           {}", tick(c.vision))?;
    writeln!(out, "  Allowed Models:   {}", models_text(a))?;
    writeln!(out)?;
    writeln!(out, "Auth:")?;
    writeln!(out, "  Scope:        {}", scope_text(a))?;
    writeln!(
        out,
        "  Token:        {}… (prefix only; the token is never stored)",
        a.token_prefix
    )?;
    writeln!(out, "  Expires:      {}", expires(a))?;
    writeln!(out, "  Created:      {}", rfc3339(a.created_at_ms))?;
    if !a.open_grants.is_empty() {
        writeln!(out)?;
        writeln!(out, "Grants (held by data planes, docs/GRANTS.md):")?;
        for g in &a.open_grants {
            let requests = if g.requests > 0 {
                format!(", {} of {} requests", g.requests_used, g.requests)
            } else {
                String::new()
            };
            writeln!(
                out,
                "  {}: {} used of {}{requests}, until {}",
                g.data_plane,
                usd_with_micro(g.used_micro),
                usd_with_micro(g.budget_micro),
                rfc3339(g.deadline_ms)
            )?;
        }
    }
    Ok(())
}
