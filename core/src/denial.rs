//! What a denial says, as closed sets both planes share: the rule that
//! fired (`x-aex-denied-by`, the `deny` event's reason, the `deny:<rule>`
//! counter), the OpenAI-style `code`, and the error `type`. The control
//! plane decides with these; the data plane reads them back from the wire
//! with `parse`, so a value it does not know is mapped, never trusted.

/// Defines a closed set with its stored/wire names, `ALL`, `as_str`,
/// `parse`, and comparison with a name (so `assert_eq!(rule, "rpm")` reads
/// as the wire does).
macro_rules! named_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

pub(crate) use named_set;

named_set! {
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

named_set! {
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

named_set! {
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
