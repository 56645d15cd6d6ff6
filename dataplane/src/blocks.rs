//! Walking a request's JSON for the blocks admission cares about (images,
//! files and documents, content the provider fetches by reference), for
//! both APIs' inspections (`openai.rs`, `anthropic.rs`): each says what a
//! block looks like, this finds them at any depth.

use serde_json::{Map, Value};

/// Whether any object in `v`, at any depth, is one `is` picks.
pub fn any_object(v: &Value, is: &impl Fn(&Map<String, Value>) -> bool) -> bool {
    match v {
        Value::Array(items) => items.iter().any(|item| any_object(item, is)),
        Value::Object(map) => is(map) || map.values().any(|item| any_object(item, is)),
        _ => false,
    }
}

/// The objects `picks` answers for (with the bytes of their inline data),
/// not looked into further: how many, and those bytes in all.
pub fn count_objects(v: &Value, picks: &impl Fn(&Map<String, Value>) -> Option<u64>) -> (u64, u64) {
    let add = |(n, b): (u64, u64), item: &Value| {
        let (n2, b2) = count_objects(item, picks);
        (n + n2, b + b2)
    };
    match v {
        Value::Array(items) => items.iter().fold((0, 0), add),
        Value::Object(map) => match picks(map) {
            Some(inline) => (1, inline),
            None => map.values().fold((0, 0), add),
        },
        _ => (0, 0),
    }
}
