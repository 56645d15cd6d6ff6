//! The provider side of a call: resolving and connecting (pooled), sending
//! the request, reading the response head within the first-byte timeout
//! and its body within the idle timeout, and giving the connection back.

use super::{Call, Gateway};
use crate::api::{Api, Family};
use crate::control::Route;
use crate::simulated::{self, SimulatedResponse};
use bytes::Bytes;
use pingora_core::protocols::http::client::HttpSession as ClientSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::ErrorType;
use pingora_http::{RequestHeader, ResponseHeader};
use std::fmt;
use std::time::Duration;

pub(super) enum Upstream {
    Http {
        session: Box<ClientSession>,
        peer: Box<HttpPeer>,
    },
    Simulated(SimulatedResponse),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No answer (or no next byte) in time.
    Timeout,
    /// Refused, reset, unresolvable, or not HTTP.
    Failed,
}

/// Why a provider call failed, with what pingora said about it: its cause
/// and whether a retry on a fresh connection could succeed.
#[derive(Debug, Clone)]
pub struct UpstreamFailure {
    pub kind: FailureKind,
    pub detail: String,
    /// pingora's retry class: the request can be sent again safely.
    pub retryable: bool,
}

impl UpstreamFailure {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            retryable: false,
        }
    }

    /// `reused`: whether the connection came from the pool, which decides
    /// the retry class of errors pingora marks "retry only if reused"
    /// (its `Error::retry` panics on those until decided).
    pub fn from_pingora(e: &pingora_error::Error, reused: bool) -> Self {
        let kind = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                FailureKind::Timeout
            }
            _ => FailureKind::Failed,
        };
        Self {
            kind,
            detail: e.to_string(),
            retryable: match e.retry {
                pingora_error::RetryType::Decided(retry) => retry,
                pingora_error::RetryType::ReusedOnly => reused,
            },
        }
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == FailureKind::Timeout
    }
}

impl fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The `anthropic-version` sent to an `anthropic` provider when the client
/// sent none: the version Anthropic's SDKs send.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The provider's `retry-after-ms` or `retry-after` (seconds), in ms.
pub(super) fn retry_after_ms(header: &ResponseHeader) -> u64 {
    let get = |name: &str| header.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return ms.max(0.0) as u64;
    }
    get("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |s| s.saturating_mul(1000))
}

/// A response head with `status`: building fails only on a status that is
/// not one, and a `StatusCode` always is.
pub(super) fn response_head(status: http::StatusCode, capacity: usize) -> ResponseHeader {
    ResponseHeader::build(status, Some(capacity)).expect("a StatusCode is a valid status")
}

impl Gateway {
    pub(super) async fn open_upstream(
        &self,
        route: &Route,
        call: &Call<'_>,
        api: Api,
        body: Vec<u8>,
        client_headers: &[(http::HeaderName, http::HeaderValue)],
    ) -> Result<(Upstream, ResponseHeader), UpstreamFailure> {
        let (family, tls, host, port, base_path, api_key) = match route {
            Route::Simulated(settings) => {
                let sim = simulated::respond(
                    *settings,
                    call.inspected,
                    &call.admission.provider_model,
                    call.admission.output_tokens_cap,
                    call.request_id,
                );
                let mut h = response_head(http::StatusCode::OK, 1);
                let _ = h.insert_header("content-type", sim.content_type);
                return Ok((Upstream::Simulated(sim), h));
            }
            Route::Http {
                family,
                tls,
                host,
                port,
                base_path,
                api_key,
                ..
            } => (*family, *tls, host, *port, base_path, api_key),
        };
        let addr = tokio::time::timeout(
            self.limits.connect_timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| {
            UpstreamFailure::new(FailureKind::Timeout, format!("resolving {host} timed out"))
        })?
        .map_err(|e| {
            UpstreamFailure::new(FailureKind::Failed, format!("cannot resolve {host}: {e}"))
        })?
        .next()
        .ok_or_else(|| {
            UpstreamFailure::new(FailureKind::Failed, format!("{host} has no address"))
        })?;
        let mut peer = HttpPeer::new(addr, tls, host.clone());
        peer.options.connection_timeout = Some(self.limits.connect_timeout);
        peer.options.read_timeout = Some(self.limits.first_byte_timeout);
        peer.options.write_timeout = Some(self.limits.idle_timeout);

        let path = format!("{base_path}{}", api.upstream_suffix());
        let mut req = RequestHeader::build("POST", path.as_bytes(), None).map_err(|e| {
            UpstreamFailure::new(
                FailureKind::Failed,
                format!("the provider's base_url gives an invalid path: {e}"),
            )
        })?;
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
        let _ = req.insert_header("x-aex-request-id", call.request_id);
        // The provider's spans become children of ours; without tracing the
        // client's own traceparent (copied above) passes through.
        for (key, value) in aex_telemetry::current_context_headers() {
            let _ = req.insert_header(key, value);
        }
        match (family, api_key) {
            (Family::OpenAi, Some(key)) => {
                let _ = req.insert_header("authorization", format!("Bearer {key}"));
            }
            (Family::Anthropic, key) => {
                if let Some(key) = key {
                    let _ = req.insert_header("x-api-key", key.as_str());
                }
                // Anthropic requires a version; the client's own (passed
                // on above) wins.
                if !req.headers.contains_key("anthropic-version") {
                    let _ = req.insert_header("anthropic-version", ANTHROPIC_VERSION);
                }
            }
            (Family::OpenAi, None) => {}
        }
        // Kept for a retry only while one is possible: the head is copied
        // at most once, and only for a reused connection.
        let mut req = Some(Box::new(req));
        let body = Bytes::from(body);
        // A pooled connection may have been closed by the provider while
        // idle; that shows as a failure to send on a reused connection, and
        // one retry on a fresh connection is safe because nothing was read.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut session, reused) = self
                .connector
                .get_http_session(&peer)
                .await
                .map_err(|e| UpstreamFailure::from_pingora(&e, false))?;
            let may_retry = reused && attempt == 1;
            // The head may take up to the first-byte timeout (a model
            // thinking); after it, silence is bounded by the idle timeout.
            session.set_read_timeout(Some(self.limits.first_byte_timeout));
            let head = match (may_retry, &mut req) {
                (true, Some(req)) => req.clone(),
                (_, req) => req.take().expect("a head is kept until the last attempt"),
            };
            let sent = async {
                session.write_request_header(head).await?;
                session.write_request_body(body.clone(), true).await?;
                session.finish_request_body().await
            }
            .await;
            if let Err(e) = sent {
                if may_retry {
                    continue;
                }
                return Err(UpstreamFailure::from_pingora(&e, reused));
            }
            match tokio::time::timeout(
                self.limits.first_byte_timeout,
                session.read_response_header(),
            )
            .await
            {
                Err(_) => {
                    return Err(UpstreamFailure::new(
                        FailureKind::Timeout,
                        "no response from the provider in time",
                    ));
                }
                Ok(Err(e)) if may_retry && e.etype() != &ErrorType::ReadTimedout => continue,
                Ok(Err(e)) => return Err(UpstreamFailure::from_pingora(&e, reused)),
                Ok(Ok(())) => {}
            }
            session.set_read_timeout(Some(self.limits.idle_timeout));
            let Some(header) = session.response_header().cloned() else {
                return Err(UpstreamFailure::new(
                    FailureKind::Failed,
                    "the provider's response has no head",
                ));
            };
            return Ok((
                Upstream::Http {
                    session: Box::new(session),
                    peer: Box::new(peer),
                },
                header,
            ));
        }
    }

    pub(super) async fn read_chunk(
        upstream: &mut Upstream,
        idle: Duration,
    ) -> Result<Option<Bytes>, UpstreamFailure> {
        match upstream {
            Upstream::Simulated(sim) => Ok(sim.next_chunk().await),
            Upstream::Http { session, .. } => {
                match tokio::time::timeout(idle, session.read_response_body()).await {
                    Err(_) => Err(UpstreamFailure::new(
                        FailureKind::Timeout,
                        "the provider went silent",
                    )),
                    // Mid-response: never safe to send again.
                    Ok(Err(e)) => Err(UpstreamFailure::from_pingora(&e, false)),
                    Ok(Ok(chunk)) => Ok(chunk),
                }
            }
        }
    }

    /// Gives a fully read connection back to the pool; anything else is closed.
    pub(super) async fn release(&self, upstream: Upstream, complete: bool) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: pingora's `Error::retry` panics on errors whose retry
    /// class depends on reuse; a dropped provider connection is one.
    #[test]
    fn an_undecided_retry_class_is_decided_by_reuse_not_a_panic() {
        let mut e = pingora_error::Error::new(ErrorType::ConnectionClosed);
        e.retry = pingora_error::RetryType::ReusedOnly;
        assert!(UpstreamFailure::from_pingora(&e, true).retryable);
        assert!(!UpstreamFailure::from_pingora(&e, false).retryable);
        let mut e = pingora_error::Error::new(ErrorType::ReadTimedout);
        e.retry = pingora_error::RetryType::Decided(true);
        let f = UpstreamFailure::from_pingora(&e, false);
        assert!(f.retryable && f.is_timeout());
    }
}
