//! Answers shaped like Anthropic's Messages API, complete enough for its
//! SDKs and Claude Code to accept them: text or a `tool_use` block, usage
//! with the prompt cache's parts, and the whole event sequence of a stream
//! (`message_start`, each block's start, deltas and stop, `message_delta`
//! with the stop reason and output usage, `message_stop`).

use super::openai::{Answer, TOOL_CALL_ID, deltas, text};
use serde_json::{Value, json};

/// What the mock reports: `input_tokens` counts the input neither read
/// from nor written to the cache, as Anthropic's does.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl Usage {
    fn value(self, output: u64) -> Value {
        json!({"input_tokens": self.input, "output_tokens": output,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation_input_tokens": self.cache_write})
    }
}

/// An error in Anthropic's shape for an HTTP status.
pub fn error(status: u16) -> String {
    let kind = match status {
        400 | 404 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": format!("mock {status}")}})
        .to_string()
}

fn stop_reason(answer: &Answer) -> &'static str {
    match answer {
        Answer::ToolCall { .. } => "tool_use",
        Answer::Text { .. } => "end_turn",
    }
}

fn tool_use(name: &str, input: Value) -> Value {
    json!({"type": "tool_use", "id": TOOL_CALL_ID, "name": name, "input": input})
}

fn message(model: &Value, content: Value, stop: Value, usage: Value) -> Value {
    json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage})
}

/// A whole (non-streamed) answer; `text_override` replaces the text (the
/// `ignore-cap` mode's flood).
pub fn whole(model: &Value, answer: &Answer, usage: Usage, text_override: Option<String>) -> Value {
    let content = match answer {
        Answer::Text { tool_output } => {
            json!([{"type": "text", "text": text_override.unwrap_or_else(|| text(tool_output))}])
        }
        Answer::ToolCall { name, arguments } => {
            let input: Value = serde_json::from_str(arguments).unwrap_or(json!({}));
            json!([tool_use(name, input)])
        }
    };
    message(
        model,
        content,
        json!(stop_reason(answer)),
        usage.value(usage.output),
    )
}

fn event(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// The events of a streamed answer: `words` text deltas (or the tool's
/// input in two pieces of partial JSON). With `usage_at_end` false the
/// closing `message_delta` carries no usage (a provider that never says
/// what it generated).
pub fn events(
    model: &Value,
    answer: &Answer,
    words: &[String],
    usage: Usage,
    usage_at_end: bool,
) -> Vec<String> {
    let mut out = vec![event(
        "message_start",
        json!({"type": "message_start",
                "message": message(model, json!([]), Value::Null, usage.value(1))}),
    )];
    match answer {
        Answer::Text { .. } => {
            out.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
            ));
            out.push(event("ping", json!({"type": "ping"})));
            out.extend(words.iter().map(|w| {
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": w}}),
                )
            }));
        }
        Answer::ToolCall { name, arguments } => {
            out.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                    "content_block": tool_use(name, json!({}))}),
            ));
            let half = arguments.len() / 2;
            let (a, b) = arguments.split_at(
                (0..=half)
                    .rev()
                    .find(|i| arguments.is_char_boundary(*i))
                    .unwrap_or(0),
            );
            for piece in [a, b] {
                out.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
        }
    }
    out.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta = json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason(answer), "stop_sequence": null}});
    if usage_at_end {
        delta["usage"] = json!({"output_tokens": usage.output});
    }
    out.push(event("message_delta", delta));
    out.push(event("message_stop", json!({"type": "message_stop"})));
    out
}

/// The words of a streamed text answer: `count` of them, the tool's output
/// first.
pub fn words(answer: &Answer, count: u64) -> Vec<String> {
    match answer {
        Answer::Text { tool_output } => deltas(tool_output, count),
        Answer::ToolCall { .. } => Vec::new(),
    }
}
