//! The OpenAI-compatible HTTP service, on pingora's HTTP server and pingora's
//! pooled upstream connector.
//!
//! Why not pingora's `ProxyHttp` pipeline: it picks the upstream and sends
//! the request head before the body is read, and replays a buffered body only
//! up to 64 KiB. AEX must read the whole body first: the model (and so the
//! provider) is in it, admission needs it, and the upstream body is rewritten.
//! A denied request must never reach a provider at all.

use crate::control::{ControlPlane, Route};
use crate::metering::{Metered, cut_off_bytes, meter};
use crate::metrics::Metrics;
use crate::openai::{self, Api, Inspected};
use crate::simulated::{self, SimulatedResponse};
use crate::sse::{SseMeter, Usage, output_text_bytes, usage_of};
use aex_core::money::{Pricing, charge};
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

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones AEX sets itself: never
/// relayed from a provider's response.
const NOT_RELAYED: &[&str] = &[
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

fn relayed(name: &str) -> bool {
    !NOT_RELAYED.contains(&name)
}

/// The client headers a provider gets (models.yaml's `forward_headers`
/// adds to these per provider). Everything else stays with AEX: an agent
/// must not choose which of the operator's organizations or projects is
/// billed (`OpenAI-Organization`, `OpenAI-Project`), nor reach the
/// provider with headers AEX did not vet.
pub const FORWARDED_BY_DEFAULT: &[&str] = &[
    "accept",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
    "traceparent",
    "tracestate",
    "idempotency-key",
    "x-idempotency-key",
];

/// Bounds on a request's headers, checked before admission: no client
/// needs more, and all of it would otherwise be held and scanned per call.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
pub const MAX_HEADERS_BYTES: usize = 64 * 1024;
pub const MAX_HEADERS: usize = 100;

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

    /// The answer to a request that is not valid HTTP/1.1, by the status
    /// the parser chose. Never echoes the request: its head may carry a token.
    fn malformed(status: u16, header_timeout: Duration) -> Self {
        let (code, message) = match status {
            408 => (
                "request_timeout",
                format!(
                    "The request's headers did not arrive within {} s.",
                    header_timeout.as_secs_f64()
                ),
            ),
            414 => (
                "uri_too_long",
                format!(
                    "The request target is longer than {} bytes.",
                    pingora_core::protocols::http::v1::server::MAX_REQUEST_TARGET_LEN
                ),
            ),
            431 => (
                "request_header_fields_too_large",
                "The request has too many headers, or they are too large.".to_string(),
            ),
            501 => (
                "not_implemented",
                "Unsupported Transfer-Encoding: AEX accepts bodies with Content-Length or chunked."
                    .to_string(),
            ),
            505 => (
                "http_version_not_supported",
                "Unsupported HTTP version: AEX speaks HTTP/1.1 and HTTP/1.0.".to_string(),
            ),
            _ => (
                "invalid_request",
                "The request is not valid HTTP/1.1 (its request line, a header, or its framing). \
                 Check for bare CR or NUL in values, folded or duplicate headers, and a single \
                 valid Content-Length."
                    .to_string(),
            ),
        };
        Self::new(status, code, "invalid_request_error", message)
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
    aex_core::secrets::new_id("req")
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
                aex_telemetry::set_parent_from(&span, &session.req_header().headers);
                let keep = self
                    .proxy(session, api, &request_id, &mut observed)
                    .instrument(span)
                    .await;
                self.observe(session, &observed, started.elapsed());
                keep
            }
            (_, p) if Api::from_path(p).is_some() || p == "/v1/models" => {
                // Read past the body first, so a pipelined request behind
                // it is still answered.
                Self::drain_request_body(session).await;
                let e = ApiError::new(
                    405,
                    "method_not_allowed",
                    "invalid_request_error",
                    format!("Method not allowed for {p}."),
                );
                Self::respond_error(session, &request_id, e).await
            }
            (_, p) => {
                Self::drain_request_body(session).await;
                // A path may be 16 KiB long: echo only its start.
                let shown: String = p.chars().take(120).collect();
                let e = ApiError::new(
                    404,
                    "not_found",
                    "invalid_request_error",
                    format!(
                        "Unknown path {shown}. AEX serves /v1/chat/completions, /v1/responses, /v1/embeddings, /v1/completions and /v1/models."
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
        aex_core::secrets::token_sha256(token)
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
                session.set_keepalive(None);
                Self::respond_error(session, request_id, e).await;
                // Closing while the client is still uploading would reset the
                // connection before it reads the 413: swallow the rest of the
                // upload first (bounded), then close.
                Self::drain_request_body(session).await;
                return false;
            }
        };
        // After the body, so the connection stays usable for what follows.
        if let Err(e) = Self::check_headers(session) {
            return Self::respond_error(session, request_id, e).await;
        }
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
            output_multiplier: inspected.output_multiplier,
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

    /// What the control plane will charge for this call (the same rule, so
    /// `x-aex-cost-micro` and the ledger agree).
    fn charge_of(
        admission: &pb::Admission,
        outcome: pb::SettleOutcome,
        metered: Metered,
    ) -> aex_core::money::Charge {
        charge(
            Pricing {
                input_pico_per_token: admission.input_pico_per_token,
                output_pico_per_token: admission.output_pico_per_token,
            },
            admission.reserved_micro,
            metered.prompt_tokens,
            metered.completion_tokens,
            metered.usage_reported,
            outcome == pb::SettleOutcome::CutOff,
        )
    }

    fn settle(
        &self,
        inspected: &Inspected,
        admission: &pb::Admission,
        f: &Finished,
        model_label: &str,
    ) {
        let metered = meter(
            f.outcome,
            f.usage,
            f.output_bytes,
            inspected.estimated_prompt_tokens(),
        );
        let charge = Self::charge_of(admission, f.outcome, metered);
        self.metrics
            .spent_micro
            .with_label_values(&[model_label])
            .inc_by(charge.charged_micro.max(0) as u64);
        if charge.overrun_micro > 0 {
            self.metrics
                .overrun_micro
                .with_label_values(&[model_label])
                .inc_by(charge.overrun_micro as u64);
        }
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
            prompt_tokens: metered.prompt_tokens,
            completion_tokens: metered.completion_tokens,
            usage_reported: metered.usage_reported,
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
                ..
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
        peer.options.read_timeout = Some(self.limits.first_byte_timeout);
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
        for (key, value) in aex_telemetry::current_context_headers() {
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
            // The head may take up to the first-byte timeout (a model
            // thinking); after it, silence is bounded by the idle timeout.
            session.set_read_timeout(Some(self.limits.first_byte_timeout));
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
            session.set_read_timeout(Some(self.limits.idle_timeout));
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
        let client_headers = Self::forwardable_headers(session, &route);
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

    /// The client's headers that go upstream: the allow-list only, never
    /// its AEX token (replaced by the provider key) or framing headers.
    fn forwardable_headers(
        session: &ServerSession,
        route: &Route,
    ) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let extra: &[String] = match route {
            Route::Http {
                forward_headers, ..
            } => forward_headers,
            Route::Simulated(_) => &[],
        };
        // Headers the client named in Connection are hop-by-hop (RFC 9110
        // §7.6.1), even allowed ones.
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
            .filter(|(name, _)| {
                let name = name.as_str();
                (FORWARDED_BY_DEFAULT.contains(&name) || extra.iter().any(|e| e == name))
                    && !connection_listed.iter().any(|c| c == name)
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// 431 for headers past the bounds (before anything is reserved).
    fn check_headers(session: &ServerSession) -> Result<(), ApiError> {
        let headers = &session.req_header().headers;
        let too_large = |what: String| {
            ApiError::new(
                431,
                "request_header_fields_too_large",
                "invalid_request_error",
                format!("{what}. Send fewer or shorter headers."),
            )
        };
        if headers.len() > MAX_HEADERS {
            return Err(too_large(format!(
                "The request has {} headers; at most {MAX_HEADERS} are accepted",
                headers.len()
            )));
        }
        let mut total = 0;
        for (name, value) in headers {
            if value.len() > MAX_HEADER_VALUE_BYTES {
                return Err(too_large(format!(
                    "The header '{name}' is {} bytes; at most {MAX_HEADER_VALUE_BYTES} are accepted",
                    value.len()
                )));
            }
            total += name.as_str().len() + value.len();
        }
        if total > MAX_HEADERS_BYTES {
            return Err(too_large(format!(
                "The request's headers are {total} bytes; at most {MAX_HEADERS_BYTES} are accepted"
            )));
        }
        Ok(())
    }

    fn response_head(upstream: &ResponseHeader, request_id: &str) -> ResponseHeader {
        let mut h = ResponseHeader::build(upstream.status, None).expect("valid status");
        for (name, value) in upstream.headers.iter() {
            if relayed(name.as_str()) && name.as_str() != "content-encoding" {
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
                Ok(Some(chunk)) if body.len() + chunk.len() > self.limits.max_response_bytes => {
                    // The provider generated (and may bill) what it sent:
                    // settle it as delivered output, capped by the reservation.
                    finished.outcome = pb::SettleOutcome::UpstreamError;
                    finished.output_bytes = (body.len() + chunk.len()) as u64;
                    finished.upstream_status = header.status.as_u16();
                    self.release(upstream, false).await;
                    let e = ApiError::new(
                        502,
                        "upstream_error",
                        "server_error",
                        format!(
                            "The provider '{}' sent a response larger than {} bytes; AEX stopped reading it. \
                             Stream the call (stream: true) or raise aex-dataplane --max-response-bytes.",
                            admission.provider, self.limits.max_response_bytes
                        ),
                    );
                    return (Self::respond_error(session, request_id, e).await, finished);
                }
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
            let parsed = serde_json::from_slice::<serde_json::Value>(&body).ok();
            finished.usage = parsed.as_ref().and_then(|v| usage_of(inspected.api, v));
            // The generated text, which usage must account for; a body that
            // is not JSON counts whole.
            finished.output_bytes = parsed
                .as_ref()
                .map_or(body.len() as u64, |v| output_text_bytes(inspected.api, v));
            let metered = meter(
                finished.outcome,
                finished.usage,
                finished.output_bytes,
                inspected.estimated_prompt_tokens(),
            );
            let cost = Self::charge_of(admission, finished.outcome, metered).charged_micro;
            let _ = head.insert_header("x-aex-cost-micro", cost.to_string());
            let remaining = admission.remaining_micro + admission.reserved_micro - cost;
            let _ = head.insert_header("x-aex-remaining-micro", remaining.to_string());
        } else {
            finished.upstream_retry_after_ms = retry_after_ms(&header);
            finished.outcome = match status {
                429 => pb::SettleOutcome::UpstreamRateLimited,
                500.. => pb::SettleOutcome::UpstreamError,
                // The provider refused the request: nothing generated, nothing billed.
                _ => pb::SettleOutcome::UpstreamRejected,
            };
            if status == 429 {
                // The provider's limit, not AEX's: say so, keep its Retry-After.
                let _ = head.insert_header("x-aex-denied-by", "upstream");
            }
            if matches!(status, 401 | 403) {
                // AEX's own provider key was refused. Relayed as is, the
                // client would read it as its AEX token being wrong.
                let e = ApiError::new(
                    502,
                    "upstream_error",
                    "server_error",
                    format!(
                        "The provider '{}' refused AEX's provider key (HTTP {status}). Your AEX token is fine: \
                         the operator must set a valid key in {} (in AEX_HOME/.env or the environment of \
                         aex-dataplane) and restart the data plane.",
                        admission.provider,
                        aex_core::config::api_key_env(&admission.provider),
                    ),
                );
                tracing::warn!(provider = %admission.provider, status, "provider refused AEX's key");
                return (Self::respond_error(session, request_id, e).await, finished);
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
        // Chunked, so the connection outlives the stream: without it pingora
        // delimits the body by closing (while saying keep-alive), and every
        // request pipelined or sent after a stream was lost. HTTP/1.0
        // clients get the close-delimited body they expect.
        if session.req_header().version == http::Version::HTTP_11 {
            let _ = head.insert_header("transfer-encoding", "chunked");
        }
        if session.write_response_header(Box::new(head)).await.is_err() {
            finished.outcome = pb::SettleOutcome::ClientDisconnected;
            return false;
        }
        let mut meter = SseMeter::new(inspected.api, !inspected.client_wants_usage);
        // Every choice may run to the cap; the reservation covered them all.
        let cap = admission
            .output_tokens_cap
            .saturating_mul(u64::from(inspected.output_multiplier.max(1)));
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
            // provider with long tokens from ever being cut. Counted from
            // what was streamed, whatever usage the provider claims so far.
            if meter.output_bytes() > cut_off_bytes(cap) {
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
                    let error = ApiError::malformed(status, self.limits.header_timeout);
                    Self::respond_error(&mut session, &new_request_id(), error).await;
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
