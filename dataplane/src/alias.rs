//! The model a client asked for, in the answers it reads (issue #33): a
//! models.yaml entry names its provider's id (`provider_model: llama3`)
//! behind the name agents use (`llama3-local`), and a provider's answer
//! says its own id. Clients read `model` back — AutoGen warns of a
//! mismatch on every call, others price or route by it — so AEX answers
//! with the name asked for, and says the provider's in
//! `x-aex-provider-model`.
//!
//! The answer is relayed byte for byte but for that value: the rename is a
//! splice of each `"model": "<provider id>"` member, never a re-encoding
//! (which would rewrite numbers, escapes and key order the client may
//! compare). Such a member can only be a key and its value, never text
//! inside a string: a quote inside a JSON string is always escaped, so the
//! unescaped `"model":"` cannot occur there. It finds the member wherever
//! an API puts it — top level (chat, completions, embeddings, a Messages
//! answer), `response.model` (Responses events), `message.model`
//! (`message_start`) — and nothing else has that name and that value.

/// A rename of the provider's model id to the client's name for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// The provider's id as a JSON string, quotes included.
    from: Vec<u8>,
    /// The client's name as a JSON string, quotes included.
    to: Vec<u8>,
}

const KEY: &[u8] = b"\"model\"";

impl Rename {
    /// `None` when the names are the same: nothing to do, nothing scanned.
    pub fn new(provider_model: &str, asked: &str) -> Option<Self> {
        if provider_model == asked || provider_model.is_empty() || asked.is_empty() {
            return None;
        }
        let encode = |s: &str| serde_json::to_vec(s).expect("a string encodes");
        Some(Self {
            from: encode(provider_model),
            to: encode(asked),
        })
    }

    /// `json` with each `"model": <from>` member's value replaced; `None`
    /// when there is none.
    pub fn apply(&self, json: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(json.len() + 16);
        self.append(json, &mut out).then_some(out)
    }

    /// Appends `json` to `out` with each `"model": <from>` member's value
    /// replaced (straight into the stream's output: no buffer of its own);
    /// returns whether there was one.
    pub fn append(&self, json: &[u8], out: &mut Vec<u8>) -> bool {
        let mut copied = 0;
        let mut at = 0;
        while let Some(found) = find(&json[at..], KEY) {
            let key_end = at + found + KEY.len();
            at = key_end;
            let mut i = skip_space(json, key_end);
            if json.get(i) != Some(&b':') {
                continue;
            }
            i = skip_space(json, i + 1);
            if !json[i..].starts_with(&self.from) {
                continue;
            }
            out.extend_from_slice(&json[copied..i]);
            out.extend_from_slice(&self.to);
            copied = i + self.from.len();
            at = copied;
        }
        out.extend_from_slice(&json[copied..]);
        copied > 0
    }
}

fn skip_space(json: &[u8], mut i: usize) -> usize {
    while json
        .get(i)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Where `needle` starts in `haystack`: at one of its first byte's
/// occurrences (a quote, a few dozen in an event).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(q) = haystack[from..].iter().position(|&b| b == needle[0]) {
        let at = from + q;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rename(json: &str) -> String {
        let r = Rename::new("llama3", "llama3-local").unwrap();
        r.apply(json.as_bytes())
            .map_or_else(|| json.to_string(), |b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn the_model_member_is_renamed_wherever_the_api_puts_it() {
        assert_eq!(
            rename(r#"{"id":"c","model":"llama3","choices":[]}"#),
            r#"{"id":"c","model":"llama3-local","choices":[]}"#
        );
        assert_eq!(
            rename(
                "data: {\"type\":\"response.created\",\"response\":{\"model\" :  \"llama3\",\"x\":1.50}}\n\n"
            ),
            "data: {\"type\":\"response.created\",\"response\":{\"model\" :  \"llama3-local\",\"x\":1.50}}\n\n"
        );
        assert_eq!(
            rename(r#"{"type":"message_start","message":{"model":"llama3"}}"#),
            r#"{"type":"message_start","message":{"model":"llama3-local"}}"#
        );
    }

    #[test]
    fn nothing_else_is_touched() {
        for json in [
            // Another model, a longer id, a key that only ends in model.
            r#"{"model":"llama3-8b"}"#,
            r#"{"model":"other","submodel":"llama3"}"#,
            // The words inside text: escaped quotes, never a member.
            r#"{"content":"say \"model\":\"llama3\" please","model":"x"}"#,
            r#"{"model":["llama3"]}"#,
            "not json at all \"model\"",
            "",
        ] {
            assert_eq!(rename(json), json, "{json}");
        }
        assert!(Rename::new("same", "same").is_none());
        // Names that need escaping are matched and written as JSON.
        let r = Rename::new("org/m\"1", "mine").unwrap();
        assert_eq!(
            r.apply(br#"{"model":"org/m\"1"}"#).unwrap(),
            br#"{"model":"mine"}"#
        );
    }

    proptest! {
        /// Renaming changes exactly the model's values: every other byte is
        /// the provider's (numbers, escapes, order), whatever text surrounds
        /// them, and the models read back as the name asked for.
        #[test]
        fn only_the_value_changes(text in ".{0,40}", n in any::<f64>()) {
            let original = serde_json::json!({"text": text, "model": "llama3", "n": n,
                "nested": {"model": "llama3", "text": format!("\"model\":\"llama3\"{text}")}});
            let bytes = serde_json::to_vec(&original).unwrap();
            let renamed = Rename::new("llama3", "llama3-local").unwrap().apply(&bytes).unwrap();
            let renamed = String::from_utf8(renamed).unwrap();
            // An unescaped quoted name can only be a member's value.
            prop_assert_eq!(
                renamed.replace("\"llama3-local\"", "\"llama3\""),
                String::from_utf8(bytes).unwrap()
            );
            let got: serde_json::Value = serde_json::from_str(&renamed).unwrap();
            prop_assert_eq!(&got["model"], "llama3-local");
            prop_assert_eq!(&got["nested"]["model"], "llama3-local");
            prop_assert_eq!(&got["nested"]["text"], &original["nested"]["text"]);
        }
    }
}
