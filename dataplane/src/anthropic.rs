//! Anthropic Messages request bodies (`POST /v1/messages` and
//! `/v1/messages/count_tokens`): validation in Anthropic's words, what
//! admission needs to know, and the body sent to an `anthropic` provider.
//! Pure functions over bytes and JSON, like `openai.rs`.

use crate::api::Api;
use crate::blocks::{any_object, count_objects};
use crate::openai::IMAGE_TOKENS_BOUND;
use aex_core::policy::UnboundedInput;
use serde_json::{Map, Value};

/// The largest `max_tokens` a request may name: above it the value is not a
/// cap but a mistake or an attempt to overflow a provider's 32-bit field.
pub const MAX_TOKENS_PARAM: u64 = i32::MAX as u64;

/// A 400 in Anthropic's shape (`invalid_request_error`); the message names
/// the field first, as Anthropic's do (`max_tokens: Field required`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest {
    pub message: String,
}

fn invalid(field: &str, what: &str) -> InvalidRequest {
    InvalidRequest {
        message: format!("{field}: {what}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inspected {
    /// `Messages` (generates, so `max_tokens` is required) or
    /// `CountTokens` (counts the prompt, generates nothing).
    pub api: Api,
    pub model: String,
    pub stream: bool,
    /// The client's `max_tokens` (`None` only for count_tokens).
    pub max_tokens: Option<u64>,
    pub uses_tools: bool,
    /// `tool_choice` makes the model call a tool (`any`, or a named one).
    pub forces_tool: bool,
    /// Image or document (PDF) blocks anywhere in the prompt.
    pub uses_vision: bool,
    /// What makes the prompt's size unknowable from the body, if anything.
    pub unbounded_input: Option<UnboundedInput>,
    /// Upper bound of the prompt's tokens, as for OpenAI's bodies: the
    /// body's bytes (`system`, `messages` and `tools` are all in it), less
    /// inline image data, plus a fixed allowance per image.
    pub input_tokens_bound: u64,
    body: Map<String, Value>,
}

/// A positive integer field within `max`; `None` when absent or null.
fn positive_int(
    body: &Map<String, Value>,
    name: &str,
    max: u64,
) -> Result<Option<u64>, InvalidRequest> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(0) => Err(invalid(name, "Input should be greater than or equal to 1")),
            Some(n) if n > max => Err(invalid(
                name,
                &format!("Input should be less than or equal to {max}"),
            )),
            Some(n) => Ok(Some(n)),
            None if v.as_i64().is_some() => {
                Err(invalid(name, "Input should be greater than or equal to 1"))
            }
            None => Err(invalid(name, "Input should be a valid integer")),
        },
    }
}

/// Image blocks (`"type": "image"`) anywhere in `v`, and the bytes of
/// their inline base64 data, which are not prompt text.
fn count_images(v: &Value) -> (u64, u64) {
    count_objects(v, &|map| {
        (map.get("type").and_then(Value::as_str) == Some("image")).then(|| {
            map.get("source")
                .and_then(|s| s.get("data"))
                .and_then(Value::as_str)
                .map_or(0, |d| d.len() as u64)
        })
    })
}

/// A document block: a PDF is read as page images and text, so it needs
/// the vision capability (its inline data stays in the bound byte for byte).
fn has_document(v: &Value) -> bool {
    any_object(v, &|map| {
        map.get("type").and_then(Value::as_str) == Some("document")
    })
}

/// A block whose content the provider fetches: a `source` by URL or by
/// file id. Its tokens cannot be bounded from the body.
fn references_by_id(v: &Value) -> bool {
    any_object(v, &|map| {
        map.get("source")
            .and_then(|s| s.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| matches!(t, "url" | "file"))
    })
}

/// Tools the client runs itself: its own (no `type`, or `custom`) and the
/// ones Anthropic defines for a client to run (bash, the text editor,
/// computer use, memory). Any other typed tool runs at the provider (web
/// search, web fetch, code execution, …): its results join the prompt and
/// it may be billed per use, so the prompt is unbounded.
fn runs_at_client(tool: &Value) -> bool {
    match tool.get("type").and_then(Value::as_str) {
        None | Some("custom") => true,
        Some(t) => ["bash_", "text_editor_", "computer_", "memory_"]
            .iter()
            .any(|p| t.starts_with(p)),
    }
}

fn unbounded_input(body: &Map<String, Value>) -> Option<UnboundedInput> {
    let hosted = body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|tools| tools.iter().any(|t| !runs_at_client(t)))
        || body
            .get("mcp_servers")
            .and_then(Value::as_array)
            .is_some_and(|s| !s.is_empty());
    if hosted {
        return Some(UnboundedInput::HostedTool);
    }
    ["system", "messages"]
        .iter()
        .any(|k| body.get(*k).is_some_and(references_by_id))
        .then_some(UnboundedInput::Reference)
}

pub fn inspect(api: Api, raw: &[u8]) -> Result<Inspected, InvalidRequest> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| InvalidRequest {
        message: if std::str::from_utf8(raw).is_err() {
            "The body is not valid UTF-8. Send a JSON object with content-type: application/json."
                .to_string()
        } else {
            format!(
                "The body is not valid JSON ({e}). Send a JSON object with content-type: application/json."
            )
        },
    })?;
    let Value::Object(body) = value else {
        return Err(InvalidRequest {
            message: "The body must be a JSON object.".into(),
        });
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) => {
            return Err(invalid("model", "String should have at least 1 character"));
        }
        None | Some(Value::Null) => return Err(invalid("model", "Field required")),
        Some(_) => return Err(invalid("model", "Input should be a valid string")),
    };
    match body.get("messages") {
        Some(Value::Array(m)) => {
            if m.iter().any(|msg| !msg.is_object()) {
                return Err(invalid(
                    "messages",
                    "Input should be a list of objects with a role and content",
                ));
            }
        }
        None | Some(Value::Null) => return Err(invalid("messages", "Field required")),
        Some(_) => return Err(invalid("messages", "Input should be a valid list")),
    }
    let max_tokens = positive_int(&body, "max_tokens", MAX_TOKENS_PARAM)?;
    if api == Api::Messages && max_tokens.is_none() {
        return Err(invalid("max_tokens", "Field required"));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "Input should be a valid boolean")),
    };
    if stream && api == Api::CountTokens {
        return Err(invalid("stream", "Extra inputs are not permitted"));
    }
    match body.get("tools") {
        None | Some(Value::Null) | Some(Value::Array(_)) => {}
        Some(_) => return Err(invalid("tools", "Input should be a valid list")),
    }
    let uses_tools = body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let forces_tool = matches!(
        body.get("tool_choice")
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str),
        Some("any" | "tool")
    );
    let prompt = [body.get("system"), body.get("messages")];
    let (images, inline_image_bytes) = prompt
        .iter()
        .flatten()
        .map(|v| count_images(v))
        .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2));
    let uses_vision = images > 0 || prompt.iter().flatten().any(|v| has_document(v));
    Ok(Inspected {
        api,
        model,
        stream,
        max_tokens,
        uses_tools,
        forces_tool,
        uses_vision,
        unbounded_input: unbounded_input(&body),
        input_tokens_bound: (raw.len() as u64).saturating_sub(inline_image_bytes)
            + images * IMAGE_TOKENS_BOUND,
        body,
    })
}

/// Fields a client could set to be billed above the price models.yaml
/// names (`service_tier`: priority capacity). Never sent upstream.
const BILLING_SWITCHES: &[&str] = &["service_tier"];

impl Inspected {
    /// The body for an `anthropic` provider: its model name and the output
    /// cap reserved for in `max_tokens` (the only field this API caps
    /// output with); everything else as the client sent it.
    pub fn upstream_body(&self, provider_model: &str, output_cap: u64) -> Vec<u8> {
        let mut body: Map<String, Value> = self
            .body
            .iter()
            .filter(|(k, _)| !BILLING_SWITCHES.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        body.insert("model".into(), Value::String(provider_model.to_string()));
        if self.api == Api::Messages {
            body.insert("max_tokens".into(), Value::from(output_cap));
        }
        serde_json::to_vec(&body).expect("JSON values serialise")
    }

    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(body: Value) -> Result<Inspected, InvalidRequest> {
        inspect(Api::Messages, body.to_string().as_bytes())
    }

    fn hello() -> Value {
        json!({"model": "claude", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello"}]})
    }

    fn with(field: &str, v: Value) -> Value {
        let mut b = hello();
        b[field] = v;
        b
    }

    fn message(r: Result<Inspected, InvalidRequest>) -> String {
        r.expect_err("refused").message
    }

    #[test]
    fn a_missing_or_bad_field_is_refused_in_anthropics_words() {
        let mut no_cap = hello();
        no_cap.as_object_mut().unwrap().remove("max_tokens");
        assert_eq!(message(messages(no_cap)), "max_tokens: Field required");
        let mut no_model = hello();
        no_model.as_object_mut().unwrap().remove("model");
        assert_eq!(message(messages(no_model)), "model: Field required");
        assert_eq!(
            message(messages(with("max_tokens", json!(0)))),
            "max_tokens: Input should be greater than or equal to 1"
        );
        assert_eq!(
            message(messages(with("max_tokens", json!(-3)))),
            "max_tokens: Input should be greater than or equal to 1"
        );
        assert_eq!(
            message(messages(with("max_tokens", json!("ten")))),
            "max_tokens: Input should be a valid integer"
        );
        assert!(
            message(messages(with("max_tokens", json!(1u64 << 40)))).starts_with("max_tokens: ")
        );
        assert_eq!(
            message(messages(with("messages", json!("hi")))),
            "messages: Input should be a valid list"
        );
        assert_eq!(
            message(messages(with("stream", json!("yes")))),
            "stream: Input should be a valid boolean"
        );
        assert_eq!(
            message(messages(with("tools", json!({})))),
            "tools: Input should be a valid list"
        );
        assert!(message(inspect(Api::Messages, b"{nope")).contains("not valid JSON"));
        assert!(message(inspect(Api::Messages, b"[1]")).contains("JSON object"));
    }

    #[test]
    fn counting_tokens_needs_no_cap_and_never_streams() {
        let mut b = hello();
        b.as_object_mut().unwrap().remove("max_tokens");
        let counted = inspect(Api::CountTokens, b.to_string().as_bytes()).unwrap();
        assert_eq!(counted.max_tokens, None);
        b["stream"] = json!(true);
        assert!(inspect(Api::CountTokens, b.to_string().as_bytes()).is_err());
    }

    #[test]
    fn capabilities_are_read_from_the_blocks() {
        let plain = messages(hello()).unwrap();
        assert!(!plain.uses_tools && !plain.forces_tool && !plain.uses_vision && !plain.stream);
        assert_eq!(plain.max_tokens, Some(100));
        let tools = messages(json!({"model": "claude", "max_tokens": 10, "stream": true,
            "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "Read"},
            "messages": [{"role": "user", "content": "read it"}]}))
        .unwrap();
        assert!(tools.uses_tools && tools.forces_tool && tools.stream);
        assert_eq!(tools.unbounded_input, None);
        let auto = messages(with("tool_choice", json!({"type": "auto"}))).unwrap();
        assert!(!auto.forces_tool);
        let pdf = messages(with(
            "messages",
            json!([{"role": "user", "content": [{"type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]),
        ))
        .unwrap();
        assert!(pdf.uses_vision);
    }

    #[test]
    fn an_image_costs_its_allowance_not_its_bytes() {
        let data = "A".repeat(300_000);
        let body = with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
                {"type": "text", "text": "what is this?"}]}]),
        );
        let raw = body.to_string();
        let i = messages(body).unwrap();
        assert!(i.uses_vision);
        assert_eq!(
            i.input_tokens_bound,
            raw.len() as u64 - 300_000 + IMAGE_TOKENS_BOUND
        );
        // The system prompt and the tools are in the body's bytes.
        let long_system = with("system", json!("x".repeat(30_000)));
        assert!(messages(long_system).unwrap().input_tokens_bound > 30_000);
    }

    #[test]
    fn what_the_body_cannot_bound_is_named() {
        let search = with(
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search"}]),
        );
        assert_eq!(
            messages(search).unwrap().unbounded_input,
            Some(UnboundedInput::HostedTool)
        );
        let client_side = with(
            "tools",
            json!([{"type": "bash_20250124", "name": "bash"},
                {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
                {"type": "custom", "name": "mine", "input_schema": {}}]),
        );
        assert_eq!(messages(client_side).unwrap().unbounded_input, None);
        let mcp = with(
            "mcp_servers",
            json!([{"type": "url", "url": "https://x", "name": "x"}]),
        );
        assert_eq!(
            messages(mcp).unwrap().unbounded_input,
            Some(UnboundedInput::HostedTool)
        );
        let by_url = with(
            "messages",
            json!([{"role": "user", "content": [{"type": "image",
                "source": {"type": "url", "url": "https://example.com/a.png"}}]}]),
        );
        assert_eq!(
            messages(by_url).unwrap().unbounded_input,
            Some(UnboundedInput::Reference)
        );
    }

    #[test]
    fn upstream_gets_the_reserved_cap_and_the_provider_model_only() {
        let i = messages(with("service_tier", json!("auto"))).unwrap();
        let sent: Value =
            serde_json::from_slice(&i.upstream_body("claude-sonnet-4-5", 40)).unwrap();
        assert_eq!(sent["model"], "claude-sonnet-4-5");
        assert_eq!(sent["max_tokens"], 40);
        assert_eq!(sent["messages"], hello()["messages"]);
        assert!(sent.get("service_tier").is_none());
        let mut b = hello();
        b.as_object_mut().unwrap().remove("max_tokens");
        let counted = inspect(Api::CountTokens, b.to_string().as_bytes()).unwrap();
        let sent: Value = serde_json::from_slice(&counted.upstream_body("m", 40)).unwrap();
        assert!(sent.get("max_tokens").is_none());
    }
}
