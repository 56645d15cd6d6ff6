//! The OpenAI-compatible HTTP service, on pingora's HTTP server and pingora's
//! pooled upstream connector.
//!
//! Why not pingora's `ProxyHttp` pipeline: it picks the upstream and sends
//! the request head before the body is read, and replays a buffered body only
//! up to 64 KiB. AEX must read the whole body first: the model (and so the
//! provider) is in it, admission needs it, and the upstream body is rewritten.
//! A denied request must never reach a provider at all.

use crate::control::{ControlPlane, Route};
use crate::metrics::Metrics;
use crate::openai::{self, Api, Inspected};
use crate::simulated::{self, SimulatedResponse};
use crate::sse::{SseMeter, Usage, usage_of_body};
use aex_control::money::{Pricing, charge};
use aex_proto::v1 as pb;
use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, StatusCode};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::http::client::HttpSession as ClientSession;
use pingora_core::server::ShutdownWatch;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::ErrorType;
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::json;
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones AEX sets itself.
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
    "accept-encoding",
    "expect",
];

fn forwarded(name: &str, connection_listed: &[String]) -> bool {
    !NOT_FORWARDED.contains(&name) && !connection_listed.iter().any(|c| c == name)
}

pub struct Gateway {
    control: Arc<ControlPlane>,
    connector: Connector,
    limits: Limits,
    metrics: Arc<Metrics>,
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

/// An error response in OpenAI's shape.
struct ApiError {
    status: u16,
    code: &'static str,
    kind: &'static str,
    message: String,
    param: Option<String>,
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(
        status: u16,
        code: &'static str,
        kind: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            kind,
            message: message.into(),
            param: None,
            headers: Vec::new(),
        }
    }

    fn bad_request(e: openai::BadRequest) -> Self {
        let mut err = Self::new(400, "invalid_request", "invalid_request_error", e.message);
        err.param = (!e.param.is_empty()).then(|| e.param.to_string());
        err
    }

    fn body(&self) -> Bytes {
        Bytes::from(
            json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
                .to_string(),
        )
    }
}

/// How the call to the provider went, for settlement.
struct Finished {
    /// From sending to the provider until its last byte (None: not reached).
    upstream_time: Option<Duration>,
    outcome: pb::SettleOutcome,
    usage: Option<Usage>,
    output_bytes: u64,
    upstream_status: u16,
    upstream_retry_after_ms: u64,
}

enum Upstream {
    Http {
        session: Box<ClientSession>,
        peer: Box<HttpPeer>,
    },
    Simulated(SimulatedResponse),
}

enum UpstreamFailure {
    Timeout(String),
    Failed(String),
}

fn classify(e: &pingora_error::Error) -> UpstreamFailure {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            UpstreamFailure::Timeout(e.to_string())
        }
        _ => UpstreamFailure::Failed(e.to_string()),
    }
}

fn retry_after_ms(header: &ResponseHeader) -> u64 {
    let get = |name: &str| header.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return ms.max(0.0) as u64;
    }
    get("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |s| s.saturating_mul(1000))
}

fn new_request_id() -> String {
    aex_control::secrets::new_id("req")
}

impl Gateway {
    pub fn new(control: Arc<ControlPlane>, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            control,
            connector: Connector::new(None),
            limits,
            metrics,
        }
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
            None if matches!(status, 400 | 404 | 405 | 413) => "bad_request".into(),
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
        status: u16,
        content_type: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> bool {
        let mut h = ResponseHeader::build(status, Some(headers.len() + 3)).expect("valid status");
        let _ = h.insert_header("content-type", content_type);
        let _ = h.insert_header("content-length", body.len().to_string());
        for (k, v) in headers {
            let _ = h.insert_header(*k, v.as_str());
        }
        session.write_response_header(Box::new(h)).await.is_ok()
            && session.write_response_body(body, true).await.is_ok()
    }

    async fn respond_error(session: &mut ServerSession, request_id: &str, e: ApiError) -> bool {
        let mut headers = e.headers.clone();
        headers.push(("x-aex-request-id", request_id.to_string()));
        Self::respond(session, e.status, "application/json", &headers, e.body()).await
    }

    /// Handles one request; returns whether the connection may be reused.
    async fn handle(&self, session: &mut ServerSession) -> bool {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let request_id = new_request_id();
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => {
                let body = format!(
                    "{{\"status\":\"ok\",\"version\":\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                );
                Self::respond(session, 200, "application/json", &[], body.into()).await
            }
            (Method::GET, "/readyz") => {
                let ready = self.control.cache.is_ready();
                let (status, body) = if ready {
                    (200, "{\"status\":\"ready\"}")
                } else {
                    (503, "{\"status\":\"waiting for the control plane\"}")
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
            (Method::GET, "/metrics") => {
                let body = self.metrics.render();
                Self::respond(session, 200, "text/plain; version=0.0.4", &[], body.into()).await
            }
            (Method::POST, p) if Api::from_path(p).is_some() => {
                let api = Api::from_path(p).expect("checked");
                let _guard = self.control.inflight.enter();
                let started = std::time::Instant::now();
                let mut observed = Observed {
                    endpoint: api.upstream_suffix().trim_start_matches('/'),
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
                aex_control::telemetry::set_parent_from(&span, &session.req_header().headers);
                let keep = self
                    .proxy(session, api, &request_id, &mut observed)
                    .instrument(span)
                    .await;
                self.observe(session, &observed, started.elapsed());
                keep
            }
            (_, p) if Api::from_path(p).is_some() || p == "/v1/models" => {
                let e = ApiError::new(
                    405,
                    "method_not_allowed",
                    "invalid_request_error",
                    format!("Method not allowed for {p}."),
                );
                Self::respond_error(session, &request_id, e).await
            }
            (_, p) => {
                let e = ApiError::new(
                    404,
                    "not_found",
                    "invalid_request_error",
                    format!(
                        "Unknown path {p}. AEX serves /v1/chat/completions, /v1/responses, /v1/embeddings, /v1/completions and /v1/models."
                    ),
                );
                Self::respond_error(session, &request_id, e).await
            }
        }
    }

    fn token_sha256(session: &ServerSession) -> String {
        let token = session
            .get_header("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .unwrap_or("");
        aex_control::secrets::token_sha256(token)
    }

    fn denial_error(d: pb::Denial) -> ApiError {
        let mut e = ApiError {
            status: d.http_status as u16,
            code: "",
            kind: "",
            message: d.message,
            param: (!d.param.is_empty()).then_some(d.param),
            headers: vec![("x-aex-denied-by", d.denied_by)],
        };
        // Codes and types come from a closed set; keep them 'static.
        e.code = match d.code.as_str() {
            "invalid_api_key" => "invalid_api_key",
            "budget_exceeded" => "budget_exceeded",
            "model_not_allowed" => "model_not_allowed",
            "capability_denied" => "capability_denied",
            "agent_paused" => "agent_paused",
            "rate_limit_exceeded" => "rate_limit_exceeded",
            _ => "invalid_request",
        };
        e.kind = match d.r#type.as_str() {
            "insufficient_quota" => "insufficient_quota",
            "permission_error" => "permission_error",
            "rate_limit_error" => "rate_limit_error",
            _ => "invalid_request_error",
        };
        if e.status == 402 {
            e.headers.push(("x-should-retry", "false".into()));
        }
        if e.status == 429 {
            let ms = d.retry_after_ms.max(1);
            e.headers
                .push(("retry-after", ms.div_ceil(1000).clamp(1, 60).to_string()));
            e.headers.push(("retry-after-ms", ms.to_string()));
        }
        e
    }

    fn control_unavailable(status: tonic::Status) -> ApiError {
        tracing::error!(%status, "control plane unavailable");
        let mut e = ApiError::new(
            503,
            "control_plane_unavailable",
            "server_error",
            "AEX cannot reach its control plane, so it cannot admit requests; retry shortly.",
        );
        e.headers.push(("retry-after", "1".into()));
        e.headers.push(("x-aex-denied-by", "control_plane".into()));
        e
    }

    async fn list_models(&self, session: &mut ServerSession, request_id: &str) -> bool {
        let request = pb::AdmitRequest {
            request_id: request_id.to_string(),
            token_sha256: Self::token_sha256(session),
            endpoint: pb::Endpoint::Models as i32,
            ..Default::default()
        };
        let agent_id = match self.control.admit(request).await {
            Err(status) => {
                return Self::respond_error(session, request_id, Self::control_unavailable(status))
                    .await;
            }
            Ok(r) => match r.outcome {
                Some(pb::admit_response::Outcome::Admitted(a)) => a.agent_id,
                Some(pb::admit_response::Outcome::Denied(d)) => {
                    return Self::respond_error(session, request_id, Self::denial_error(d)).await;
                }
                None => String::new(),
            },
        };
        let data: Vec<_> = self
            .control
            .cache
            .models_for(&agent_id)
            .into_iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "aex"}))
            .collect();
        let body = json!({"object": "list", "data": data}).to_string();
        Self::respond(
            session,
            200,
            "application/json",
            &[("x-aex-request-id", request_id.to_string())],
            body.into(),
        )
        .await
    }

    /// Discards what is left of a refused request body: at most 64 MiB or 5 s.
    async fn drain_request_body(session: &mut ServerSession) {
        let drain = async {
            let mut left: usize = 64 * 1024 * 1024;
            while let Ok(Some(chunk)) = session.read_request_body().await {
                left = left.saturating_sub(chunk.len());
                if left == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }

    /// Reads the whole body, refusing more than the limit.
    async fn read_body(&self, session: &mut ServerSession) -> Result<Vec<u8>, ApiError> {
        let too_large = || {
            ApiError::new(
                413,
                "request_too_large",
                "invalid_request_error",
                format!(
                    "The request body is larger than {} bytes.",
                    self.limits.max_body_bytes
                ),
            )
        };
        let declared = session
            .get_header("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body_bytes) {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(4096));
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.limits.max_body_bytes {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(ApiError::new(
                        400,
                        "invalid_request",
                        "invalid_request_error",
                        format!("Could not read the request body: {e}"),
                    ));
                }
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
        let raw = match self.read_body(session).await {
            Ok(raw) => raw,
            Err(e) => {
                Self::respond_error(session, request_id, e).await;
                // Closing while the client is still uploading would reset the
                // connection before it reads the 413: swallow the rest of the
                // upload first (bounded), then close.
                Self::drain_request_body(session).await;
                return false;
            }
        };
        let inspected = match openai::inspect(api, &raw) {
            Ok(i) => i,
            Err(e) => {
                return Self::respond_error(session, request_id, ApiError::bad_request(e)).await;
            }
        };
        if self.control.cache.has_model(&inspected.model) {
            observed.model = inspected.model.clone();
        }
        let endpoint = match api {
            Api::ChatCompletions => pb::Endpoint::ChatCompletions,
            Api::Responses => pb::Endpoint::Responses,
            Api::Embeddings => pb::Endpoint::Embeddings,
            Api::Completions => pb::Endpoint::Completions,
        };
        let admit = pb::AdmitRequest {
            request_id: request_id.to_string(),
            token_sha256: Self::token_sha256(session),
            endpoint: endpoint as i32,
            model: inspected.model.clone(),
            stream: inspected.stream,
            uses_tools: inspected.uses_tools,
            uses_function_calling: inspected.uses_function_calling,
            uses_vision: inspected.uses_vision,
            input_tokens_bound: inspected.input_tokens_bound,
            requested_output_tokens: inspected.requested_output_tokens,
        };
        let admitted = self
            .control
            .admit(admit)
            .instrument(tracing::info_span!("aex.admit", otel.kind = "client"));
        let admission = match admitted.await {
            Err(status) => {
                return Self::respond_error(session, request_id, Self::control_unavailable(status))
                    .await;
            }
            Ok(r) => match r.outcome {
                Some(pb::admit_response::Outcome::Admitted(a)) => a,
                Some(pb::admit_response::Outcome::Denied(d)) => {
                    return Self::respond_error(session, request_id, Self::denial_error(d)).await;
                }
                None => {
                    return Self::respond_error(
                        session,
                        request_id,
                        Self::control_unavailable(tonic::Status::internal("empty admission")),
                    )
                    .await;
                }
            },
        };
        self.metrics.open_reservations.inc();
        let admitted_at = std::time::Instant::now();
        let upstream_span = tracing::info_span!(
            "aex.upstream",
            otel.kind = "client",
            aex.provider = %admission.provider,
            gen_ai.request.model = %admission.provider_model,
        );
        let (keep, finished) = self
            .forward(session, &inspected, &admission, request_id)
            .instrument(upstream_span)
            .await;
        observed.upstream = finished
            .upstream_time
            .unwrap_or_else(|| admitted_at.elapsed());
        self.settle(&inspected, &admission, &finished, &observed.model);
        self.metrics.open_reservations.dec();
        keep
    }

    fn settle(
        &self,
        inspected: &Inspected,
        admission: &pb::Admission,
        f: &Finished,
        model_label: &str,
    ) {
        let (prompt, completion, reported) = match f.usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens, true),
            None if f.outcome == pb::SettleOutcome::Completed
                || f.outcome == pb::SettleOutcome::ClientDisconnected
                || f.outcome == pb::SettleOutcome::CutOff =>
            {
                // The provider never said: estimate from what was sent and
                // what came back (the control plane caps an estimate at the
                // reservation).
                let sent = if f.output_bytes > 0 || f.outcome == pb::SettleOutcome::Completed {
                    inspected.estimated_prompt_tokens()
                } else {
                    0
                };
                (sent, f.output_bytes.div_ceil(4), false)
            }
            None => (0, 0, false),
        };
        let pricing = Pricing {
            input_pico_per_token: admission.input_pico_per_token,
            output_pico_per_token: admission.output_pico_per_token,
        };
        let cut_off = f.outcome == pb::SettleOutcome::CutOff;
        let (charged, _) = charge(
            pricing,
            admission.reserved_micro,
            prompt,
            completion,
            reported,
            cut_off,
        );
        self.metrics
            .spent_micro
            .with_label_values(&[model_label])
            .inc_by(charged.max(0) as u64);
        let failure = match f.outcome {
            pb::SettleOutcome::UpstreamRateLimited => Some("rate_limited"),
            pb::SettleOutcome::UpstreamError => Some("error"),
            pb::SettleOutcome::UpstreamTimeout => Some("timeout"),
            _ => None,
        };
        if let Some(kind) = failure {
            self.metrics
                .upstream_errors
                .with_label_values(&[&admission.provider, kind])
                .inc();
        }
        self.control.settle(pb::SettleRequest {
            reservation_id: admission.reservation_id.clone(),
            outcome: f.outcome as i32,
            prompt_tokens: prompt,
            completion_tokens: completion,
            usage_reported: reported,
            upstream_status: u32::from(f.upstream_status),
            upstream_retry_after_ms: f.upstream_retry_after_ms,
            request_id: String::new(),
        });
    }

    async fn open_upstream(
        &self,
        route: &Route,
        inspected: &Inspected,
        admission: &pb::Admission,
        body: Vec<u8>,
        client_headers: &[(http::HeaderName, http::HeaderValue)],
        request_id: &str,
    ) -> Result<(Upstream, ResponseHeader), UpstreamFailure> {
        let (tls, host, port, base_path, api_key) = match route {
            Route::Simulated(settings) => {
                let sim = simulated::respond(
                    *settings,
                    inspected,
                    &admission.provider_model,
                    admission.output_tokens_cap,
                    request_id,
                );
                let mut h = ResponseHeader::build(200, None).expect("200");
                let _ = h.insert_header("content-type", sim.content_type);
                return Ok((Upstream::Simulated(sim), h));
            }
            Route::Http {
                tls,
                host,
                port,
                base_path,
                api_key,
            } => (*tls, host, *port, base_path, api_key),
        };
        let addr = tokio::time::timeout(
            self.limits.connect_timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| UpstreamFailure::Timeout(format!("resolving {host} timed out")))?
        .map_err(|e| UpstreamFailure::Failed(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| UpstreamFailure::Failed(format!("{host} has no address")))?;
        let mut peer = HttpPeer::new(addr, tls, host.clone());
        peer.options.connection_timeout = Some(self.limits.connect_timeout);
        peer.options.read_timeout = Some(self.limits.idle_timeout);
        peer.options.write_timeout = Some(self.limits.idle_timeout);

        let path = format!("{base_path}{}", inspected.api.upstream_suffix());
        let mut req =
            RequestHeader::build("POST", path.as_bytes(), None).expect("valid request line");
        for (name, value) in client_headers {
            let _ = req.append_header(name.clone(), value.clone());
        }
        let authority = if (tls && port == 443) || (!tls && port == 80) {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let _ = req.insert_header("host", authority);
        let _ = req.insert_header("content-type", "application/json");
        let _ = req.insert_header("content-length", body.len().to_string());
        // Identity, so usage can be read from the bytes as they pass.
        let _ = req.insert_header("accept-encoding", "identity");
        let _ = req.insert_header("x-aex-request-id", request_id);
        // The provider's spans become children of ours; without tracing the
        // client's own traceparent (copied above) passes through.
        for (key, value) in aex_control::telemetry::current_context_headers() {
            let _ = req.insert_header(key, value);
        }
        if let Some(key) = api_key {
            let _ = req.insert_header("authorization", format!("Bearer {key}"));
        }
        let body = Bytes::from(body);
        // A pooled connection may have been closed by the provider while
        // idle; that shows as a failure to send on a reused connection, and
        // one retry on a fresh connection is safe because nothing was read.
        for attempt in 0..2 {
            let (mut session, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| classify(&e))?;
            session.set_read_timeout(Some(self.limits.idle_timeout));
            let sent = async {
                session.write_request_header(Box::new(req.clone())).await?;
                session.write_request_body(body.clone(), true).await?;
                session.finish_request_body().await
            }
            .await;
            if let Err(e) = sent {
                if reused && attempt == 0 {
                    continue;
                }
                return Err(classify(&e));
            }
            match tokio::time::timeout(
                self.limits.first_byte_timeout,
                session.read_response_header(),
            )
            .await
            {
                Err(_) => {
                    return Err(UpstreamFailure::Timeout(
                        "no response from the provider in time".into(),
                    ));
                }
                Ok(Err(e)) if reused && attempt == 0 && e.etype() != &ErrorType::ReadTimedout => {
                    continue;
                }
                Ok(Err(e)) => return Err(classify(&e)),
                Ok(Ok(())) => {}
            }
            let header = session.response_header().cloned().expect("read above");
            return Ok((
                Upstream::Http {
                    session: Box::new(session),
                    peer: Box::new(peer),
                },
                header,
            ));
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn read_chunk(
        upstream: &mut Upstream,
        idle: Duration,
    ) -> Result<Option<Bytes>, UpstreamFailure> {
        match upstream {
            Upstream::Simulated(sim) => Ok(sim.next_chunk().await),
            Upstream::Http { session, .. } => {
                match tokio::time::timeout(idle, session.read_response_body()).await {
                    Err(_) => Err(UpstreamFailure::Timeout("the provider went silent".into())),
                    Ok(Err(e)) => Err(classify(&e)),
                    Ok(Ok(chunk)) => Ok(chunk),
                }
            }
        }
    }

    /// Gives a fully read connection back to the pool; anything else is closed.
    async fn release(&self, upstream: Upstream, complete: bool) {
        if let Upstream::Http { mut session, peer } = upstream {
            if complete && session.response_done() {
                self.connector
                    .release_http_session(*session, &*peer, Some(Duration::from_secs(60)))
                    .await;
            } else {
                session.shutdown().await;
            }
        }
    }

    /// Sends the request upstream and the response back. Returns whether the
    /// client connection may be reused, and how the call ended.
    async fn forward(
        &self,
        session: &mut ServerSession,
        inspected: &Inspected,
        admission: &pb::Admission,
        request_id: &str,
    ) -> (bool, Finished) {
        let mut finished = Finished {
            upstream_time: None,
            outcome: pb::SettleOutcome::Completed,
            usage: None,
            output_bytes: 0,
            upstream_status: 0,
            upstream_retry_after_ms: 0,
        };
        let Some(route) = self.control.cache.route(&admission.provider) else {
            finished.outcome = pb::SettleOutcome::UpstreamError;
            let e = ApiError::new(
                502,
                "upstream_error",
                "server_error",
                format!(
                    "No route to provider '{}' yet; the data plane is still loading its configuration.",
                    admission.provider
                ),
            );
            return (Self::respond_error(session, request_id, e).await, finished);
        };
        let cap = admission
            .output_cap_injected
            .then_some(admission.output_tokens_cap);
        let body = inspected.upstream_body(&admission.provider_model, cap);
        let client_headers = Self::forwardable_headers(session);
        let upstream_started = std::time::Instant::now();
        let opened = tokio::select! {
            r = self.open_upstream(&route, inspected, admission, body, &client_headers, request_id) => Some(r),
            _ = session.read_body_or_idle(true) => None,
        };
        let (mut upstream, header) = match opened {
            None => {
                finished.outcome = pb::SettleOutcome::ClientDisconnected;
                return (false, finished);
            }
            Some(Err(failure)) => {
                let e = match failure {
                    UpstreamFailure::Timeout(why) => {
                        finished.outcome = pb::SettleOutcome::UpstreamTimeout;
                        ApiError::new(
                            504,
                            "upstream_timeout",
                            "server_error",
                            format!(
                                "The provider '{}' did not answer in time: {why}.",
                                admission.provider
                            ),
                        )
                    }
                    UpstreamFailure::Failed(why) => {
                        finished.outcome = pb::SettleOutcome::UpstreamError;
                        ApiError::new(
                            502,
                            "upstream_error",
                            "server_error",
                            format!(
                                "The provider '{}' could not be reached: {why}.",
                                admission.provider
                            ),
                        )
                    }
                };
                return (Self::respond_error(session, request_id, e).await, finished);
            }
            Some(Ok(opened)) => opened,
        };
        finished.upstream_status = header.status.as_u16();
        let is_sse = header
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if header.status == StatusCode::OK && is_sse {
            let keep = self
                .stream(
                    session,
                    &mut upstream,
                    &header,
                    inspected,
                    admission,
                    request_id,
                    &mut finished,
                )
                .await;
            finished.upstream_time = Some(upstream_started.elapsed());
            let complete = finished.outcome == pb::SettleOutcome::Completed;
            self.release(upstream, complete).await;
            return (keep, finished);
        }
        self.buffered(
            session,
            upstream,
            header,
            inspected,
            admission,
            request_id,
            finished,
            upstream_started,
        )
        .await
    }

    /// The client's headers that go upstream: end-to-end ones only, never
    /// its AEX token (replaced by the provider key) or framing headers.
    fn forwardable_headers(session: &ServerSession) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let connection_listed: Vec<String> = session
            .get_header("connection")
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect()
            })
            .unwrap_or_default();
        session
            .req_header()
            .headers
            .iter()
            .filter(|(name, _)| forwarded(name.as_str(), &connection_listed))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    fn response_head(upstream: &ResponseHeader, request_id: &str) -> ResponseHeader {
        let mut h = ResponseHeader::build(upstream.status, None).expect("valid status");
        for (name, value) in upstream.headers.iter() {
            if forwarded(name.as_str(), &[]) && name.as_str() != "content-encoding" {
                let _ = h.append_header(name.clone(), value.clone());
            }
        }
        let _ = h.insert_header("x-aex-request-id", request_id);
        h
    }

    #[allow(clippy::too_many_arguments)]
    async fn buffered(
        &self,
        session: &mut ServerSession,
        mut upstream: Upstream,
        header: ResponseHeader,
        inspected: &Inspected,
        admission: &pb::Admission,
        request_id: &str,
        mut finished: Finished,
        upstream_started: std::time::Instant,
    ) -> (bool, Finished) {
        let mut body = Vec::new();
        let complete = loop {
            let next = tokio::select! {
                r = Self::read_chunk(&mut upstream, self.limits.idle_timeout) => r,
                _ = session.read_body_or_idle(true) => {
                    finished.outcome = pb::SettleOutcome::ClientDisconnected;
                    self.release(upstream, false).await;
                    return (false, finished);
                }
            };
            match next {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break true,
                Err(failure) => {
                    let (outcome, status, code) = match failure {
                        UpstreamFailure::Timeout(_) => {
                            (pb::SettleOutcome::UpstreamTimeout, 504, "upstream_timeout")
                        }
                        UpstreamFailure::Failed(_) => {
                            (pb::SettleOutcome::UpstreamError, 502, "upstream_error")
                        }
                    };
                    finished.outcome = outcome;
                    self.release(upstream, false).await;
                    let e = ApiError::new(
                        status,
                        code,
                        "server_error",
                        format!(
                            "The provider '{}' failed while answering.",
                            admission.provider
                        ),
                    );
                    return (Self::respond_error(session, request_id, e).await, finished);
                }
            }
        };
        finished.upstream_time = Some(upstream_started.elapsed());
        self.release(upstream, complete).await;
        let status = header.status.as_u16();
        let mut head = Self::response_head(&header, request_id);
        if header.status.is_success() {
            finished.usage = usage_of_body(inspected.api, &body);
            finished.output_bytes = body.len() as u64;
            let pricing = Pricing {
                input_pico_per_token: admission.input_pico_per_token,
                output_pico_per_token: admission.output_pico_per_token,
            };
            let (prompt, completion, reported) = match finished.usage {
                Some(u) => (u.prompt_tokens, u.completion_tokens, true),
                None => (
                    inspected.estimated_prompt_tokens(),
                    (body.len() as u64).div_ceil(4),
                    false,
                ),
            };
            let (cost, _) = charge(
                pricing,
                admission.reserved_micro,
                prompt,
                completion,
                reported,
                false,
            );
            let _ = head.insert_header("x-aex-cost-micro", cost.to_string());
            let remaining = admission.remaining_micro + admission.reserved_micro - cost;
            let _ = head.insert_header("x-aex-remaining-micro", remaining.to_string());
        } else {
            finished.upstream_retry_after_ms = retry_after_ms(&header);
            finished.outcome = if status == 429 {
                pb::SettleOutcome::UpstreamRateLimited
            } else if status >= 500 {
                pb::SettleOutcome::UpstreamError
            } else {
                pb::SettleOutcome::Completed
            };
            if status == 429 {
                // The provider's limit, not AEX's: say so, keep its Retry-After.
                let _ = head.insert_header("x-aex-denied-by", "upstream");
            }
        }
        let _ = head.insert_header("content-length", body.len().to_string());
        let ok = session.write_response_header(Box::new(head)).await.is_ok()
            && session
                .write_response_body(Bytes::from(body), true)
                .await
                .is_ok();
        if !ok {
            finished.outcome = pb::SettleOutcome::ClientDisconnected;
        }
        (ok, finished)
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        session: &mut ServerSession,
        upstream: &mut Upstream,
        header: &ResponseHeader,
        inspected: &Inspected,
        admission: &pb::Admission,
        request_id: &str,
        finished: &mut Finished,
    ) -> bool {
        let mut head = Self::response_head(header, request_id);
        let _ = head.insert_header(
            "x-aex-remaining-micro",
            admission.remaining_micro.to_string(),
        );
        let _ = head.insert_header("cache-control", "no-cache");
        if session.write_response_header(Box::new(head)).await.is_err() {
            finished.outcome = pb::SettleOutcome::ClientDisconnected;
            return false;
        }
        let mut meter = SseMeter::new(inspected.api, !inspected.client_wants_usage);
        let cap = admission.output_tokens_cap;
        let mut out = Vec::new();
        loop {
            out.clear();
            let next = tokio::select! {
                r = Self::read_chunk(upstream, self.limits.idle_timeout) => r,
                _ = session.read_body_or_idle(true) => {
                    finished.outcome = pb::SettleOutcome::ClientDisconnected;
                    break;
                }
            };
            match next {
                Ok(Some(chunk)) => meter.feed(&chunk, &mut out),
                Ok(None) => {
                    meter.finish(&mut out);
                    if !out.is_empty()
                        && session
                            .write_response_body(Bytes::from(out.clone()), false)
                            .await
                            .is_err()
                    {
                        finished.outcome = pb::SettleOutcome::ClientDisconnected;
                    }
                    break;
                }
                Err(failure) => {
                    finished.outcome = match failure {
                        UpstreamFailure::Timeout(_) => pb::SettleOutcome::UpstreamTimeout,
                        UpstreamFailure::Failed(_) => pb::SettleOutcome::UpstreamError,
                    };
                    let _ = session
                        .write_response_body(Bytes::from(stream_error_event(inspected.api)), false)
                        .await;
                    break;
                }
            }
            if !out.is_empty()
                && session
                    .write_response_body(Bytes::from(out.clone()), false)
                    .await
                    .is_err()
            {
                finished.outcome = pb::SettleOutcome::ClientDisconnected;
                break;
            }
            // A provider that ignores the output cap is cut off once its text
            // is far past it, so spent never passes budget. Tokens average
            // about 4 bytes; the margin (12 bytes a token) keeps an honest
            // provider with long tokens from ever being cut.
            if cap > 0 && meter.usage().is_none() && meter.output_bytes() > cut_off_bytes(cap) {
                finished.outcome = pb::SettleOutcome::CutOff;
                let _ = session
                    .write_response_body(Bytes::from(cut_off_event(inspected.api)), false)
                    .await;
                break;
            }
        }
        finished.usage = meter.usage();
        finished.output_bytes = meter.output_bytes();
        if finished.outcome == pb::SettleOutcome::ClientDisconnected {
            return false;
        }
        session
            .write_response_body(Bytes::new(), true)
            .await
            .is_ok()
            && finished.outcome == pb::SettleOutcome::Completed
    }
}

/// Output text beyond which a stream has certainly passed `cap` tokens.
pub fn cut_off_bytes(cap: u64) -> u64 {
    cap.saturating_mul(12).saturating_add(64)
}

/// The clean end of a stream AEX stopped at its output cap.
fn cut_off_event(api: Api) -> String {
    match api {
        Api::Responses => format!(
            "event: response.incomplete\ndata: {}\n\n",
            json!({"type": "response.incomplete", "response": {"status": "incomplete",
                   "incomplete_details": {"reason": "max_output_tokens"}}})
        ),
        _ => format!(
            "data: {}\n\ndata: [DONE]\n\n",
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        ),
    }
}

fn stream_error_event(api: Api) -> String {
    let error = json!({"message": "The provider failed mid-stream.", "type": "server_error", "code": "upstream_error"});
    match api {
        Api::Responses => format!(
            "event: error\ndata: {}\n\n",
            json!({"type": "error", "error": error})
        ),
        _ => format!("data: {}\n\n", json!({"error": error})),
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            _ => return None,
        }
        if !self.handle(&mut session).await {
            return None;
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
