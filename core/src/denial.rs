//! What a denial says, as closed sets both planes share: the rule that
//! fired (`x-aex-denied-by`, the `deny` event's reason, the `deny:<rule>`
//! counter), the OpenAI-style `code`, and the error `type`. The control
//! plane decides with these; the data plane reads them back from the wire
//! with `parse`, so a value it does not know is mapped, never trusted.

crate::named::named_set! {
    /// The rule that refused a call.
    Rule {
        /// An unknown token, or a deleted agent's.
        Auth => "auth",
        TokenExpired => "token_expired",
        Paused => "paused",
        /// A read-only agent calling a model.
        Scope => "scope",
        /// The request itself is invalid (a missing model, `max_tokens: 0`,
        /// a retried admission whose reservation already closed).
        Request => "request",
        /// The model is not configured, or not allowed for the agent.
        Model => "model",
        Streaming => "streaming",
        Tools => "tools",
        FunctionCalling => "function_calling",
        Vision => "vision",
        Rpm => "rpm",
        Tpm => "tpm",
        Concurrency => "concurrency",
        /// A model's tokens-per-minute limit across all agents.
        ModelTpm => "model_tpm",
        Budget => "budget",
        /// A data plane whose credential is scoped to other agents
        /// (`aex_core::credential`).
        DataPlane => "data_plane",
    }
}

impl Rule {
    /// A rate limit: waiting (`retry-after`) lets the call through.
    pub fn is_rate_limit(self) -> bool {
        matches!(
            self,
            Rule::Rpm | Rule::Tpm | Rule::Concurrency | Rule::ModelTpm
        )
    }

    /// The caller was not who it claimed, or no longer may be.
    pub fn is_authentication(self) -> bool {
        matches!(self, Rule::Auth | Rule::TokenExpired)
    }
}

crate::named::named_set! {
    /// The `code` of an AEX denial's error body.
    DenialCode {
        InvalidApiKey => "invalid_api_key",
        BudgetExceeded => "budget_exceeded",
        ModelNotAllowed => "model_not_allowed",
        CapabilityDenied => "capability_denied",
        AgentPaused => "agent_paused",
        RateLimitExceeded => "rate_limit_exceeded",
        InvalidRequest => "invalid_request",
        RequestAlreadyClosed => "request_already_closed",
        AgentNotServed => "agent_not_served",
    }
}

crate::named::named_set! {
    /// The `type` of an AEX denial's error body (OpenAI's names).
    ErrorType {
        InvalidRequestError => "invalid_request_error",
        InsufficientQuota => "insufficient_quota",
        PermissionError => "permission_error",
        RateLimitError => "rate_limit_error",
    }
}

crate::named::named_set! {
    /// The `error.type` of an error on Anthropic's Messages API, by which
    /// the Anthropic SDKs choose their exception and whether to retry.
    AnthropicErrorType {
        InvalidRequestError => "invalid_request_error",
        AuthenticationError => "authentication_error",
        BillingError => "billing_error",
        PermissionError => "permission_error",
        NotFoundError => "not_found_error",
        ConflictError => "conflict_error",
        RequestTooLarge => "request_too_large",
        RateLimitError => "rate_limit_error",
        ApiError => "api_error",
        OverloadedError => "overloaded_error",
    }
}

impl AnthropicErrorType {
    /// The type Anthropic answers an HTTP status with (its "other 4xx" are
    /// `invalid_request_error`, every other 5xx `api_error`).
    pub fn for_status(status: u16) -> Self {
        match status {
            401 => Self::AuthenticationError,
            402 => Self::BillingError,
            403 => Self::PermissionError,
            404 => Self::NotFoundError,
            409 => Self::ConflictError,
            413 => Self::RequestTooLarge,
            429 => Self::RateLimitError,
            503 | 529 => Self::OverloadedError,
            500..=599 => Self::ApiError,
            _ => Self::InvalidRequestError,
        }
    }
}

/// What a `deny` event says of the call it refused (issue #33): the request
/// id its client received (`x-aex-request-id`, by which `aexctl events
/// --request` finds it), and the status, code, endpoint and model of the
/// answer. Every deny event of one call starts from this; each adds what
/// its rule knows (a wait, the budget's numbers).
pub fn deny_details(
    request_id: &str,
    status: u16,
    code: DenialCode,
    endpoint: &str,
    model: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut details = serde_json::Map::new();
    for (key, value) in [
        ("request_id", serde_json::json!(request_id)),
        ("status", serde_json::json!(status)),
        ("code", serde_json::json!(code.as_str())),
        ("endpoint", serde_json::json!(endpoint)),
        ("model", serde_json::json!(model)),
    ] {
        details.insert(key.to_string(), value);
    }
    details
}

impl crate::policy::Denial {
    /// Its `deny` event's details ([`deny_details`], and the wait it told).
    pub fn event_details(
        &self,
        request_id: &str,
        endpoint: crate::policy::Endpoint,
        model: &str,
    ) -> serde_json::Value {
        let mut details = deny_details(
            request_id,
            self.http_status,
            self.code,
            endpoint.as_str(),
            model,
        );
        if self.retry_after_ms > 0 {
            details.insert("retry_after_ms".into(), self.retry_after_ms.into());
        }
        serde_json::Value::Object(details)
    }
}

/// What the admission engine's refusals say: the prose of every limit and
/// ledger refusal, in one place beside the rules they name (the policy's
/// own are in `policy.rs`, where it decides them).
impl crate::policy::Denial {
    /// `wait_ms`: when one of the calls in flight is expected to end
    /// (`inflight::CallDurations::slot_wait_ms`).
    pub fn concurrency(agent_name: &str, max_concurrent: u32, wait_ms: u64) -> Self {
        Self::rate_limited(
            Rule::Concurrency,
            wait_ms,
            format!(
                "Rate limit reached: agent '{agent_name}' already has {max_concurrent} request(s) in flight \
                 (its concurrency limit). Retry when one finishes, expected in about {wait_ms} ms."
            ),
        )
    }

    pub fn rpm(agent_name: &str, rpm: u32, wait_ms: u64) -> Self {
        Self::rate_limited(
            Rule::Rpm,
            wait_ms,
            format!(
                "Rate limit reached: agent '{agent_name}' is limited to {rpm} requests per minute. Retry in {wait_ms} ms."
            ),
        )
    }

    pub fn tpm(agent_name: &str, tpm: u64, wait_ms: u64) -> Self {
        Self::rate_limited(
            Rule::Tpm,
            wait_ms,
            format!(
                "Rate limit reached: agent '{agent_name}' is limited to {tpm} tokens per minute. Retry in {wait_ms} ms."
            ),
        )
    }

    pub fn model_tpm(model: &str, model_tpm: u64, wait_ms: u64) -> Self {
        Self::rate_limited(
            Rule::ModelTpm,
            wait_ms,
            format!(
                "Rate limit reached: model '{model}' is limited to {model_tpm} tokens per minute across all agents. Retry in {wait_ms} ms."
            ),
        )
    }

    /// The budget does not cover the worst case `plan` reserves.
    pub fn budget_exceeded(
        agent_name: &str,
        remaining_micro: i64,
        plan: &crate::policy::Plan,
    ) -> Self {
        Self::budget(format!(
            "Budget exceeded: agent '{}' has {} left and this request may cost up to {} \
             ({} input tokens bound + {} output tokens). Lower max_tokens, or top up with \
             `aexctl agent update {} --top-up USD`.",
            agent_name,
            crate::money::usd_with_micro(remaining_micro.max(0)),
            crate::money::usd_with_micro(plan.reserve_micro),
            plan.input_tokens_bound,
            plan.output_tokens_cap,
            agent_name,
        ))
    }

    /// A retried admission whose reservation closed meanwhile.
    pub fn retried_after_close(reservation_id: &str) -> Self {
        Self::request_closed(format!(
            "This request's reservation {reservation_id} was already closed (settled or expired) when its \
             admission was retried, so it cannot go ahead on it. Send the request again."
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_and_is_distinct() {
        fn check<T: Copy + Eq + std::fmt::Debug>(
            all: &[T],
            name: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            let names: std::collections::HashSet<_> = all.iter().map(|v| name(*v)).collect();
            assert_eq!(names.len(), all.len());
            for v in all {
                assert_eq!(parse(name(*v)), Some(*v));
            }
        }
        check(Rule::ALL, Rule::as_str, Rule::parse);
        check(DenialCode::ALL, DenialCode::as_str, DenialCode::parse);
        check(ErrorType::ALL, ErrorType::as_str, ErrorType::parse);
        check(
            AnthropicErrorType::ALL,
            AnthropicErrorType::as_str,
            AnthropicErrorType::parse,
        );
        assert_eq!(Rule::parse("budget "), None);
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (408, "invalid_request_error"),
            (413, "request_too_large"),
            (429, "rate_limit_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "api_error"),
        ] {
            assert_eq!(AnthropicErrorType::for_status(status), kind, "{status}");
        }
        assert!(Rule::Rpm == "rpm");
    }
}
