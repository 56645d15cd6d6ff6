//! Agent policies and model routes, as the control plane's watch stream
//! last said; read by every request without a round trip.

use crate::api::Family;
use crate::simulated::Settings;
use aex_core::config::ModelsConfig;
use aex_proto::v1 as pb;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// Where a provider lives and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Http {
        /// The API the provider speaks.
        family: Family,
        tls: bool,
        host: String,
        port: u16,
        /// Path prefix of the base URL, e.g. `/v1` (no trailing slash).
        base_path: String,
        /// The provider key (`Authorization: Bearer`, or Anthropic's
        /// `x-api-key`); never logged.
        api_key: Option<String>,
        /// Client headers allowed beyond the default list (lower case).
        forward_headers: Vec<String>,
    },
    Simulated(Settings),
}

/// Splits `http(s)://host[:port][/path]`; the control plane validated it.
pub fn parse_base_url(url: &str) -> Option<(bool, String, u16, String)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        (false, url.strip_prefix("http://")?)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((tls, host.to_string(), port, path.to_string()))
}

#[derive(Default)]
struct CacheState {
    /// Shared, so that admitting from a grant reads one without copying it.
    agents: HashMap<String, Arc<pb::AgentPolicy>>,
    /// Token hash → agent id, for admitting from a grant.
    by_token: HashMap<String, String>,
    models: Vec<pb::Model>,
    /// The same models as the control plane's admission plan reads them.
    plan_models: Arc<ModelsConfig>,
    routes: HashMap<String, Route>,
}

impl CacheState {
    fn index_tokens(&mut self) {
        self.by_token = self
            .agents
            .values()
            .map(|a| (a.token_sha256.clone(), a.agent_id.clone()))
            .collect();
    }
}

/// Agent policies and model routes, as the control plane last said.
pub struct Cache {
    state: RwLock<CacheState>,
    ready: AtomicBool,
    env_file: Option<std::path::PathBuf>,
}

impl Cache {
    pub fn new(env_file: Option<std::path::PathBuf>) -> Self {
        Self {
            state: RwLock::default(),
            ready: AtomicBool::new(false),
            env_file,
        }
    }

    /// True once a snapshot arrived and the watch stream is connected.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(super) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the control plane has said where any provider lives yet.
    pub(super) fn has_routes(&self) -> bool {
        !self.state.read().expect("cache lock").routes.is_empty()
    }

    /// The API the provider of `model` speaks; `None` for a model not
    /// configured, or served by the simulated provider (which speaks both).
    pub fn provider_family(&self, model: &str) -> Option<Family> {
        let s = self.state.read().expect("cache lock");
        let provider = &s.plan_models.models.get(model)?.provider;
        match s.routes.get(provider)? {
            Route::Http { family, .. } => Some(*family),
            Route::Simulated(_) => None,
        }
    }

    pub fn route(&self, provider: &str) -> Option<Route> {
        self.state
            .read()
            .expect("cache lock")
            .routes
            .get(provider)
            .cloned()
    }

    /// Whether `model` is configured (bounds metric label cardinality).
    pub fn has_model(&self, model: &str) -> bool {
        self.state
            .read()
            .expect("cache lock")
            .models
            .iter()
            .any(|m| m.name == model)
    }

    /// The models an agent may list (all configured ones if its list is empty).
    pub fn models_for(&self, agent_id: &str) -> Vec<String> {
        let s = self.state.read().expect("cache lock");
        let allowed = s
            .agents
            .get(agent_id)
            .map(|a| a.allowed_models.clone())
            .unwrap_or_default();
        s.models
            .iter()
            .map(|m| m.name.clone())
            .filter(|m| allowed.is_empty() || allowed.contains(m))
            .collect()
    }

    /// The policy of the agent whose token hashes to `token_sha256`.
    pub(super) fn policy_by_token(&self, token_sha256: &str) -> Option<Arc<pb::AgentPolicy>> {
        let s = self.state.read().expect("cache lock");
        s.by_token
            .get(token_sha256)
            .and_then(|id| s.agents.get(id))
            .cloned()
    }

    /// The models, in the shape the admission plan reads.
    pub(super) fn plan_models(&self) -> Arc<ModelsConfig> {
        self.state.read().expect("cache lock").plan_models.clone()
    }

    pub(super) fn apply(&self, event: pb::watch_event::Change) {
        use pb::watch_event::Change;
        let mut s = self.state.write().expect("cache lock");
        match event {
            Change::Snapshot(snap) => {
                s.agents = snap
                    .agents
                    .into_iter()
                    .map(|a| (a.agent_id.clone(), Arc::new(a)))
                    .collect();
                s.index_tokens();
            }
            Change::AgentUpserted(a) => {
                // A rotated token no longer signs in.
                if let Some(old) = s.agents.get(&a.agent_id)
                    && old.token_sha256 != a.token_sha256
                {
                    let rotated = old.token_sha256.clone();
                    s.by_token.remove(&rotated);
                }
                s.by_token
                    .insert(a.token_sha256.clone(), a.agent_id.clone());
                s.agents.insert(a.agent_id.clone(), Arc::new(a));
            }
            Change::AgentRemoved(id) => {
                if let Some(old) = s.agents.remove(&id) {
                    s.by_token.remove(&old.token_sha256);
                }
            }
            // For the grants (`grants.rs`); nothing cached changes.
            Change::GrantsRevoked(_) => {}
            // Collected by the watch (`watch.rs`) and applied with the
            // snapshot that ends them.
            Change::SnapshotPart(_) => {}
            Change::Models(config) => {
                let env_file = self
                    .env_file
                    .as_deref()
                    .map(aex_core::home::read_env_file)
                    .unwrap_or_default();
                let key = |var: &str| {
                    std::env::var(var)
                        .ok()
                        .or_else(|| env_file.get(var).cloned())
                        .filter(|k| !k.is_empty())
                };
                s.routes = config
                    .providers
                    .iter()
                    .filter_map(|p| {
                        let route = match p.r#type() {
                            pb::ProviderType::Simulated => {
                                let sim = p.simulated.unwrap_or_default();
                                Route::Simulated(Settings {
                                    latency_ms: sim.latency_ms,
                                    tokens_per_second: sim.tokens_per_second,
                                    completion_tokens: sim.completion_tokens,
                                })
                            }
                            kind => {
                                let (tls, host, port, base_path) = parse_base_url(&p.base_url)?;
                                Route::Http {
                                    family: match kind {
                                        pb::ProviderType::Anthropic => Family::Anthropic,
                                        _ => Family::OpenAi,
                                    },
                                    tls,
                                    host,
                                    port,
                                    base_path,
                                    api_key: key(&p.api_key_env),
                                    forward_headers: p.forward_headers.clone(),
                                }
                            }
                        };
                        Some((p.name.clone(), route))
                    })
                    .collect();
                s.plan_models = Arc::new(ModelsConfig {
                    providers: Default::default(),
                    models: config
                        .models
                        .iter()
                        .map(|m| (m.name.clone(), aex_proto::convert::model_from_pb(m)))
                        .collect(),
                    default_model: config.default_model.clone(),
                    source: config.source_path.clone().into(),
                    digest: config.digest.clone(),
                });
                s.models = config.models;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("http://localhost:11434/v1"),
            Some((false, "localhost".into(), 11434, "/v1".into()))
        );
        assert_eq!(
            parse_base_url("https://api.groq.com/openai/v1/"),
            Some((true, "api.groq.com".into(), 443, "/openai/v1".into()))
        );
        assert_eq!(
            parse_base_url("http://[::1]:8080"),
            Some((false, "::1".into(), 8080, "".into()))
        );
        assert_eq!(parse_base_url("ftp://x"), None);
    }
}
