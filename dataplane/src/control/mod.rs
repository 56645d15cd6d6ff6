//! The data plane's side of the control plane: the admission client
//! (`admit.rs` batches), the policy/route cache fed by the watch stream
//! (`cache.rs`, `watch.rs`), settlement that retries until the control plane
//! answers (`settle.rs`), heartbeats for long streams, and what a shutdown
//! waits for (`inflight.rs`). Grants: the book (`grants.rs`) and the reports
//! it calls for behind one lock (`desk.rs`), admitting from one
//! (`local.rs`), the ordered report channel (`report.rs`). Every retrying
//! loop waits by `backoff.rs`.

mod admit;
mod backoff;
mod cache;
mod desk;
pub mod grants;
mod identify;
mod inflight;
mod local;
mod report;
mod settle;
pub mod slots;
mod watch;

pub use cache::{Cache, Route, parse_base_url};
pub use identify::Identified;
pub use inflight::{Inflight, InflightGuard};
pub use report::MAX_BACKLOG;
pub use slots::DEFAULT_CONCURRENCY_WAIT;

use crate::metrics::Metrics;
use admit::PendingAdmit;
use aex_proto::v1::{self as pb, admission_service_client::AdmissionServiceClient};
use backoff::{Backoff, retryable};
use settle::PendingSettle;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone)]
pub struct Bearer {
    value: MetadataValue<Ascii>,
    rpcs: prometheus::IntCounter,
}

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.rpcs.inc();
        r.metadata_mut().insert("authorization", self.value.clone());
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

pub struct ControlPlane {
    pub(super) client: Client,
    pub cache: Arc<Cache>,
    pub(super) open: Arc<Mutex<HashSet<String>>>,
    pub inflight: Arc<Inflight>,
    settlements: mpsc::UnboundedSender<PendingSettle>,
    admissions: mpsc::UnboundedSender<PendingAdmit>,
    /// Admissions asked and not yet answered, by any path.
    admitting: Arc<AtomicUsize>,
    /// The grants held here and the reports they call for, one lock.
    desk: desk::SharedDesk,
    settings: Settings,
    /// Tokens the control plane vouched for before their body was read.
    vouched: Mutex<identify::Vouched>,
    /// Calls waiting for a concurrency slot (`slots.rs`).
    slots: Arc<slots::SlotQueues>,
}

/// How this data plane takes part in grants.
#[derive(Clone)]
pub struct Settings {
    /// Named in the control plane's grant events (`--id`).
    pub id: String,
    /// Whether busy agents' calls are admitted from grants (`--grants`).
    pub grants: bool,
    /// Calls and settlements admitted from grants that may wait for the
    /// control plane's acknowledgement before calls go central
    /// ([`MAX_BACKLOG`] by default, `--report-backlog`).
    pub max_backlog: i64,
    pub metrics: Arc<Metrics>,
    /// How long a call over its agent's concurrency limit waits for a slot
    /// (`slots.rs`, `--concurrency-wait-ms`); zero: refused at once.
    pub concurrency_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            id: aex_core::secrets::new_id("dp"),
            grants: true,
            max_backlog: MAX_BACKLOG,
            metrics: Arc::default(),
            concurrency_wait: DEFAULT_CONCURRENCY_WAIT,
        }
    }
}

/// Whether an admission reserves (and so may be settled, and may wait for
/// a concurrency slot): every call but listing models and counting tokens.
fn reserves(request: &pb::AdmitRequest) -> bool {
    ![pb::Endpoint::Models, pb::Endpoint::CountTokens].contains(&request.endpoint())
}

impl ControlPlane {
    /// Must be called inside the runtime: it starts the admission and
    /// settlement senders.
    /// `urls`: one control plane, or several over one database, comma
    /// separated. With several, calls are balanced over the ones that
    /// answer: one that goes away is left out (its calls fail as
    /// UNAVAILABLE and are retried, idempotently, on another).
    pub fn connect(
        urls: &str,
        tls: &aex_proto::tls::ClientTls,
        token: &str,
        cache: Arc<Cache>,
        settings: Settings,
    ) -> Result<Arc<Self>, String> {
        let endpoints = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.to_string())
                    .map_err(|e| format!("--control '{url}' is not a URL: {e}"))?
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_while_idle(true);
                tls.apply(endpoint, url)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let channel = match endpoints.as_slice() {
            [] => return Err("--control names no control plane".into()),
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let bearer = Bearer {
            value: format!("Bearer {token}").parse().map_err(|_| {
                "the data-plane credential holds characters that cannot be sent".to_string()
            })?,
            rpcs: settings.metrics.control_rpcs.clone(),
        };
        let client = AdmissionServiceClient::with_interceptor(channel, bearer);
        let open = Arc::new(Mutex::default());
        let (settlements, queue) = mpsc::unbounded_channel();
        tokio::spawn(settle::send_settlements(
            client.clone(),
            open.clone(),
            queue,
        ));
        let (admissions, queue) = mpsc::unbounded_channel();
        tokio::spawn(admit::send_admissions(client.clone(), queue));
        let inflight: Arc<Inflight> = Arc::default();
        let (reports, queue) = mpsc::unbounded_channel();
        let desk = desk::open(
            &settings.id,
            reports,
            inflight.clone(),
            settings.metrics.report_backlog.clone(),
        );
        let reporter = report::Reporter {
            client: client.clone(),
            desk: Arc::downgrade(&desk),
            data_plane: settings.id.clone(),
            open: open.clone(),
            metrics: settings.metrics.clone(),
        };
        tokio::spawn(reporter.run(queue));
        Ok(Arc::new(Self {
            client,
            cache,
            open,
            inflight,
            settlements,
            admissions,
            admitting: Arc::default(),
            desk,
            settings,
            vouched: Mutex::default(),
            slots: Arc::default(),
        }))
    }

    /// Asks the control plane to admit; a call refused for its agent's
    /// concurrency waits for a slot (`slots.rs`) for up to
    /// `Settings::concurrency_wait`, in its agent's queue.
    pub async fn admit(
        self: &Arc<Self>,
        mut request: pb::AdmitRequest,
    ) -> Result<pb::AdmitResponse, tonic::Status> {
        let wait = self.settings.concurrency_wait;
        if wait.is_zero() || !reserves(&request) {
            return self.admit_once(&mut request).await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        // Behind the calls of its agent already waiting here, without
        // asking first: a slot that frees is theirs.
        let mut ticket = None;
        if self.slots.any_waiting() {
            ticket = self
                .cache
                .policy_by_token(&request.token_sha256)
                .filter(|p| self.slots.waiting(&p.name) > 0)
                .map(|p| self.slots.enter(&p.name));
        }
        loop {
            let head = ticket.as_ref().is_none_or(slots::Ticket::is_head);
            let last = tokio::time::Instant::now() >= deadline;
            if head || last {
                request.waits_for_slot = !last;
                let response = self.admit_once(&mut request).await?;
                let full = match &response.outcome {
                    Some(pb::admit_response::Outcome::Denied(d))
                        if d.denied_by == aex_core::denial::Rule::Concurrency.as_str() =>
                    {
                        Some(d.agent_name.clone())
                    }
                    _ => None,
                };
                match full {
                    Some(agent) if !last => {
                        if ticket.is_none() {
                            ticket = Some(self.slots.enter(&agent));
                        }
                    }
                    // Admitted, refused for another reason, or out of time:
                    // the ticket goes, and the next call asks.
                    _ => return Ok(response),
                }
            }
            let moved = self.slots.moved();
            let poll =
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + slots::POLL));
            tokio::select! {
                _ = moved, if !head => {}
                _ = poll => {}
            }
        }
    }

    /// One admission, asked until answered. Admission is idempotent by
    /// request id, so a call lost to a control-plane restart is retried
    /// (for up to `ADMIT_PATIENCE`) without reserving twice. When giving
    /// up, whatever may have been reserved is released in the background,
    /// so a client that saw a failure is never charged.
    async fn admit_once(
        self: &Arc<Self>,
        request: &mut pb::AdmitRequest,
    ) -> Result<pb::AdmitResponse, tonic::Status> {
        request.data_plane.clone_from(&self.settings.id);
        const ADMIT_PATIENCE: Duration = Duration::from_secs(5);
        if let Some(admitted) = self.admit_from_grant(request) {
            return Ok(admitted);
        }
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(500));
        let response = loop {
            match self.ask_admission(request.clone()).await {
                Ok(response) => break response,
                Err(status)
                    if retryable(&status)
                        && started.elapsed() + backoff.delay() < ADMIT_PATIENCE =>
                {
                    backoff.wait().await;
                }
                Err(status) => {
                    if retryable(&status) && reserves(request) {
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
            self.settings
                .metrics
                .admissions
                .with_label_values(&["central"])
                .inc();
            self.note_call(&a.agent_id, a.reserved_micro);
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
            return admit::admit_unary(self.client.clone(), request).await;
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
        // A call admitted from a grant is settled by report, after its
        // admit, on the same ordered channel.
        let Some(request) = desk::lock(&self.desk).settle(request) else {
            return;
        };
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
            async fn report(
                &self,
                _: Request<pb::ReportRequest>,
            ) -> Result<Response<pb::ReportResponse>, Status> {
                Err(Status::unimplemented("too old"))
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
        let control = ControlPlane::connect(
            &url,
            &Default::default(),
            "t",
            Arc::new(Cache::new(None)),
            Settings::default(),
        )
        .unwrap();
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
