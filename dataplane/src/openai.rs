//! OpenAI request bodies: validation, what admission needs to know, and the
//! rewrite sent upstream. Pure functions over bytes and JSON.

pub use crate::api::Api;
use crate::blocks::{any_object, count_objects};
use aex_core::policy::UnboundedInput;
use serde_json::{Map, Value};

impl Api {
    /// The fields this API defines for the output cap.
    fn standard_caps(self) -> &'static [&'static str] {
        match self {
            Api::ChatCompletions => &["max_tokens", "max_completion_tokens"],
            Api::Responses => &["max_output_tokens"],
            Api::Completions => &["max_tokens"],
            // Not OpenAI's: `anthropic.rs` reads their bodies.
            Api::Embeddings | Api::Messages | Api::CountTokens => &[],
        }
    }

    /// The field AEX sets the output cap in when the client set none.
    fn output_field(self) -> Option<&'static str> {
        match self {
            Api::ChatCompletions => Some("max_completion_tokens"),
            Api::Responses => Some("max_output_tokens"),
            Api::Completions => Some("max_tokens"),
            Api::Embeddings | Api::Messages | Api::CountTokens => None,
        }
    }

    fn can_stream(self) -> bool {
        !matches!(self, Api::Embeddings | Api::CountTokens)
    }
}

/// A 400 in OpenAI's shape: what is wrong and with which parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub param: &'static str,
    pub message: String,
}

fn bad(param: &'static str, message: impl Into<String>) -> BadRequest {
    BadRequest {
        param,
        message: message.into(),
    }
}

/// Token allowance for one image (OpenAI's high-detail maximum is below this).
pub const IMAGE_TOKENS_BOUND: u64 = 2_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Inspected {
    pub api: Api,
    pub model: String,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
    pub uses_tools: bool,
    pub uses_function_calling: bool,
    pub uses_vision: bool,
    pub requested_output_tokens: Option<u64>,
    /// How many times the output cap is generated: `n` choices, or
    /// `best_of` candidates on completions (billed even though only `n` are
    /// returned). The reservation and the stream cut-off scale with it.
    pub output_multiplier: u32,
    /// What makes the prompt's size unknowable from the body, if anything:
    /// admission refuses it unless the model gives its context window.
    pub unbounded_input: Option<UnboundedInput>,
    /// Upper bound of the prompt's tokens. Every token of a byte-level BPE
    /// vocabulary is at least one byte, and the JSON around each message is
    /// longer than the chat template's tokens for it, so the body's length
    /// bounds the text; images get a fixed allowance instead of their bytes.
    pub input_tokens_bound: u64,
    body: Map<String, Value>,
}

/// Fields some server reads as the output cap besides the API's own
/// (`max_tokens`, `max_completion_tokens`, `max_output_tokens`): llama.cpp's
/// `n_predict`, Ollama's `num_predict`, Hugging Face's `max_new_tokens`,
/// Anthropic's legacy `max_tokens_to_sample`, Meta's `max_gen_len`,
/// Gemini's `maxOutputTokens`. A server honouring one the reservation did
/// not account for generates past it (issue #31: SGLang honours the larger
/// of two, llama.cpp's `n_predict` runs to 4,000 tokens on a 10-token
/// reservation), so every one a client sets is rewritten to the cap
/// reserved for.
const ALTERNATIVE_CAPS: &[&str] = &[
    "n_predict",
    "num_predict",
    "max_new_tokens",
    "max_tokens_to_sample",
    "max_gen_len",
    "maxOutputTokens",
];

/// Objects whose fields some servers read as generation options (Ollama's
/// `options`, Hugging Face's `parameters`, `generation_config` /
/// `generationConfig`): caps inside them are rewritten too.
const OPTION_OBJECTS: &[&str] = &[
    "options",
    "parameters",
    "generation_config",
    "generationConfig",
];

/// Every name that caps output, standard or not.
fn is_cap_field(name: &str) -> bool {
    matches!(
        name,
        "max_tokens" | "max_completion_tokens" | "max_output_tokens"
    ) || ALTERNATIVE_CAPS.contains(&name)
}

/// The smallest positive integer cap a client set in a field the API does
/// not define (at the top or in an options object). Lenient, unlike the
/// API's own fields: such a field's other values (llama.cpp's `-1`:
/// unlimited, or a value past any real cap) set no cap, and it is
/// rewritten to the reserved one anyway.
fn alternative_cap(body: &Map<String, Value>, standard: &[&str]) -> Option<u64> {
    let positive = |v: &Value| {
        v.as_u64()
            .filter(|n| (1..=MAX_OUTPUT_TOKENS_PARAM).contains(n))
    };
    let top = body
        .iter()
        .filter(|(k, _)| is_cap_field(k) && !standard.contains(&k.as_str()))
        .filter_map(|(_, v)| positive(v));
    let nested = OPTION_OBJECTS
        .iter()
        .filter_map(|o| body.get(*o).and_then(Value::as_object))
        .flat_map(|o| o.iter())
        .filter(|(k, _)| is_cap_field(k))
        .filter_map(|(_, v)| positive(v));
    top.chain(nested).min()
}

/// The client's body with a few fields replaced, serialised without
/// copying it: a prompt can be tens of KB (OpenClaw re-sends its system
/// prompt every turn), and only the fields AEX sets change.
struct Overlay<'a> {
    base: &'a Map<String, Value>,
    replaced: Vec<(&'a str, Value)>,
}

/// Fields a client could set to be billed more than AEX reserved for:
/// `service_tier` (`priority` is billed above the model's price). Never
/// sent upstream, so the provider's default tier — the price models.yaml
/// names — applies.
const BILLING_SWITCHES: &[&str] = &["service_tier"];

impl serde::Serialize for Overlay<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.base {
            let replaced = self.replaced.iter().any(|(r, _)| r == k);
            if !replaced && !BILLING_SWITCHES.contains(&k.as_str()) {
                map.serialize_entry(k, v)?;
            }
        }
        for (k, v) in &self.replaced {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The largest output cap a request may name. A model's own limit clamps
/// anything below this; above it, the value is not a cap but a mistake or an
/// attempt to overflow a provider's 32-bit field.
pub const MAX_OUTPUT_TOKENS_PARAM: u64 = i32::MAX as u64;
/// OpenAI's own limits on `n` and `best_of`.
pub const MAX_CHOICES: u64 = 128;
pub const MAX_BEST_OF: u64 = 20;

/// A positive integer parameter within `max`; `null` or absent is unset.
/// 0 is refused: providers read it as "no limit" or "no choices", and
/// either would let a call run past its reservation.
fn positive_int(
    body: &Map<String, Value>,
    name: &'static str,
    max: u64,
) -> Result<Option<u64>, BadRequest> {
    let v = match body.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    match v.as_u64() {
        Some(0) => Err(bad(
            name,
            format!(
                "Invalid '{name}': integer below minimum value. Expected a value >= 1, but got 0 instead."
            ),
        )),
        Some(n) if n > max => Err(bad(
            name,
            format!(
                "Invalid '{name}': integer above maximum value. Expected a value <= {max}, but got {n} instead."
            ),
        )),
        Some(n) => Ok(Some(n)),
        None if v.as_i64().is_some() || v.as_f64().is_some_and(|f| f < 0.0) => Err(bad(
            name,
            format!(
                "Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {v} instead."
            ),
        )),
        None => Err(bad(
            name,
            format!("Invalid '{name}': expected an integer, got {v}."),
        )),
    }
}

/// Reads the output cap a client set (either name); `null` means unset.
fn output_cap(
    body: &Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<u64>, BadRequest> {
    let mut cap: Option<u64> = None;
    for &name in names {
        if let Some(n) = positive_int(body, name, MAX_OUTPUT_TOKENS_PARAM)? {
            cap = Some(cap.map_or(n, |c| c.min(n)));
        }
    }
    Ok(cap)
}

/// `n` (chat, completions) and `best_of` (completions): how many outputs
/// the provider generates and bills.
fn output_multiplier(api: Api, body: &Map<String, Value>) -> Result<u32, BadRequest> {
    let n = match api {
        Api::ChatCompletions | Api::Completions => positive_int(body, "n", MAX_CHOICES)?,
        _ => None,
    };
    let best_of = match api {
        Api::Completions => positive_int(body, "best_of", MAX_BEST_OF)?,
        _ => None,
    };
    if let (Some(n), Some(best_of)) = (n, best_of)
        && best_of < n
    {
        return Err(bad(
            "best_of",
            format!("Invalid 'best_of': it must be at least 'n' ({n}), got {best_of}."),
        ));
    }
    let multiplier = n.unwrap_or(1).max(best_of.unwrap_or(1));
    Ok(u32::try_from(multiplier).expect("bounded by MAX_CHOICES"))
}

fn non_empty_array(v: Option<&Value>) -> bool {
    v.and_then(Value::as_array).is_some_and(|a| !a.is_empty())
}

/// Images anywhere in the input: `image_url` / `input_image` content parts.
/// Returns (count, bytes of inline data URLs, which are not prompt text).
fn count_images(v: &Value) -> (u64, u64) {
    count_objects(v, &|map| {
        let kind = map.get("type").and_then(Value::as_str);
        if !matches!(kind, Some("image_url" | "input_image" | "image")) {
            return None;
        }
        let url = match map.get("image_url") {
            Some(Value::String(s)) => Some(s.as_str()),
            Some(Value::Object(o)) => o.get("url").and_then(Value::as_str),
            _ => None,
        };
        Some(
            url.filter(|u| u.starts_with("data:"))
                .map_or(0, |u| u.len() as u64),
        )
    })
}

/// A file part (`file` in chat, `input_file` in Responses): a PDF is read
/// as page images and text, so files need the vision capability. Inline
/// file data stays in the input bound byte for byte.
fn has_file_part(v: &Value) -> bool {
    any_object(v, &|map| {
        matches!(
            map.get("type").and_then(Value::as_str),
            Some("file" | "input_file")
        )
    })
}

/// Input the provider fetches by reference: an `item_reference`, or a file
/// by `file_id` / `file_url` (inline `file_data` is in the body's bytes).
fn references_by_id(v: &Value) -> bool {
    any_object(v, &|map| {
        map.get("type").and_then(Value::as_str) == Some("item_reference")
            || ["file_id", "file_url"]
                .iter()
                .any(|k| map.get(*k).is_some_and(|v| !v.is_null()))
    })
}

/// A tool the provider runs itself (anything but a function or a custom
/// tool the client runs): its results join the input, and it may be
/// billed per call.
fn hosted_tool(tools: Option<&Value>) -> bool {
    tools
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|t| {
            !matches!(
                t.get("type").and_then(Value::as_str),
                Some("function" | "custom") | None
            )
        })
}

/// What in the body makes its input unknowable from the body itself
/// (`aex_core::policy::UnboundedInput`), if anything.
fn unbounded_input(api: Api, body: &Map<String, Value>) -> Option<UnboundedInput> {
    let set = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    if api == Api::Responses {
        if set("previous_response_id") {
            return Some(UnboundedInput::PreviousResponse);
        }
        if set("conversation") {
            return Some(UnboundedInput::Conversation);
        }
        // Responses' `prompt` is a stored template; completions' is text.
        if body.get("prompt").is_some_and(Value::is_object) {
            return Some(UnboundedInput::StoredPrompt);
        }
    }
    let input = match api {
        Api::ChatCompletions => body.get("messages"),
        _ => body.get("input"),
    };
    if input.is_some_and(references_by_id) {
        return Some(UnboundedInput::Reference);
    }
    if hosted_tool(body.get("tools")) || set("web_search_options") {
        return Some(UnboundedInput::HostedTool);
    }
    None
}

/// Forcing a specific function (or `required`) is function calling; `auto`
/// and `none` only allow or forbid tools.
fn forces_function(tool_choice: Option<&Value>) -> bool {
    match tool_choice {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => s == "required",
        Some(_) => true,
    }
}

pub fn inspect(api: Api, raw: &[u8]) -> Result<Inspected, BadRequest> {
    let value: Value = serde_json::from_slice(raw).map_err(|e| {
        let what = if std::str::from_utf8(raw).is_err() {
            "The body is not valid UTF-8".to_string()
        } else {
            format!("The body is not valid JSON ({e})")
        };
        bad(
            "",
            format!("{what}. Send a JSON object with Content-Type: application/json."),
        )
    })?;
    let Value::Object(body) = value else {
        return Err(bad("", "The body must be a JSON object."));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(bad("model", "You must provide a model parameter."));
        }
        Some(other) => {
            return Err(bad(
                "model",
                format!("Invalid 'model': expected a string, got {other}."),
            ));
        }
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                "stream",
                format!("Invalid 'stream': expected a boolean, got {other}."),
            ));
        }
    };
    if stream && !api.can_stream() {
        return Err(bad("stream", "This endpoint does not stream."));
    }
    let client_wants_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match api {
        Api::ChatCompletions => match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => {
                if m.iter().any(|msg| !msg.is_object()) {
                    return Err(bad(
                        "messages",
                        "Invalid 'messages': every message must be an object.",
                    ));
                }
            }
            Some(Value::Array(_)) => {
                return Err(bad("messages", "Invalid 'messages': empty array."));
            }
            None | Some(Value::Null) => {
                return Err(bad("messages", "Missing required parameter: 'messages'."));
            }
            Some(_) => {
                return Err(bad(
                    "messages",
                    "Invalid 'messages': expected an array of messages.",
                ));
            }
        },
        Api::Responses | Api::Embeddings => match body.get("input") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            None | Some(Value::Null) => {
                return Err(bad("input", "Missing required parameter: 'input'."));
            }
            Some(_) => {
                return Err(bad(
                    "input",
                    "Invalid 'input': expected a string or an array.",
                ));
            }
        },
        Api::Completions | Api::Messages | Api::CountTokens => {}
    }
    let requested_output_tokens = match api.standard_caps() {
        [] => None,
        standard => {
            let own = output_cap(&body, standard)?;
            // The smallest cap any server might honour is what the client
            // asked for.
            [own, alternative_cap(&body, standard)]
                .into_iter()
                .flatten()
                .min()
        }
    };
    let output_multiplier = output_multiplier(api, &body)?;
    for key in ["tools", "functions"] {
        if let Some(v) = body.get(key)
            && !v.is_array()
            && !v.is_null()
        {
            return Err(bad(
                if key == "tools" { "tools" } else { "functions" },
                format!("Invalid '{key}': expected an array."),
            ));
        }
    }
    let uses_tools = non_empty_array(body.get("tools"));
    let uses_function_calling = non_empty_array(body.get("functions"))
        || body.get("function_call").is_some_and(|v| !v.is_null())
        || forces_function(body.get("tool_choice"));
    let input = match api {
        Api::ChatCompletions => body.get("messages"),
        _ => body.get("input"),
    };
    let (images, inline_image_bytes) = input.map(count_images).unwrap_or((0, 0));
    let input_tokens_bound =
        (raw.len() as u64).saturating_sub(inline_image_bytes) + images * IMAGE_TOKENS_BOUND;
    Ok(Inspected {
        api,
        model,
        stream,
        client_wants_usage,
        uses_tools,
        uses_function_calling,
        uses_vision: images > 0 || input.is_some_and(has_file_part),
        requested_output_tokens,
        output_multiplier,
        unbounded_input: unbounded_input(api, &body),
        input_tokens_bound,
        body,
    })
}

impl Inspected {
    /// The body for the provider: its model name, exactly one output cap
    /// (the one reserved for), and a request for usage in streams.
    /// Everything else the client sent is passed through untouched.
    ///
    /// The cap is written under every name the client used for one — so
    /// the server the client wrote for reads it under the name it knows,
    /// and none can honour a larger value under another name — or, when it
    /// used none, under the API's own name.
    pub fn upstream_body(&self, provider_model: &str, output_cap: u64) -> Vec<u8> {
        let mut body = Overlay {
            base: &self.body,
            replaced: vec![("model", Value::String(provider_model.to_string()))],
        };
        if let Some(field) = self.api.output_field() {
            let cap = Value::from(output_cap);
            let mut named = false;
            for k in self.body.keys().filter(|k| is_cap_field(k)) {
                named |= self.api.standard_caps().contains(&k.as_str());
                body.replaced.push((k, cap.clone()));
            }
            if !named {
                body.replaced.push((field, cap.clone()));
            }
            for name in OPTION_OBJECTS {
                if let Some(Value::Object(o)) = self.body.get(*name)
                    && o.keys().any(|k| is_cap_field(k))
                {
                    let mut o = o.clone();
                    for (k, v) in o.iter_mut() {
                        if is_cap_field(k) {
                            *v = cap.clone();
                        }
                    }
                    body.replaced.push((name, Value::Object(o)));
                }
            }
        }
        if self.stream && matches!(self.api, Api::ChatCompletions | Api::Completions) {
            let options = match self.body.get("stream_options") {
                Some(Value::Object(o)) => {
                    let mut o = o.clone();
                    o.insert("include_usage".into(), Value::Bool(true));
                    Value::Object(o)
                }
                _ => serde_json::json!({"include_usage": true}),
            };
            body.replaced.push(("stream_options", options));
        }
        serde_json::to_vec(&body).expect("JSON values serialise")
    }

    /// A rough count of the prompt's tokens, for settling a call whose
    /// provider never reported usage: the bound counts one token per byte,
    /// the estimate [`crate::tokens::ESTIMATED_BYTES_PER_TOKEN`].
    pub fn estimated_prompt_tokens(&self) -> u64 {
        crate::tokens::estimated_tokens(self.input_tokens_bound)
    }

    pub fn body(&self) -> &Map<String, Value> {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Result<Inspected, BadRequest> {
        inspect(Api::ChatCompletions, &serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn inspects_a_chat_request() {
        let raw = json!({"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":50,"seed":7});
        let i = chat(raw.clone()).unwrap();
        assert_eq!(i.model, "m");
        assert!(!i.stream && !i.uses_tools && !i.uses_vision);
        assert_eq!(i.requested_output_tokens, Some(50));
        assert_eq!(
            i.input_tokens_bound,
            serde_json::to_vec(&raw).unwrap().len() as u64
        );
    }

    #[test]
    fn rejects_bad_input_with_the_parameter() {
        let cases = [
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"abc"}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-5}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_completion_tokens":1.5}),
                "max_completion_tokens",
            ),
            (json!({"model":"m"}), "messages"),
            (json!({"model":"m","messages":[]}), "messages"),
            (json!({"model":"m","messages":"hi"}), "messages"),
            (json!({"model":"m","messages":[1]}), "messages"),
            (json!({"messages":[{"role":"user","content":"x"}]}), "model"),
            (
                json!({"model":5,"messages":[{"role":"user","content":"x"}]}),
                "model",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}),
                "stream",
            ),
            (
                json!({"model":"m","messages":[{"role":"user","content":"x"}],"tools":{}}),
                "tools",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(chat(body.clone()).unwrap_err().param, param, "{body}");
        }
        assert_eq!(
            inspect(Api::ChatCompletions, b"[1,2]").unwrap_err().param,
            ""
        );
        assert!(
            inspect(Api::ChatCompletions, b"{not json")
                .unwrap_err()
                .message
                .contains("not valid JSON")
        );
        assert!(
            inspect(Api::ChatCompletions, b"{\"model\":\"\xff\"}")
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
        assert_eq!(
            inspect(Api::Embeddings, br#"{"model":"e"}"#)
                .unwrap_err()
                .param,
            "input"
        );
        assert_eq!(
            inspect(
                Api::Embeddings,
                br#"{"model":"e","input":"x","stream":true}"#
            )
            .unwrap_err()
            .param,
            "stream"
        );
        assert_eq!(
            inspect(Api::Responses, br#"{"model":"r","input":3}"#)
                .unwrap_err()
                .param,
            "input"
        );
    }

    /// Regression (hardening #1, #2): `n` and `best_of` multiply the output
    /// and were not in the bound; a cap of 0 reserved no output at all.
    #[test]
    fn output_multipliers_and_caps_are_bounded() {
        let msgs = json!([{"role":"user","content":"x"}]);
        let i = chat(json!({"model":"m","messages":msgs,"max_tokens":20,"n":100})).unwrap();
        assert_eq!(
            (i.output_multiplier, i.requested_output_tokens),
            (100, Some(20))
        );
        assert_eq!(
            chat(json!({"model":"m","messages":msgs}))
                .unwrap()
                .output_multiplier,
            1
        );
        let completions = |v: Value| inspect(Api::Completions, &serde_json::to_vec(&v).unwrap());
        let c = completions(json!({"model":"m","prompt":"x","n":2,"best_of":5})).unwrap();
        assert_eq!(c.output_multiplier, 5, "best_of candidates are all billed");
        for (body, param) in [
            (
                json!({"model":"m","messages":msgs,"max_tokens":0}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":msgs,"max_completion_tokens":0}),
                "max_completion_tokens",
            ),
            (
                json!({"model":"m","messages":msgs,"max_tokens":-1}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":msgs,"max_tokens":1e300}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":msgs,"max_tokens":4_000_000_000u64}),
                "max_tokens",
            ),
            (
                json!({"model":"m","messages":msgs,"max_tokens":true}),
                "max_tokens",
            ),
            (json!({"model":"m","messages":msgs,"n":0}), "n"),
            (json!({"model":"m","messages":msgs,"n":129}), "n"),
            (json!({"model":"m","messages":msgs,"n":2.5}), "n"),
            (json!({"model":"m","messages":msgs,"n":"2"}), "n"),
        ] {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.param, param, "{body}");
        }
        assert_eq!(
            completions(json!({"model":"m","prompt":"x","best_of":21}))
                .unwrap_err()
                .param,
            "best_of"
        );
        assert_eq!(
            completions(json!({"model":"m","prompt":"x","n":3,"best_of":2}))
                .unwrap_err()
                .param,
            "best_of"
        );
        assert_eq!(
            inspect(
                Api::Responses,
                br#"{"model":"m","input":"x","max_output_tokens":0}"#
            )
            .unwrap_err()
            .param,
            "max_output_tokens"
        );
        assert!(
            chat(json!({"model":"m","messages":msgs,"max_tokens":0}))
                .unwrap_err()
                .message
                .contains(">= 1")
        );
    }

    proptest::proptest! {
        /// Fuzz: the inspector never panics, and whatever it accepts has a
        /// positive, bounded cap and multiplier.
        #[test]
        fn inspect_never_panics_and_accepts_only_bounded_requests(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            max_tokens in proptest::prelude::any::<i64>(),
            n in proptest::prelude::any::<i32>(),
            best_of in proptest::prelude::any::<i16>(),
            float in proptest::prelude::any::<f64>(),
        ) {
            for api in [Api::ChatCompletions, Api::Responses, Api::Embeddings, Api::Completions] {
                let _ = inspect(api, &bytes);
                for body in [
                    json!({"model":"m","messages":[{"role":"user","content":"x"}],"prompt":"p","input":"i",
                           "max_tokens":max_tokens,"n":n,"best_of":best_of}),
                    json!({"model":"m","messages":[{"role":"user","content":"x"}],"prompt":"p","input":"i",
                           "max_completion_tokens":float,"max_output_tokens":max_tokens,"n":float}),
                ] {
                    if let Ok(i) = inspect(api, &serde_json::to_vec(&body).unwrap()) {
                        proptest::prop_assert!((1..=MAX_CHOICES as u32).contains(&i.output_multiplier));
                        if let Some(cap) = i.requested_output_tokens {
                            proptest::prop_assert!((1..=MAX_OUTPUT_TOKENS_PARAM).contains(&cap));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn capabilities_are_detected() {
        let tools = chat(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],
            "tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"auto"}),
        )
        .unwrap();
        assert!(tools.uses_tools && !tools.uses_function_calling);
        let forced = chat(json!({"model":"m","messages":[{"role":"user","content":"x"}],
            "tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"f"}}})).unwrap();
        assert!(forced.uses_function_calling);
        let legacy = chat(json!({"model":"m","messages":[{"role":"user","content":"x"}],"functions":[{"name":"f"}]})).unwrap();
        assert!(legacy.uses_function_calling && !legacy.uses_tools);
        let data_url = format!("data:image/png;base64,{}", "A".repeat(10_000));
        let vision = chat(json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"what is this"},
            {"type":"image_url","image_url":{"url": data_url}}]}]}))
        .unwrap();
        assert!(vision.uses_vision);
        assert!(
            vision.input_tokens_bound < 10_000,
            "inline image bytes are not prompt text"
        );
        assert!(vision.input_tokens_bound >= IMAGE_TOKENS_BOUND);
        let responses = inspect(
            Api::Responses,
            &serde_json::to_vec(&json!({"model":"m","input":[
            {"role":"user","content":[{"type":"input_image","image_url":"https://x/y.png"}]}]}))
            .unwrap(),
        )
        .unwrap();
        assert!(responses.uses_vision);
    }

    #[test]
    fn rewrites_model_cap_and_usage_and_keeps_unknown_fields() {
        let i = chat(
            json!({"model":"alias","messages":[{"role":"user","content":"x"}],
            "stream":true,"max_tokens":9000,"logit_bias":{"1":2},"x_custom":[1]}),
        )
        .unwrap();
        assert!(!i.client_wants_usage);
        let out: Value = serde_json::from_slice(&i.upstream_body("real-model", 4096)).unwrap();
        assert_eq!(out["model"], "real-model");
        assert_eq!(out["max_tokens"], 4096, "the client's own name, clamped");
        assert!(out.get("max_completion_tokens").is_none());
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["logit_bias"], json!({"1":2}));
        assert_eq!(out["x_custom"], json!([1]));
        let r = inspect(
            Api::Responses,
            br#"{"model":"a","input":"x","stream":true}"#,
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&r.upstream_body("b", 10)).unwrap();
        assert_eq!(out["max_output_tokens"], 10);
        assert!(
            out.get("stream_options").is_none(),
            "responses streams always carry usage"
        );
    }

    /// Issue #31, finding 2: whatever cap fields a client sends, the
    /// provider receives one cap — the reserved one — under each of them;
    /// the smallest any server could honour is what is reserved for.
    #[test]
    fn the_provider_receives_only_the_cap_reserved_for() {
        let i = chat(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],
            "max_tokens":10,"max_completion_tokens":4000,"n_predict":4000,
            "options":{"num_predict":-1,"temperature":0.2},"max_new_tokens":"lots"}),
        )
        .unwrap();
        assert_eq!(i.requested_output_tokens, Some(10));
        let out: Value = serde_json::from_slice(&i.upstream_body("p", 10)).unwrap();
        for field in [
            "max_tokens",
            "max_completion_tokens",
            "n_predict",
            "max_new_tokens",
        ] {
            assert_eq!(out[field], 10, "{field}: {out}");
        }
        assert_eq!(
            out["options"],
            json!({"num_predict": 10, "temperature": 0.2})
        );
        // A smaller alternative cap is the request: reserved for, sent in
        // the API's own name too.
        let i = chat(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],
            "n_predict":7}),
        )
        .unwrap();
        assert_eq!(i.requested_output_tokens, Some(7));
        let out: Value = serde_json::from_slice(&i.upstream_body("p", 7)).unwrap();
        assert_eq!(
            (
                out["n_predict"].clone(),
                out["max_completion_tokens"].clone()
            ),
            (json!(7), json!(7))
        );
        // None at all: the API's own field, nothing else.
        let i = chat(json!({"model":"m","messages":[{"role":"user","content":"x"}]})).unwrap();
        let out: Value = serde_json::from_slice(&i.upstream_body("p", 4096)).unwrap();
        let caps: Vec<&String> = out
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| is_cap_field(k))
            .collect();
        assert_eq!(caps, ["max_completion_tokens"]);
        // Responses and completions alike.
        let r = inspect(
            Api::Responses,
            br#"{"model":"a","input":"x","max_output_tokens":50,"max_tokens":900}"#,
        )
        .unwrap();
        assert_eq!(r.requested_output_tokens, Some(50));
        let out: Value = serde_json::from_slice(&r.upstream_body("b", 50)).unwrap();
        assert_eq!(
            (out["max_output_tokens"].clone(), out["max_tokens"].clone()),
            (json!(50), json!(50))
        );
        let c = inspect(
            Api::Completions,
            br#"{"model":"a","prompt":"x","max_tokens":5,"num_predict":99}"#,
        )
        .unwrap();
        let out: Value = serde_json::from_slice(&c.upstream_body("b", 5)).unwrap();
        assert_eq!(
            (out["max_tokens"].clone(), out["num_predict"].clone()),
            (json!(5), json!(5))
        );
    }

    /// Issue #31, finding 3: inputs the provider holds, and a billing
    /// switch, seen in the body.
    #[test]
    fn inputs_the_body_cannot_bound_are_named_and_billing_switches_dropped() {
        let responses =
            |v: Value| inspect(Api::Responses, &serde_json::to_vec(&v).unwrap()).unwrap();
        let cases = [
            (
                json!({"model":"m","input":"x","previous_response_id":"resp_1"}),
                Some(UnboundedInput::PreviousResponse),
            ),
            (
                json!({"model":"m","input":"x","conversation":"conv_1"}),
                Some(UnboundedInput::Conversation),
            ),
            (
                json!({"model":"m","input":"x","prompt":{"id":"pmpt_1"}}),
                Some(UnboundedInput::StoredPrompt),
            ),
            (
                json!({"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_id":"file-1"}]}]}),
                Some(UnboundedInput::Reference),
            ),
            (
                json!({"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}),
                Some(UnboundedInput::Reference),
            ),
            (
                json!({"model":"m","input":"x","tools":[{"type":"web_search"}]}),
                Some(UnboundedInput::HostedTool),
            ),
            (
                json!({"model":"m","input":"x","tools":[{"type":"function","name":"f"}],"previous_response_id":null}),
                None,
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(responses(body.clone()).unbounded_input, expected, "{body}");
        }
        let chat_file = chat(json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"file","file":{"file_id":"file-1"}}]}]}))
        .unwrap();
        assert_eq!(chat_file.unbounded_input, Some(UnboundedInput::Reference));
        let inline = chat(json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"file","file":{"file_data":"data:application/pdf;base64,AAAA"}}]}]}))
        .unwrap();
        assert_eq!(inline.unbounded_input, None, "inline data is in the body");
        assert!(
            inline.uses_vision,
            "a file part needs the vision capability"
        );
        let search = chat(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],"web_search_options":{}}),
        )
        .unwrap();
        assert_eq!(search.unbounded_input, Some(UnboundedInput::HostedTool));
        let text = inspect(Api::Completions, br#"{"model":"m","prompt":"p"}"#).unwrap();
        assert_eq!(text.unbounded_input, None, "completions' prompt is text");

        let tiered = chat(json!({"model":"m","messages":[{"role":"user","content":"x"}],"service_tier":"priority"})).unwrap();
        let out: Value = serde_json::from_slice(&tiered.upstream_body("p", 10)).unwrap();
        assert!(out.get("service_tier").is_none(), "{out}");
    }
}
