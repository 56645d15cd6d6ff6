//! How much a model generated, read from the part of an answer that holds
//! what it generated (a chunk's `delta`, a choice's `message`, a Responses
//! output item). The meters count this toward the cut-off and the estimate
//! of a call whose provider reports no usage, so it fails closed: every
//! string counts — content as a string or an array of parts, refusals,
//! reasoning, audio and its transcript, legacy `function_call` and
//! `tool_calls` arguments, fields no API defines yet — except the few that
//! are bookkeeping, not generation (issue #31: a stream meter that read only
//! `content` let 2–4 MB through `refusal`, `audio` and array content past a
//! 20-token cap, charged 28 µ). Pure.

use serde_json::Value;

/// Keys whose strings a model does not generate: roles, object types, ids,
/// the finish reason, and log probabilities (which repeat each generated
/// token with its alternatives, so counting them would cut honest answers
/// off at a fraction of their cap).
const BOOKKEEPING: &[&str] = &[
    "role",
    "type",
    "id",
    "object",
    "index",
    "finish_reason",
    "stop_reason",
    "logprobs",
    "expires_at",
    "status",
    "call_id",
];

/// Base64 audio bytes that count as one byte of text. Speech at 24 kHz in
/// 16-bit samples is about 64 KB/s of base64, billed at roughly 20 audio
/// tokens per second; the cut-off allows 12 bytes a token
/// (`metering::MAX_BYTES_PER_TOKEN`), so counting audio at 1/256 keeps an
/// honest answer clear of it while a provider sending audio it was not
/// asked for still meets it after about 3 KB per token of cap.
pub const AUDIO_BYTES_PER_TEXT_BYTE: u64 = 256;

/// Bytes generated in `v`, counted as described above.
pub fn generated_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items.iter().map(generated_bytes).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| !BOOKKEEPING.contains(&k.as_str()))
            .map(|(k, v)| match (k.as_str(), v) {
                // Encoded audio, not text: counted by its own measure
                // (`audio.data` in chat, the `delta` of Responses' audio).
                ("data", Value::String(s)) => audio_bytes(s.len()),
                _ => generated_bytes(v),
            })
            .sum(),
        _ => 0,
    }
}

/// What `len` bytes of base64 audio count for.
pub fn audio_bytes(len: usize) -> u64 {
    (len as u64).div_ceil(AUDIO_BYTES_PER_TEXT_BYTE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_generated_field_counts_and_bookkeeping_does_not() {
        let delta = json!({
            "role": "assistant",
            "content": "Hello",
            "refusal": "no",
            "reasoning_content": "hmm",
            "function_call": {"name": "f", "arguments": "{}"},
            "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "g", "arguments": "{\"a\":1}"}}],
            "audio": {"id": "audio_1", "expires_at": 1, "data": "A".repeat(512), "transcript": "hi"},
            "some_future_field": "xyz",
        });
        // 5 + 2 + 3 + (1 + 2) + (1 + 7) + (2 audio + 2) + 3
        assert_eq!(generated_bytes(&delta), 28);
        let parts = json!({"content": [{"type": "text", "text": "abc"},
                                       {"type": "refusal", "refusal": "de"}]});
        assert_eq!(generated_bytes(&parts), 5);
        let logprobs = json!({"content": "a", "logprobs": {"content": [{"token": "a", "top_logprobs": [{"token": "b"}]}]}});
        assert_eq!(generated_bytes(&logprobs), 1);
        assert_eq!(
            generated_bytes(&json!({"content": null, "role": "assistant"})),
            0
        );
    }
}
