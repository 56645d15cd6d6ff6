//! A chat client on an `anthropic` provider (OpenAI-SDK agents on Claude):
//! a chat completion request as Anthropic's Messages request, and the
//! answer — whole, or its stream event by event — back as a chat
//! completion.

use super::{Unsupported, Untranslated, chat_event, text_of, tool_use_of, unsupported};
use crate::api::Api;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

fn refuse(what: &str, fix: &str) -> Unsupported {
    unsupported(what, Api::ChatCompletions, fix)
}

/// Options whose neutral value changes nothing and is accepted (clients
/// send their defaults); any other value has no Messages counterpart.
fn neutral(key: &str, v: &Value) -> bool {
    match key {
        "n" => v.as_u64() == Some(1),
        "presence_penalty" | "frequency_penalty" => v.as_f64() == Some(0.0),
        "logprobs" => v.as_bool() == Some(false),
        "logit_bias" => v.as_object().is_some_and(Map::is_empty),
        "response_format" => v.get("type").and_then(Value::as_str) == Some("text"),
        _ => false,
    }
}

/// The Messages request for a chat completion: system and developer turns
/// as `system`, tool results as `tool_result` blocks of a user turn, the
/// output cap reserved for in `max_tokens`.
pub fn request(
    body: &Map<String, Value>,
    provider_model: &str,
    output_cap: u64,
    untranslated: &mut Untranslated,
) -> Result<Map<String, Value>, Unsupported> {
    let mut out = Map::new();
    out.insert("model".into(), json!(provider_model));
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => system.push(text_only(content, "A system message")?),
            Some("user") => {
                messages.push(json!({"role": "user", "content": user_content(content)?}))
            }
            Some("assistant") => messages.push(assistant(m)?),
            Some("tool") => {
                let result = json!({"type": "tool_result",
                    "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                    "content": text_only(content, "A tool message")?});
                // Every result of one assistant turn's calls goes in the
                // one user turn after it.
                match messages.last_mut() {
                    Some(last)
                        if last["role"] == "user"
                            && last["content"]
                                .as_array()
                                .is_some_and(|c| c.iter().all(|b| b["type"] == "tool_result")) =>
                    {
                        last["content"]
                            .as_array_mut()
                            .expect("checked")
                            .push(result);
                    }
                    _ => messages.push(json!({"role": "user", "content": [result]})),
                }
            }
            other => {
                return Err(refuse(
                    &format!(
                        "A message with role {}",
                        other.map_or("(none)".into(), |r| format!("'{r}'"))
                    ),
                    "Use the roles system, user, assistant and tool.",
                ));
            }
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(output_cap));
    let parallel = body.get("parallel_tool_calls").and_then(Value::as_bool);
    for (key, value) in body {
        if value.is_null() || neutral(key, value) {
            continue;
        }
        match key.as_str() {
            "model"
            | "messages"
            | "max_tokens"
            | "max_completion_tokens"
            | "stream_options"
            | "parallel_tool_calls" => {}
            "stream" | "temperature" | "top_p" => {
                out.insert(key.clone(), value.clone());
            }
            "stop" => {
                let stops = match value {
                    Value::String(s) => json!([s]),
                    other => other.clone(),
                };
                out.insert("stop_sequences".into(), stops);
            }
            "user" => {
                out.insert("metadata".into(), json!({"user_id": value}));
            }
            "tools" => {
                out.insert("tools".into(), tools(value)?);
            }
            "tool_choice" => {
                out.insert("tool_choice".into(), tool_choice(value, parallel)?);
            }
            // OpenAI's own storage of the completion: nothing generated
            // depends on it.
            "store" | "metadata" => untranslated.note(key),
            // Never sent upstream in any API (billing switch).
            "service_tier" => {}
            other => {
                return Err(refuse(
                    &format!("The parameter '{}'", aex_core::policy::echoed(other)),
                    "Leave it out for this model, or call a model whose provider speaks OpenAI's API.",
                ));
            }
        }
    }
    if parallel == Some(false) && !out.contains_key("tool_choice") && out.contains_key("tools") {
        out.insert(
            "tool_choice".into(),
            json!({"type": "auto", "disable_parallel_tool_use": true}),
        );
    }
    Ok(out)
}

/// Content that must be text: a string, or text parts.
fn text_only(content: &Value, what: &str) -> Result<String, Unsupported> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts)
            if parts
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str) == Some("text")) =>
        {
            Ok(text_of(content))
        }
        Value::Null => Ok(String::new()),
        _ => Err(refuse(
            &format!("{what} with other than text"),
            "Send its content as text.",
        )),
    }
}

/// A user turn's content: text, and images (a data URL inline, any other
/// URL by reference).
fn user_content(content: &Value) -> Result<Value, Unsupported> {
    let parts = match content {
        Value::String(s) => return Ok(json!(s)),
        Value::Array(parts) => parts,
        _ => {
            return Err(refuse(
                "A user message whose content is neither text nor parts",
                "Send a string or a list of parts.",
            ));
        }
    };
    let mut blocks = Vec::new();
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => blocks.push(
                json!({"type": "text", "text": text_of(p.get("text").unwrap_or(&Value::Null))}),
            ),
            Some("image_url") => {
                let url = match p.get("image_url") {
                    Some(Value::String(u)) => u.as_str(),
                    Some(o) => o.get("url").and_then(Value::as_str).unwrap_or_default(),
                    None => "",
                };
                let source = match url
                    .strip_prefix("data:")
                    .and_then(|rest| rest.split_once(";base64,"))
                {
                    Some((media_type, data)) => {
                        json!({"type": "base64", "media_type": media_type, "data": data})
                    }
                    None => json!({"type": "url", "url": url}),
                };
                blocks.push(json!({"type": "image", "source": source}));
            }
            other => {
                return Err(refuse(
                    &format!(
                        "A '{}' content part",
                        aex_core::policy::echoed(other.unwrap_or("(untyped)"))
                    ),
                    "Send text and images only.",
                ));
            }
        }
    }
    Ok(Value::Array(blocks))
}

/// An assistant turn: its text, then its tool calls as `tool_use` blocks.
fn assistant(m: &Value) -> Result<Value, Unsupported> {
    if m.get("function_call").is_some_and(|f| !f.is_null())
        || m.get("audio").is_some_and(|a| !a.is_null())
    {
        return Err(refuse(
            "A legacy function_call or audio in an assistant message",
            "Send tool calls as tool_calls.",
        ));
    }
    let mut blocks = Vec::new();
    let text = text_only(
        m.get("content").unwrap_or(&Value::Null),
        "An assistant message",
    )?;
    if !text.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in m
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        blocks.push(tool_use_of(call).ok_or_else(|| {
            refuse(
                "A tool call whose arguments are not a JSON object",
                "Send each call's arguments as a JSON object.",
            )
        })?);
    }
    Ok(json!({"role": "assistant", "content": blocks}))
}

fn tools(v: &Value) -> Result<Value, Unsupported> {
    let mut out = Vec::new();
    for t in v.as_array().into_iter().flatten() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(refuse(
                "A tool other than a function",
                "Give it as a function with parameters.",
            ));
        }
        let f = t.get("function").unwrap_or(&Value::Null);
        let mut tool = json!({"name": f.get("name").cloned().unwrap_or(Value::Null),
            "input_schema": f.get("parameters").filter(|p| !p.is_null()).cloned()
                .unwrap_or(json!({"type": "object", "properties": {}}))});
        if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
            tool["description"] = d.clone();
        }
        out.push(tool);
    }
    Ok(Value::Array(out))
}

fn tool_choice(v: &Value, parallel: Option<bool>) -> Result<Value, Unsupported> {
    let mut choice = match v {
        Value::String(s) if s == "auto" => json!({"type": "auto"}),
        Value::String(s) if s == "required" => json!({"type": "any"}),
        Value::String(s) if s == "none" => json!({"type": "none"}),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            json!({"type": "tool", "name": o.get("function").and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null)})
        }
        _ => {
            return Err(refuse(
                "This tool_choice",
                "Use auto, required, none or a named function.",
            ));
        }
    };
    if parallel == Some(false) && choice["type"] != "none" {
        choice["disable_parallel_tool_use"] = json!(true);
    }
    Ok(choice)
}

/// The chat finish reason for Anthropic's stop reason.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// The chat usage for Anthropic's: every input token, the cache's parts in
/// the details (OpenAI's `cached_tokens`, OpenRouter's
/// `cache_write_tokens`).
fn usage(input: u64, cache_read: u64, cache_write: u64, output: u64) -> Value {
    let prompt = input + cache_read + cache_write;
    json!({"prompt_tokens": prompt, "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write}})
}

fn usage_of(u: &Value) -> (u64, u64, u64, u64) {
    let f = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    (
        f("input_tokens"),
        f("cache_read_input_tokens"),
        f("cache_creation_input_tokens"),
        f("output_tokens"),
    )
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A whole Messages answer as a chat completion.
pub fn response(v: &Value, model: &str) -> Result<Value, String> {
    let blocks = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or("the provider's answer has no content")?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("thinking") => reasoning.push_str(b.get("thinking").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => calls.push(json!({"id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function", "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map_or("{}".to_string(), Value::to_string)}})),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
        "refusal": null});
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let stop = v
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    let (input, read, write, output) = usage_of(v.get("usage").unwrap_or(&Value::Null));
    let id = v.get("id").and_then(Value::as_str).unwrap_or("aex");
    Ok(
        json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": now_s(),
        "model": model, "choices": [{"index": 0, "message": message, "logprobs": null,
            "finish_reason": finish_reason(stop)}],
        "usage": usage(input, read, write, output)}),
    )
}

/// Anthropic's events in, chat chunks out: a chunk per text, reasoning or
/// tool-input delta (each `tool_use` block a tool call of its own index),
/// the finish reason at the end, then the usage chunk if the client asked
/// for one, then `[DONE]`.
#[derive(Debug)]
pub struct StreamToChat {
    model: String,
    include_usage: bool,
    id: String,
    created: u64,
    /// A `tool_use` block's index → its tool call's.
    tools: HashMap<u64, u64>,
    finish: Option<&'static str>,
    usage: (u64, u64, u64, u64),
    finished: bool,
}

impl StreamToChat {
    pub fn new(model: &str, include_usage: bool) -> Self {
        Self {
            model: model.to_string(),
            include_usage,
            id: "chatcmpl-aex".into(),
            created: now_s(),
            tools: HashMap::new(),
            finish: None,
            usage: (0, 0, 0, 0),
            finished: false,
        }
    }

    fn chunk(&self, out: &mut Vec<u8>, delta: Value, finish: Option<&str>) {
        chat_event(
            out,
            &json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
                    "finish_reason": finish}]}),
        );
    }

    fn merge_usage(&mut self, u: &Value) {
        let f = |k: &str| u.get(k).and_then(Value::as_u64);
        let (input, read, write, output) = &mut self.usage;
        *input = f("input_tokens").unwrap_or(*input);
        *read = f("cache_read_input_tokens").unwrap_or(*read);
        *write = f("cache_creation_input_tokens").unwrap_or(*write);
        *output = f("output_tokens").unwrap_or(*output);
    }

    pub fn event(&mut self, data: Option<&Value>, out: &mut Vec<u8>) {
        let Some(e) = data else { return };
        if self.finished {
            return;
        }
        match e.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                let m = e.get("message").unwrap_or(&Value::Null);
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.id = format!("chatcmpl-{id}");
                }
                if let Some(u) = m.get("usage") {
                    self.merge_usage(u);
                }
                self.chunk(out, json!({"role": "assistant", "content": ""}), None);
            }
            "content_block_start" => {
                let block = e.get("content_block").unwrap_or(&Value::Null);
                let index = e.get("index").and_then(Value::as_u64).unwrap_or(0);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let k = self.tools.len() as u64;
                        self.tools.insert(index, k);
                        self.chunk(out, json!({"tool_calls": [{"index": k,
                            "id": block.get("id").cloned().unwrap_or(Value::Null), "type": "function",
                            "function": {"name": block.get("name").cloned().unwrap_or(Value::Null),
                                "arguments": ""}}]}), None);
                    }
                    Some("text") => {
                        let text = block
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        if !text.is_empty() {
                            self.chunk(out, json!({"content": text}), None);
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = e.get("delta").unwrap_or(&Value::Null);
                let index = e.get("index").and_then(Value::as_u64).unwrap_or(0);
                let s = |k: &str| delta.get(k).and_then(Value::as_str).unwrap_or_default();
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => self.chunk(out, json!({"content": s("text")}), None),
                    Some("thinking_delta") => {
                        self.chunk(out, json!({"reasoning_content": s("thinking")}), None)
                    }
                    Some("input_json_delta") => {
                        let k = self.tools.get(&index).copied().unwrap_or(0);
                        self.chunk(
                            out,
                            json!({"tool_calls": [{"index": k,
                            "function": {"arguments": s("partial_json")}}]}),
                            None,
                        );
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(stop) = e.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.finish = Some(finish_reason(stop));
                }
                if let Some(u) = e.get("usage") {
                    self.merge_usage(u);
                }
            }
            "error" => {
                let message = e
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("the provider failed");
                chat_event(
                    out,
                    &json!({"error": {"message": message, "type": "server_error",
                    "param": null, "code": "upstream_error"}}),
                );
            }
            // ping, content_block_stop, message_stop (the end is `finish`).
            _ => {}
        }
    }

    pub fn finish(&mut self, cut_off: bool, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let finish = if cut_off {
            "length"
        } else {
            self.finish.unwrap_or("stop")
        };
        self.chunk(out, json!({}), Some(finish));
        if self.include_usage {
            let (input, read, write, output) = self.usage;
            chat_event(
                out,
                &json!({"id": self.id, "object": "chat.completion.chunk",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(input, read, write, output)}),
            );
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Result<Value, Unsupported> {
        let mut untranslated = Untranslated::default();
        request(body.as_object().unwrap(), "claude-x", 64, &mut untranslated).map(Value::Object)
    }

    #[test]
    fn an_openai_sdk_turn_becomes_a_message() {
        let out = translate(json!({
            "model": "claude", "max_completion_tokens": 500, "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "presence_penalty": 0,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": [{"type": "text", "text": "weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{\"c\":\"P\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "w", "arguments": "{\"c\":\"L\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"}],
            "tools": [{"type": "function", "function": {"name": "w", "description": "Weather",
                "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "stop": "END", "user": "u1", "temperature": 0.2
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "claude-x", "max_tokens": 64, "stream": true,
                "system": "Be brief.\n\nUse tools.",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "weather?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "w", "input": {"c": "P"}},
                        {"type": "tool_use", "id": "call_2", "name": "w", "input": {"c": "L"}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"}]}],
                "tools": [{"name": "w", "description": "Weather", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "temperature": 0.2
            })
        );
    }

    #[test]
    fn what_messages_cannot_carry_is_refused_by_name() {
        let hello = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = hello.clone();
            b[k] = v;
            translate(b).unwrap_err().message
        };
        assert!(with("n", json!(2)).contains("'n'"));
        assert!(
            with("response_format", json!({"type": "json_object"})).contains("'response_format'")
        );
        assert!(with("logprobs", json!(true)).contains("'logprobs'"));
        assert!(with("seed", json!(1)).contains("'seed'"));
        assert!(
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "input_audio"}]}])
            )
            .contains("'input_audio'")
        );
        let said = with(
            "tools",
            json!([{"type": "custom", "custom": {"name": "x"}}]),
        );
        assert!(said.contains("Anthropic's Messages API"), "{said}");
        // Neutral values are what clients send by default: accepted.
        assert!(
            translate(
                json!({"model": "m", "messages": [], "n": 1, "logprobs": false,
            "frequency_penalty": 0.0, "response_format": {"type": "text"}})
            )
            .is_ok()
        );
    }

    #[test]
    fn an_answer_comes_back_as_a_chat_completion() {
        let message = json!({"id": "msg_1", "type": "message", "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 80,
                      "cache_creation_input_tokens": 20, "output_tokens": 5}});
        let chat = response(&message, "claude").unwrap();
        assert_eq!(chat["model"], "claude");
        assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            chat["choices"][0]["message"],
            json!({"role": "assistant", "content": "Let me look.", "refusal": null,
                "reasoning_content": "hmm",
                "tool_calls": [{"id": "toolu_1", "type": "function",
                    "function": {"name": "w", "arguments": "{\"c\":\"P\"}"}}]})
        );
        assert_eq!(
            chat["usage"],
            json!({"prompt_tokens": 110, "completion_tokens": 5, "total_tokens": 115,
                "prompt_tokens_details": {"cached_tokens": 80, "cache_write_tokens": 20}})
        );
    }

    fn chunks(out: &[u8]) -> Vec<Option<Value>> {
        super::super::event_data(out)
    }

    #[test]
    fn a_stream_is_translated_event_by_event() {
        let mut s = StreamToChat::new("claude", true);
        let mut out = Vec::new();
        for e in [
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 10, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"c\":"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"P\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ] {
            s.event(Some(&e), &mut out);
        }
        s.finish(false, &mut out);
        let c = chunks(&out);
        assert_eq!(c.len(), 8, "{}", String::from_utf8_lossy(&out));
        let delta = |i: usize| c[i].as_ref().unwrap()["choices"][0]["delta"].clone();
        assert_eq!(delta(0), json!({"role": "assistant", "content": ""}));
        assert_eq!(delta(1), json!({"content": "Hi"}));
        assert_eq!(delta(2)["tool_calls"][0]["function"]["name"], "w");
        assert_eq!(
            delta(3)["tool_calls"][0]["function"]["arguments"],
            "{\"c\":"
        );
        assert_eq!(
            c[5].as_ref().unwrap()["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert_eq!(c[6].as_ref().unwrap()["usage"]["prompt_tokens"], 10);
        assert_eq!(c[6].as_ref().unwrap()["usage"]["completion_tokens"], 9);
        assert!(c[7].is_none(), "[DONE]");
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with("data: [DONE]\n\n")
        );
    }
}
