//! Domain ⇄ protobuf conversions, in one place.

use crate::storage::{AgentRecord, AgentState, EventRecord, Scope};
use aex_core::chain::EventBody;
use aex_core::config::{ModelsConfig, ProviderKind};
pub use aex_proto::convert::scope_from_pb;
use aex_proto::v1 as pb;

pub fn scope_to_pb(s: Scope) -> pb::Scope {
    match s {
        Scope::Execution => pb::Scope::Execution,
        Scope::ReadOnly => pb::Scope::ReadOnly,
    }
}

pub fn state_to_pb(s: AgentState) -> pb::AgentState {
    match s {
        AgentState::Active => pb::AgentState::Active,
        AgentState::Paused => pb::AgentState::Paused,
        AgentState::Deleted => pb::AgentState::Deleted,
    }
}

pub fn agent_to_pb(a: &AgentRecord) -> pb::Agent {
    pb::Agent {
        id: a.id.clone(),
        name: a.name.clone(),
        budget_micro: a.budget_micro,
        spent_micro: a.spent_micro,
        overrun_micro: a.overrun_micro,
        reserved_micro: a.reserved_micro,
        rpm: a.rpm,
        tpm: a.tpm,
        max_concurrent: a.max_concurrent,
        allowed_models: a.allowed_models.clone(),
        capabilities: Some(pb::Capabilities {
            streaming: a.caps.streaming,
            tools: a.caps.tools,
            function_calling: a.caps.function_calling,
            vision: a.caps.vision,
        }),
        scope: scope_to_pb(a.scope) as i32,
        state: state_to_pb(a.state) as i32,
        token_prefix: a.token_prefix.clone(),
        token_expires_at_ms: a.token_expires_at_ms,
        created_at_ms: a.created_at_ms,
        updated_at_ms: a.updated_at_ms,
        last_activity_at_ms: a.last_activity_at_ms,
        deleted_at_ms: a.deleted_at_ms,
        open_grants: Vec::new(),
    }
}

pub fn models_to_pb(c: &ModelsConfig, loaded_at_ms: i64) -> pb::ModelConfig {
    pb::ModelConfig {
        providers: c
            .providers
            .values()
            .map(|p| {
                let (kind, base_url, simulated) = match &p.kind {
                    ProviderKind::OpenAiCompatible { base_url } => {
                        (pb::ProviderType::OpenaiCompatible, base_url.clone(), None)
                    }
                    ProviderKind::Anthropic { base_url } => {
                        (pb::ProviderType::Anthropic, base_url.clone(), None)
                    }
                    ProviderKind::Simulated(s) => (
                        pb::ProviderType::Simulated,
                        String::new(),
                        Some(pb::SimulatedProvider {
                            latency_ms: s.latency_ms,
                            tokens_per_second: s.tokens_per_second,
                            completion_tokens: s.completion_tokens,
                        }),
                    ),
                };
                pb::Provider {
                    name: p.name.clone(),
                    r#type: kind as i32,
                    base_url,
                    api_key_env: p.api_key_env.clone(),
                    simulated,
                    forward_headers: p.forward_headers.clone(),
                }
            })
            .collect(),
        models: c
            .models
            .values()
            .map(|m| pb::Model {
                name: m.name.clone(),
                provider: m.provider.clone(),
                provider_model: m.provider_model.clone(),
                input_pico_per_token: m.pricing.input_pico_per_token,
                output_pico_per_token: m.pricing.output_pico_per_token,
                cached_input_pico_per_token: Some(m.pricing.cached_input_pico_per_token),
                cache_write_pico_per_token: Some(m.pricing.cache_write_pico_per_token),
                max_tokens: m.max_tokens,
                max_tokens_per_minute: m.max_tokens_per_minute,
                max_input_tokens: m.max_input_tokens,
                reasoning: m.reasoning,
                tools: m.tools,
                vision: m.vision,
            })
            .collect(),
        default_model: c.default_model.clone(),
        source_path: c.source.display().to_string(),
        digest: c.digest.clone(),
        loaded_at_ms,
    }
}

pub fn grant_to_pb(g: &aex_core::grant::GrantRecord) -> pb::AgentGrant {
    pb::AgentGrant {
        grant_id: g.id.clone(),
        data_plane: g.data_plane.clone(),
        budget_micro: g.budget_micro,
        used_micro: g.used_micro,
        requests: g.requests.unwrap_or(0),
        requests_used: g.requests_used,
        created_at_ms: g.created_at_ms,
        deadline_ms: g.deadline_ms,
    }
}

pub fn event_to_pb(e: EventRecord) -> pb::Event {
    let EventBody {
        seq,
        ts_ms,
        kind,
        agent_id,
        agent_name,
        reservation_id,
        amount_micro,
        reason,
        details_json,
    } = e.body;
    pb::Event {
        seq,
        ts_ms,
        kind,
        agent_id,
        agent_name,
        reservation_id,
        amount_micro,
        reason,
        details_json,
        hash: e.hash,
    }
}

pub fn policy_to_pb(a: &AgentRecord) -> pb::AgentPolicy {
    pb::AgentPolicy {
        agent_id: a.id.clone(),
        name: a.name.clone(),
        token_sha256: a.token_sha256.clone(),
        state: state_to_pb(a.state) as i32,
        scope: scope_to_pb(a.scope) as i32,
        allowed_models: a.allowed_models.clone(),
        capabilities: Some(pb::Capabilities {
            streaming: a.caps.streaming,
            tools: a.caps.tools,
            function_calling: a.caps.function_calling,
            vision: a.caps.vision,
        }),
        token_expires_at_ms: a.token_expires_at_ms,
    }
}
