//! Usage from provider responses: whole JSON bodies, and SSE streams read
//! incrementally. The stream meter forwards complete events as they arrive
//! (minus the usage-only chunk AEX asked for on the client's behalf), counts
//! the output text so far, and keeps the last usage the provider reported.
//! Pure: bytes in, bytes out, whatever the chunking.

use crate::openai::Api;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn tokens(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// `usage` of a chat/completions/embeddings object, or of a responses object.
pub fn usage_of(api: Api, object: &Value) -> Option<Usage> {
    let usage = object.get("usage").filter(|u| u.is_object())?;
    match api {
        Api::Responses => Some(Usage {
            prompt_tokens: tokens(usage, "input_tokens")?,
            completion_tokens: tokens(usage, "output_tokens").unwrap_or(0),
        }),
        _ => Some(Usage {
            prompt_tokens: tokens(usage, "prompt_tokens")?,
            completion_tokens: tokens(usage, "completion_tokens").unwrap_or(0),
        }),
    }
}

/// Usage from a complete (non-streamed) response body.
pub fn usage_of_body(api: Api, body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| usage_of(api, &v))
}

#[derive(Debug, Clone)]
pub struct SseMeter {
    api: Api,
    strip_usage_chunk: bool,
    pending: Vec<u8>,
    usage: Option<Usage>,
    output_bytes: u64,
    saw_done: bool,
}

/// Where the first complete event in `buf` ends (after its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
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
            usage: None,
            output_bytes: 0,
            saw_done: false,
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes of generated text (content, tool arguments, reasoning) so far.
    pub fn output_bytes(&self) -> u64 {
        self.output_bytes
    }

    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Takes a chunk as it came off the wire; appends to `out` the bytes to
    /// forward now (whole events only).
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(len) = event_end(&pending[start..]) {
            let end = start + len;
            let event = &pending[start..end];
            if self.inspect(event) {
                out.extend_from_slice(event);
            }
            start = end;
        }
        pending.drain(..start);
        self.pending = pending;
    }

    /// End of stream: forwards whatever incomplete event is left.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            if self.inspect(&rest) {
                out.extend_from_slice(&rest);
            }
        }
    }

    /// Meters one event; returns whether to forward it.
    fn inspect(&mut self, event: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(event) else {
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
            self.saw_done = true;
            return true;
        }
        let Ok(json) = serde_json::from_str::<Value>(&data) else {
            return true;
        };
        match self.api {
            Api::Responses => {
                let kind = json.get("type").and_then(Value::as_str).unwrap_or("");
                if kind.ends_with(".delta") {
                    self.output_bytes += text_len(json.get("delta"));
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
                    self.output_bytes += text_len(choice.get("text"));
                    if let Some(delta) = choice.get("delta") {
                        self.output_bytes += text_len(delta.get("content"))
                            + text_len(delta.get("reasoning_content"))
                            + text_len(delta.get("reasoning"));
                        for call in delta
                            .get("tool_calls")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            self.output_bytes +=
                                text_len(call.get("function").and_then(|f| f.get("arguments")));
                        }
                    }
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

    #[test]
    fn chat_usage_and_stripping() {
        let (out, m) = run(Api::ChatCompletions, false, &[CHAT.as_bytes()]);
        assert_eq!(out, CHAT.as_bytes());
        assert_eq!(
            m.usage(),
            Some(Usage {
                prompt_tokens: 11,
                completion_tokens: 7
            })
        );
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
        assert_eq!(
            m.usage(),
            Some(Usage {
                prompt_tokens: 20,
                completion_tokens: 3
            })
        );
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
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 0
            })
        );
        assert_eq!(usage_of_body(Api::ChatCompletions, b"{}"), None);
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
        fn any_split_of_a_responses_stream(cuts in splits(RESPONSES)) {
            let parts = split_at(RESPONSES.as_bytes(), cuts);
            let (out, m) = run(Api::Responses, true, &parts);
            prop_assert_eq!(out, RESPONSES.as_bytes());
            prop_assert_eq!(m.usage(), Some(Usage { prompt_tokens: 20, completion_tokens: 3 }));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_out, _m) = run(Api::ChatCompletions, true, &[&bytes]);
        }
    }
}
