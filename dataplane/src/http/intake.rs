//! A request as it arrives: its body read within the limit, its headers
//! bounded, its token, and the few client headers a provider may see.

use super::Gateway;
use super::decode;
use super::errors::GatewayError;
use crate::control::Route;
use aex_core::presented::{Problem, presented};
use aex_proto::v1 as pb;
use pingora_core::protocols::http::ServerSession;
use std::time::Duration;

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

/// The token a request presents, hashed (the token itself never leaves
/// the data plane), or why it presents none (`aex_core::presented`): a
/// bearer token, Anthropic's `x-api-key` (its SDKs and Claude Code), or
/// Azure OpenAI's `api-key` (the OpenAI SDKs' Azure clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// `""` when there is no usable token.
    pub token_sha256: String,
    pub problem: Option<Problem>,
}

impl Credential {
    /// An admission of this caller (its other fields for the caller to set).
    pub fn admit_request(&self, request_id: &str, endpoint: pb::Endpoint) -> pb::AdmitRequest {
        pb::AdmitRequest {
            request_id: request_id.to_string(),
            token_sha256: self.token_sha256.clone(),
            credential_problem: Problem::to_wire(self.problem),
            endpoint: endpoint as i32,
            ..Default::default()
        }
    }
}

pub(super) fn credential(session: &ServerSession) -> Credential {
    let headers = &session.req_header().headers;
    match presented(|name| headers.get(name.as_str()).map(|v| v.as_bytes())) {
        Ok(token) => Credential {
            token_sha256: aex_core::secrets::token_sha256(token),
            problem: None,
        },
        Err(problem) => Credential {
            token_sha256: String::new(),
            problem: Some(problem),
        },
    }
}

/// Discards what is left of a refused request body: at most 64 MiB or 5 s.
pub(super) async fn drain_request_body(session: &mut ServerSession) {
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

/// 431 for headers past the bounds (before anything is reserved).
pub(super) fn check_headers(session: &ServerSession) -> Result<(), GatewayError> {
    let headers = &session.req_header().headers;
    if headers.len() > MAX_HEADERS {
        return Err(GatewayError::headers_too_large(format!(
            "The request has {} headers; at most {MAX_HEADERS} are accepted",
            headers.len()
        )));
    }
    let mut total = 0;
    for (name, value) in headers {
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(GatewayError::headers_too_large(format!(
                "The header '{name}' is {} bytes; at most {MAX_HEADER_VALUE_BYTES} are accepted",
                value.len()
            )));
        }
        total += name.as_str().len() + value.len();
    }
    if total > MAX_HEADERS_BYTES {
        return Err(GatewayError::headers_too_large(format!(
            "The request's headers are {total} bytes; at most {MAX_HEADERS_BYTES} are accepted"
        )));
    }
    Ok(())
}

/// The client's headers that go upstream: the allow-list only, never its
/// AEX token (replaced by the provider key) or framing headers.
pub(super) fn forwardable_headers(
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

impl Gateway {
    /// Reads the whole body, refusing more than the limit, and undoes its
    /// `Content-Encoding` (`decode.rs`) within the same limit.
    pub(super) async fn read_body(
        &self,
        session: &mut ServerSession,
    ) -> Result<Vec<u8>, GatewayError> {
        let limit = self.limits.max_body_bytes;
        let declared = session
            .get_header("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(GatewayError::body_too_large(limit));
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(4096));
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(GatewayError::body_too_large(limit));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(GatewayError::body_unreadable(&e)),
            }
        }
        let encoding = session
            .get_header("content-encoding")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        if encoding.is_empty() {
            return Ok(body);
        }
        decode::codings(&encoding)
            .and_then(|codings| decode::decode(body, &codings, limit))
            .map_err(|e| GatewayError::undecodable(e, limit))
    }
}
