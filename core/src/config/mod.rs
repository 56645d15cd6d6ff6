//! `models.yaml`: parsed into raw serde structs (unknown keys are errors),
//! then validated into runtime types. Every error names the file, the line
//! and the key, so a user can fix it without guessing.

mod raw;
mod validate;

use raw::RawConfig;
use validate::{Validator, yaml_error};

use crate::money::{Pico, Pricing, parse_scaled};
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

// ------------------------------------------------------------ runtime form

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedSettings {
    pub latency_ms: u32,
    pub tokens_per_second: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAiCompatible {
        base_url: String,
    },
    /// Anthropic's Messages API at `base_url` (its host, e.g.
    /// `https://api.anthropic.com`; `/v1/messages` goes under it).
    Anthropic {
        base_url: String,
    },
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
    "api-key",
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

#[cfg(test)]
mod tests {
    use super::validate::find_key_line;
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
    fn an_anthropic_provider_is_its_host_with_or_without_the_version() {
        for url in [
            "https://api.anthropic.com",
            "https://api.anthropic.com/",
            "https://api.anthropic.com/v1",
        ] {
            let text = format!(
                "version: 1
providers:
  claude: {{ base_url: {url}, type: anthropic }}
models:
  sonnet:
    provider: claude
    pricing: {{ input_usd_per_mtok: 3, output_usd_per_mtok: 15 }}
default_model: sonnet
"
            );
            let c = parse(&text).unwrap();
            assert_eq!(
                c.providers["claude"].kind,
                ProviderKind::Anthropic {
                    base_url: "https://api.anthropic.com".into()
                },
                "{url}"
            );
            assert_eq!(c.providers["claude"].api_key_env, "CLAUDE_API_KEY");
        }
        let err = parse(
            "version: 1
providers:
  claude: { type: anthropic }
models: {}
",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("https://api.anthropic.com"), "{err}");
    }

    #[test]
    fn cache_prices_in_either_form() {
        let text = "version: 1
providers:
  claude: { base_url: https://api.anthropic.com, type: anthropic }
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
