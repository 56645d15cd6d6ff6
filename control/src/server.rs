//! Assembles the gRPC server: admin services behind the admin credential,
//! reflection and health open (so `grpcurl list` works with no .proto files).

use crate::admission::engine::{AdmissionEngine, ExpiryPolicy};
use crate::auth::{RequireBearer, RequireDataPlane};
use crate::error::Result;
use crate::service::{
    admission::AdmissionApi, agents::AgentsApi, credentials::CredentialsApi, ledger::LedgerApi,
    models::ModelsApi, processes::ProcessesApi,
};
use crate::state::ControlState;
use crate::storage::Database;
use aex_core::config::ModelsConfig;
use aex_core::home::Home;
use aex_proto::v1::{
    FILE_DESCRIPTOR_SET, admission_service_server::AdmissionServiceServer,
    agent_service_server::AgentServiceServer, credential_service_server::CredentialServiceServer,
    ledger_service_server::LedgerServiceServer, model_service_server::ModelServiceServer,
    process_service_server::ProcessServiceServer,
};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

/// Names reported by grpc.health.v1 besides the overall "".
pub const SERVICE_NAMES: &[&str] = &[
    "aex.v1.AdmissionService",
    "aex.v1.AgentService",
    "aex.v1.ModelService",
    "aex.v1.LedgerService",
    "aex.v1.ProcessService",
    "aex.v1.CredentialService",
];

/// How reservations nobody settles are handled.
#[derive(Debug, Clone, Copy)]
pub struct ReservationSettings {
    /// How long a reservation lives without a settle or heartbeat.
    pub ttl_ms: i64,
    pub expiry_policy: ExpiryPolicy,
    /// How often expired reservations are swept.
    pub sweep_interval_ms: u64,
    /// When usage reported past reservations pauses an agent.
    pub overrun_limit: aex_core::overrun::OverrunLimit,
}

impl Default for ReservationSettings {
    fn default() -> Self {
        Self {
            ttl_ms: 120_000,
            expiry_policy: ExpiryPolicy::Charge,
            sweep_interval_ms: 1_000,
            overrun_limit: aex_core::overrun::OverrunLimit::DEFAULT,
        }
    }
}

/// Accepted connections with Nagle off. gRPC writes a response as several
/// small frames; with Nagle on, each unary call waits ~40 ms for the peer's
/// delayed ACK. (tonic's own `tcp_nodelay` only applies when it binds.)
fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    })
}

/// Applies what changed through any control plane on the database (agents,
/// their processes, models reloads), so that this one's admission and its
/// data planes' caches follow within the notification's delay.
async fn apply_changes(state: Arc<ControlState>, mut feed: crate::storage::ChangeFeed) {
    use crate::storage::{EVERY_AGENT, StoreChange};
    while let Some(change) = feed.recv().await {
        let agent_id = match change {
            StoreChange::Agent(id) => id,
            StoreChange::ModelsReloaded => {
                reload_models_here(&state);
                continue;
            }
            StoreChange::GrantsRecalled(agent_id) => {
                state.admission.grants_recalled_elsewhere(&agent_id);
                continue;
            }
            StoreChange::Credentials => {
                reload_credentials_here(&state).await;
                continue;
            }
            StoreChange::Everything => {
                // A gap may have hidden a reload and a revocation too.
                reload_models_here(&state);
                reload_credentials_here(&state).await;
                EVERY_AGENT.to_string()
            }
        };
        // Until it applies: a change skipped here would leave this replica
        // admitting on a paused agent or a rotated token.
        let mut backoff = std::time::Duration::from_millis(100);
        while let Err(e) = state.admission.refresh_agent(&agent_id).await {
            tracing::error!(error = %e, agent = %agent_id, "cannot apply a change made through another control plane; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
        }
    }
}

/// Until it applies: a revocation skipped here would leave a revoked
/// sidecar served by this replica.
async fn reload_credentials_here(state: &ControlState) {
    let mut backoff = std::time::Duration::from_millis(100);
    while let Err(e) = state.credentials.reload().await {
        tracing::error!(error = %e, "cannot reload data-plane credentials changed through another control plane; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

/// This control plane's own models.yaml, reloaded (if it changed) because
/// one was told to: a file that does not load leaves the running config.
fn reload_models_here(state: &ControlState) {
    if let Err(e) = state.reload_models_if_changed() {
        tracing::error!(error = %e, "models.yaml was reloaded through another control plane, but this one's does not load; running on the config it had");
    }
}

/// The gRPC listener's TLS: its certificate and key, and with a client CA,
/// mutual TLS (every client must present a certificate it signed).
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    /// Reads the PEM files; the error names the file that could not be read.
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> std::result::Result<Self, String> {
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
        };
        Ok(Self {
            cert_pem: read("TLS certificate", cert)?,
            key_pem: read("TLS key", key)?,
            client_ca_pem: client_ca.map(|p| read("client CA", p)).transpose()?,
        })
    }

    fn config(&self) -> tonic::transport::ServerTlsConfig {
        let config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem),
        );
        match &self.client_ca_pem {
            Some(ca) => config.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => config,
        }
    }
}

pub struct Control {
    pub state: Arc<ControlState>,
    /// None: plain HTTP/2 (loopback, or TLS terminated in front).
    pub tls: Option<ServerTls>,
    admin_token: String,
    reservations: ReservationSettings,
}

impl Control {
    /// Reads credentials, the ledger key and models.yaml from `home`, and
    /// opens `database`.
    pub async fn open(
        home: &Home,
        database: &Database,
        reservations: ReservationSettings,
    ) -> Result<Self> {
        let admin_token = home.read_admin_token()?;
        let dataplane_token = home.read_dataplane_token()?;
        let ledger_key = home.read_ledger_key()?;
        let models = ModelsConfig::load(&home.models_yaml())?;
        let store = database.open(home, ledger_key.clone()).await?;
        // Listening before loading: a change committed in between is
        // re-read, never missed.
        let changes = store.changes().await?;
        let admission = AdmissionEngine::load(store.clone(), reservations.ttl_ms)
            .await?
            .with_overrun_limit(reservations.overrun_limit);
        let credentials = Arc::new(crate::credentials::CredentialBook::new(
            store.clone(),
            &dataplane_token,
        ));
        credentials.reload().await?;
        let state = Arc::new(ControlState::new(
            store,
            admission,
            credentials,
            models,
            home.models_yaml(),
            database.describe(),
            ledger_key,
        ));
        if let Some(feed) = changes {
            tokio::spawn(apply_changes(state.clone(), feed));
        }
        Ok(Self {
            state,
            tls: None,
            admin_token,
            reservations,
        })
    }

    /// Serves `/metrics` on `listener` for as long as the process runs.
    pub fn serve_metrics(&self, listener: TcpListener) {
        let state = self.state.clone();
        let render = Arc::new(move || {
            // Gauges are set from live state at each scrape.
            let (open, agents) = state.admission.counts();
            state.metrics.open_reservations.set(open as i64);
            state.metrics.agents.set(agents as i64);
            // Counted by admission, which holds no metrics.
            let revoked = state.metrics.grants.with_label_values(&["revoked"]);
            let recalls = state.admission.grant_recalls();
            if recalls > revoked.get() {
                revoked.inc_by(recalls - revoked.get());
            }
            state.metrics.render()
        });
        tokio::spawn(aex_telemetry::metrics::serve(listener, render));
    }

    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::result::Result<(), tonic::transport::Error> {
        let admin = RequireBearer::admin(&self.admin_token);
        let dataplane = RequireDataPlane::new(self.state.credentials.clone());
        // Expired reservations are settled continuously, not only at start.
        let sweeper = {
            let state = self.state.clone();
            let settings = self.reservations;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(
                    settings.sweep_interval_ms,
                ));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let now = crate::clock::now_ms();
                    match state
                        .admission
                        .expire_due(now, settings.expiry_policy)
                        .await
                    {
                        Ok(sweep) => state.metrics.expired.inc_by(sweep.expired as u64),
                        Err(e) => tracing::error!(error = %e, "could not expire reservations"),
                    }
                    match state
                        .admission
                        .expire_grants(now, settings.expiry_policy)
                        .await
                    {
                        Ok(n) => state
                            .metrics
                            .grants
                            .with_label_values(&["expired"])
                            .inc_by(n as u64),
                        Err(e) => tracing::error!(error = %e, "could not expire grants"),
                    }
                    if let Err(e) = state.admission.flush_unauthenticated().await {
                        tracing::error!(error = %e, "could not log unauthenticated denials");
                    }
                }
            })
        };
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        for name in SERVICE_NAMES {
            health_reporter
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the embedded descriptor set is valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("the embedded descriptor set is valid");

        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(tls.config())?;
        }
        let served = builder
            // A span per RPC, child of the caller's trace (W3C metadata).
            .trace_fn(|request| {
                let span = tracing::info_span!(
                    "aex.rpc",
                    otel.name = %request.uri().path(),
                    otel.kind = "server",
                    rpc.system = "grpc",
                );
                aex_telemetry::set_parent_from(&span, request.headers());
                span
            })
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AdmissionServiceServer::with_interceptor(
                AdmissionApi::new(self.state.clone()),
                dataplane,
            ))
            .add_service(AgentServiceServer::with_interceptor(
                AgentsApi::new(self.state.clone()),
                admin.clone(),
            ))
            .add_service(ModelServiceServer::with_interceptor(
                ModelsApi::new(self.state.clone()),
                admin.clone(),
            ))
            .add_service(LedgerServiceServer::with_interceptor(
                LedgerApi::new(self.state.clone()),
                admin.clone(),
            ))
            .add_service(ProcessServiceServer::with_interceptor(
                ProcessesApi::new(self.state.clone()),
                admin.clone(),
            ))
            .add_service(CredentialServiceServer::with_interceptor(
                CredentialsApi::new(self.state.clone()),
                admin,
            ))
            .serve_with_incoming_shutdown(nodelay(listener), {
                let state = self.state.clone();
                async move {
                    shutdown.await;
                    let _ = state.shutting_down.send(true);
                }
            });
        // In-flight RPCs get a moment to finish; then stop regardless.
        let stopping = ControlState::stopping(self.state.shutting_down.subscribe());
        let served = tokio::select! {
            r = served => r,
            _ = async {
                stopping.await;
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            } => Ok(()),
        };
        sweeper.abort();
        if let Err(e) = self.state.admission.flush_unauthenticated().await {
            tracing::error!(error = %e, "could not log unauthenticated denials at shutdown");
        }
        served
    }
}
