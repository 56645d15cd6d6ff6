//! The data-plane credentials this control plane accepts (docs/DEPLOY.md,
//! `aex_core::credential`): the fleet one, and the scoped ones held in the
//! store, known here by the SHA-256 of their secret. The book is read on
//! every data-plane RPC by a synchronous interceptor, so it lives in memory
//! and is reloaded: at start, after every issue and revoke through any
//! control plane (the store's change feed), and — bounded — when a
//! presented credential is not in it, so a credential issued through
//! another control plane a moment ago works here within a retry.

use crate::storage::{Store, StoreError};
use aex_core::credential::Served;
use aex_core::secrets::{secrets_match, token_sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// An unknown credential reloads the book at most this often: each reload
/// reads every credential, and a client presenting garbage must not turn
/// into a read per RPC. A data plane retries its RPCs within about a
/// second, so a credential issued elsewhere works by its next retry.
const RELOAD_ON_MISS_MS: i64 = 1_000;

pub struct CredentialBook {
    store: Arc<dyn Store>,
    fleet: Arc<str>,
    scoped: RwLock<HashMap<String, Served>>,
    last_miss_reload_ms: AtomicI64,
    /// Bumped at each reload, so long-lived streams (Watch) check that
    /// their credential is still valid.
    generation: tokio::sync::watch::Sender<u64>,
    /// One reload at a time, each reading the store after the one before
    /// wrote: otherwise a reload that read before a revocation could write
    /// after the one that read it, and bring the revoked credential back.
    reloading: tokio::sync::Mutex<()>,
}

/// The data plane behind one RPC: what it may serve, and which scoped
/// credential says so (checked again by long-lived streams).
#[derive(Debug, Clone)]
pub struct Caller {
    pub served: Served,
    secret_sha256: Option<String>,
}

impl Caller {
    /// A data plane with the fleet credential.
    pub fn fleet() -> Self {
        Self {
            served: Served::Every,
            secret_sha256: None,
        }
    }

    /// No credential seen: serves no agent (fails closed).
    pub fn nobody() -> Self {
        Self {
            served: Served::Agents {
                credential: String::new(),
                names: Default::default(),
            },
            secret_sha256: Some(String::new()),
        }
    }
}

/// Why a presented data-plane credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Unknown,
}

impl CredentialBook {
    pub fn new(store: Arc<dyn Store>, fleet: &str) -> Self {
        Self {
            store,
            fleet: fleet.into(),
            scoped: RwLock::default(),
            last_miss_reload_ms: AtomicI64::new(0),
            generation: tokio::sync::watch::Sender::new(0),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Which agents the holder of `presented` may act for.
    pub fn resolve(self: &Arc<Self>, presented: &str) -> Result<Caller, Refused> {
        if presented.is_empty() {
            return Err(Refused::Missing);
        }
        if secrets_match(presented, &self.fleet) {
            return Ok(Caller::fleet());
        }
        let hash = token_sha256(presented);
        if let Some(served) = self.scoped_by_hash(&hash) {
            return Ok(Caller {
                served,
                secret_sha256: Some(hash),
            });
        }
        self.reload_soon();
        Err(Refused::Unknown)
    }

    fn scoped_by_hash(&self, secret_sha256: &str) -> Option<Served> {
        self.scoped
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(secret_sha256)
            .cloned()
    }

    /// Whether the credential behind `caller` is still live (the fleet
    /// one always is).
    pub fn still_valid(&self, caller: &Caller) -> bool {
        caller
            .secret_sha256
            .as_deref()
            .is_none_or(|h| self.scoped_by_hash(h).is_some())
    }

    /// Reloads every live credential from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let live = self.store.list_credentials(false).await?;
        let scoped: HashMap<String, Served> = live
            .iter()
            .map(|c| (c.secret_sha256.clone(), Served::scoped(c)))
            .collect();
        *self.scoped.write().unwrap_or_else(|p| p.into_inner()) = scoped;
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Reloads in the background, at most once per [`RELOAD_ON_MISS_MS`]:
    /// the interceptor cannot wait, so the reload serves the next RPC.
    fn reload_soon(self: &Arc<Self>) {
        let now = crate::clock::now_ms();
        let last = self.last_miss_reload_ms.load(Ordering::Relaxed);
        if now - last < RELOAD_ON_MISS_MS
            || self
                .last_miss_reload_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let book = self.clone();
        runtime.spawn(async move {
            if let Err(e) = book.reload().await {
                tracing::warn!(error = %e, "could not reload data-plane credentials");
            }
        });
    }

    /// Changes of the book, for long-lived streams.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
