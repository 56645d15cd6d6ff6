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
        assert_eq!(Rule::parse("budget "), None);
        assert!(Rule::Rpm == "rpm");
    }
}
