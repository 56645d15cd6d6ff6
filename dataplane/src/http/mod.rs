//! The HTTP service (OpenAI's APIs and Anthropic's Messages API), on
//! pingora's HTTP server and pingora's
//! pooled upstream connector. This file routes a request and runs a call's
//! steps; each step is a file: `intake` (body, headers, token), `models`
//! (the models list and one model), `count` (count_tokens, which reserves
//! nothing), `upstream`
//! (the provider connection), `relay` (the answer back, buffered or
//! streamed), `settle` (what it cost), `errors` (every error answered).
//!
//! Why not pingora's `ProxyHttp` pipeline: it picks the upstream and sends
//! the request head before the body is read, and replays a buffered body only
//! up to 64 KiB. AEX must read the whole body first: the model (and so the
//! provider) is in it, admission needs it, and the upstream body is rewritten.
//! A denied request must never reach a provider at all.

pub mod cors;
mod count;
mod decode;
mod errors;
mod intake;
pub use intake::Credential;
mod models;
mod relay;
mod settle;
mod upstream;

pub use errors::GatewayError;
pub use intake::{FORWARDED_BY_DEFAULT, MAX_HEADER_VALUE_BYTES, MAX_HEADERS, MAX_HEADERS_BYTES};

use crate::api::{Api, Family};
use crate::control::{ControlPlane, Identified};
use crate::metrics::Metrics;
use crate::request::{self, Inspected};
use aex_proto::v1 as pb;
use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, StatusCode};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub connect_timeout: Duration,
    /// From the request being sent to the response head arriving.
    pub first_byte_timeout: Duration,
    /// Longest silence between two pieces of a response; there is no total
    /// deadline, so long streams are never truncated.
    pub idle_timeout: Duration,
    /// Largest non-streamed response held to meter it; a bigger one is a
    /// 502 (streams are relayed as they come and never held whole).
    pub max_response_bytes: usize,
    /// From a request head's first byte to its end (408 past it).
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection is kept between requests.
    pub keepalive_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            max_response_bytes: 32 * 1024 * 1024,
            header_timeout: Duration::from_secs(30),
            keepalive_idle: Duration::from_secs(60),
        }
    }
}

pub struct Gateway {
    control: Arc<ControlPlane>,
    connector: Connector,
    limits: Limits,
    metrics: Arc<Metrics>,
    cors: cors::Cors,
}

/// What one request's metrics need that the response head does not say.
struct Observed {
    endpoint: &'static str,
    /// The model label: the requested model if configured, else "" (so
    /// clients cannot grow the label set).
    model: String,
    /// Time spent waiting on the provider (not AEX's own latency).
    upstream: Duration,
}

/// One admitted call: what every step after admission needs.
struct Call<'a> {
    request_id: &'a str,
    inspected: &'a Inspected,
    admission: &'a pb::Admission,
}

impl Call<'_> {
    /// The output the call may generate: every choice may run to the cap,
    /// and the reservation covered them all.
    fn output_cap_total(&self) -> u64 {
        self.admission
            .output_tokens_cap
            .saturating_mul(u64::from(self.inspected.output_multiplier().max(1)))
    }
}

/// `GET /v1/models/{id}`.
const MODEL_PATH: &str = "/v1/models/";

fn new_request_id() -> String {
    aex_core::secrets::new_id("req")
}

impl Gateway {
    pub fn new(control: Arc<ControlPlane>, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            control,
            connector: Connector::new(None),
            limits,
            metrics,
            cors: cors::Cors::default(),
        }
    }

    /// Answers browsers from these origins (`cors.rs`); none by default.
    pub fn with_cors(mut self, cors: cors::Cors) -> Self {
        self.cors = cors;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Counts a finished API request by what was actually sent.
    fn observe(&self, session: &ServerSession, o: &Observed, total: Duration) {
        let Some(head) = session.response_written() else {
            return;
        };
        let status = head.status.as_u16();
        let reason = match head
            .headers
            .get("x-aex-denied-by")
            .and_then(|v| v.to_str().ok())
        {
            Some(rule) => rule.to_string(),
            None if status < 400 => "ok".into(),
            None if matches!(status, 400 | 404 | 405 | 413 | 415) => "bad_request".into(),
            None => "upstream".into(),
        };
        self.metrics
            .requests
            .with_label_values(&[o.endpoint, &o.model, &status.to_string(), &reason])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[o.endpoint])
            .observe(total.as_secs_f64());
        self.metrics
            .added_latency
            .with_label_values(&[o.endpoint])
            .observe(total.saturating_sub(o.upstream).as_secs_f64());
    }

    async fn respond(
        session: &mut ServerSession,
        status: StatusCode,
        content_type: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> bool {
        Self::write_answer(session, status, content_type, headers, body, true).await
    }

    /// `parsed`: the request's head was read (an answer to one that was
    /// not has no origin to allow, and no head to ask).
    async fn write_answer(
        session: &mut ServerSession,
        status: StatusCode,
        content_type: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
        parsed: bool,
    ) -> bool {
        let mut h = upstream::response_head(status, headers.len() + 3);
        // A 204 has no content, nor the headers that describe it (RFC 9110).
        if status != StatusCode::NO_CONTENT {
            let _ = h.insert_header("content-type", content_type);
            let _ = h.insert_header("content-length", body.len().to_string());
        }
        for (k, v) in headers {
            let _ = h.insert_header(*k, v.as_str());
        }
        if parsed {
            cors::decorate(session, &mut h);
        }
        session.write_response_header(Box::new(h)).await.is_ok()
            && session.write_response_body(body, true).await.is_ok()
    }

    /// Answers `e` in the shape of the API the request called.
    async fn respond_error(session: &mut ServerSession, request_id: &str, e: GatewayError) -> bool {
        let req = session.req_header();
        let family = Family::of_request(
            req.uri.path(),
            req.headers.contains_key("anthropic-version"),
        );
        Self::respond_error_as(session, request_id, e, family, true).await
    }

    /// Answers `e` in `family`'s shape: also for a request whose head was
    /// never parsed (`parsed` false: it has no path to tell the API by).
    async fn respond_error_as(
        session: &mut ServerSession,
        request_id: &str,
        e: GatewayError,
        family: Family,
        parsed: bool,
    ) -> bool {
        let mut headers = e.headers.clone();
        headers.push(("x-aex-request-id", request_id.to_string()));
        // A client that proved no token keeps no connection (issue #31):
        // otherwise idle keep-alives after a 401 would hold the slots
        // `--max-connections` counts for agents.
        let unauthenticated = e.status == StatusCode::UNAUTHORIZED;
        if unauthenticated {
            session.set_keepalive(None);
        }
        let body = e.body_for(family);
        Self::write_answer(
            session,
            e.status,
            "application/json",
            &headers,
            body,
            parsed,
        )
        .await
            && !unauthenticated
    }

    /// Handles one request; returns whether the connection may be reused.
    async fn handle(&self, session: &mut ServerSession) -> bool {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let request_id = new_request_id();
        self.cors.admit_origin(session);
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => {
                let body = format!(
                    "{{\"status\":\"ok\",\"version\":\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                );
                Self::respond(
                    session,
                    StatusCode::OK,
                    "application/json",
                    &[],
                    body.into(),
                )
                .await
            }
            (Method::GET, "/readyz") => {
                let ready = self.control.cache.is_ready();
                let (status, body) = if ready {
                    (StatusCode::OK, "{\"status\":\"ready\"}")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "{\"status\":\"waiting for the control plane\"}",
                    )
                };
                Self::respond(
                    session,
                    status,
                    "application/json",
                    &[],
                    Bytes::from_static(body.as_bytes()),
                )
                .await
            }
            (Method::GET, "/v1/models") => self.list_models(session, &request_id).await,
            (Method::GET, p) if p.starts_with(MODEL_PATH) => {
                // Ids may hold `/` or spaces: SDKs percent-encode them.
                let id = percent_encoding::percent_decode_str(&p[MODEL_PATH.len()..])
                    .decode_utf8_lossy()
                    .into_owned();
                self.get_model(session, &request_id, &id).await
            }
            (Method::POST, p) if Api::from_path(p).is_some() => {
                let api = Api::from_path(p).expect("checked");
                let _guard = self.control.inflight.enter();
                let started = std::time::Instant::now();
                let mut observed = Observed {
                    endpoint: api.label(),
                    model: String::new(),
                    upstream: Duration::ZERO,
                };
                let span = tracing::info_span!(
                    "aex.request",
                    otel.name = %format!("POST {p}"),
                    otel.kind = "server",
                    http.request.method = "POST",
                    url.path = %p,
                    aex.request_id = %request_id,
                );
                aex_telemetry::set_parent_from(&span, &session.req_header().headers);
                let keep = self
                    .proxy(session, api, &request_id, &mut observed)
                    .instrument(span)
                    .await;
                self.observe(session, &observed, started.elapsed());
                keep
            }
            (Method::OPTIONS, p)
                if cors::is_preflight(session)
                    && (Api::from_path(p).is_some()
                        || p == "/v1/models"
                        || p.starts_with(MODEL_PATH)) =>
            {
                intake::drain_request_body(session).await;
                if cors::is_allowed(session) {
                    let headers = cors::preflight_headers(session);
                    Self::respond(session, StatusCode::NO_CONTENT, "", &headers, Bytes::new()).await
                } else {
                    let origin = session
                        .get_header("origin")
                        .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let e = GatewayError::origin_not_allowed(&origin, self.cors.is_off());
                    Self::respond_error(session, &request_id, e).await
                }
            }
            (_, p)
                if Api::from_path(p).is_some()
                    || p == "/v1/models"
                    || p.starts_with(MODEL_PATH) =>
            {
                // Read past the body first, so a pipelined request behind
                // it is still answered.
                intake::drain_request_body(session).await;
                Self::respond_error(session, &request_id, GatewayError::method_not_allowed(p)).await
            }
            (_, p) => {
                intake::drain_request_body(session).await;
                Self::respond_error(session, &request_id, GatewayError::not_found(p)).await
            }
        }
    }

    async fn proxy(
        &self,
        session: &mut ServerSession,
        api: Api,
        request_id: &str,
        observed: &mut Observed,
    ) -> bool {
        // The caller first: a body is read and parsed only for a token the
        // control plane knows (issue #31).
        let credential = intake::credential(session);
        let refused = match self.control.identify(&credential, request_id).await {
            Identified::Known => None,
            Identified::Refused(d) => Some(GatewayError::denied(d)),
            Identified::Unavailable(status) => Some(GatewayError::control_unavailable(&status)),
        };
        if let Some(e) = refused {
            // Its body is never read: the connection closes after the
            // answer, once what is still being uploaded is discarded
            // (bounded), so the client reads the answer, not a reset.
            session.set_keepalive(None);
            Self::respond_error(session, request_id, e).await;
            intake::drain_request_body(session).await;
            return false;
        }
        let raw = match self.read_body(session).await {
            Ok(raw) => raw,
            Err(e) => {
                session.set_keepalive(None);
                Self::respond_error(session, request_id, e).await;
                // Closing while the client is still uploading would reset the
                // connection before it reads the 413: swallow the rest of the
                // upload first (bounded), then close.
                intake::drain_request_body(session).await;
                return false;
            }
        };
        // After the body, so the connection stays usable for what follows.
        if let Err(e) = intake::check_headers(session) {
            return Self::respond_error(session, request_id, e).await;
        }
        let inspected = match request::inspect(api, &raw) {
            Ok(i) => i,
            Err(e) => {
                return Self::respond_error(session, request_id, GatewayError::refused(e)).await;
            }
        };
        if self.control.cache.has_model(inspected.model()) {
            observed.model = inspected.model().to_string();
        }
        // A call to a provider of the other API is translated, once, here:
        // what cannot be is refused before anything is reserved. (Counting
        // tokens is answered by AEX itself there: `count.rs`.)
        let translated = match self.control.cache.provider_family(inspected.model()) {
            Some(family) if family != api.family() && api != Api::CountTokens => {
                match crate::translate::upstream_request(api, inspected.body()) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let e = GatewayError::untranslatable(e);
                        return Self::respond_error(session, request_id, e).await;
                    }
                }
            }
            _ => None,
        };
        let admit = inspected.admit_request(request_id, &credential);
        let admitted = self
            .control
            .admit(admit)
            .instrument(tracing::info_span!("aex.admit", otel.kind = "client"));
        let admission = match admitted.await {
            Err(status) => {
                return Self::respond_error(
                    session,
                    request_id,
                    GatewayError::control_unavailable(&status),
                )
                .await;
            }
            Ok(r) => match r.outcome {
                Some(pb::admit_response::Outcome::Admitted(a)) => a,
                Some(pb::admit_response::Outcome::Denied(d)) => {
                    return Self::respond_error(session, request_id, GatewayError::denied(d)).await;
                }
                None => {
                    return Self::respond_error(
                        session,
                        request_id,
                        GatewayError::control_unavailable(&tonic::Status::internal(
                            "empty admission",
                        )),
                    )
                    .await;
                }
            },
        };
        if admission.reservation_id.is_empty() {
            // Counting tokens: admitted without a reservation, so nothing
            // to settle.
            let call = Call {
                request_id,
                inspected: &inspected,
                admission: &admission,
            };
            return self.count_tokens(session, &call).await;
        }
        self.metrics.open_reservations.inc();
        let admitted_at = std::time::Instant::now();
        let upstream_span = tracing::info_span!(
            "aex.upstream",
            otel.kind = "client",
            aex.provider = %admission.provider,
            gen_ai.request.model = %admission.provider_model,
        );
        let call = Call {
            request_id,
            inspected: &inspected,
            admission: &admission,
        };
        let (keep, mut finished) = self
            .forward(session, &call, translated)
            .instrument(upstream_span)
            .await;
        observed.upstream = finished
            .upstream_time
            .unwrap_or_else(|| admitted_at.elapsed());
        self.settle(&call, &mut finished, &observed.model);
        self.metrics.open_reservations.dec();
        keep
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // A client that half-closes after its request still gets the answer
        // (RFC 9112 §9.6), and pipelined requests are answered in order.
        // Neither setting is carried to a reused connection's next session.
        session.set_abort_on_close(false);
        session.set_pipelining_enabled(true);
        session.set_request_header_timeout(Some(self.limits.header_timeout));
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // A request that began but is not valid HTTP gets its 4xx;
                // one that never began (an idle connection closing) nothing.
                if let Some(status) = session.request_reject_status() {
                    // Never log `e` itself: it quotes the raw head, tokens included.
                    tracing::debug!(status, kind = ?e.etype(), "malformed request");
                    self.metrics
                        .requests
                        .with_label_values(&["", "", &status.to_string(), "malformed"])
                        .inc();
                    let error = GatewayError::malformed(status, self.limits.header_timeout);
                    let id = new_request_id();
                    Self::respond_error_as(&mut session, &id, error, Family::OpenAi, false).await;
                    session.close_lingering(Duration::from_secs(2)).await;
                }
                return None;
            }
        }
        if !self.handle(&mut session).await {
            // Whatever the client still sends is read and dropped for a
            // moment, so it gets the answer rather than a reset.
            session.close_lingering(Duration::from_secs(1)).await;
            return None;
        }
        // pingora keeps an HTTP/1.1 connection forever between requests;
        // bound it (unless this response already closes it).
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.limits.keepalive_idle.as_secs().max(1)));
        }
        let settings = HttpPersistentSettings::for_session(&session);
        session
            .finish()
            .await
            .ok()
            .flatten()
            .map(|stream| ReusedHttpStream::from_reusable_stream(stream, settings))
    }
}
