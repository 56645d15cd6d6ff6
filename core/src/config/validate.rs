//! From the raw form to the runtime one: every rule models.yaml must keep,
//! each error naming the file, the line and the key.

use super::raw::*;
use super::*;

pub(super) fn yaml_error(e: &serde_yaml::Error, file: &Path) -> ConfigError {
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

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a Path,
    pub(super) errors: Vec<ConfigError>,
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

    pub(super) fn validate(&mut self, raw: RawConfig) -> Option<ModelsConfig> {
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
            RawProviderType::OpenaiCompatible | RawProviderType::Anthropic => {
                let anthropic = matches!(p.kind, RawProviderType::Anthropic);
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
                        if anthropic {
                            "an anthropic provider needs base_url, e.g. https://api.anthropic.com"
                        } else {
                            "an openai_compatible provider needs base_url, e.g. http://localhost:11434/v1"
                        },
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
                let base_url = url.trim_end_matches('/');
                if anthropic {
                    // Anthropic's SDKs take the host; a URL copied with its
                    // version works the same.
                    ProviderKind::Anthropic {
                        base_url: base_url.strip_suffix("/v1").unwrap_or(base_url).to_string(),
                    }
                } else {
                    ProviderKind::OpenAiCompatible {
                        base_url: base_url.to_string(),
                    }
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
            ProviderKind::OpenAiCompatible { .. } | ProviderKind::Anthropic { .. } => {
                api_key_env(name)
            }
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

pub(super) const NAME_RULE: &str = "names may only use letters, digits, '.', '_', '-', ':' and '/'";

pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
}

/// The 1-based line of `a.b.c` in block-style YAML (or of the line holding a
/// flow mapping that contains the last key). Good enough to point a user at
/// the right place; `None` when the key cannot be found.
pub(super) fn find_key_line(text: &str, path: &[&str]) -> Option<usize> {
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
