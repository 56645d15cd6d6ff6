//! Wire ⇄ domain conversions that both planes need: the control plane
//! reading what a data plane sent, and a data plane running the same
//! admission plan as the control plane (`aex_core::policy`) on what the
//! watch stream told it.

use crate::v1 as pb;
use aex_core::agent::{AgentState, Caps, Scope};
use aex_core::config::Model;
use aex_core::grant::GrantRefusal;
use aex_core::money::Pricing;
use aex_core::policy::{Caller, Endpoint};
use aex_core::reservation::Outcome;

/// The policy's endpoint; `None` for "unspecified".
pub fn endpoint_from_pb(e: pb::Endpoint) -> Option<Endpoint> {
    Some(match e {
        pb::Endpoint::ChatCompletions => Endpoint::ChatCompletions,
        pb::Endpoint::Responses => Endpoint::Responses,
        pb::Endpoint::Embeddings => Endpoint::Embeddings,
        pb::Endpoint::Completions => Endpoint::Completions,
        pb::Endpoint::Models => Endpoint::Models,
        pb::Endpoint::Messages => Endpoint::Messages,
        pb::Endpoint::CountTokens => Endpoint::CountTokens,
        pb::Endpoint::Unspecified => return None,
    })
}

/// How a call ended; "unspecified" (a data plane older than the field)
/// reads as completed.
pub fn outcome_from_pb(o: pb::SettleOutcome) -> Outcome {
    match o {
        pb::SettleOutcome::Completed | pb::SettleOutcome::Unspecified => Outcome::Completed,
        pb::SettleOutcome::UpstreamError => Outcome::UpstreamError,
        pb::SettleOutcome::UpstreamTimeout => Outcome::UpstreamTimeout,
        pb::SettleOutcome::UpstreamRateLimited => Outcome::UpstreamRateLimited,
        pb::SettleOutcome::ClientDisconnected => Outcome::ClientDisconnected,
        pb::SettleOutcome::CutOff => Outcome::CutOff,
        pb::SettleOutcome::UpstreamRejected => Outcome::UpstreamRejected,
    }
}

pub fn outcome_to_pb(o: Outcome) -> pb::SettleOutcome {
    match o {
        Outcome::Completed => pb::SettleOutcome::Completed,
        Outcome::UpstreamError => pb::SettleOutcome::UpstreamError,
        Outcome::UpstreamTimeout => pb::SettleOutcome::UpstreamTimeout,
        Outcome::UpstreamRateLimited => pb::SettleOutcome::UpstreamRateLimited,
        Outcome::ClientDisconnected => pb::SettleOutcome::ClientDisconnected,
        Outcome::CutOff => pb::SettleOutcome::CutOff,
        Outcome::UpstreamRejected => pb::SettleOutcome::UpstreamRejected,
    }
}

pub fn refusal_to_pb(r: GrantRefusal) -> pb::GrantRefusal {
    match r {
        GrantRefusal::BudgetEdge => pb::GrantRefusal::BudgetEdge,
        GrantRefusal::RpmEdge => pb::GrantRefusal::RpmEdge,
        GrantRefusal::Invalid => pb::GrantRefusal::Invalid,
        GrantRefusal::Limits => pb::GrantRefusal::Limits,
        GrantRefusal::NotAdmissible => pb::GrantRefusal::NotAdmissible,
        GrantRefusal::Recalled => pb::GrantRefusal::Recalled,
    }
}

/// Why a grant was refused; from an older control plane that sent only
/// the name, by the name. `None`: a reason this data plane does not know.
pub fn refusal_from_pb(r: &pb::GrantRefused) -> Option<GrantRefusal> {
    Some(match r.why() {
        pb::GrantRefusal::BudgetEdge => GrantRefusal::BudgetEdge,
        pb::GrantRefusal::RpmEdge => GrantRefusal::RpmEdge,
        pb::GrantRefusal::Invalid => GrantRefusal::Invalid,
        pb::GrantRefusal::Limits => GrantRefusal::Limits,
        pb::GrantRefusal::NotAdmissible => GrantRefusal::NotAdmissible,
        pb::GrantRefusal::Recalled => GrantRefusal::Recalled,
        pb::GrantRefusal::Unspecified => return GrantRefusal::parse(&r.reason),
    })
}

/// `None` for "unspecified" (keep / use the default).
pub fn scope_from_pb(s: pb::Scope) -> Option<Scope> {
    match s {
        pb::Scope::Unspecified => None,
        pb::Scope::Execution => Some(Scope::Execution),
        pb::Scope::ReadOnly => Some(Scope::ReadOnly),
    }
}

pub fn state_from_pb(s: pb::AgentState) -> Option<AgentState> {
    match s {
        pb::AgentState::Unspecified => None,
        pb::AgentState::Active => Some(AgentState::Active),
        pb::AgentState::Paused => Some(AgentState::Paused),
        pb::AgentState::Deleted => Some(AgentState::Deleted),
    }
}

pub fn caps_from_pb(c: Option<&pb::Capabilities>) -> Caps {
    let c = c.cloned().unwrap_or_default();
    Caps {
        streaming: c.streaming,
        tools: c.tools,
        function_calling: c.function_calling,
        vision: c.vision,
    }
}

/// The caller a policy names, or `None` when its state or scope is one
/// this build does not know (the data plane then leaves it to the control
/// plane).
pub fn caller_from_pb(p: &pb::AgentPolicy) -> Option<Caller<'_>> {
    Some(Caller {
        name: &p.name,
        state: state_from_pb(p.state())?,
        token_expires_at_ms: p.token_expires_at_ms,
        scope: scope_from_pb(p.scope())?,
        allowed_models: &p.allowed_models,
        caps: caps_from_pb(p.capabilities.as_ref()),
    })
}

/// Prices as the wire carries them: cache prices a peer older than them
/// leaves out are the input price, as that peer charged them.
pub fn pricing_from_pb(
    input: i64,
    output: i64,
    cached_input: Option<i64>,
    cache_write: Option<i64>,
) -> Pricing {
    Pricing::with_optional_cache(input, output, cached_input, cache_write)
}

pub fn model_from_pb(m: &pb::Model) -> Model {
    Model {
        name: m.name.clone(),
        provider: m.provider.clone(),
        provider_model: m.provider_model.clone(),
        pricing: pricing_from_pb(
            m.input_pico_per_token,
            m.output_pico_per_token,
            m.cached_input_pico_per_token,
            m.cache_write_pico_per_token,
        ),
        max_tokens: m.max_tokens,
        max_tokens_per_minute: m.max_tokens_per_minute,
        max_input_tokens: m.max_input_tokens,
        reasoning: m.reasoning,
        tools: m.tools,
        vision: m.vision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_refusals_cross_the_wire_unchanged() {
        for &o in Outcome::ALL {
            assert_eq!(outcome_from_pb(outcome_to_pb(o)), o);
        }
        for &why in GrantRefusal::ALL {
            let sent = pb::GrantRefused {
                reason: why.as_str().into(),
                why: refusal_to_pb(why) as i32,
                ..Default::default()
            };
            assert_eq!(refusal_from_pb(&sent), Some(why));
            // From a control plane older than the enum: by name.
            let old = pb::GrantRefused { why: 0, ..sent };
            assert_eq!(refusal_from_pb(&old), Some(why));
        }
        let unknown = pb::GrantRefused {
            reason: "a_newer_reason".into(),
            ..Default::default()
        };
        assert_eq!(refusal_from_pb(&unknown), None);
    }
}
