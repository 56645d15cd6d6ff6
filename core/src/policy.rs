//! The admission policy as a pure function: given a caller, the model
//! configuration and what the request asks for, either a plan (output cap and
//! cost bound to reserve) or the denial to send. No I/O, no clocks except the
//! `now` passed in. The control plane decides every central admission with
//! it, and a data plane every call it admits from a grant (docs/GRANTS.md), so the
//! two can never disagree on a bound.

use crate::agent::{AgentRecord, AgentState, Caps, Scope};
use crate::config::{Model, ModelsConfig};
pub use crate::denial::{DenialCode, ErrorType, Rule};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub http_status: u16,
    pub code: DenialCode,
    pub error_type: ErrorType,
    pub message: String,
    /// The rule that fired: `x-aex-denied-by`, and the reason in the ledger.
    pub denied_by: Rule,
    pub param: &'static str,
    pub retry_after_ms: u64,
}

impl Denial {
    fn new(
        http_status: u16,
        code: DenialCode,
        error_type: ErrorType,
        denied_by: Rule,
        message: impl Into<String>,
    ) -> Self {
        Self {
            http_status,
            code,
            error_type,
            message: message.into(),
            denied_by,
            param: "",
            retry_after_ms: 0,
        }
    }

    pub fn unauthenticated(denied_by: Rule, message: impl Into<String>) -> Self {
        Self::new(
            401,
            DenialCode::InvalidApiKey,
            ErrorType::InvalidRequestError,
            denied_by,
            message,
        )
    }

    pub fn forbidden(code: DenialCode, denied_by: Rule, message: impl Into<String>) -> Self {
        Self::new(403, code, ErrorType::PermissionError, denied_by, message)
    }

    pub fn rate_limited(denied_by: Rule, retry_after_ms: u64, message: impl Into<String>) -> Self {
        Self {
            retry_after_ms,
            ..Self::new(
                429,
                DenialCode::RateLimitExceeded,
                ErrorType::RateLimitError,
                denied_by,
                message,
            )
        }
    }

    pub fn budget(message: impl Into<String>) -> Self {
        Self::new(
            402,
            DenialCode::BudgetExceeded,
            ErrorType::InsufficientQuota,
            Rule::Budget,
            message,
        )
    }

    /// A retried admission of a request whose reservation already closed
    /// (it expired while the answer was lost, say). 409, which the OpenAI
    /// SDKs retry: as a new request, with a reservation of its own.
    pub fn request_closed(message: impl Into<String>) -> Self {
        Self::new(
            409,
            DenialCode::RequestAlreadyClosed,
            ErrorType::InvalidRequestError,
            Rule::Request,
            message,
        )
    }

    pub fn bad_request(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            ..Self::new(
                400,
                DenialCode::InvalidRequest,
                ErrorType::InvalidRequestError,
                Rule::Request,
                message,
            )
        }
    }
}

crate::named::named_set! {
    /// The API a call came through. The names are what the ledger's `admit`
    /// and `deny` events have always said (`"endpoint"`): fixed here, never
    /// derived from the variants' spelling.
    Endpoint {
        ChatCompletions => "ChatCompletions",
        Responses => "Responses",
        Embeddings => "Embeddings",
        Completions => "Completions",
        Models => "Models",
        /// Anthropic's `POST /v1/messages`.
        Messages => "Messages",
        /// Anthropic's `POST /v1/messages/count_tokens`: generates nothing
        /// and reserves nothing ([`countable`]).
        CountTokens => "CountTokens",
    }
}

/// What the data plane found in the request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask<'a> {
    pub endpoint: Endpoint,
    pub model: &'a str,
    pub stream: bool,
    pub uses_tools: bool,
    pub uses_function_calling: bool,
    pub uses_vision: bool,
    pub input_tokens_bound: u64,
    pub requested_output_tokens: Option<u64>,
    /// Outputs generated per call (`n`, `best_of`); 0 from an older data
    /// plane means 1.
    pub output_multiplier: u32,
    /// What in the request the body cannot bound, if anything.
    pub unbounded_input: Option<UnboundedInput>,
}

crate::named::named_set! {
    /// What makes a request's input unknowable from its body (issue #31):
    /// the provider adds to the prompt something only it holds, so the
    /// bound from the body's bytes is no bound. Such a request is refused
    /// unless the model's models.yaml entry gives `limits.max_input_tokens`,
    /// which it then reserves at the input price. The names are the wire
    /// form (and the parameter a 400 names).
    UnboundedInput {
        /// Responses: a previous response's whole conversation.
        PreviousResponse => "previous_response_id",
        /// Responses: a stored conversation.
        Conversation => "conversation",
        /// Responses: a stored prompt template.
        StoredPrompt => "prompt",
        /// An input item or file by id or URL (`item_reference`,
        /// `file_id`, `file_url`).
        Reference => "file_id",
        /// A tool the provider runs (web or file search, code interpreter,
        /// a remote MCP server…), whose results join the input.
        HostedTool => "tools",
        /// A name a newer data plane sent that this control plane does
        /// not know: unbounded all the same.
        Unrecognized => "unrecognized",
    }
}

impl UnboundedInput {
    /// From the wire: empty is none, and an unknown name is still unbounded.
    pub fn from_wire(s: &str) -> Option<Self> {
        if s.is_empty() {
            return None;
        }
        Some(Self::parse(s).unwrap_or(UnboundedInput::Unrecognized))
    }

    pub fn to_wire(this: Option<Self>) -> String {
        this.map_or_else(String::new, |u| u.as_str().to_string())
    }
}

/// The most outputs one call may ask for (OpenAI's limit on `n`).
pub const MAX_OUTPUT_MULTIPLIER: u32 = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The input bound reserved for: the body's, or the model's context
    /// window for an input the body cannot bound.
    pub input_tokens_bound: u64,
    pub output_tokens_cap: u64,
    pub output_cap_injected: bool,
    pub reserve_micro: i64,
}

/// What policy looks at of the caller: the control plane's agent row and a
/// data plane's cached policy both hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    pub name: &'a str,
    pub state: AgentState,
    pub token_expires_at_ms: Option<i64>,
    pub scope: Scope,
    pub allowed_models: &'a [String],
    pub caps: Caps,
}

impl<'a> From<&'a AgentRecord> for Caller<'a> {
    fn from(a: &'a AgentRecord) -> Self {
        Self {
            name: &a.name,
            state: a.state,
            token_expires_at_ms: a.token_expires_at_ms,
            scope: a.scope,
            allowed_models: &a.allowed_models,
            caps: a.caps,
        }
    }
}

/// Who is calling and may they call at all (before any model is looked at).
pub fn authenticate(agent: Option<&AgentRecord>, now_ms: i64) -> Result<&AgentRecord, Denial> {
    let Some(agent) = agent else {
        return Err(unknown_token());
    };
    admissible(&Caller::from(agent), now_ms)?;
    Ok(agent)
}

/// The denial of a token no agent has, and of which the ledger knows
/// nothing more (`presented::Retired`).
pub fn unknown_token() -> Denial {
    Denial::unauthenticated(
        Rule::Auth,
        "Invalid API key: this token is not known to AEX. Use the token printed by `aexctl agent create` \
         or `aexctl agent rotate-token`.",
    )
}

/// Whether a known caller may call at all now: its token unexpired, the
/// agent active.
pub fn admissible(agent: &Caller<'_>, now_ms: i64) -> Result<(), Denial> {
    if let Some(expiry) = agent.token_expires_at_ms
        && expiry <= now_ms
    {
        return Err(Denial::unauthenticated(
            Rule::TokenExpired,
            format!(
                "The token of agent '{}' has expired. Issue a new one with `aexctl agent rotate-token {}`.",
                agent.name, agent.name
            ),
        ));
    }
    match agent.state {
        AgentState::Active => Ok(()),
        AgentState::Paused => Err(Denial::forbidden(
            DenialCode::AgentPaused,
            Rule::Paused,
            format!(
                "Agent '{}' is paused. Resume it with `aexctl agent resume {}`.",
                agent.name, agent.name
            ),
        )),
        AgentState::Deleted => Err(Denial::unauthenticated(
            Rule::Auth,
            "Invalid API key: the agent was deleted.",
        )),
    }
}

/// A client's string as an error message echoes it: its start only, so a
/// megabyte of model name is not sent back (issue #31).
pub fn echoed(s: &str) -> String {
    const SHOWN_CHARS: usize = 120;
    let mut chars = s.chars();
    let shown: String = chars.by_ref().take(SHOWN_CHARS).collect();
    if chars.next().is_some() {
        format!("{shown}… ({} bytes)", s.len())
    } else {
        shown
    }
}

/// The configured model a request names, if the agent may use it.
fn model_for<'m>(
    agent: &Caller<'_>,
    models: &'m ModelsConfig,
    ask: &Ask<'_>,
) -> Result<&'m Model, Denial> {
    if ask.model.is_empty() {
        return Err(Denial::bad_request(
            "model",
            "You must provide a model parameter.",
        ));
    }
    let Some(model) = models.models.get(ask.model) else {
        return Err(Denial::forbidden(
            DenialCode::ModelNotAllowed,
            Rule::Model,
            format!(
                "The model '{}' is not configured in AEX. Configured models: {}.",
                echoed(ask.model),
                models.models.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    };
    if !agent.allowed_models.is_empty() && !agent.allowed_models.iter().any(|m| m == ask.model) {
        return Err(Denial::forbidden(
            DenialCode::ModelNotAllowed,
            Rule::Model,
            format!(
                "Agent '{}' may not use model '{}' (allowed: {}).",
                agent.name,
                echoed(ask.model),
                agent.allowed_models.join(", ")
            ),
        ));
    }
    Ok(model)
}

/// Counting a prompt's tokens (`Endpoint::CountTokens`) generates nothing
/// and costs nothing: it needs a model the agent may use, and no
/// reservation, limit or capability. Read-only agents may count, as they
/// may list models.
pub fn countable<'m>(
    agent: &Caller<'_>,
    models: &'m ModelsConfig,
    ask: &Ask<'_>,
) -> Result<&'m Model, Denial> {
    model_for(agent, models, ask)
}

/// Policy and cost bound for an authenticated agent's request.
pub fn plan(agent: &Caller<'_>, models: &ModelsConfig, ask: &Ask<'_>) -> Result<Plan, Denial> {
    if agent.scope == Scope::ReadOnly && ask.endpoint != Endpoint::Models {
        return Err(Denial::forbidden(
            DenialCode::CapabilityDenied,
            Rule::Scope,
            format!(
                "Agent '{}' has read-only scope: it may list models but not call them. \
                 Change it with `aexctl agent update {} --scope execution`.",
                agent.name, agent.name
            ),
        ));
    }
    let model = model_for(agent, models, ask)?;
    capabilities(agent, model, ask)?;
    if ask.requested_output_tokens == Some(0) {
        // Providers read 0 as "no limit": the reservation would not bound the call.
        return Err(Denial::bad_request(
            "max_tokens",
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ));
    }
    if ask.output_multiplier > MAX_OUTPUT_MULTIPLIER {
        return Err(Denial::bad_request(
            "n",
            format!(
                "Invalid 'n': integer above maximum value. Expected a value <= {MAX_OUTPUT_MULTIPLIER}, but got {} instead.",
                ask.output_multiplier
            ),
        ));
    }
    let input_tokens_bound = match ask.unbounded_input {
        None => ask.input_tokens_bound,
        Some(_) if model.max_input_tokens > 0 => ask.input_tokens_bound.max(model.max_input_tokens),
        Some(what) => {
            let param = match what {
                UnboundedInput::Unrecognized => "",
                known => known.as_str(),
            };
            return Err(Denial::bad_request(
                param,
                format!(
                    "AEX cannot bound this request's input: with '{}' the provider adds to the prompt \
                     what only it holds, so the call's cost is unknown before it runs. Send the input \
                     in the request, or give model '{}' its context window in models.yaml \
                     (limits.max_input_tokens), which AEX then reserves at the input price.",
                    what.as_str(),
                    echoed(ask.model)
                ),
            ));
        }
    };
    let (output_tokens_cap, output_cap_injected) = match ask.endpoint {
        Endpoint::Embeddings | Endpoint::Models | Endpoint::CountTokens => (0, false),
        _ => match ask.requested_output_tokens {
            Some(n) if n <= u64::from(model.max_tokens) => (n, false),
            // Above the model's limit: clamp, so the reservation stays a real bound.
            Some(_) | None => (u64::from(model.max_tokens), true),
        },
    };
    Ok(Plan {
        input_tokens_bound,
        output_tokens_cap,
        output_cap_injected,
        // The prompt is billed once; every choice may run to the cap.
        reserve_micro: model.pricing.bound_micro(
            input_tokens_bound,
            output_tokens_cap.saturating_mul(u64::from(ask.output_multiplier.max(1))),
        ),
    })
}

fn capabilities(agent: &Caller<'_>, model: &Model, ask: &Ask<'_>) -> Result<(), Denial> {
    let deny = |denied_by: Rule, what: &str, fix: &str| {
        Err(Denial::forbidden(
            DenialCode::CapabilityDenied,
            denied_by,
            format!("{what} {fix}"),
        ))
    };
    let name = &agent.name;
    if ask.stream && !agent.caps.streaming {
        return deny(
            Rule::Streaming,
            &format!("Agent '{name}' may not stream (stream: true)."),
            &format!(
                "Send stream: false, or allow it: `aexctl agent update {name} --streaming true`."
            ),
        );
    }
    if ask.uses_tools && !model.tools {
        return deny(
            Rule::Tools,
            &format!("Model '{}' is configured without tool support.", model.name),
            "Remove `tools`, or set capabilities.tools: true in models.yaml.",
        );
    }
    if ask.uses_tools && !agent.caps.tools {
        return deny(
            Rule::Tools,
            &format!("Agent '{name}' may not use tools."),
            &format!("Remove `tools`, or allow them: `aexctl agent update {name} --tools true`."),
        );
    }
    if ask.uses_function_calling && !agent.caps.function_calling {
        return deny(
            Rule::FunctionCalling,
            &format!("Agent '{name}' may not use function calling (functions / tool_choice)."),
            &format!("Allow it with `aexctl agent update {name} --function-calling true`."),
        );
    }
    if ask.uses_vision && !model.vision {
        return deny(
            Rule::Vision,
            &format!("Model '{}' is configured without vision.", model.name),
            "Remove the image inputs, or set capabilities.vision: true in models.yaml.",
        );
    }
    if ask.uses_vision && !agent.caps.vision {
        return deny(
            Rule::Vision,
            &format!("Agent '{name}' may not send images."),
            &format!("Allow it with `aexctl agent update {name} --vision true`."),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MODELS_YAML;
    use std::path::Path;

    fn plan_for(a: &AgentRecord, m: &ModelsConfig, ask: &Ask<'_>) -> Result<Plan, Denial> {
        plan(&a.into(), m, ask)
    }

    fn agent() -> AgentRecord {
        AgentRecord {
            id: "agt_1".into(),
            name: "dev".into(),
            token_sha256: "h".into(),
            token_prefix: "aex_".into(),
            token_expires_at_ms: None,
            token_ttl_seconds: 0,
            budget_micro: 1_000_000,
            spent_micro: 0,
            reserved_micro: 0,
            overrun_micro: 0,
            rpm: 60,
            tpm: 0,
            max_concurrent: 0,
            allowed_models: vec![],
            caps: Caps {
                streaming: true,
                tools: true,
                function_calling: true,
                vision: false,
            },
            scope: Scope::Execution,
            state: AgentState::Active,
            created_at_ms: 0,
            updated_at_ms: 0,
            last_activity_at_ms: None,
            deleted_at_ms: None,
        }
    }

    fn ask(model: &str) -> Ask<'_> {
        Ask {
            endpoint: Endpoint::ChatCompletions,
            model,
            stream: false,
            uses_tools: false,
            uses_function_calling: false,
            uses_vision: false,
            input_tokens_bound: 100,
            requested_output_tokens: Some(50),
            output_multiplier: 1,
            unbounded_input: None,
        }
    }

    fn models() -> ModelsConfig {
        ModelsConfig::parse(DEFAULT_MODELS_YAML, Path::new("m.yaml")).unwrap()
    }

    /// Issue #31: an input only the provider holds is no bound; refused
    /// unless the model gives its context window, then reserved for it.
    #[test]
    fn inputs_the_body_cannot_bound_take_the_context_window_or_a_400() {
        let unbounded = |what| Ask {
            unbounded_input: Some(what),
            ..ask("llama3-local")
        };
        let e = plan_for(
            &agent(),
            &models(),
            &unbounded(UnboundedInput::PreviousResponse),
        )
        .unwrap_err();
        assert_eq!((e.http_status, e.param), (400, "previous_response_id"));
        assert!(
            e.message.contains("limits.max_input_tokens"),
            "{}",
            e.message
        );
        let mut m = models();
        m.models.get_mut("llama3-local").unwrap().max_input_tokens = 8_000;
        let p = plan_for(&agent(), &m, &unbounded(UnboundedInput::HostedTool)).unwrap();
        assert_eq!(p.input_tokens_bound, 8_000);
        assert_eq!(p.reserve_micro, 8_000 + 50 * 2);
        // A body larger than the window keeps its own, larger bound.
        let big = Ask {
            input_tokens_bound: 9_000,
            ..unbounded(UnboundedInput::Reference)
        };
        assert_eq!(
            plan_for(&agent(), &m, &big).unwrap().input_tokens_bound,
            9_000
        );
        assert_eq!(UnboundedInput::from_wire(""), None);
        assert_eq!(
            UnboundedInput::from_wire("something_newer"),
            Some(UnboundedInput::Unrecognized)
        );
    }

    #[test]
    fn a_huge_model_name_is_not_echoed_whole() {
        let name = "m".repeat(1_000_000);
        let e = plan_for(&agent(), &models(), &ask(&name)).unwrap_err();
        assert!(e.message.len() < 1_000, "{} bytes", e.message.len());
        assert!(e.message.contains("(1000000 bytes)"), "{}", e.message);
        assert_eq!(echoed("llama3"), "llama3");
    }

    #[test]
    fn reserves_the_upper_bound_and_injects_a_cap() {
        let m = models();
        let p = plan_for(&agent(), &m, &ask("llama3-local")).unwrap();
        assert_eq!(
            p,
            Plan {
                input_tokens_bound: 100,
                output_tokens_cap: 50,
                output_cap_injected: false,
                reserve_micro: 100 + 100
            }
        );
        let p = plan_for(
            &agent(),
            &m,
            &Ask {
                requested_output_tokens: None,
                ..ask("llama3-local")
            },
        )
        .unwrap();
        assert_eq!((p.output_tokens_cap, p.output_cap_injected), (4096, true));
        assert_eq!(p.reserve_micro, 100 + 4096 * 2);
        let p = plan_for(
            &agent(),
            &m,
            &Ask {
                requested_output_tokens: Some(1 << 40),
                ..ask("llama3-local")
            },
        )
        .unwrap();
        assert_eq!((p.output_tokens_cap, p.output_cap_injected), (4096, true));
        let p = plan_for(
            &agent(),
            &m,
            &Ask {
                endpoint: Endpoint::Embeddings,
                ..ask("simulated")
            },
        )
        .unwrap();
        assert_eq!(p.output_tokens_cap, 0);
        assert_eq!(p.reserve_micro, 15); // 100 × 0.15 µ
    }

    /// Regression (hardening #1, #2): `n` multiplied the output past the
    /// reservation, and a cap of 0 reserved no output at all.
    #[test]
    fn every_choice_is_reserved_and_a_zero_cap_is_refused() {
        let m = models();
        let p = plan_for(
            &agent(),
            &m,
            &Ask {
                output_multiplier: 100,
                requested_output_tokens: Some(20),
                ..ask("llama3-local")
            },
        )
        .unwrap();
        assert_eq!(p.output_tokens_cap, 20);
        assert_eq!(p.reserve_micro, 100 + 100 * 20 * 2);
        let older_data_plane = plan_for(
            &agent(),
            &m,
            &Ask {
                output_multiplier: 0,
                ..ask("llama3-local")
            },
        )
        .unwrap();
        assert_eq!(older_data_plane.reserve_micro, 100 + 50 * 2);
        let zero = plan_for(
            &agent(),
            &m,
            &Ask {
                requested_output_tokens: Some(0),
                ..ask("llama3-local")
            },
        )
        .unwrap_err();
        assert_eq!((zero.http_status, zero.param), (400, "max_tokens"));
        let too_many = plan_for(
            &agent(),
            &m,
            &Ask {
                output_multiplier: 129,
                ..ask("llama3-local")
            },
        )
        .unwrap_err();
        assert_eq!((too_many.http_status, too_many.param), (400, "n"));
    }

    #[test]
    fn denials_name_their_rule() {
        let m = models();
        let mut a = agent();
        a.allowed_models = vec!["simulated".into()];
        assert_eq!(
            plan_for(&a, &m, &ask("llama3-local"))
                .unwrap_err()
                .denied_by,
            "model"
        );
        assert_eq!(
            plan_for(&a, &m, &ask("gpt-9")).unwrap_err().code,
            "model_not_allowed"
        );
        let mut a = agent();
        a.caps.streaming = false;
        assert_eq!(
            plan_for(
                &a,
                &m,
                &Ask {
                    stream: true,
                    ..ask("simulated")
                }
            )
            .unwrap_err()
            .denied_by,
            "streaming"
        );
        let mut a = agent();
        a.caps.tools = false;
        assert_eq!(
            plan_for(
                &a,
                &m,
                &Ask {
                    uses_tools: true,
                    ..ask("simulated")
                }
            )
            .unwrap_err()
            .denied_by,
            "tools"
        );
        let mut a = agent();
        a.caps.function_calling = false;
        let d = plan_for(
            &a,
            &m,
            &Ask {
                uses_function_calling: true,
                ..ask("simulated")
            },
        )
        .unwrap_err();
        assert_eq!((d.http_status, d.denied_by), (403, Rule::FunctionCalling));
        let mut a = agent();
        a.caps.vision = true;
        // The model itself has no vision.
        assert_eq!(
            plan_for(
                &a,
                &m,
                &Ask {
                    uses_vision: true,
                    ..ask("simulated")
                }
            )
            .unwrap_err()
            .denied_by,
            "vision"
        );
        let mut a = agent();
        a.scope = Scope::ReadOnly;
        assert_eq!(
            plan_for(&a, &m, &ask("simulated")).unwrap_err().denied_by,
            "scope"
        );
        assert!(
            plan_for(
                &a,
                &m,
                &Ask {
                    endpoint: Endpoint::Models,
                    ..ask("simulated")
                }
            )
            .is_ok()
        );
        assert_eq!(
            plan_for(&agent(), &m, &ask("")).unwrap_err().http_status,
            400
        );
    }

    #[test]
    fn authentication() {
        assert_eq!(authenticate(None, 0).unwrap_err().http_status, 401);
        let mut a = agent();
        a.token_expires_at_ms = Some(10);
        assert_eq!(authenticate(Some(&a), 9).unwrap().id, "agt_1");
        assert_eq!(
            authenticate(Some(&a), 10).unwrap_err().denied_by,
            "token_expired"
        );
        let mut a = agent();
        a.state = AgentState::Paused;
        let d = authenticate(Some(&a), 0).unwrap_err();
        assert_eq!((d.http_status, d.code), (403, DenialCode::AgentPaused));
    }
}
