//! The APIs AEX serves, each by its path: which family it belongs to (the
//! family decides the shape of its errors and of its stream's events), the
//! endpoint admission knows it as, and where it goes under a provider's
//! base URL.

use aex_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Responses,
    Embeddings,
    Completions,
    /// Anthropic's `POST /v1/messages`.
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`.
    CountTokens,
}

/// Who defined an API, and so what its errors and streams look like, and
/// what a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    OpenAi,
    Anthropic,
}

impl Api {
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path {
            "/v1/chat/completions" => Api::ChatCompletions,
            "/v1/responses" => Api::Responses,
            "/v1/embeddings" => Api::Embeddings,
            "/v1/completions" => Api::Completions,
            "/v1/messages" => Api::Messages,
            "/v1/messages/count_tokens" => Api::CountTokens,
            _ => return None,
        })
    }

    pub fn family(self) -> Family {
        match self {
            Api::Messages | Api::CountTokens => Family::Anthropic,
            _ => Family::OpenAi,
        }
    }

    /// The path under the provider's base URL. An OpenAI-compatible base
    /// URL ends in its version (`…/v1`); Anthropic's is the host
    /// (`https://api.anthropic.com`), as its SDKs take it.
    pub fn upstream_suffix(self) -> &'static str {
        match self {
            Api::ChatCompletions => "/chat/completions",
            Api::Responses => "/responses",
            Api::Embeddings => "/embeddings",
            Api::Completions => "/completions",
            Api::Messages => "/v1/messages",
            Api::CountTokens => "/v1/messages/count_tokens",
        }
    }

    /// The `endpoint` label of the data plane's metrics.
    pub fn label(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat/completions",
            Api::Responses => "responses",
            Api::Embeddings => "embeddings",
            Api::Completions => "completions",
            Api::Messages => "messages",
            Api::CountTokens => "messages/count_tokens",
        }
    }

    pub fn endpoint(self) -> pb::Endpoint {
        match self {
            Api::ChatCompletions => pb::Endpoint::ChatCompletions,
            Api::Responses => pb::Endpoint::Responses,
            Api::Embeddings => pb::Endpoint::Embeddings,
            Api::Completions => pb::Endpoint::Completions,
            Api::Messages => pb::Endpoint::Messages,
            Api::CountTokens => pb::Endpoint::CountTokens,
        }
    }
}

impl Family {
    /// The family whose shape a request's errors take: the Messages paths
    /// are Anthropic's, and so are `/v1/models` and `/v1/models/{id}` when
    /// asked by an Anthropic client (it sends `anthropic-version`, as
    /// Anthropic requires).
    pub fn of_request(path: &str, has_anthropic_version: bool) -> Self {
        let models = path == "/v1/models" || path.starts_with("/v1/models/");
        if path.starts_with("/v1/messages") || (models && has_anthropic_version) {
            Family::Anthropic
        } else {
            Family::OpenAi
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_names_one_api_and_its_family() {
        for api in [
            Api::ChatCompletions,
            Api::Responses,
            Api::Embeddings,
            Api::Completions,
            Api::Messages,
            Api::CountTokens,
        ] {
            let path = match api.family() {
                Family::OpenAi => format!("/v1{}", api.upstream_suffix()),
                Family::Anthropic => api.upstream_suffix().to_string(),
            };
            assert_eq!(Api::from_path(&path), Some(api));
            assert_eq!(Family::of_request(&path, false), api.family());
        }
        assert_eq!(Api::from_path("/v1/messages/"), None);
        assert_eq!(Family::of_request("/v1/models", true), Family::Anthropic);
        assert_eq!(Family::of_request("/v1/models", false), Family::OpenAi);
        assert_eq!(Family::of_request("/v1/models/x", true), Family::Anthropic);
    }
}
