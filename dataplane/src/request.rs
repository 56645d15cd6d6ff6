//! A request body as AEX read it, whichever API it came through: the one
//! view the call's steps (admission, the upstream body, metering, the
//! simulated provider) take, over `openai.rs`'s and `anthropic.rs`'s
//! readings of their own bodies.

use crate::anthropic;
use crate::api::Api;
use crate::http::Credential;
use crate::openai;
use aex_core::policy::UnboundedInput;
use aex_proto::v1 as pb;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub enum Inspected {
    OpenAi(openai::Inspected),
    Anthropic(anthropic::Inspected),
}

/// Why a body was refused, in the words of the API it was sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    OpenAi(openai::BadRequest),
    Anthropic(anthropic::InvalidRequest),
}

pub fn inspect(api: Api, raw: &[u8]) -> Result<Inspected, Refused> {
    match api {
        Api::Messages | Api::CountTokens => anthropic::inspect(api, raw)
            .map(Inspected::Anthropic)
            .map_err(Refused::Anthropic),
        _ => openai::inspect(api, raw)
            .map(Inspected::OpenAi)
            .map_err(Refused::OpenAi),
    }
}

impl Inspected {
    pub fn api(&self) -> Api {
        match self {
            Inspected::OpenAi(i) => i.api,
            Inspected::Anthropic(i) => i.api,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Inspected::OpenAi(i) => &i.model,
            Inspected::Anthropic(i) => &i.model,
        }
    }

    pub fn stream(&self) -> bool {
        match self {
            Inspected::OpenAi(i) => i.stream,
            Inspected::Anthropic(i) => i.stream,
        }
    }

    /// The client asked for usage in its stream. Anthropic's streams
    /// always carry it: nothing AEX asked for is there to strip.
    pub fn client_wants_usage(&self) -> bool {
        match self {
            Inspected::OpenAi(i) => i.client_wants_usage,
            Inspected::Anthropic(_) => true,
        }
    }

    /// How many times the output cap may be generated (`n`, `best_of`).
    pub fn output_multiplier(&self) -> u32 {
        match self {
            Inspected::OpenAi(i) => i.output_multiplier,
            Inspected::Anthropic(_) => 1,
        }
    }

    pub fn input_tokens_bound(&self) -> u64 {
        match self {
            Inspected::OpenAi(i) => i.input_tokens_bound,
            Inspected::Anthropic(i) => i.input_tokens_bound,
        }
    }

    /// A rough count of the prompt's tokens, for settling a call whose
    /// provider never reported usage (the bound counts one token per
    /// byte; the estimate [`crate::tokens::ESTIMATED_BYTES_PER_TOKEN`]).
    pub fn estimated_prompt_tokens(&self) -> u64 {
        crate::tokens::estimated_tokens(self.input_tokens_bound())
    }

    pub fn body(&self) -> &Map<String, Value> {
        match self {
            Inspected::OpenAi(i) => i.body(),
            Inspected::Anthropic(i) => i.body(),
        }
    }

    /// What admission is asked about this request. The Messages API's
    /// `tool_use` is tools, a forced tool is function calling, image and
    /// document blocks are vision, and `max_tokens` the output cap.
    pub fn admit_request(&self, request_id: &str, credential: &Credential) -> pb::AdmitRequest {
        let (uses_tools, uses_function_calling, uses_vision, requested, multiplier, unbounded) =
            match self {
                Inspected::OpenAi(i) => (
                    i.uses_tools,
                    i.uses_function_calling,
                    i.uses_vision,
                    i.requested_output_tokens,
                    i.output_multiplier,
                    i.unbounded_input,
                ),
                Inspected::Anthropic(i) => (
                    i.uses_tools,
                    i.forces_tool,
                    i.uses_vision,
                    i.max_tokens,
                    1,
                    i.unbounded_input,
                ),
            };
        pb::AdmitRequest {
            model: self.model().to_string(),
            stream: self.stream(),
            uses_tools,
            uses_function_calling,
            uses_vision,
            input_tokens_bound: self.input_tokens_bound(),
            requested_output_tokens: requested,
            output_multiplier: multiplier,
            unbounded_input: UnboundedInput::to_wire(unbounded),
            // Who is calling; `data_plane` is set by the control-plane client.
            ..credential.admit_request(request_id, self.api().endpoint())
        }
    }

    /// The body for the provider, in the request's own API.
    pub fn upstream_body(&self, provider_model: &str, output_cap: u64) -> Vec<u8> {
        match self {
            Inspected::OpenAi(i) => i.upstream_body(provider_model, output_cap),
            Inspected::Anthropic(i) => i.upstream_body(provider_model, output_cap),
        }
    }
}
