//! What every RPC handler shares.

use crate::admission::engine::AdmissionEngine;
use crate::error::Result;
use crate::storage::Store;
use aex_core::config::ModelsConfig;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub struct ControlState {
    pub store: Arc<dyn Store>,
    pub admission: AdmissionEngine,
    /// The data-plane credentials accepted, and what each may serve.
    pub credentials: Arc<crate::credentials::CredentialBook>,
    /// For `status`: where the ledger lives and since when we serve.
    pub database: String,
    pub started_at_ms: i64,
    /// Data planes connected to the watch stream right now.
    pub data_planes: std::sync::atomic::AtomicU32,
    /// The ledger key, for audit.
    pub ledger_key: Vec<u8>,
    pub metrics: Arc<crate::metrics::ControlMetrics>,
    /// Flips to true when the server starts shutting down, so endless
    /// streams (watch, supervise) end and graceful shutdown can complete.
    pub shutting_down: tokio::sync::watch::Sender<bool>,
    models: RwLock<Arc<ModelsConfig>>,
    models_path: PathBuf,
    /// When the running models.yaml was loaded (here, or on another
    /// control plane's reload).
    models_loaded_at_ms: std::sync::atomic::AtomicI64,
    reloading: std::sync::Mutex<()>,
}

impl ControlState {
    pub fn new(
        store: Arc<dyn Store>,
        admission: AdmissionEngine,
        credentials: Arc<crate::credentials::CredentialBook>,
        models: ModelsConfig,
        models_path: PathBuf,
        database: String,
        ledger_key: Vec<u8>,
    ) -> Self {
        Self {
            store,
            admission,
            credentials,
            database,
            started_at_ms: crate::clock::now_ms(),
            data_planes: Default::default(),
            ledger_key,
            metrics: Default::default(),
            shutting_down: tokio::sync::watch::Sender::new(false),
            models: RwLock::new(Arc::new(models)),
            models_path,
            models_loaded_at_ms: crate::clock::now_ms().into(),
            reloading: Default::default(),
        }
    }

    pub fn models_loaded_at_ms(&self) -> i64 {
        self.models_loaded_at_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The running model configuration; a cheap `Arc` clone.
    pub fn models(&self) -> Arc<ModelsConfig> {
        self.models.read().expect("models lock poisoned").clone()
    }

    /// Resolves once the server starts shutting down.
    pub async fn stopping(mut rx: tokio::sync::watch::Receiver<bool>) {
        // The borrow guard is dropped here, so callers' futures stay Send.
        let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
    }

    /// Re-reads models.yaml; on any error the running config stays as it was.
    pub fn reload_models(&self) -> Result<Arc<ModelsConfig>> {
        self.reload(false).map(|(models, _)| models)
    }

    /// Re-reads models.yaml because another control plane reloaded its own
    /// (or the change feed had a gap): applied only if it differs from the
    /// running config, so this one's own announcement is not applied twice.
    /// Whether it was applied.
    pub fn reload_models_if_changed(&self) -> Result<bool> {
        self.reload(true).map(|(_, applied)| applied)
    }

    fn reload(&self, only_if_changed: bool) -> Result<(Arc<ModelsConfig>, bool)> {
        // One reload at a time: an older file must not be applied last.
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = Arc::new(ModelsConfig::load(&self.models_path)?);
        if only_if_changed && fresh.digest == self.models().digest {
            return Ok((fresh, false));
        }
        *self.models.write().expect("models lock poisoned") = fresh.clone();
        self.models_loaded_at_ms
            .store(crate::clock::now_ms(), std::sync::atomic::Ordering::Relaxed);
        self.admission.models_changed(fresh.clone());
        tracing::info!(models = fresh.models.len(), digest = %fresh.digest, "models reloaded");
        Ok((fresh, true))
    }
}
