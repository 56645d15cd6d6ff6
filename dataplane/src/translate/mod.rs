//! Translation between OpenAI's Chat Completions and Anthropic's Messages,
//! for a model whose provider speaks the other API than the client called
//! (SPEC §5): Claude Code on a local Ollama or vLLM model
//! (`to_chat.rs`: a Messages request sent as a chat completion, the answer
//! and its stream turned back into Anthropic's), and OpenAI-SDK agents on
//! Claude (`to_messages.rs`: the other way). System prompts, turns, tools
//! and tool results, images, stop reasons, usage and streams (event by
//! event) are mapped both ways; what has no counterpart is a 400 that names
//! it, and a hint that leaves what is generated to the model (`thinking`,
//! `cache_control`, …) is not carried and is named in `x-aex-untranslated`:
//! nothing is dropped unsaid. Pure: JSON in, JSON or bytes out.

pub mod to_chat;
pub mod to_messages;

use crate::api::Api;
use serde_json::{Map, Value};

/// A request feature the other API cannot carry: answered with a 400
/// naming it, before anything is reserved or sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub message: String,
}

pub(crate) fn unsupported(what: &str, from: Api, fix: &str) -> Unsupported {
    let (called, speaks) = match from.family() {
        crate::api::Family::Anthropic => ("Anthropic's Messages API", "OpenAI's API"),
        crate::api::Family::OpenAi => ("OpenAI's API", "Anthropic's Messages API"),
    };
    Unsupported {
        message: format!(
            "{what} cannot be translated: this model's provider speaks {speaks}, and AEX \
             translates {called} into it only where both have the feature. {fix}"
        ),
    }
}

/// Request hints the other API has no counterpart for, which leave what is
/// generated to the model (how hard it thinks, prompt-cache marks): not
/// carried, and named to the client in `x-aex-untranslated`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Untranslated(std::collections::BTreeSet<String>);

impl Untranslated {
    pub(crate) fn note(&mut self, name: &str) {
        self.0.insert(name.to_string());
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A request translated for a provider of the other API, once, before
/// admission (so what cannot be is refused before anything is reserved);
/// the provider's model and the output cap are set when it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// The API it is sent as.
    pub api: Api,
    body: Map<String, Value>,
    pub untranslated: Untranslated,
}

impl Translated {
    /// The body sent: the provider's model, exactly the output cap
    /// reserved for (`max_tokens` in both APIs).
    pub fn upstream_body(&mut self, provider_model: &str, output_cap: u64) -> Vec<u8> {
        self.body
            .insert("model".into(), Value::String(provider_model.to_string()));
        self.body
            .insert("max_tokens".into(), Value::from(output_cap));
        serde_json::to_vec(&self.body).expect("JSON values serialise")
    }
}

/// A client's body in the other API.
pub fn upstream_request(client: Api, body: &Map<String, Value>) -> Result<Translated, Unsupported> {
    let mut untranslated = Untranslated::default();
    // The model and the cap are `Translated::upstream_body`'s to set.
    let (api, translated) = match client {
        Api::Messages => (
            Api::ChatCompletions,
            to_chat::request(body, "", 0, &mut untranslated)?,
        ),
        Api::ChatCompletions => (
            Api::Messages,
            to_messages::request(body, "", 0, &mut untranslated)?,
        ),
        other => {
            return Err(unsupported(
                &format!("The {} endpoint", other.label()),
                other,
                "Call this model through its provider's own API.",
            ));
        }
    };
    Ok(Translated {
        api,
        body: translated,
        untranslated,
    })
}

/// A provider's whole (non-streamed) answer in the client's API; `model`
/// is the name the client asked for. `Err` says why it cannot be.
pub fn response(client: Api, upstream: &Value, model: &str) -> Result<Value, String> {
    match client {
        Api::Messages => to_chat::response(upstream, model),
        Api::ChatCompletions => to_messages::response(upstream, model),
        other => Err(format!("{} is not translated", other.label())),
    }
}

/// A provider's error body in the client's API's shape: its message kept,
/// its type by status (as `GatewayError` types AEX's own).
pub fn error(client: Api, status: u16, upstream: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(upstream).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(upstream)
                .chars()
                .take(2_000)
                .collect()
        });
    let body = match client.family() {
        crate::api::Family::Anthropic => serde_json::json!({"type": "error", "error": {
            "type": aex_core::denial::AnthropicErrorType::for_status(status).as_str(),
            "message": message}}),
        crate::api::Family::OpenAi => serde_json::json!({"error": {
            "message": message,
            "type": if status >= 500 { "server_error" } else { "invalid_request_error" },
            "param": null,
            "code": null}}),
    };
    body.to_string().into_bytes()
}

/// A stream translator: takes the provider's whole SSE events (as the
/// meter forwards them) and gives the client's.
pub enum Stream {
    /// Chat chunks from the provider, Anthropic's events to the client.
    ToMessages(to_chat::StreamToMessages),
    /// Anthropic's events from the provider, chat chunks to the client.
    ToChat(to_messages::StreamToChat),
}

impl Stream {
    /// For a client of `client` whose call goes to the other API; `model`
    /// is the name the client asked for, `include_usage` whether a chat
    /// client asked for the usage chunk.
    pub fn new(client: Api, model: &str, include_usage: bool) -> Option<Self> {
        match client {
            Api::Messages => Some(Stream::ToMessages(to_chat::StreamToMessages::new(model))),
            Api::ChatCompletions => Some(Stream::ToChat(to_messages::StreamToChat::new(
                model,
                include_usage,
            ))),
            _ => None,
        }
    }

    /// Translates whole events (`events` holds only complete ones).
    pub fn feed(&mut self, events: &[u8], out: &mut Vec<u8>) {
        for data in event_data(events) {
            match self {
                Stream::ToMessages(s) => s.event(data.as_ref(), out),
                Stream::ToChat(s) => s.event(data.as_ref(), out),
            }
        }
    }

    /// The provider's stream ended (`cut_off`: AEX stopped it at the
    /// reservation): the client's stream is closed as its API closes one.
    pub fn finish(&mut self, cut_off: bool, out: &mut Vec<u8>) {
        match self {
            Stream::ToMessages(s) => s.finish(cut_off, out),
            Stream::ToChat(s) => s.finish(cut_off, out),
        }
    }
}

/// The JSON `data` of each event in `events` (`None` for one without JSON,
/// such as `[DONE]`, or a comment).
fn event_data(events: &[u8]) -> Vec<Option<Value>> {
    let Ok(text) = std::str::from_utf8(events) else {
        return Vec::new();
    };
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            serde_json::from_str(&data.join("\n")).ok()
        })
        .collect()
}

/// One SSE event as Anthropic sends it: its name, then its JSON.
pub(crate) fn anthropic_event(out: &mut Vec<u8>, data: &Value) {
    let name = data
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    out.extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
}

/// One SSE event as OpenAI sends a chat chunk.
pub(crate) fn chat_event(out: &mut Vec<u8>, data: &Value) {
    out.extend_from_slice(format!("data: {data}\n\n").as_bytes());
}

/// A chat tool call (`{"id", "function": {"name", "arguments"}}`) as
/// Anthropic's `tool_use` block; `None` when its arguments are not a JSON
/// object (an empty string is `{}`), which a `tool_use` input must be.
pub(crate) fn tool_use_of(call: &Value) -> Option<Value> {
    let f = call.get("function").unwrap_or(&Value::Null);
    let arguments = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
    let arguments = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    match serde_json::from_str(arguments) {
        Ok(input @ Value::Object(_)) => Some(serde_json::json!({"type": "tool_use",
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "name": f.get("name").cloned().unwrap_or(Value::Null), "input": input})),
        _ => None,
    }
}

/// Text of a content value: a string, or the text parts of a list.
pub(crate) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}
