//! A Messages client on an OpenAI-compatible provider (Claude Code on a
//! local Ollama or vLLM model): Anthropic's request as a chat completion,
//! and the answer — whole, or its stream chunk by chunk — back in
//! Anthropic's shape.

use super::{Unsupported, Untranslated, anthropic_event, text_of, tool_use_of, unsupported};
use crate::api::Api;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

fn refuse(what: &str, fix: &str) -> Unsupported {
    unsupported(what, Api::Messages, fix)
}

/// The chat completion for a Messages request: its model the provider's,
/// its output cap (`max_tokens`) the one reserved for, usage asked for in a
/// stream. Hints with no chat counterpart that leave what is generated to
/// the model (how hard it thinks, prompt-cache marks, context editing) are
/// not carried and are named in `untranslated`.
pub fn request(
    body: &Map<String, Value>,
    provider_model: &str,
    output_cap: u64,
    untranslated: &mut Untranslated,
) -> Result<Map<String, Value>, Unsupported> {
    let mut out = Map::new();
    out.insert("model".into(), json!(provider_model));
    let mut messages = Vec::new();
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        let text = system_text(system, untranslated)?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str) {
            Some("user") => user_turn(content, &mut messages, untranslated)?,
            Some("assistant") => assistant_turn(content, &mut messages, untranslated)?,
            // Claude Code sends environment notes as system turns.
            Some("system") => messages.push(json!({"role": "system",
                "content": system_text(content, untranslated)?})),
            other => {
                return Err(refuse(
                    &format!(
                        "A message with role {}",
                        other.map_or("(none)".into(), |r| format!("'{r}'"))
                    ),
                    "Use the roles user and assistant.",
                ));
            }
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(output_cap));
    for (key, value) in body {
        match key.as_str() {
            "model" | "messages" | "system" | "max_tokens" => {}
            "stream" => {
                out.insert("stream".into(), value.clone());
                if value.as_bool() == Some(true) {
                    out.insert("stream_options".into(), json!({"include_usage": true}));
                }
            }
            "temperature" | "top_p" | "top_k" => {
                out.insert(key.clone(), value.clone());
            }
            "stop_sequences" => {
                out.insert("stop".into(), value.clone());
            }
            "metadata" => {
                if let Some(user) = value.get("user_id").and_then(Value::as_str) {
                    out.insert("user".into(), json!(user));
                }
            }
            "tools" => {
                out.insert("tools".into(), tools(value, untranslated)?);
            }
            "tool_choice" => tool_choice(value, &mut out)?,
            // Leave to the model how much it reasons (`thinking`,
            // `output_config.effort`) and what of its context the
            // provider prunes: what it generates stays an answer in kind.
            "thinking" | "context_management" => untranslated.note(key),
            "output_config" => {
                for (k, _) in value.as_object().into_iter().flatten() {
                    if k == "effort" {
                        untranslated.note("output_config.effort");
                    } else {
                        return Err(refuse(
                            &format!("'output_config.{k}'"),
                            "Leave it out for this model.",
                        ));
                    }
                }
            }
            // Never sent upstream in any API (billing switch).
            "service_tier" => {}
            other => {
                return Err(refuse(
                    &format!("The field '{}'", aex_core::policy::echoed(other)),
                    "Leave it out for this model, or call a model whose provider speaks Anthropic's API.",
                ));
            }
        }
    }
    Ok(out)
}

/// `system` (or a system turn): a string, or text blocks.
fn system_text(v: &Value, untranslated: &mut Untranslated) -> Result<String, Unsupported> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::new();
            for b in blocks {
                note_cache_control(b, untranslated);
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => parts.push(text_of(b.get("text").unwrap_or(&Value::Null))),
                    other => return Err(block_refused(other, "a system prompt")),
                }
            }
            Ok(parts.join("\n"))
        }
        _ => Err(refuse(
            "A system prompt that is neither text nor text blocks",
            "Send it as a string.",
        )),
    }
}

fn note_cache_control(block: &Value, untranslated: &mut Untranslated) {
    if block.get("cache_control").is_some_and(|c| !c.is_null()) {
        untranslated.note("cache_control");
    }
}

fn block_refused(kind: Option<&str>, place: &str) -> Unsupported {
    refuse(
        &format!(
            "A '{}' block in {place}",
            aex_core::policy::echoed(kind.unwrap_or("(untyped)"))
        ),
        "Send text, images, tool calls and tool results only.",
    )
}

/// An image block's URL for a chat `image_url` part: inline data as a data
/// URL, or the image's own URL.
fn image_url(block: &Value) -> Result<String, Unsupported> {
    let source = block.get("source").unwrap_or(&Value::Null);
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => Ok(format!(
            "data:{};base64,{}",
            source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            source
                .get("data")
                .and_then(Value::as_str)
                .unwrap_or_default()
        )),
        Some("url") => Ok(source
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()),
        _ => Err(refuse(
            "An image given by file id",
            "Send the image inline (base64) or by URL.",
        )),
    }
}

/// A turn's blocks; a turn of plain text is passed on as it is (`None`).
fn blocks_of<'a>(
    content: &'a Value,
    role: &str,
    messages: &mut Vec<Value>,
) -> Result<Option<&'a Vec<Value>>, Unsupported> {
    match content {
        Value::String(s) => {
            messages.push(json!({"role": role, "content": s}));
            Ok(None)
        }
        Value::Array(blocks) => Ok(Some(blocks)),
        _ => Err(refuse(
            "A message whose content is neither text nor blocks",
            "Send a string or a list of blocks.",
        )),
    }
}

/// A user turn: its tool results become `tool` messages (first, right
/// after the assistant turn that called them), the rest one user message.
fn user_turn(
    content: &Value,
    messages: &mut Vec<Value>,
    untranslated: &mut Untranslated,
) -> Result<(), Unsupported> {
    let Some(blocks) = blocks_of(content, "user", messages)? else {
        return Ok(());
    };
    let mut parts = Vec::new();
    for b in blocks {
        note_cache_control(b, untranslated);
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts.push(json!({"type": "text",
                "text": text_of(b.get("text").unwrap_or(&Value::Null))})),
            Some("image") => {
                parts.push(json!({"type": "image_url", "image_url": {"url": image_url(b)?}}))
            }
            Some("tool_result") => {
                let content = b.get("content").unwrap_or(&Value::Null);
                if let Value::Array(items) = content
                    && items
                        .iter()
                        .any(|i| i.get("type").and_then(Value::as_str) != Some("text"))
                {
                    return Err(refuse(
                        "A tool result with images or documents",
                        "Return the tool's result as text.",
                    ));
                }
                let mut text = text_of(content);
                // Chat has no error flag on a tool's result: say it in it.
                if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    text = format!("Error: {text}");
                }
                messages.push(json!({"role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null),
                    "content": text}));
            }
            other => return Err(block_refused(other, "a user turn")),
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    // Text alone goes as a string: every OpenAI-compatible server reads it.
    let content = if parts.iter().all(|p| p["type"] == "text") {
        json!(
            parts
                .iter()
                .map(|p| p["text"].as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        )
    } else {
        Value::Array(parts)
    };
    messages.push(json!({"role": "user", "content": content}));
    Ok(())
}

/// An assistant turn: its text, and its tool calls. Its thinking (the
/// model's own earlier reasoning) has no place in a chat turn.
fn assistant_turn(
    content: &Value,
    messages: &mut Vec<Value>,
    untranslated: &mut Untranslated,
) -> Result<(), Unsupported> {
    let Some(blocks) = blocks_of(content, "assistant", messages)? else {
        return Ok(());
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        note_cache_control(b, untranslated);
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(&text_of(b.get("text").unwrap_or(&Value::Null))),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map_or("{}".to_string(), Value::to_string)}})),
            Some("thinking" | "redacted_thinking") => untranslated.note("thinking"),
            other => return Err(block_refused(other, "an assistant turn")),
        }
    }
    let mut m = json!({"role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    messages.push(m);
    Ok(())
}

/// Tools the client runs (no `type`, or `custom`) as functions; a tool
/// Anthropic defines or runs (bash, the text editor, web search, …) has no
/// counterpart.
fn tools(v: &Value, untranslated: &mut Untranslated) -> Result<Value, Unsupported> {
    let mut out = Vec::new();
    for t in v.as_array().into_iter().flatten() {
        note_cache_control(t, untranslated);
        match t.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(kind) => {
                return Err(refuse(
                    &format!("The tool type '{}'", aex_core::policy::echoed(kind)),
                    "Give the tool as a custom tool with an input_schema.",
                ));
            }
        }
        let mut function = json!({"name": t.get("name").cloned().unwrap_or(Value::Null),
            "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
        if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
            function["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

fn tool_choice(v: &Value, out: &mut Map<String, Value>) -> Result<(), Unsupported> {
    let choice = match v.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => json!({"type": "function",
            "function": {"name": v.get("name").cloned().unwrap_or(Value::Null)}}),
        _ => {
            return Err(refuse(
                "This tool_choice",
                "Use auto, any, none or a named tool.",
            ));
        }
    };
    out.insert("tool_choice".into(), choice);
    if v.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true) {
        out.insert("parallel_tool_calls".into(), json!(false));
    }
    Ok(())
}

/// Anthropic's stop reason for a chat finish reason.
fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic's usage for a chat one: its input counts exclude the cache.
fn usage(u: Option<&Value>) -> Value {
    let field = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_u64);
    let prompt = field(u, "prompt_tokens").unwrap_or(0);
    let details = u.and_then(|u| u.get("prompt_tokens_details"));
    let read = field(details, "cached_tokens").unwrap_or(0);
    let written = field(details, "cache_write_tokens").unwrap_or(0);
    json!({"input_tokens": prompt.saturating_sub(read).saturating_sub(written),
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": written,
        "output_tokens": field(u, "completion_tokens").unwrap_or(0)})
}

/// The model's reasoning, where OpenAI-compatible servers put it
/// (`reasoning_content`: DeepSeek, vLLM; `reasoning`: Ollama, OpenRouter).
fn reasoning_of(v: &Value) -> Option<&str> {
    ["reasoning_content", "reasoning"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
}

/// A whole chat completion as Anthropic's message; `Err` says why it
/// cannot be (a tool call whose arguments are not a JSON object).
pub fn response(v: &Value, model: &str) -> Result<Value, String> {
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or("the provider's answer has no choices")?;
    let message = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    if let Some(r) = reasoning_of(message) {
        content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    let text = text_of(message.get("content").unwrap_or(&Value::Null));
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        content.push(
            tool_use_of(call).ok_or("the model's tool call arguments are not a JSON object")?,
        );
    }
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    let id = v.get("id").and_then(Value::as_str).unwrap_or("aex");
    Ok(
        json!({"id": format!("msg_{id}"), "type": "message", "role": "assistant",
        "model": model, "content": content, "stop_reason": stop_reason(finish),
        "stop_sequence": null, "usage": usage(v.get("usage"))}),
    )
}

/// The block a Messages stream has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text(u64),
    Thinking(u64),
    Tool(u64),
}

impl Open {
    fn index(self) -> u64 {
        match self {
            Open::Text(i) | Open::Thinking(i) | Open::Tool(i) => i,
        }
    }
}

/// Chat chunks in, Anthropic's events out: `message_start` at the first
/// chunk, a block per run of text, reasoning or tool call (its arguments as
/// `input_json_delta`), and at the end the stop reason with the usage the
/// provider reported last (input included, which `message_start` could not
/// know yet).
#[derive(Debug)]
pub struct StreamToMessages {
    model: String,
    started: bool,
    open: Option<Open>,
    next_index: u64,
    /// A chat tool call's index → its block's.
    tools: HashMap<u64, u64>,
    stop_reason: Option<&'static str>,
    usage: Option<Value>,
    finished: bool,
}

impl StreamToMessages {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            started: false,
            open: None,
            next_index: 0,
            tools: HashMap::new(),
            stop_reason: None,
            usage: None,
            finished: false,
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        anthropic_event(
            out,
            &json!({"type": "message_start", "message": {"id": format!("msg_{id}"),
                "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        );
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(open) = self.open.take() {
            anthropic_event(
                out,
                &json!({"type": "content_block_stop", "index": open.index()}),
            );
        }
    }

    /// Opens a block of `kind` unless one is open; returns its index.
    fn ensure(&mut self, kind: fn(u64) -> Open, block: Value, out: &mut Vec<u8>) -> u64 {
        if let Some(open) = self.open
            && open == kind(open.index())
        {
            return open.index();
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        self.open = Some(kind(index));
        anthropic_event(
            out,
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    pub fn event(&mut self, data: Option<&Value>, out: &mut Vec<u8>) {
        let Some(chunk) = data else { return };
        if self.finished {
            return;
        }
        self.start(
            chunk.get("id").and_then(Value::as_str).unwrap_or("aex"),
            out,
        );
        if let Some(error) = chunk.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the provider failed");
            anthropic_event(
                out,
                &json!({"type": "error",
                "error": {"type": "api_error", "message": message}}),
            );
            return;
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(r) = reasoning_of(delta) {
            let index = self.ensure(
                Open::Thinking,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            );
            anthropic_event(
                out,
                &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "thinking_delta", "thinking": r}}),
            );
        }
        let text = text_of(delta.get("content").unwrap_or(&Value::Null));
        if !text.is_empty() {
            let index = self.ensure(Open::Text, json!({"type": "text", "text": ""}), out);
            anthropic_event(
                out,
                &json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": text}}),
            );
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = call.get("function").unwrap_or(&Value::Null);
            let index = match self.tools.get(&k) {
                Some(i) => *i,
                None => {
                    self.close(out);
                    let index = self.next_index;
                    self.next_index += 1;
                    self.open = Some(Open::Tool(index));
                    self.tools.insert(k, index);
                    anthropic_event(
                        out,
                        &json!({"type": "content_block_start", "index": index,
                        "content_block": {"type": "tool_use",
                            "id": call.get("id").cloned().unwrap_or(Value::Null),
                            "name": f.get("name").cloned().unwrap_or(Value::Null),
                            "input": {}}}),
                    );
                    index
                }
            };
            let arguments = f.get("arguments").and_then(Value::as_str).unwrap_or("");
            if !arguments.is_empty() {
                anthropic_event(
                    out,
                    &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                );
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(stop_reason(finish));
        }
    }

    pub fn finish(&mut self, cut_off: bool, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.start("aex", out);
        self.close(out);
        self.finished = true;
        let stop = if cut_off {
            "max_tokens"
        } else {
            self.stop_reason.unwrap_or("end_turn")
        };
        anthropic_event(
            out,
            &json!({"type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": usage(self.usage.as_ref())}),
        );
        anthropic_event(out, &json!({"type": "message_stop"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(body: Value) -> Result<(Value, Vec<String>), Unsupported> {
        let mut untranslated = Untranslated::default();
        let out = request(body.as_object().unwrap(), "llama3", 77, &mut untranslated)?;
        Ok((Value::Object(out), untranslated.names()))
    }

    #[test]
    fn a_claude_code_turn_becomes_a_chat_completion() {
        let (out, dropped) = translate(json!({
            "model": "local", "max_tokens": 32000, "stream": true,
            "system": [{"type": "text", "text": "You are Claude Code."},
                       {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "<reminder>"},
                                             {"type": "text", "text": "list files"}]},
                {"role": "system", "content": [{"type": "text", "text": "# Environment"}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"},
                    {"type": "text", "text": "and?"}]}],
            "tools": [{"name": "Bash", "description": "Runs a command",
                       "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
            "metadata": {"user_id": "u1"}, "temperature": 0.5, "stop_sequences": ["END"],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "high"},
            "context_management": {"edits": []}
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "model": "llama3", "max_tokens": 77, "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [
                    {"role": "system", "content": "You are Claude Code.\nBe brief."},
                    {"role": "user", "content": "<reminder>\nlist files"},
                    {"role": "system", "content": "# Environment"},
                    {"role": "assistant", "content": "Looking.", "tool_calls": [{"id": "toolu_1",
                        "type": "function", "function": {"name": "Bash", "arguments": "{\"command\":\"ls\"}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "a.txt"},
                    {"role": "user", "content": "and?"}],
                "tools": [{"type": "function", "function": {"name": "Bash", "description": "Runs a command",
                    "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}],
                "tool_choice": "auto", "parallel_tool_calls": false,
                "user": "u1", "temperature": 0.5, "stop": ["END"]
            })
        );
        assert_eq!(
            dropped,
            [
                "cache_control",
                "context_management",
                "output_config.effort",
                "thinking"
            ]
        );
    }

    #[test]
    fn images_and_errors_of_tools_are_carried() {
        let (out, _) = translate(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                "content": [{"type": "text", "text": "boom"}], "is_error": true}]}],
            "tool_choice": {"type": "tool", "name": "f"}}))
        .unwrap();
        assert_eq!(
            out["messages"][0]["content"],
            json!([{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                   {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                   {"type": "text", "text": "what?"}])
        );
        assert_eq!(out["messages"][1]["content"], Value::Null);
        assert_eq!(
            out["messages"][2],
            json!({"role": "tool", "tool_call_id": "t", "content": "Error: boom"})
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
    }

    #[test]
    fn what_chat_cannot_carry_is_refused_by_name() {
        let hello =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = hello.clone();
            b[k] = v;
            translate(b).unwrap_err().message
        };
        assert!(
            with(
                "tools",
                json!([{"type": "web_search_20250305", "name": "web_search"}])
            )
            .contains("'web_search_20250305'")
        );
        assert!(with("mcp_servers", json!([])).contains("'mcp_servers'"));
        assert!(with("output_config", json!({"format": {}})).contains("'output_config.format'"));
        assert!(
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "document", "source": {}}]}])
            )
            .contains("'document'")
        );
        let said = with("container", json!("c"));
        assert!(said.contains("OpenAI's API"), "{said}");
    }

    #[test]
    fn an_answer_comes_back_in_anthropics_words() {
        let chat = json!({"id": "c1", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": "Sure.", "reasoning_content": "think",
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 60}}});
        assert_eq!(
            response(&chat, "local").unwrap(),
            json!({"id": "msg_c1", "type": "message", "role": "assistant", "model": "local",
                "content": [{"type": "thinking", "thinking": "think", "signature": ""},
                            {"type": "text", "text": "Sure."},
                            {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 40, "cache_read_input_tokens": 60,
                          "cache_creation_input_tokens": 0, "output_tokens": 7}})
        );
        let mut bad = chat.clone();
        bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
        assert!(response(&bad, "local").is_err());
    }

    fn events(out: &[u8]) -> Vec<Value> {
        super::super::event_data(out)
            .into_iter()
            .flatten()
            .collect()
    }

    #[test]
    fn a_stream_is_translated_chunk_by_chunk() {
        let mut s = StreamToMessages::new("local");
        let mut out = Vec::new();
        let chunks = [
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1",
                "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": "{\"a\":1}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 4}}),
        ];
        for c in &chunks {
            s.event(Some(c), &mut out);
        }
        s.event(None, &mut out);
        s.finish(false, &mut out);
        let kinds: Vec<String> = events(&out)
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let e = events(&out);
        assert_eq!(
            e[5]["content_block"],
            json!({"type": "tool_use", "id": "call_1", "name": "f", "input": {}})
        );
        assert_eq!(
            e[6]["delta"],
            json!({"type": "input_json_delta", "partial_json": "{\"a\":1}"})
        );
        assert_eq!(e[8]["delta"]["stop_reason"], "tool_use");
        assert_eq!(e[8]["usage"]["input_tokens"], 12);
        assert_eq!(e[8]["usage"]["output_tokens"], 4);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("event: message_start\ndata: ")
        );
    }

    #[test]
    fn a_cut_off_stream_ends_at_max_tokens() {
        let mut s = StreamToMessages::new("local");
        let mut out = Vec::new();
        s.event(
            Some(&json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]})),
            &mut out,
        );
        s.finish(true, &mut out);
        s.finish(false, &mut out);
        let e = events(&out);
        let kinds: Vec<&str> = e.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(e[4]["delta"]["stop_reason"], "max_tokens");
    }
}
