//! models.yaml as written: raw serde structs (unknown keys are errors),
//! and decimals kept as text so that a price is exactly what the user wrote.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// A decimal kept as text so that `0.15` stays exactly 0.15. YAML numbers
/// arrive as f64; Rust prints an f64 as the shortest decimal that reads back
/// to it, which is the literal the user wrote (for up to 15 digits).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Decimal(pub(super) String);

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Decimal;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative decimal number")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Decimal, E> {
                Ok(Decimal(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Decimal, E> {
                Ok(Decimal(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Decimal, E> {
                if v.is_finite() {
                    Ok(Decimal(v.to_string()))
                } else {
                    Err(E::custom(format!("{v} is not a price")))
                }
            }
            fn visit_str<E>(self, v: &str) -> Result<Decimal, E> {
                Ok(Decimal(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) version: u32,
    #[serde(default)]
    pub(super) providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub(super) models: BTreeMap<String, RawModel>,
    pub(super) default_model: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawProviderType {
    OpenaiCompatible,
    Anthropic,
    Simulated,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    #[serde(rename = "type")]
    pub(super) kind: RawProviderType,
    pub(super) base_url: Option<String>,
    pub(super) latency_ms: Option<u32>,
    pub(super) tokens_per_second: Option<u32>,
    pub(super) completion_tokens: Option<u32>,
    /// Client headers forwarded to this provider beyond the default allow-list.
    pub(super) forward_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    pub(super) provider: String,
    pub(super) provider_model: Option<String>,
    pub(super) pricing: RawPricing,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) capabilities: RawCapabilities,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPricing {
    pub(super) input_micro: Option<Decimal>,
    pub(super) output_micro: Option<Decimal>,
    pub(super) input_usd_per_mtok: Option<Decimal>,
    pub(super) output_usd_per_mtok: Option<Decimal>,
    // Input read from the provider's prompt cache, and written to it; the
    // input price when absent.
    pub(super) cached_input_micro: Option<Decimal>,
    pub(super) cached_input_usd_per_mtok: Option<Decimal>,
    pub(super) cache_write_micro: Option<Decimal>,
    pub(super) cache_write_usd_per_mtok: Option<Decimal>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_tokens: Option<u32>,
    pub(super) max_tokens_per_minute: Option<u64>,
    pub(super) max_input_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCapabilities {
    #[serde(default)]
    pub(super) reasoning: bool,
    #[serde(default = "yes")]
    pub(super) tools: bool,
    #[serde(default)]
    pub(super) vision: bool,
}

impl Default for RawCapabilities {
    fn default() -> Self {
        Self {
            reasoning: false,
            tools: true,
            vision: false,
        }
    }
}

pub(super) fn yes() -> bool {
    true
}
