//! Usage from provider responses: whole JSON bodies, and SSE streams read
//! incrementally. The stream meter forwards complete events as they arrive
//! (minus the usage-only chunk AEX asked for on the client's behalf), counts
//! the output text so far, and keeps the last usage the provider reported.
//! Pure: bytes in, bytes out, whatever the chunking.

use crate::api::{Api, Family};
use crate::generated::{audio_bytes, generated_bytes};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Every input token, cached or not.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Parts of `prompt_tokens` read from the provider's prompt cache, and
    /// written to it (billed at their own prices).
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            ..Usage::default()
        }
    }
}

fn tokens(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// `usage` of a chat/completions/embeddings object, or of a responses
/// object. OpenAI-style input counts include the cached part: OpenAI's
/// `prompt_tokens_details.cached_tokens` (Responses:
/// `input_tokens_details.cached_tokens`), OpenRouter's
/// `prompt_tokens_details.cache_write_tokens`, DeepSeek's flat
/// `prompt_cache_hit_tokens`. Reasoning tokens are in the output counts
/// already.
pub fn usage_of(api: Api, object: &Value) -> Option<Usage> {
    let usage = object.get("usage").filter(|u| u.is_object())?;
    if api.family() == Family::Anthropic {
        return anthropic_usage(usage, None);
    }
    let (input, output, details) = match api {
        Api::Responses => ("input_tokens", "output_tokens", "input_tokens_details"),
        _ => (
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
        ),
    };
    let details = usage.get(details);
    let detail = |key| details.and_then(|d| tokens(d, key));
    Some(Usage {
        prompt_tokens: tokens(usage, input)?,
        completion_tokens: tokens(usage, output).unwrap_or(0),
        cached_input_tokens: detail("cached_tokens")
            .or_else(|| tokens(usage, "prompt_cache_hit_tokens"))
            .unwrap_or(0),
        cache_write_tokens: detail("cache_write_tokens").unwrap_or(0),
    })
}

/// Anthropic's `usage`: `input_tokens` counts only the input neither read
/// from nor written to the prompt cache, so the whole input is the sum of
/// the three. In a stream, `message_start` carries the input and
/// `message_delta` the output, and may repeat the input counts (then
/// final): `earlier` is what the stream reported before.
fn anthropic_usage(usage: &Value, earlier: Option<Usage>) -> Option<Usage> {
    let field = |key| tokens(usage, key);
    let input = field("input_tokens");
    let cache_read = field("cache_read_input_tokens");
    let cache_write = field("cache_creation_input_tokens");
    let output = field("output_tokens");
    let (mut u, uncached_before) = match earlier {
        Some(e) => (
            e,
            e.prompt_tokens
                .saturating_sub(e.cached_input_tokens)
                .saturating_sub(e.cache_write_tokens),
        ),
        None if input.is_none() => return None,
        None => (Usage::default(), 0),
    };
    u.cached_input_tokens = cache_read.unwrap_or(u.cached_input_tokens);
    u.cache_write_tokens = cache_write.unwrap_or(u.cache_write_tokens);
    u.prompt_tokens =
        input.unwrap_or(uncached_before) + u.cached_input_tokens + u.cache_write_tokens;
    u.completion_tokens = output.unwrap_or(u.completion_tokens);
    Some(u)
}

/// Usage from a complete (non-streamed) response body.
pub fn usage_of_body(api: Api, body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| usage_of(api, &v))
}

/// Bytes of generated text (content, refusals, reasoning, audio, tool
/// arguments, any field [`generated_bytes`] counts) in a complete response
/// object: what a provider's usage must at least account for.
pub fn output_text_bytes(api: Api, object: &Value) -> u64 {
    let items = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    };
    match api {
        Api::Embeddings | Api::CountTokens => 0,
        Api::Responses => items("output").map(generated_bytes).sum(),
        Api::ChatCompletions | Api::Completions => items("choices").map(choice_bytes).sum(),
        Api::Messages => items("content").map(generated_bytes).sum(),
    }
}

/// What one choice (of a chunk or a whole answer) generated: completions'
/// `text`, a chunk's `delta`, and a `message` wherever it appears.
fn choice_bytes(choice: &Value) -> u64 {
    text_len(choice.get("text"))
        + choice.get("delta").map_or(0, generated_bytes)
        + choice.get("message").map_or(0, generated_bytes)
}

#[derive(Debug, Clone)]
pub struct SseMeter {
    api: Api,
    strip_usage_chunk: bool,
    pending: Vec<u8>,
    /// How much of `pending` was already searched for an event's end, so a
    /// stream without delimiters is scanned once, not once per chunk.
    scanned: usize,
    /// Bytes examined for delimiters over the stream's life (linear in its
    /// length; tests hold it to that).
    examined: u64,
    usage: Option<Usage>,
    output_bytes: u64,
    /// The longest incomplete event held back to inspect ([`Self::cut_off_at`]).
    hold_limit: usize,
    /// A Messages stream's content block that has started and not
    /// stopped: a cut-off closes it before it ends the message.
    open_block: Option<u64>,
    /// The provider's model id renamed to the client's in each event
    /// forwarded (`alias.rs`).
    rename: Option<crate::alias::Rename>,
    /// Only tests ask: the settlement goes by usage and bytes, not by
    /// whether the provider closed with `[DONE]`.
    #[cfg(test)]
    saw_done: bool,
}

/// The longest event AEX holds back to inspect. Past it, the bytes are
/// forwarded unread and all counted as output, so an endless event can
/// neither exhaust memory nor slip past the cut-off.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// JSON an honest event carries around its generated text: ids, roles,
/// finish reasons, and log probabilities (about 2 KB a token with 20
/// alternatives each), with room to spare.
pub const EVENT_ENVELOPE_BYTES: usize = 16 * 1024;

/// Where the first complete event in `buf` ends (after its blank line),
/// searching from `from` (a delimiter is at most 3 bytes long).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        match buf[i] {
            b'\n' => {
                if buf.get(i + 1) == Some(&b'\n') {
                    return Some(i + 2);
                }
                if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                    return Some(i + 3);
                }
            }
            b'\r' if buf.get(i + 1) == Some(&b'\r') => return Some(i + 2),
            _ => {}
        }
        i += 1;
    }
    None
}

fn text_len(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_str).map_or(0, |s| s.len() as u64)
}

impl SseMeter {
    /// `strip_usage_chunk`: the client did not ask for usage, so the
    /// usage-only chunk AEX requested upstream is not forwarded.
    pub fn new(api: Api, strip_usage_chunk: bool) -> Self {
        Self {
            api,
            strip_usage_chunk,
            pending: Vec::new(),
            scanned: 0,
            examined: 0,
            usage: None,
            output_bytes: 0,
            hold_limit: MAX_EVENT_BYTES,
            open_block: None,
            rename: None,
            #[cfg(test)]
            saw_done: false,
        }
    }

    /// The stream is cut off once its output passes `bytes`: an event
    /// that has not ended by then is held back only as long as an honest
    /// one could be ([`EVENT_ENVELOPE_BYTES`] of JSON around the text left
    /// before the cut-off), then forwarded and counted whole, so an
    /// undelimited event cannot carry output past the cut-off.
    pub fn cut_off_at(mut self, bytes: u64) -> Self {
        let limit = bytes.saturating_add(EVENT_ENVELOPE_BYTES as u64);
        self.hold_limit =
            usize::try_from(limit).map_or(MAX_EVENT_BYTES, |l| l.min(MAX_EVENT_BYTES));
        self
    }

    /// Events are forwarded with the provider's model id renamed.
    pub fn renaming(mut self, rename: Option<crate::alias::Rename>) -> Self {
        self.rename = rename;
        self
    }

    /// Appends an event to forward, renamed if it names the provider's model.
    fn emit(&self, event: &[u8], out: &mut Vec<u8>) {
        match &self.rename {
            Some(rename) => {
                rename.append(event, out);
            }
            None => out.extend_from_slice(event),
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes of generated text (content, tool arguments, reasoning) so far.
    pub fn output_bytes(&self) -> u64 {
        self.output_bytes
    }

    /// The index of the Messages content block still open, if any.
    pub fn open_block(&self) -> Option<u64> {
        self.open_block
    }

    #[cfg(test)]
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    pub fn examined_bytes(&self) -> u64 {
        self.examined
    }

    /// Takes a chunk as it came off the wire; appends to `out` the bytes to
    /// forward now (whole events only).
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(chunk);
        let mut start = 0;
        // A match not found before could only start in the last 2 bytes seen.
        let mut from = self.scanned.saturating_sub(2);
        loop {
            let Some(len) = event_end(&pending[start..], from) else {
                self.examined += (pending.len() - start).saturating_sub(from) as u64;
                break;
            };
            self.examined += len.saturating_sub(from) as u64;
            let end = start + len;
            let event = &pending[start..end];
            if self.inspect(event) {
                self.emit(event, out);
            }
            start = end;
            from = 0;
        }
        pending.drain(..start);
        if pending.len() > self.hold_limit {
            self.output_bytes = self.output_bytes.saturating_add(pending.len() as u64);
            out.extend_from_slice(&pending);
            pending.clear();
        }
        self.scanned = pending.len();
        self.pending = pending;
    }

    /// End of stream: forwards whatever incomplete event is left.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.scanned = 0;
            if self.inspect(&rest) {
                self.emit(&rest, out);
            }
        }
    }

    /// Meters one event; returns whether to forward it.
    fn inspect(&mut self, event: &[u8]) -> bool {
        // What cannot be read is counted as output: a provider must not
        // evade the cut-off by sending text AEX does not parse.
        let Ok(text) = std::str::from_utf8(event) else {
            self.output_bytes = self.output_bytes.saturating_add(event.len() as u64);
            return true;
        };
        let mut data = String::new();
        for line in text.lines() {
            if let Some(d) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
        }
        if data.is_empty() {
            return true;
        }
        if data.trim() == "[DONE]" {
            #[cfg(test)]
            {
                self.saw_done = true;
            }
            return true;
        }
        let Ok(json) = serde_json::from_str::<Value>(&data) else {
            self.output_bytes = self.output_bytes.saturating_add(data.len() as u64);
            return true;
        };
        match self.api {
            Api::Messages | Api::CountTokens => {
                self.inspect_message_event(&json);
                true
            }
            Api::Responses => {
                let kind = json.get("type").and_then(Value::as_str).unwrap_or("");
                if kind.ends_with(".delta") {
                    let delta = match (kind, json.get("delta")) {
                        ("response.audio.delta", Some(Value::String(audio))) => {
                            audio_bytes(audio.len())
                        }
                        (_, Some(delta)) => generated_bytes(delta),
                        (_, None) => 0,
                    };
                    self.output_bytes = self.output_bytes.saturating_add(delta);
                }
                if matches!(
                    kind,
                    "response.completed" | "response.incomplete" | "response.failed"
                ) && let Some(u) = json
                    .get("response")
                    .and_then(|r| usage_of(Api::Responses, r))
                {
                    self.usage = Some(u);
                }
                true
            }
            _ => {
                let choices = json.get("choices").and_then(Value::as_array);
                for choice in choices.into_iter().flatten() {
                    self.output_bytes = self.output_bytes.saturating_add(choice_bytes(choice));
                }
                let usage = usage_of(self.api, &json);
                if let Some(u) = usage {
                    self.usage = Some(u);
                }
                let usage_only = usage.is_some() && choices.is_none_or(|c| c.is_empty());
                !(self.strip_usage_chunk && usage_only)
            }
        }
    }
}

impl SseMeter {
    /// One event of a Messages stream: usage from `message_start` and
    /// `message_delta`, generated text from each content block's start
    /// (a block may arrive whole) and deltas (text, thinking, tool input
    /// as partial JSON).
    fn inspect_message_event(&mut self, json: &Value) {
        match json.get("type").and_then(Value::as_str).unwrap_or("") {
            "message_start" => {
                if let Some(u) = json
                    .get("message")
                    .and_then(|m| m.get("usage"))
                    .and_then(|u| anthropic_usage(u, None))
                {
                    self.usage = Some(u);
                }
            }
            "message_delta" => {
                if let Some(u) = json
                    .get("usage")
                    .filter(|u| u.is_object())
                    .and_then(|u| anthropic_usage(u, Some(self.usage.unwrap_or_default())))
                {
                    self.usage = Some(u);
                }
            }
            "content_block_start" => {
                self.open_block = json.get("index").and_then(Value::as_u64).or(Some(0));
                let block = json.get("content_block").map_or(0, generated_bytes);
                self.output_bytes = self.output_bytes.saturating_add(block);
            }
            "content_block_delta" => {
                let delta = json.get("delta").map_or(0, generated_bytes);
                self.output_bytes = self.output_bytes.saturating_add(delta);
            }
            "content_block_stop" => self.open_block = None,
            // ping, message_stop, error, and types Anthropic may add.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHAT: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
        ": keep-alive comment\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}\n\n",
        "data: [DONE]\n\n",
    );

    const RESPONSES: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi there\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"usage\":{\"input_tokens\":20,\"output_tokens\":3,\"total_tokens\":23}}}\n\n",
    );

    fn run(api: Api, strip: bool, chunks: &[&[u8]]) -> (Vec<u8>, SseMeter) {
        let mut m = SseMeter::new(api, strip);
        let mut out = Vec::new();
        for c in chunks {
            m.feed(c, &mut out);
        }
        m.finish(&mut out);
        (out, m)
    }

    /// Anthropic's stream: a text block, then a tool_use block left open
    /// (as a stream cut mid-block would leave it).
    const MESSAGES: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":80,\"cache_creation_input_tokens\":20,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"get\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    /// MESSAGES' usage: every input token (10 + 80 read + 20 written).
    fn messages_usage() -> Usage {
        Usage {
            cached_input_tokens: 80,
            cache_write_tokens: 20,
            ..Usage::new(110, 7)
        }
    }

    #[test]
    fn a_messages_stream_is_metered_from_its_start_and_delta_and_passed_whole() {
        let (out, m) = run(Api::Messages, true, &[MESSAGES.as_bytes()]);
        assert_eq!(
            out,
            MESSAGES.as_bytes(),
            "nothing of Anthropic's is stripped"
        );
        assert_eq!(m.usage(), Some(messages_usage()));
        // "Hello", the tool's name, and its input `{"a":1}`.
        assert_eq!(m.output_bytes(), 15);
        assert_eq!(m.open_block(), Some(1));
        // A final message_delta that repeats the input counts wins; what
        // it leaves out stays as message_start said.
        let late = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":90,\"output_tokens\":9}}\n\n";
        let (_, m) = run(Api::Messages, true, &[MESSAGES.as_bytes(), late.as_bytes()]);
        assert_eq!(
            m.usage(),
            Some(Usage {
                cached_input_tokens: 90,
                cache_write_tokens: 20,
                ..Usage::new(122, 9)
            })
        );
    }

    #[test]
    fn a_whole_message_is_metered_in_anthropics_words() {
        let body = br#"{"type":"message","content":[{"type":"text","text":"Hi there"},
            {"type":"tool_use","id":"toolu_1","name":"get","input":{"city":"Paris"}}],
            "usage":{"input_tokens":10,"cache_read_input_tokens":80,"cache_creation_input_tokens":20,"output_tokens":7}}"#;
        assert_eq!(usage_of_body(Api::Messages, body), Some(messages_usage()));
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(output_text_bytes(Api::Messages, &v), 8 + 3 + 5);
        assert_eq!(
            usage_of_body(Api::Messages, br#"{"usage":{"output_tokens":1}}"#),
            None
        );
    }

    #[test]
    fn chat_usage_and_stripping() {
        let (out, m) = run(Api::ChatCompletions, false, &[CHAT.as_bytes()]);
        assert_eq!(out, CHAT.as_bytes());
        assert_eq!(m.usage(), Some(Usage::new(11, 7)));
        assert_eq!(m.output_bytes(), 5 + 7);
        assert!(m.saw_done());
        let (stripped, m) = run(Api::ChatCompletions, true, &[CHAT.as_bytes()]);
        let stripped = String::from_utf8(stripped).unwrap();
        assert!(!stripped.contains("prompt_tokens"));
        assert!(stripped.ends_with("data: [DONE]\n\n"));
        assert_eq!(m.usage().unwrap().completion_tokens, 7, "still metered");
    }

    #[test]
    fn responses_usage() {
        let (out, m) = run(Api::Responses, true, &[RESPONSES.as_bytes()]);
        assert_eq!(
            out,
            RESPONSES.as_bytes(),
            "responses events are never stripped"
        );
        assert_eq!(m.usage(), Some(Usage::new(20, 3)));
        assert_eq!(m.output_bytes(), 8);
    }

    #[test]
    fn crlf_framing_and_bodies() {
        let crlf = CHAT.replace("\n\n", "\r\n\r\n");
        let (out, m) = run(Api::ChatCompletions, false, &[crlf.as_bytes()]);
        assert_eq!(out, crlf.as_bytes());
        assert_eq!(m.usage().unwrap().prompt_tokens, 11);
        assert_eq!(
            usage_of_body(
                Api::Embeddings,
                br#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#
            ),
            Some(Usage::new(4, 0))
        );
        assert_eq!(usage_of_body(Api::ChatCompletions, b"{}"), None);
    }

    #[test]
    fn cache_parts_in_each_providers_words() {
        let openai = br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,
            "prompt_tokens_details":{"cached_tokens":80},"completion_tokens_details":{"reasoning_tokens":3}}}"#;
        assert_eq!(
            usage_of_body(Api::ChatCompletions, openai),
            Some(Usage {
                cached_input_tokens: 80,
                ..Usage::new(100, 5)
            })
        );
        let responses = br#"{"usage":{"input_tokens":100,"output_tokens":5,
            "input_tokens_details":{"cached_tokens":64}}}"#;
        assert_eq!(
            usage_of_body(Api::Responses, responses).map(|u| u.cached_input_tokens),
            Some(64)
        );
        let openrouter = br#"{"usage":{"prompt_tokens":194,"completion_tokens":2,
            "prompt_tokens_details":{"cached_tokens":0,"cache_write_tokens":100}}}"#;
        assert_eq!(
            usage_of_body(Api::ChatCompletions, openrouter),
            Some(Usage {
                cache_write_tokens: 100,
                ..Usage::new(194, 2)
            })
        );
        let deepseek = br#"{"usage":{"prompt_tokens":50,"completion_tokens":1,
            "prompt_cache_hit_tokens":40,"prompt_cache_miss_tokens":10}}"#;
        assert_eq!(
            usage_of_body(Api::ChatCompletions, deepseek).map(|u| u.cached_input_tokens),
            Some(40)
        );
    }

    /// Regression (hardening #9): a stream without event delimiters was
    /// rescanned from its start on every chunk, and held whole in memory.
    #[test]
    fn an_endless_event_is_scanned_once_and_never_held_whole() {
        let mut m = SseMeter::new(Api::ChatCompletions, true);
        let mut forwarded = 0usize;
        let chunk = vec![b'x'; 1024];
        let total = 4 * MAX_EVENT_BYTES;
        for _ in 0..total / chunk.len() {
            let mut out = Vec::new();
            m.feed(&chunk, &mut out);
            forwarded += out.len();
            assert!(m.pending.len() <= MAX_EVENT_BYTES);
        }
        let mut out = Vec::new();
        m.finish(&mut out);
        forwarded += out.len();
        assert_eq!(forwarded, total, "every byte is forwarded");
        assert!(
            m.examined_bytes() <= 2 * total as u64,
            "linear: {}",
            m.examined_bytes()
        );
        assert!(
            m.output_bytes() >= (total - MAX_EVENT_BYTES) as u64,
            "unread bytes count as output, so the cut-off still applies"
        );
    }

    #[test]
    fn text_the_cut_off_cannot_parse_is_counted() {
        let (_, m) = run(Api::ChatCompletions, true, &[b"data: not json at all\n\n"]);
        assert_eq!(m.output_bytes(), "not json at all".len() as u64);
    }

    #[test]
    fn output_text_of_whole_bodies() {
        let chat = serde_json::json!({"choices": [
            {"message": {"content": "hello", "tool_calls": [{"function": {"arguments": "{}"}}]}},
            {"message": {"content": [{"type": "text", "text": "abc"}], "reasoning_content": "r"}}]});
        assert_eq!(
            output_text_bytes(Api::ChatCompletions, &chat),
            5 + 2 + 3 + 1
        );
        let completion = serde_json::json!({"choices": [{"text": "four"}, {"text": "xy"}]});
        assert_eq!(output_text_bytes(Api::Completions, &completion), 6);
        let responses = serde_json::json!({"output": [
            {"type": "message", "content": [{"type": "output_text", "text": "hi"}]},
            {"type": "function_call", "arguments": "{\"a\":1}"}]});
        assert_eq!(output_text_bytes(Api::Responses, &responses), 2 + 7);
        assert_eq!(output_text_bytes(Api::Embeddings, &chat), 0);
    }

    fn splits(text: &'static str) -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0..=text.len(), 0..40)
    }

    fn split_at(bytes: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
        cuts.sort_unstable();
        let mut parts = Vec::new();
        let mut last = 0;
        for c in cuts {
            parts.push(&bytes[last..c]);
            last = c;
        }
        parts.push(&bytes[last..]);
        parts
    }

    proptest! {
        #[test]
        fn any_chunk_split_yields_the_same_usage_and_bytes(cuts in splits(CHAT), strip in any::<bool>()) {
            let (whole_out, whole) = run(Api::ChatCompletions, strip, &[CHAT.as_bytes()]);
            let parts = split_at(CHAT.as_bytes(), cuts);
            let (out, m) = run(Api::ChatCompletions, strip, &parts);
            prop_assert_eq!(out, whole_out);
            prop_assert_eq!(m.usage(), whole.usage());
            prop_assert_eq!(m.output_bytes(), whole.output_bytes());
        }

        #[test]
        fn any_split_of_a_messages_stream(cuts in splits(MESSAGES)) {
            let parts = split_at(MESSAGES.as_bytes(), cuts);
            let (out, m) = run(Api::Messages, true, &parts);
            prop_assert_eq!(out, MESSAGES.as_bytes());
            prop_assert_eq!(m.usage(), Some(messages_usage()));
            prop_assert_eq!(m.output_bytes(), 15);
            prop_assert_eq!(m.open_block(), Some(1));
        }

        #[test]
        fn any_split_of_a_responses_stream(cuts in splits(RESPONSES)) {
            let parts = split_at(RESPONSES.as_bytes(), cuts);
            let (out, m) = run(Api::Responses, true, &parts);
            prop_assert_eq!(out, RESPONSES.as_bytes());
            prop_assert_eq!(m.usage(), Some(Usage::new(20, 3)));
        }

        /// Fuzz: whatever bytes arrive, in whatever chunks, the meter never
        /// panics, forwards only what it was given, and for the OpenAI
        /// streams (where only usage chunks are stripped) what it holds
        /// back is bounded.
        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(0usize..3000, 0..20),
            api in prop_oneof![Just(Api::ChatCompletions), Just(Api::Responses), Just(Api::Completions), Just(Api::Messages)],
            strip in any::<bool>(),
        ) {
            let cuts = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            let parts = split_at(&bytes, cuts);
            let chunks = parts.len() as u64;
            let (out, m) = run(api, strip, &parts);
            prop_assert!(out.len() <= bytes.len());
            if !strip || api == Api::Responses {
                prop_assert_eq!(out, bytes.clone());
            }
            // Linear: each byte once, plus a delimiter's overlap per chunk.
            prop_assert!(m.examined_bytes() <= bytes.len() as u64 + 2 * chunks);
        }

        /// Fuzz: usage parsing of arbitrary JSON never panics.
        #[test]
        fn usage_of_any_json_never_panics(
            p in any::<i64>(), c in any::<f64>(), big in any::<u64>(), s in ".{0,12}",
        ) {
            for body in [
                serde_json::json!({"usage": {"prompt_tokens": p, "completion_tokens": c}}),
                serde_json::json!({"usage": {"prompt_tokens": big, "completion_tokens": s}}),
                serde_json::json!({"usage": {"input_tokens": big, "output_tokens": p}, "output": s}),
                serde_json::json!({"usage": s, "choices": [{"message": {"content": p}}]}),
            ] {
                for api in [Api::ChatCompletions, Api::Responses, Api::Completions, Api::Embeddings] {
                    let u = usage_of(api, &body);
                    let _ = output_text_bytes(api, &body);
                    // Negative or fractional counts are not usage.
                    if u.is_some() && api != Api::Responses {
                        prop_assert!(p >= 0 || body["usage"]["prompt_tokens"].is_u64());
                    }
                }
            }
        }
    }
}
