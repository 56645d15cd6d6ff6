//! Answers shaped like OpenAI's own, complete enough for real clients
//! (the SDKs' parsers, OpenAI Agents, OpenClaw) to accept them: tool calls,
//! and the whole Responses event sequence, not only deltas and a final usage.

use serde_json::{Value, json};

/// What the mock says this turn.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Plain text: "hello from mock", or what a tool returned.
    Text { tool_output: Option<String> },
    /// A call of a tool the request offered, asked for with `use_tool:NAME`
    /// in the user's turn (so clients that always send tools, such as
    /// OpenClaw, never get a call they did not ask for).
    ToolCall { name: String, arguments: String },
}

/// The API a request came through, as far as the answer's choice goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Chat,
    Responses,
    /// Anthropic's Messages API.
    Messages,
}

pub fn answer_for(body: &Value, shape: Shape) -> Answer {
    let items: Vec<Value> = match (shape, body.get("input")) {
        (Shape::Responses, Some(Value::Array(items))) => items.clone(),
        (Shape::Responses, Some(text @ Value::String(_))) => {
            vec![json!({"role": "user", "content": text})]
        }
        (Shape::Responses, _) => Vec::new(),
        _ => body
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
    };
    let model_spoke = |m: &Value| {
        m["role"] == "assistant" || (shape == Shape::Responses && m["type"] == "function_call")
    };
    // What came after the model last spoke: tool results, and the user's
    // turn (OpenClaw follows both with a user message of internal context).
    let tail: Vec<&Value> = items.iter().rev().take_while(|m| !model_spoke(m)).collect();
    let tool_output = tail.iter().find_map(|m| match shape {
        Shape::Responses if m["type"] == "function_call_output" => Some(text_of(&m["output"])),
        Shape::Chat if m["role"] == "tool" => Some(text_of(&m["content"])),
        // Anthropic: a user turn's `tool_result` blocks.
        Shape::Messages => m["content"].as_array().and_then(|blocks| {
            blocks
                .iter()
                .find(|b| b["type"] == "tool_result")
                .map(|b| text_of(&b["content"]))
        }),
        _ => None,
    });
    if tool_output.is_some() {
        return Answer::Text { tool_output };
    }
    let asked = tail
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .collect::<Vec<_>>()
        .join(" ");
    let wanted = asked
        .split_whitespace()
        .find_map(|w| w.strip_prefix("use_tool:"))
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '_' && c != '-'));
    let name_of = |t: &'_ Value| match shape {
        Shape::Chat => t["function"]["name"].as_str().map(str::to_string),
        _ => t["name"].as_str().map(str::to_string),
    };
    let offered = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|t| name_of(t).as_deref() == wanted);
    match (wanted, offered) {
        (Some(name), Some(tool)) => {
            let schema = match shape {
                Shape::Chat => &tool["function"]["parameters"],
                Shape::Responses => &tool["parameters"],
                Shape::Messages => &tool["input_schema"],
            };
            Answer::ToolCall {
                name: name.to_string(),
                arguments: arguments_for(schema).to_string(),
            }
        }
        _ => Answer::Text { tool_output: None },
    }
}

/// Message content as text: a string, or the text parts of a list.
pub fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Arguments that satisfy the tool's JSON schema's required properties.
fn arguments_for(schema: &Value) -> Value {
    let mut args = serde_json::Map::new();
    for name in schema["required"].as_array().into_iter().flatten() {
        let Some(name) = name.as_str() else { continue };
        let value = match schema["properties"][name]["type"].as_str() {
            Some("integer" | "number") => json!(1),
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            Some("object") => json!({}),
            _ => json!("Paris"),
        };
        args.insert(name.to_string(), value);
    }
    Value::Object(args)
}

pub const TOOL_CALL_ID: &str = "call_mock_1";

/// The text of a non-streamed answer.
pub fn text(tool_output: &Option<String>) -> String {
    match tool_output {
        Some(out) => format!("tool said: {out}"),
        None => "hello from mock".to_string(),
    }
}

/// Stream deltas: one word per completion token (the tool's output first).
pub fn deltas(tool_output: &Option<String>, count: u64) -> Vec<String> {
    let mut words: Vec<String> = (0..count.max(1)).map(|i| format!("word{i} ")).collect();
    if let Some(out) = tool_output {
        words[0] = format!("tool said: {out} {}", words[0]);
    }
    words
}

pub fn chat_completion(model: &Value, answer: &Answer, usage: Option<Value>) -> Value {
    let (message, finish) = match answer {
        Answer::Text { tool_output } => (
            json!({"role": "assistant", "content": text(tool_output), "refusal": null}),
            "stop",
        ),
        Answer::ToolCall { name, arguments } => (
            json!({"role": "assistant", "content": null, "refusal": null,
                   "tool_calls": [{"id": TOOL_CALL_ID, "type": "function",
                                   "function": {"name": name, "arguments": arguments}}]}),
            "tool_calls",
        ),
    };
    let mut v = json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000,
        "model": model, "choices": [{"index": 0, "message": message, "logprobs": null,
        "finish_reason": finish}]});
    if let Some(usage) = usage {
        v["usage"] = usage;
    }
    v
}

fn chunk(model: &Value, delta: Value, finish: Option<&str>) -> String {
    let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
    format!("data: {v}\n\n")
}

/// The SSE events of a streamed chat completion, before the usage chunk.
/// `n` chat chunks of text in a field the usual meters miss (see the
/// `flood:FIELD` mode), or one event that never ends.
pub fn flood_events(model: &Value, field: &str, n: usize) -> Vec<String> {
    let word = |i: usize| format!("word{i} ");
    if field == "undelimited" {
        // ~250 KB for 2000: well past any cap, well within the 1 MiB an
        // event used to be held for before the cut-off applied.
        let text: String = (0..n * 16).map(word).collect();
        // No blank line ever ends it: sent in pieces, then the stream ends.
        let event = format!(
            "data: {}",
            json!({"model": model, "choices": [{"index": 0, "delta": {"content": text}}]})
        );
        return event
            .into_bytes()
            .chunks(4096)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
    }
    (0..n)
        .map(|i| {
            let choice = match field {
                "refusal" => json!({"index": 0, "delta": {"refusal": word(i)}}),
                "audio" => json!({"index": 0, "delta": {"audio": {"id": "audio_1",
                    "data": "UklGR".repeat(205), "transcript": ""}}}),
                "function_call" => {
                    json!({"index": 0, "delta": {"function_call": {"arguments": word(i)}}})
                }
                "parts" => {
                    json!({"index": 0, "delta": {"content": [{"type": "text", "text": word(i)}]}})
                }
                "message" => {
                    json!({"index": 0, "message": {"role": "assistant", "content": word(i)}})
                }
                _ => json!({"index": 0, "delta": {"x_unknown": word(i)}}),
            };
            format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-flood", "object": "chat.completion.chunk", "model": model,
                       "choices": [choice]})
            )
        })
        .collect()
}

pub fn chat_chunks(model: &Value, answer: &Answer, words: &[String]) -> Vec<String> {
    match answer {
        Answer::Text { .. } => {
            let mut out = vec![chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
            )];
            out.extend(
                words
                    .iter()
                    .map(|w| chunk(model, json!({"content": w}), None)),
            );
            out.push(chunk(model, json!({}), Some("stop")));
            out
        }
        Answer::ToolCall { name, arguments } => vec![
            chunk(
                model,
                json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0,
                    "id": TOOL_CALL_ID, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                None,
            ),
            chunk(
                model,
                json!({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
                None,
            ),
            chunk(model, json!({}), Some("tool_calls")),
        ],
    }
}

pub fn chat_usage_chunk(model: &Value, usage: &Value) -> String {
    let v = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "choices": [], "usage": usage});
    format!("data: {v}\n\n")
}

fn output_item(answer: &Answer, text: &str, status: &str) -> Value {
    match answer {
        Answer::Text { .. } => json!({"type": "message", "id": "msg_mock", "role": "assistant",
            "status": status, "content": if status == "completed" {
                json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
            } else { json!([]) }}),
        Answer::ToolCall { name, arguments } => json!({"type": "function_call", "id": "fc_mock",
            "call_id": TOOL_CALL_ID, "name": name, "status": status,
            "arguments": if status == "completed" { arguments.as_str() } else { "" }}),
    }
}

fn response_object(model: &Value, status: &str, output: Value, usage: Option<Value>) -> Value {
    json!({"id": "resp_mock", "object": "response", "created_at": 1_700_000_000, "model": model,
        "status": status, "error": null, "incomplete_details": null, "instructions": null,
        "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
        "usage": usage.unwrap_or(Value::Null)})
}

pub fn response(model: &Value, answer: &Answer, usage: Option<Value>) -> Value {
    let text = match answer {
        Answer::Text { tool_output } => text(tool_output),
        Answer::ToolCall { .. } => String::new(),
    };
    response_object(
        model,
        "completed",
        json!([output_item(answer, &text, "completed")]),
        usage,
    )
}

/// Every event of a streamed response, in OpenAI's order, each with its
/// sequence number. The last one is `response.completed` carrying usage.
pub fn response_events(
    model: &Value,
    answer: &Answer,
    words: &[String],
    usage: Option<Value>,
) -> Vec<String> {
    let mut events: Vec<Value> = vec![
        json!({"type": "response.created", "response": response_object(model, "in_progress", json!([]), None)}),
        json!({"type": "response.in_progress", "response": response_object(model, "in_progress", json!([]), None)}),
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": output_item(answer, "", "in_progress")}),
    ];
    let text = words.concat();
    match answer {
        Answer::Text { .. } => {
            let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": [], "logprobs": []});
            events.push(
                json!({"type": "response.content_part.added", "item_id": "msg_mock",
                "output_index": 0, "content_index": 0, "part": part("")}),
            );
            for w in words {
                events.push(
                    json!({"type": "response.output_text.delta", "item_id": "msg_mock",
                    "output_index": 0, "content_index": 0, "delta": w, "logprobs": []}),
                );
            }
            events.push(
                json!({"type": "response.output_text.done", "item_id": "msg_mock",
                "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
            );
            events.push(
                json!({"type": "response.content_part.done", "item_id": "msg_mock",
                "output_index": 0, "content_index": 0, "part": part(&text)}),
            );
        }
        Answer::ToolCall { arguments, .. } => {
            events.push(
                json!({"type": "response.function_call_arguments.delta", "item_id": "fc_mock",
                "output_index": 0, "delta": arguments}),
            );
            events.push(
                json!({"type": "response.function_call_arguments.done", "item_id": "fc_mock",
                "output_index": 0, "arguments": arguments}),
            );
        }
    }
    let done = output_item(answer, &text, "completed");
    events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": done}));
    events.push(json!({"type": "response.completed",
        "response": response_object(model, "completed", json!([done]), usage)}));
    events
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["sequence_number"] = json!(i);
            format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or(""))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_is_called_only_when_asked_for_and_offered() {
        let tools = json!([{"type": "function", "function": {"name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let ask =
            |text: &str| json!({"messages": [{"role": "user", "content": text}], "tools": tools});
        assert_eq!(
            answer_for(&ask("hi"), Shape::Chat),
            Answer::Text { tool_output: None }
        );
        assert_eq!(
            answer_for(&ask("please use_tool:weather."), Shape::Chat),
            Answer::ToolCall {
                name: "weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }
        );
        assert_eq!(
            answer_for(&ask("use_tool:stocks"), Shape::Chat),
            Answer::Text { tool_output: None }
        );
        let after = json!({"messages": [{"role": "user", "content": "use_tool:weather"},
            {"role": "tool", "tool_call_id": TOOL_CALL_ID, "content": "sunny"}], "tools": tools});
        assert_eq!(
            answer_for(&after, Shape::Chat),
            Answer::Text {
                tool_output: Some("sunny".into())
            }
        );
        let responses = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "use_tool:weather"}]},
            {"type": "function_call_output", "call_id": TOOL_CALL_ID, "output": "rain"}],
            "tools": [{"type": "function", "name": "weather", "parameters": {}}]});
        assert_eq!(
            answer_for(&responses, Shape::Responses),
            Answer::Text {
                tool_output: Some("rain".into())
            }
        );
    }
}
