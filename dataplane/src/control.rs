//! The data plane's side of the control plane: the admission client, the
//! policy/route cache fed by the watch stream, settlement that retries until
//! the control plane answers, and heartbeats for long streams.

use crate::simulated::Settings;
use aex_proto::v1::{self as pb, admission_service_client::AdmissionServiceClient};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

/// Failures that may pass when tried again (the control plane restarting,
/// a connection dropped); not refusals or bugs.
fn retryable(status: &tonic::Status) -> bool {
    retryable_code(status.code() as i32)
}

fn retryable_code(code: i32) -> bool {
    matches!(
        tonic::Code::from_i32(code),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        // Carry the caller's trace to the control plane (W3C traceparent).
        for (key, value) in aex_telemetry::current_context_headers() {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                r.metadata_mut().insert(k, v);
            }
        }
        Ok(r)
    }
}

pub type Client = AdmissionServiceClient<InterceptedService<Channel, Bearer>>;

/// Where a provider lives and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Http {
        tls: bool,
        host: String,
        port: u16,
        /// Path prefix of the base URL, e.g. `/v1` (no trailing slash).
        base_path: String,
        /// `Authorization: Bearer` value; never logged.
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

/// `NAME=value` lines from `AEX_HOME/.env`; the process environment wins.
pub fn read_env_file(path: &Path) -> HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            if line.starts_with('#') {
                return None;
            }
            let (k, v) = line.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

#[derive(Default)]
struct CacheState {
    agents: HashMap<String, pb::AgentPolicy>,
    models: Vec<pb::Model>,
    routes: HashMap<String, Route>,
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

    fn apply(&self, event: pb::watch_event::Change) {
        use pb::watch_event::Change;
        let mut s = self.state.write().expect("cache lock");
        match event {
            Change::Snapshot(snap) => {
                s.agents = snap
                    .agents
                    .into_iter()
                    .map(|a| (a.agent_id.clone(), a))
                    .collect();
            }
            Change::AgentUpserted(a) => {
                s.agents.insert(a.agent_id.clone(), a);
            }
            Change::AgentRemoved(id) => {
                s.agents.remove(&id);
            }
            Change::Models(config) => {
                let env_file = self
                    .env_file
                    .as_deref()
                    .map(read_env_file)
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
                            _ => {
                                let (tls, host, port, base_path) = parse_base_url(&p.base_url)?;
                                Route::Http {
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
                s.models = config.models;
            }
        }
    }
}

/// Calls in flight and settlements not yet acknowledged, so that a
/// shutdown can wait for both.
#[derive(Default)]
pub struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

impl Inflight {
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.clone())
    }

    pub fn current(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight, or the deadline passes.
    pub async fn drained(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.current() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

pub struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A settlement waiting to be sent; it keeps a shutdown waiting until the
/// control plane has acknowledged it.
struct PendingSettle {
    request: pb::SettleRequest,
    /// Opened in the request's trace; lives until the settlement is acknowledged.
    span: tracing::Span,
    _inflight: InflightGuard,
}

/// An admission waiting to be sent, with where to send its answer.
struct PendingAdmit {
    request: pb::AdmitRequest,
    /// The request's `aex.admit` span, so the control plane's span joins
    /// its trace.
    span: tracing::Span,
    answer: oneshot::Sender<Result<pb::AdmitResponse, tonic::Status>>,
}

pub struct ControlPlane {
    client: Client,
    pub cache: Arc<Cache>,
    open: Arc<Mutex<HashSet<String>>>,
    pub inflight: Arc<Inflight>,
    settlements: mpsc::UnboundedSender<PendingSettle>,
    admissions: mpsc::UnboundedSender<PendingAdmit>,
    /// Admissions asked and not yet answered, by any path.
    admitting: Arc<AtomicUsize>,
}

impl ControlPlane {
    /// Must be called inside the runtime: it starts the admission and
    /// settlement senders.
    pub fn connect(url: &str, token: &str, cache: Arc<Cache>) -> Result<Arc<Self>, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("--control '{url}' is not a URL: {e}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let bearer = Bearer(format!("Bearer {token}").parse().map_err(|_| {
            "the data-plane credential holds characters that cannot be sent".to_string()
        })?);
        let client = AdmissionServiceClient::with_interceptor(endpoint.connect_lazy(), bearer);
        let open = Arc::new(Mutex::default());
        let (settlements, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_settlements(client.clone(), open.clone(), queue));
        let (admissions, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_admissions(client.clone(), queue));
        Ok(Arc::new(Self {
            client,
            cache,
            open,
            inflight: Arc::default(),
            settlements,
            admissions,
            admitting: Arc::default(),
        }))
    }

    /// Asks the control plane to admit. Admission is idempotent by request
    /// id, so a call lost to a control-plane restart is retried (for up to
    /// `ADMIT_PATIENCE`) without reserving twice. When giving up, whatever
    /// may have been reserved is released in the background, so a client
    /// that saw a failure is never charged.
    pub async fn admit(
        self: &Arc<Self>,
        request: pb::AdmitRequest,
    ) -> Result<pb::AdmitResponse, tonic::Status> {
        const ADMIT_PATIENCE: Duration = Duration::from_secs(5);
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(25);
        let response = loop {
            match self.ask_admission(request.clone()).await {
                Ok(response) => break response,
                Err(status)
                    if retryable(&status) && started.elapsed() + backoff < ADMIT_PATIENCE =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(status) => {
                    if retryable(&status) && request.endpoint != pb::Endpoint::Models as i32 {
                        self.settle(pb::SettleRequest {
                            request_id: request.request_id.clone(),
                            outcome: pb::SettleOutcome::UpstreamError as i32,
                            ..Default::default()
                        });
                    }
                    return Err(status);
                }
            }
        };
        if let Some(pb::admit_response::Outcome::Admitted(a)) = &response.outcome
            && !a.reservation_id.is_empty()
        {
            self.open
                .lock()
                .expect("open lock")
                .insert(a.reservation_id.clone());
        }
        Ok(response)
    }

    /// One admission round trip. Alone, it is sent from the caller's task
    /// (no hand-off, nothing to wait for); while others are in flight it
    /// joins the queue, whose sender batches what accumulates.
    async fn ask_admission(
        &self,
        request: pb::AdmitRequest,
    ) -> Result<pb::AdmitResponse, tonic::Status> {
        struct Asking(Arc<AtomicUsize>);
        impl Drop for Asking {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let others = self.admitting.fetch_add(1, Ordering::Relaxed);
        let _asking = Asking(self.admitting.clone());
        if others == 0 {
            return admit_unary(self.client.clone(), request).await;
        }
        let (answer, answered) = oneshot::channel();
        let pending = PendingAdmit {
            request,
            span: tracing::Span::current(),
            answer,
        };
        self.admissions
            .send(pending)
            .map_err(|_| tonic::Status::unavailable("the admission sender has stopped"))?;
        answered
            .await
            .map_err(|_| tonic::Status::unavailable("the admission sender dropped this request"))?
    }

    /// Queues a settlement and returns at once. The sender delivers it,
    /// retrying until the control plane answers (settlement is idempotent
    /// by reservation id).
    pub fn settle(&self, request: pb::SettleRequest) {
        let span = tracing::info_span!(
            "aex.settle",
            otel.kind = "client",
            aex.reservation_id = %request.reservation_id
        );
        let pending = PendingSettle {
            request,
            span,
            _inflight: self.inflight.enter(),
        };
        if self.settlements.send(pending).is_err() {
            // Only if the sender task panicked; the reservation then expires
            // and the control plane settles it.
            tracing::error!("the settlement sender has stopped");
        }
    }

    /// Keeps the watch stream connected for as long as the process runs.
    pub async fn watch_forever(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut client = self.client.clone();
            match client.watch(pb::WatchRequest {}).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(event)) = stream.message().await {
                        if let Some(change) = event.change {
                            let snapshot = matches!(change, pb::watch_event::Change::Snapshot(_));
                            self.cache.apply(change);
                            if snapshot {
                                backoff = Duration::from_millis(100);
                            }
                        }
                        if !self
                            .cache
                            .state
                            .read()
                            .expect("cache lock")
                            .routes
                            .is_empty()
                        {
                            self.cache.ready.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(%status, "cannot watch the control plane; retrying");
                }
            }
            self.cache.ready.store(false, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Extends the reservations of calls still running, so long streams do
    /// not expire while they are being served.
    pub async fn heartbeat_forever(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ids: Vec<String> = self
                .open
                .lock()
                .expect("open lock")
                .iter()
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut client = self.client.clone();
            if let Err(status) = client
                .heartbeat(pb::HeartbeatRequest {
                    reservation_ids: ids,
                })
                .await
            {
                tracing::warn!(%status, "heartbeat failed");
            }
        }
    }
}

async fn admit_unary(
    mut client: Client,
    request: pb::AdmitRequest,
) -> Result<pb::AdmitResponse, tonic::Status> {
    let mut r = tonic::Request::new(request);
    r.set_timeout(Duration::from_secs(5));
    client.admit(r).await.map(tonic::Response::into_inner)
}

/// Sends queued admissions as `AdmitBatch` calls, up to `IN_FLIGHT` at once;
/// what queues up while they are all out goes in the next. The callers
/// retry failures as they would a failed `Admit` (idempotent by request id).
async fn send_admissions(client: Client, mut queue: mpsc::UnboundedReceiver<PendingAdmit>) {
    const IN_FLIGHT: usize = 4;
    const MAX_BATCH: usize = 256;
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let client = client.clone();
        tokio::spawn(async move {
            admit_batch(client, batch).await;
            drop(slot);
        });
    }
}

async fn admit_batch(mut client: Client, batch: Vec<PendingAdmit>) {
    use pb::admit_result::Result as Decided;
    if let [_] = batch.as_slice() {
        let only = batch.into_iter().next().expect("one");
        let span = only.span.clone();
        let answer = admit_unary(client, only.request).instrument(span).await;
        let _ = only.answer.send(answer);
        return;
    }
    let span = tracing::info_span!(
        parent: None,
        "aex.admit_batch",
        otel.kind = "client",
        aex.admissions = batch.len()
    );
    let mut requests = Vec::with_capacity(batch.len());
    let mut waiting = Vec::with_capacity(batch.len());
    for p in batch {
        span.follows_from(&p.span);
        requests.push(p.request);
        waiting.push((p.span, p.answer));
    }
    let mut r = tonic::Request::new(pb::AdmitBatchRequest {
        admissions: requests.clone(),
    });
    r.set_timeout(Duration::from_secs(5));
    match client.admit_batch(r).instrument(span).await {
        Ok(response) => {
            let mut results = response.into_inner().results.into_iter();
            for (_, answer) in waiting {
                let _ = answer.send(match results.next().and_then(|r| r.result) {
                    Some(Decided::Decided(d)) => Ok(d),
                    Some(Decided::Error(e)) => {
                        Err(tonic::Status::new(tonic::Code::from_i32(e.code), e.message))
                    }
                    // Retryable: the caller asks again, idempotently.
                    None => Err(tonic::Status::unavailable(
                        "the control plane left this admission unanswered",
                    )),
                });
            }
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            // A control plane older than AdmitBatch: one call each, at once.
            for (request, (span, answer)) in requests.into_iter().zip(waiting) {
                let client = client.clone();
                tokio::spawn(async move {
                    let _ = answer.send(admit_unary(client, request).instrument(span).await);
                });
            }
        }
        Err(status) => {
            for (_, answer) in waiting {
                let _ = answer.send(Err(status.clone()));
            }
        }
    }
}

/// Sends queued settlements, whatever queued up while the previous call was
/// in flight going as one `SettleBatch`: one at a time when calls are
/// sparse, so nothing waits; many per round trip under load. Ends when the
/// `ControlPlane` is dropped and the queue is empty.
async fn send_settlements(
    mut client: Client,
    open: Arc<Mutex<HashSet<String>>>,
    mut queue: mpsc::UnboundedReceiver<PendingSettle>,
) {
    const MAX_BATCH: usize = 256;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // One settlement stays in its request's trace; a batch gets a span
        // of its own, linked to each request's.
        let span = if let [only] = batch.as_slice() {
            only.span.clone()
        } else {
            let span = tracing::info_span!(
                parent: None,
                "aex.settle_batch",
                otel.kind = "client",
                aex.settlements = batch.len()
            );
            for p in &batch {
                span.follows_from(&p.span);
            }
            span
        };
        let requests = batch.iter().map(|p| &p.request).collect();
        deliver(&mut client, requests).instrument(span).await;
        let mut open = open.lock().expect("open lock");
        for p in &batch {
            open.remove(&p.request.reservation_id);
        }
        drop(open);
        // Dropping them releases their shutdown guards.
        batch.clear();
    }
}

/// Resends until every settlement is acknowledged or refused for good.
async fn deliver(client: &mut Client, mut todo: Vec<&pb::SettleRequest>) {
    use pb::settle_result::Result as Settled;
    let mut backoff = Duration::from_millis(50);
    while !todo.is_empty() {
        let mut r = tonic::Request::new(pb::SettleBatchRequest {
            settlements: todo.iter().map(|&r| r.clone()).collect(),
        });
        r.set_timeout(Duration::from_secs(5));
        let results = match client.settle_batch(r).await {
            Ok(response) => response.into_inner().results,
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                // A control plane older than SettleBatch.
                for request in todo.drain(..) {
                    settle_one(client, request.clone()).await;
                }
                return;
            }
            Err(status) if retryable(&status) => {
                tracing::warn!(%status, settlements = todo.len(), "settlement failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(status) => {
                tracing::error!(%status, settlements = todo.len(), "settlements refused");
                return;
            }
        };
        let mut results = results.into_iter();
        todo.retain(|request| match results.next().and_then(|r| r.result) {
            Some(Settled::Settled(_)) => false,
            Some(Settled::Error(e)) if retryable_code(e.code) => {
                tracing::warn!(reservation = %request.reservation_id, error = %e.message, "settlement failed; retrying");
                true
            }
            Some(Settled::Error(e)) => {
                tracing::error!(reservation = %request.reservation_id, error = %e.message, "settlement refused");
                false
            }
            // Not answered: safe to send again.
            None => true,
        });
        if !todo.is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// One settlement through the unary `Settle`, retried like a batch.
async fn settle_one(client: &mut Client, request: pb::SettleRequest) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut r = tonic::Request::new(request.clone());
        r.set_timeout(Duration::from_secs(5));
        match client.settle(r).await {
            Ok(_) => return,
            Err(status) if !retryable(&status) => {
                tracing::error!(%status, reservation = %request.reservation_id, "settlement refused");
                return;
            }
            Err(status) => {
                tracing::warn!(%status, reservation = %request.reservation_id, "settlement failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
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

    #[test]
    fn env_file() {
        let dir = std::env::temp_dir().join(format!("aex-env-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# c\nLOCAL_API_KEY=dummy\nexport GROQ_API_KEY=\"g k\"\nBAD\n",
        )
        .unwrap();
        let env = read_env_file(&dir);
        assert_eq!(env["LOCAL_API_KEY"], "dummy");
        assert_eq!(env["GROQ_API_KEY"], "g k");
        assert_eq!(env.len(), 2);
        let _ = std::fs::remove_file(dir);
    }

    /// A control plane from before AdmitBatch and SettleBatch: the data plane
    /// falls back to one unary call per item, and every caller still gets
    /// its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_control_plane_gets_unary_calls() {
        use aex_proto::v1::admission_service_server::{AdmissionService, AdmissionServiceServer};
        use std::sync::atomic::AtomicU64;
        use tonic::{Request, Response, Status};

        #[derive(Default)]
        struct Older {
            admits: AtomicU64,
            settles: AtomicU64,
            batches_refused: AtomicU64,
        }
        #[tonic::async_trait]
        impl AdmissionService for Older {
            async fn admit(
                &self,
                r: Request<pb::AdmitRequest>,
            ) -> Result<Response<pb::AdmitResponse>, Status> {
                self.admits.fetch_add(1, Ordering::SeqCst);
                // Slow enough that concurrent callers must queue.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let id = r.into_inner().request_id;
                Ok(Response::new(pb::AdmitResponse {
                    outcome: Some(pb::admit_response::Outcome::Admitted(pb::Admission {
                        reservation_id: format!("rsv-{id}"),
                        ..Default::default()
                    })),
                }))
            }
            async fn admit_batch(
                &self,
                _: Request<pb::AdmitBatchRequest>,
            ) -> Result<Response<pb::AdmitBatchResponse>, Status> {
                self.batches_refused.fetch_add(1, Ordering::SeqCst);
                Err(Status::unimplemented("too old"))
            }
            async fn settle(
                &self,
                _: Request<pb::SettleRequest>,
            ) -> Result<Response<pb::SettleResponse>, Status> {
                self.settles.fetch_add(1, Ordering::SeqCst);
                Ok(Response::new(pb::SettleResponse::default()))
            }
            async fn settle_batch(
                &self,
                _: Request<pb::SettleBatchRequest>,
            ) -> Result<Response<pb::SettleBatchResponse>, Status> {
                self.batches_refused.fetch_add(1, Ordering::SeqCst);
                Err(Status::unimplemented("too old"))
            }
            async fn heartbeat(
                &self,
                _: Request<pb::HeartbeatRequest>,
            ) -> Result<Response<pb::HeartbeatResponse>, Status> {
                Err(Status::unimplemented("not here"))
            }
            type WatchStream =
                tokio_stream::wrappers::ReceiverStream<Result<pb::WatchEvent, Status>>;
            async fn watch(
                &self,
                _: Request<pb::WatchRequest>,
            ) -> Result<Response<Self::WatchStream>, Status> {
                Err(Status::unimplemented("not here"))
            }
        }

        let older = Arc::new(Older::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AdmissionServiceServer::from_arc(older.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let control = ControlPlane::connect(&url, "t", Arc::new(Cache::new(None))).unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..20 {
            let control = control.clone();
            calls.spawn(async move {
                let answer = control
                    .admit(pb::AdmitRequest {
                        request_id: format!("req-{n}"),
                        endpoint: pb::Endpoint::ChatCompletions as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                match answer.outcome {
                    Some(pb::admit_response::Outcome::Admitted(a)) => {
                        assert_eq!(a.reservation_id, format!("rsv-req-{n}"));
                        control.settle(pb::SettleRequest {
                            reservation_id: a.reservation_id,
                            ..Default::default()
                        });
                    }
                    other => panic!("not admitted: {other:?}"),
                }
            });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
        assert!(control.inflight.drained(Duration::from_secs(10)).await);
        assert_eq!(older.admits.load(Ordering::SeqCst), 20);
        assert_eq!(older.settles.load(Ordering::SeqCst), 20);
        // The batches were tried first, and refused.
        assert!(older.batches_refused.load(Ordering::SeqCst) >= 2);
        server.abort();
    }
}
