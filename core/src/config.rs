//! `models.yaml`: parsed into raw serde structs (unknown keys are errors),
//! then validated into runtime types. Every error names the file, the line
//! and the key, so a user can fix it without guessing.

use crate::money::{Pico, Pricing, parse_scaled};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

const DEFAULT_MAX_TOKENS: u32 = 4096;

/// What `aexctl init` writes: the seed guide's Ollama model plus a built-in
/// simulated model for dry runs and demos.
pub const DEFAULT_MODELS_YAML: &str = r#"# AEX model routing. Docs: README.md, "models.yaml".
# Provider keys come from NAME_API_KEY (e.g. LOCAL_API_KEY), read from the
# environment or AEX_HOME/.env. LOCAL_API_KEY=dummy works for Ollama.
version: 1

providers:
  local:
    base_url: http://localhost:11434/v1
    type: openai_compatible
  simulated:
    # Built in: answers like an OpenAI-compatible server, for dry runs and demos.
    type: simulated
    latency_ms: 20
    tokens_per_second: 200
    completion_tokens: 32

models:
  llama3-local:
    provider: local
    provider_model: llama3
    pricing:
      input_micro: 1
      output_micro: 2
    limits:
      max_tokens: 4096
    capabilities:
      reasoning: true
      tools: true
      vision: false
  simulated:
    provider: simulated
    provider_model: aex-simulated
    pricing:
      input_usd_per_mtok: 0.15
      output_usd_per_mtok: 0.60
    limits:
      max_tokens: 4096
    capabilities:
      reasoning: false
      tools: true
      vision: false

default_model: llama3-local
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------- raw form

/// A decimal kept as text so that `0.15` stays exactly 0.15. YAML numbers
/// arrive as f64; Rust prints an f64 as the shortest decimal that reads back
/// to it, which is the literal the user wrote (for up to 15 digits).
#[derive(Debug, Clone, PartialEq)]
struct Decimal(String);

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
struct RawConfig {
    version: u32,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    default_model: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawProviderType {
    OpenaiCompatible,
    Simulated,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    #[serde(rename = "type")]
    kind: RawProviderType,
    base_url: Option<String>,
    latency_ms: Option<u32>,
    tokens_per_second: Option<u32>,
    completion_tokens: Option<u32>,
    /// Client headers forwarded to this provider beyond the default allow-list.
    forward_headers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: String,
    provider_model: Option<String>,
    pricing: RawPricing,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    capabilities: RawCapabilities,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    input_micro: Option<Decimal>,
    output_micro: Option<Decimal>,
    input_usd_per_mtok: Option<Decimal>,
    output_usd_per_mtok: Option<Decimal>,
    // Input read from the provider's prompt cache, and written to it; the
    // input price when absent.
    cached_input_micro: Option<Decimal>,
    cached_input_usd_per_mtok: Option<Decimal>,
    cache_write_micro: Option<Decimal>,
    cache_write_usd_per_mtok: Option<Decimal>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_tokens: Option<u32>,
    max_tokens_per_minute: Option<u64>,
    max_input_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    #[serde(default)]
    reasoning: bool,
    #[serde(default = "yes")]
    tools: bool,
    #[serde(default)]
    vision: bool,
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

fn yes() -> bool {
    true
}

// ------------------------------------------------------------ runtime form

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedSettings {
    pub latency_ms: u32,
    pub tokens_per_second: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAiCompatible { base_url: String },
    Simulated(SimulatedSettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// `NAME_API_KEY`: where the data plane finds this provider's key
    /// (empty for the built-in simulated provider, which needs none).
    pub api_key_env: String,
    /// Client headers (lower case) forwarded beyond the default allow-list.
    pub forward_headers: Vec<String>,
}

/// Headers a client never sets for the provider, even when allowed in
/// models.yaml: framing, AEX's own credential and the provider key.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "cookie",
    "x-api-key",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    pub name: String,
    pub provider: String,
    pub provider_model: String,
    pub pricing: Pricing,
    pub max_tokens: u32,
    /// 0 = unlimited.
    pub max_tokens_per_minute: u64,
    /// The model's context window: the bound of an input the request body
    /// cannot bound (server-side conversation state, files by reference,
    /// hosted tools). 0 = not given: such requests are refused.
    pub max_input_tokens: u64,
    pub reasoning: bool,
    pub tools: bool,
    pub vision: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelsConfig {
    pub providers: BTreeMap<String, Provider>,
    pub models: BTreeMap<String, Model>,
    pub default_model: String,
    pub source: PathBuf,
    /// Hex SHA-256 of the file, to tell which version is running.
    pub digest: String,
}

/// `local` → `LOCAL_API_KEY`; `my-groq.eu` → `MY_GROQ_EU_API_KEY`.
pub fn api_key_env(provider: &str) -> String {
    let mut name: String = provider
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    name.push_str("_API_KEY");
    name
}

impl ModelsConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read the file ({e}); create it with `aexctl init`"),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| yaml_error(&e, file))?;
        let mut v = Validator {
            text,
            file,
            errors: Vec::new(),
        };
        let config = v.validate(raw);
        match (config, v.errors.into_iter().next()) {
            (Some(mut config), None) => {
                config.digest = crate::secrets::hex(&Sha256::digest(text.as_bytes()));
                Ok(config)
            }
            (_, Some(first)) => Err(first),
            (None, None) => unreachable!("validation failed without an error"),
        }
    }
}

fn yaml_error(e: &serde_yaml::Error, file: &Path) -> ConfigError {
    // serde_yaml says "models.x.pricing: unknown field `foo`, expected ... at
    // line 3 column 5"; split that into our key / line / message form.
    let full = e.to_string();
    let without_location = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full.clone(),
    };
    let (key, message) = match without_location.split_once(": ") {
        Some((k, m)) if !k.contains(' ') => (k.to_string(), m.to_string()),
        _ => (String::new(), without_location),
    };
    ConfigError {
        file: file.to_path_buf(),
        line: e.location().map(|l| l.line()),
        key,
        message,
    }
}

struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn fail(&mut self, path: &[&str], message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: find_key_line(self.text, path),
            key: path.join("."),
            message: message.into(),
        });
    }

    fn validate(&mut self, raw: RawConfig) -> Option<ModelsConfig> {
        if raw.version != 1 {
            self.fail(
                &["version"],
                format!(
                    "unsupported version {}; this AEX reads version 1",
                    raw.version
                ),
            );
        }
        if raw.providers.is_empty() {
            self.fail(
                &["providers"],
                "no providers are configured; add at least one",
            );
        }
        let mut providers = BTreeMap::new();
        for (name, p) in raw.providers {
            if let Some(provider) = self.provider(&name, p) {
                providers.insert(name, provider);
            }
        }
        if raw.models.is_empty() {
            self.fail(&["models"], "no models are configured; add at least one");
        }
        let mut models = BTreeMap::new();
        for (name, m) in raw.models {
            if let Some(model) = self.model(&name, m, &providers) {
                models.insert(name, model);
            }
        }
        let default_model = match raw.default_model {
            None => {
                self.fail(&["default_model"], "missing; name one of the models");
                String::new()
            }
            Some(d) if !models.contains_key(&d) => {
                let known: Vec<_> = models.keys().cloned().collect();
                self.fail(
                    &["default_model"],
                    format!(
                        "'{d}' is not a configured model (configured: {})",
                        known.join(", ")
                    ),
                );
                d
            }
            Some(d) => d,
        };
        self.errors.is_empty().then(|| ModelsConfig {
            providers,
            models,
            default_model,
            source: self.file.to_path_buf(),
            digest: String::new(),
        })
    }

    fn provider(&mut self, name: &str, p: RawProvider) -> Option<Provider> {
        if !valid_name(name) {
            self.fail(&["providers", name], NAME_RULE);
            return None;
        }
        let kind = match p.kind {
            RawProviderType::OpenaiCompatible => {
                for (key, set) in [
                    ("latency_ms", p.latency_ms.is_some()),
                    ("tokens_per_second", p.tokens_per_second.is_some()),
                    ("completion_tokens", p.completion_tokens.is_some()),
                ] {
                    if set {
                        self.fail(
                            &["providers", name, key],
                            "only a provider of type simulated takes this key",
                        );
                    }
                }
                let Some(url) = p.base_url else {
                    self.fail(
                        &["providers", name],
                        "an openai_compatible provider needs base_url, e.g. http://localhost:11434/v1",
                    );
                    return None;
                };
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                match rest {
                    Some(r)
                        if !r.is_empty()
                            && !r.starts_with('/')
                            && !r.contains(char::is_whitespace) => {}
                    _ => {
                        self.fail(
                            &["providers", name, "base_url"],
                            format!("'{url}' is not an http(s) URL with a host"),
                        );
                        return None;
                    }
                }
                ProviderKind::OpenAiCompatible {
                    base_url: url.trim_end_matches('/').to_string(),
                }
            }
            RawProviderType::Simulated => {
                if p.base_url.is_some() {
                    self.fail(
                        &["providers", name, "base_url"],
                        "a simulated provider is built in and takes no base_url",
                    );
                }
                ProviderKind::Simulated(SimulatedSettings {
                    latency_ms: p.latency_ms.unwrap_or(20),
                    tokens_per_second: p.tokens_per_second.unwrap_or(0),
                    completion_tokens: p.completion_tokens.unwrap_or(32),
                })
            }
        };
        let api_key_env = match kind {
            ProviderKind::OpenAiCompatible { .. } => api_key_env(name),
            ProviderKind::Simulated(_) => String::new(),
        };
        let mut forward_headers = Vec::new();
        for header in p.forward_headers.unwrap_or_default() {
            let lower = header.trim().to_ascii_lowercase();
            let token = !lower.is_empty()
                && lower
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                self.fail(
                    &["providers", name, "forward_headers"],
                    format!("'{header}' is not a header name"),
                );
            } else if NEVER_FORWARDED.contains(&lower.as_str()) {
                self.fail(
                    &["providers", name, "forward_headers"],
                    format!(
                        "'{header}' is never forwarded from a client: it carries framing or credentials"
                    ),
                );
            } else if !forward_headers.contains(&lower) {
                forward_headers.push(lower);
            }
        }
        Some(Provider {
            name: name.to_string(),
            kind,
            api_key_env,
            forward_headers,
        })
    }

    fn model(
        &mut self,
        name: &str,
        m: RawModel,
        providers: &BTreeMap<String, Provider>,
    ) -> Option<Model> {
        if !valid_name(name) {
            self.fail(&["models", name], NAME_RULE);
            return None;
        }
        if !providers.contains_key(&m.provider) {
            let known: Vec<_> = providers.keys().cloned().collect();
            self.fail(
                &["models", name, "provider"],
                format!(
                    "'{}' is not a configured provider (configured: {})",
                    m.provider,
                    known.join(", ")
                ),
            );
        }
        let provider_model = m.provider_model.unwrap_or_else(|| name.to_string());
        if provider_model.trim().is_empty() {
            self.fail(&["models", name, "provider_model"], "must not be empty");
        }
        let input = self.price(
            name,
            "input",
            m.pricing.input_micro,
            m.pricing.input_usd_per_mtok,
        );
        let output = self.price(
            name,
            "output",
            m.pricing.output_micro,
            m.pricing.output_usd_per_mtok,
        );
        let cached_input = self.cache_price(
            name,
            "cached_input",
            m.pricing.cached_input_micro,
            m.pricing.cached_input_usd_per_mtok,
        );
        let cache_write = self.cache_price(
            name,
            "cache_write",
            m.pricing.cache_write_micro,
            m.pricing.cache_write_usd_per_mtok,
        );
        let max_tokens = m.limits.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            self.fail(
                &["models", name, "limits", "max_tokens"],
                "must be at least 1",
            );
        }
        Some(Model {
            name: name.to_string(),
            provider: m.provider,
            provider_model,
            pricing: {
                let input = input?;
                Pricing::flat(input, output?).with_cache(
                    cached_input?.unwrap_or(input),
                    cache_write?.unwrap_or(input),
                )
            },
            max_tokens,
            max_tokens_per_minute: m.limits.max_tokens_per_minute.unwrap_or(0),
            max_input_tokens: m.limits.max_input_tokens.unwrap_or(0),
            reasoning: m.capabilities.reasoning,
            tools: m.capabilities.tools,
            vision: m.capabilities.vision,
        })
    }

    /// A price that may be left out (`Some(None)`); `None` when it is given
    /// and invalid.
    fn cache_price(
        &mut self,
        model: &str,
        side: &str,
        micro: Option<Decimal>,
        usd_per_mtok: Option<Decimal>,
    ) -> Option<Option<Pico>> {
        if micro.is_none() && usd_per_mtok.is_none() {
            return Some(None);
        }
        self.price(model, side, micro, usd_per_mtok).map(Some)
    }

    /// One of `{side}_micro` (µ per token) or `{side}_usd_per_mtok`, resolved
    /// to exact pico-USD per token. Both forms allow 6 decimals, which is
    /// exactly what pico resolution can hold.
    fn price(
        &mut self,
        model: &str,
        side: &str,
        micro: Option<Decimal>,
        usd_per_mtok: Option<Decimal>,
    ) -> Option<Pico> {
        let micro_key = format!("{side}_micro");
        let mtok_key = format!("{side}_usd_per_mtok");
        let (key, value) = match (micro, usd_per_mtok) {
            (Some(_), Some(_)) => {
                self.fail(
                    &["models", model, "pricing", &mtok_key],
                    format!("give either {micro_key} or {mtok_key}, not both"),
                );
                return None;
            }
            (None, None) => {
                self.fail(
                    &["models", model, "pricing"],
                    format!(
                        "missing {micro_key} (µ per token) or {mtok_key} (USD per million tokens)"
                    ),
                );
                return None;
            }
            (Some(v), None) | (None, Some(v)) if v.0.is_empty() => {
                self.fail(&["models", model, "pricing"], "empty price");
                return None;
            }
            (Some(v), None) => (micro_key, v),
            (None, Some(v)) => (mtok_key, v),
        };
        // µ per token and USD per Mtok have the same scale: 1 µ/token = 1 USD/Mtok
        // = 1e6 pico per token.
        match parse_scaled(&value.0, 6) {
            Ok(pico) => Some(pico),
            Err(e) => {
                self.fail(&["models", model, "pricing", &key], e.to_string());
                None
            }
        }
    }
}

const NAME_RULE: &str = "names may only use letters, digits, '.', '_', '-', ':' and '/'";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
}

/// The 1-based line of `a.b.c` in block-style YAML (or of the line holding a
/// flow mapping that contains the last key). Good enough to point a user at
/// the right place; `None` when the key cannot be found.
fn find_key_line(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut parent_indent: Option<usize> = None;
    let mut found = None;
    for key in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = line.len() - trimmed.len();
            if let Some(p) = parent_indent
                && indent <= p
                && i > start
            {
                break;
            }
            let unquoted = trimmed.trim_start_matches(['"', '\'']);
            if let Some(rest) = unquoted.strip_prefix(key) {
                let rest = rest.trim_start_matches(['"', '\'']);
                if rest.starts_with(':') {
                    hit = Some((i, indent));
                    break;
                }
            }
        }
        match hit {
            Some((i, indent)) => {
                found = Some(i);
                start = i + 1;
                parent_indent = Some(indent);
            }
            None => {
                // Perhaps a flow mapping on the parent's line: `{ key: ... }`.
                if let Some(i) = found
                    && lines[i].contains(&format!("{key}:"))
                {
                    return Some(i + 1);
                }
                return found.map(|i| i + 1);
            }
        }
    }
    found.map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "version: 1

providers:
  local:
    base_url: http://localhost:11434/v1
    type: openai_compatible

models:
  llama3-local:
    provider: local
    provider_model: llama3
    pricing:
      input_micro: 1
      output_micro: 2
    limits:
      max_tokens: 4096
    capabilities:
      reasoning: true
      tools: true
      vision: false

default_model: llama3-local
";

    fn parse(text: &str) -> Result<ModelsConfig, ConfigError> {
        ModelsConfig::parse(text, Path::new("models.yaml"))
    }

    #[test]
    fn seed_guide_file_loads_unchanged() {
        let c = parse(SEED).unwrap();
        let m = &c.models["llama3-local"];
        assert_eq!(m.provider_model, "llama3");
        assert_eq!(m.pricing.input_pico_per_token, 1_000_000);
        assert_eq!(m.pricing.output_pico_per_token, 2_000_000);
        assert_eq!(m.max_tokens, 4096);
        assert!(m.reasoning && m.tools && !m.vision);
        assert_eq!(c.default_model, "llama3-local");
        assert_eq!(c.providers["local"].api_key_env, "LOCAL_API_KEY");
        assert_eq!(
            c.providers["local"].kind,
            ProviderKind::OpenAiCompatible {
                base_url: "http://localhost:11434/v1".into()
            }
        );
    }

    #[test]
    fn default_file_is_valid() {
        let c = parse(DEFAULT_MODELS_YAML).unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models["simulated"].pricing.input_pico_per_token, 150_000);
        assert_eq!(c.models["simulated"].pricing.output_pico_per_token, 600_000);
        assert!(matches!(
            c.providers["simulated"].kind,
            ProviderKind::Simulated(_)
        ));
    }

    #[test]
    fn spec_flow_form_with_usd_per_mtok() {
        let text = "version: 1
providers:
  groq: { base_url: https://api.groq.com/openai/v1, type: openai_compatible }
models:
  fast:
    provider: groq
    provider_model: llama-3.1-8b-instant
    pricing: { input_usd_per_mtok: 0.05, output_usd_per_mtok: 0.08 }
    limits: { max_tokens: 8192, max_tokens_per_minute: 100000 }
default_model: fast
";
        let c = parse(text).unwrap();
        let m = &c.models["fast"];
        assert_eq!(m.pricing.input_pico_per_token, 50_000);
        assert_eq!(m.pricing.output_pico_per_token, 80_000);
        assert_eq!(m.max_tokens_per_minute, 100_000);
        assert!(m.tools && !m.vision, "capability defaults");
        assert_eq!(c.providers["groq"].api_key_env, "GROQ_API_KEY");
        assert_eq!(
            m.pricing,
            Pricing::flat(50_000, 80_000),
            "no cache prices: cached input and cache writes at the input price"
        );
    }

    #[test]
    fn cache_prices_in_either_form() {
        let text = "version: 1
providers:
  claude: { base_url: https://api.anthropic.com, type: openai_compatible }
models:
  sonnet:
    provider: claude
    pricing: { input_usd_per_mtok: 3, cached_input_usd_per_mtok: 0.3,
               cache_write_usd_per_mtok: 3.75, output_usd_per_mtok: 15 }
  seed:
    provider: claude
    pricing: { input_micro: 2, cached_input_micro: 0.5, output_micro: 8 }
default_model: sonnet
";
        let c = parse(text).unwrap();
        assert_eq!(
            c.models["sonnet"].pricing,
            Pricing::flat(3_000_000, 15_000_000).with_cache(300_000, 3_750_000)
        );
        assert_eq!(
            c.models["seed"].pricing,
            Pricing::flat(2_000_000, 8_000_000).with_cache(500_000, 2_000_000)
        );
        let both = text.replace(
            "cached_input_micro: 0.5",
            "cached_input_micro: 0.5, cached_input_usd_per_mtok: 1",
        );
        let e = parse(&both).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let bad = text.replace("cached_input_micro: 0.5", "cached_input_micro: -1");
        let e = parse(&bad).unwrap_err();
        assert!(e.to_string().contains("cached_input_micro"), "{e}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = SEED.replace(
            "      output_micro: 2\n",
            "      output_micro: 2\n      outptu: 3\n",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, Some(15), "{e}");
        assert!(e.to_string().contains("unknown field `outptu`"), "{e}");
        assert!(e.key.contains("pricing"), "{e}");
    }

    #[test]
    fn missing_default_model_target_is_an_error() {
        let text = SEED.replace("default_model: llama3-local", "default_model: gpt-9");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "default_model");
        assert_eq!(e.line, Some(22));
        assert!(
            e.message.contains("'gpt-9' is not a configured model"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "models.yaml:22: default_model: 'gpt-9' is not a configured model (configured: llama3-local)"
        );
    }

    #[test]
    fn unknown_provider_names_the_model_key_line() {
        let text = SEED.replace("    provider: local", "    provider: lcoal");
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, "models.llama3-local.provider");
        assert_eq!(e.line, Some(10));
    }

    #[test]
    fn bad_prices_are_refused() {
        for (from, to, needle) in [
            ("input_micro: 1", "input_micro: -1", "negative"),
            ("input_micro: 1", "input_micro: 0.0000001", "decimal places"),
            ("input_micro: 1", "input_micro: abc", "not a decimal"),
            ("input_micro: 1\n", "", "missing input_micro"),
            (
                "input_micro: 1",
                "input_micro: 1\n      input_usd_per_mtok: 1",
                "not both",
            ),
        ] {
            let e = parse(&SEED.replace(from, to)).unwrap_err();
            assert!(e.to_string().contains(needle), "{to}: {e}");
            assert!(e.line.is_some(), "{to}: {e}");
        }
    }

    #[test]
    fn structural_errors() {
        for (from, to, needle) in [
            ("version: 1", "version: 2", "unsupported version 2"),
            (
                "    type: openai_compatible",
                "    type: grpc",
                "unknown variant `grpc`",
            ),
            (
                "    base_url: http://localhost:11434/v1\n",
                "",
                "needs base_url",
            ),
            (
                "http://localhost:11434/v1",
                "localhost:11434",
                "not an http(s) URL",
            ),
            ("max_tokens: 4096", "max_tokens: 0", "at least 1"),
            ("max_tokens: 4096", "max_tokens: lots", "invalid type"),
            ("default_model: llama3-local", "", "default_model: missing"),
        ] {
            let e = parse(&SEED.replace(from, to)).unwrap_err();
            assert!(e.to_string().contains(needle), "{to}: {e}");
        }
        assert!(parse("[1, 2]").is_err());
        assert!(parse("").is_err());
        assert!(parse("version: 1\nproviders: {}\nmodels: {}\n").is_err());
    }

    /// Hardening #4: a client's headers reach a provider only from an
    /// allow-list; models.yaml may add to it per provider, but never framing
    /// or credential headers.
    #[test]
    fn forward_headers_are_validated() {
        let with = |list: &str| {
            parse(&format!(
                "version: 1
providers:
  p:
    base_url: http://h/v1
    type: openai_compatible
    forward_headers: {list}
models:
  m: {{ provider: p, pricing: {{ input_micro: 1, output_micro: 1 }} }}
default_model: m
"
            ))
        };
        let c = with("[X-Trace-Id, x-trace-id, OpenAI-Organization]").unwrap();
        assert_eq!(
            c.providers["p"].forward_headers,
            ["x-trace-id", "openai-organization"]
        );
        for bad in ["[authorization]", "[Host]", "[\"x bad\"]", "[\"\"]"] {
            let e = with(bad).unwrap_err();
            assert!(e.key.contains("forward_headers"), "{bad}: {e}");
            assert_eq!(e.line, Some(6), "{bad}: {e}");
        }
    }

    proptest::proptest! {
        /// Fuzz: any text, and any mutation of the seed file, parses or
        /// fails with an error naming a key; it never panics.
        #[test]
        fn the_parser_never_panics(
            text in ".{0,300}",
            at in 0usize..SEED.len(),
            cut in 0usize..40,
            insert in ".{0,20}",
        ) {
            let _ = parse(&text);
            let mut mutated = SEED.to_string();
            let at = (0..=at).rev().find(|i| mutated.is_char_boundary(*i)).unwrap_or(0);
            let end = (at + cut).min(mutated.len());
            let end = (end..=mutated.len()).find(|i| mutated.is_char_boundary(*i)).unwrap_or(mutated.len());
            mutated.replace_range(at..end, &insert);
            if let Err(e) = parse(&mutated) {
                proptest::prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn api_key_env_names() {
        assert_eq!(api_key_env("local"), "LOCAL_API_KEY");
        assert_eq!(api_key_env("my-groq.eu"), "MY_GROQ_EU_API_KEY");
    }

    #[test]
    fn locates_keys() {
        assert_eq!(
            find_key_line(SEED, &["models", "llama3-local", "limits"]),
            Some(15)
        );
        assert_eq!(
            find_key_line(SEED, &["models", "llama3-local", "limits", "max_tokens"]),
            Some(16)
        );
        assert_eq!(find_key_line(SEED, &["nope"]), None);
    }
}
