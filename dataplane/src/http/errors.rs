//! Every error the data plane answers with, in one place: its status, its
//! OpenAI `code` and `type`, its message, the headers that go with it, and
//! both shapes it is sent in (a JSON body, or an SSE event once a stream
//! has begun). Named constructors, so a site says what went wrong, not
//! which triple to send.

use super::upstream::UpstreamFailure;
use crate::api::{Api, Family};
use crate::openai;
use crate::request::Refused;
use aex_core::denial::{AnthropicErrorType, DenialCode, ErrorType, Rule};
use aex_proto::v1 as pb;
use bytes::Bytes;
use http::StatusCode;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct GatewayError {
    pub status: StatusCode,
    pub code: &'static str,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub headers: Vec<(&'static str, String)>,
}

const INVALID_REQUEST: &str = "invalid_request_error";

fn is_plain_name(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}
const SERVER_ERROR: &str = "server_error";

impl GatewayError {
    fn new(
        status: StatusCode,
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

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The answer to a request that is not valid HTTP/1.1, by the status
    /// the parser chose. Never echoes the request: its head may carry a token.
    pub fn malformed(status: u16, header_timeout: Duration) -> Self {
        let (status, code, message) = match status {
            408 => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "The request's headers did not arrive within {} s.",
                    header_timeout.as_secs_f64()
                ),
            ),
            414 => (
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!(
                    "The request target is longer than {} bytes.",
                    pingora_core::protocols::http::v1::server::MAX_REQUEST_TARGET_LEN
                ),
            ),
            431 => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                "The request has too many headers, or they are too large.".to_string(),
            ),
            501 => (
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                "Unsupported Transfer-Encoding: AEX accepts bodies with Content-Length or chunked."
                    .to_string(),
            ),
            505 => (
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "http_version_not_supported",
                "Unsupported HTTP version: AEX speaks HTTP/1.1 and HTTP/1.0.".to_string(),
            ),
            _ => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The request is not valid HTTP/1.1 (its request line, a header, or its framing). \
                 Check for bare CR or NUL in values, folded or duplicate headers, and a single \
                 valid Content-Length."
                    .to_string(),
            ),
        };
        Self::new(status, code, INVALID_REQUEST, message)
    }

    pub fn bad_request(e: openai::BadRequest) -> Self {
        let mut err = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            INVALID_REQUEST,
            e.message,
        );
        err.param = (!e.param.is_empty()).then(|| e.param.to_string());
        err
    }

    /// A body refused by its API's own reading, in that API's words.
    pub fn refused(r: Refused) -> Self {
        match r {
            Refused::OpenAi(e) => Self::bad_request(e),
            Refused::Anthropic(e) => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                INVALID_REQUEST,
                e.message,
            ),
        }
    }

    pub fn method_not_allowed(path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            INVALID_REQUEST,
            format!("Method not allowed for {}.", aex_core::policy::echoed(path)),
        )
    }

    /// A browser preflight from an origin not in `--cors-origins`.
    pub fn origin_not_allowed(origin: &str, cors_off: bool) -> Self {
        let origin = aex_core::policy::echoed(origin);
        let how = if cors_off {
            "CORS is off"
        } else {
            "it is not in the data plane's --cors-origins"
        };
        Self::new(
            StatusCode::FORBIDDEN,
            "cors_origin_not_allowed",
            INVALID_REQUEST,
            format!(
                "A browser page from {origin} may not call AEX: {how}. To allow it, start aex-dataplane \
                 with --cors-origins {origin} (or AEX_CORS_ORIGINS)."
            ),
        )
    }

    pub fn not_found(path: &str) -> Self {
        // A path may be 16 KiB long: echo only its start.
        let shown: String = path.chars().take(120).collect();
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            INVALID_REQUEST,
            format!(
                "Unknown path {shown}. AEX serves /v1/chat/completions, /v1/responses, /v1/embeddings, \
                 /v1/completions, /v1/messages, /v1/messages/count_tokens, /v1/models and /v1/models/{{id}}."
            ),
        )
    }

    /// `GET /v1/models/{id}` for a model the agent may not use (or that
    /// does not exist: the two are not told apart, as OpenAI does not).
    pub fn model_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            INVALID_REQUEST,
            format!(
                "The model '{}' does not exist or you do not have access to it. \
                 `GET /v1/models` lists yours.",
                aex_core::policy::echoed(id)
            ),
        )
    }

    pub fn body_too_large(max_body_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            INVALID_REQUEST,
            format!("The request body is larger than {max_body_bytes} bytes."),
        )
    }

    /// A body whose `Content-Encoding` AEX could not undo (`decode.rs`).
    pub fn undecodable(e: super::decode::DecodeError, max_body_bytes: usize) -> Self {
        use super::decode::DecodeError;
        match e {
            DecodeError::Unsupported(name) => Self::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_encoding",
                INVALID_REQUEST,
                format!(
                    "The request body's Content-Encoding '{name}' is not one AEX decodes: send it \
                     uncompressed, or as gzip or deflate."
                ),
            ),
            DecodeError::TooLarge => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                INVALID_REQUEST,
                format!("The request body, decompressed, is larger than {max_body_bytes} bytes."),
            ),
            DecodeError::Corrupt { coding, why } => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                INVALID_REQUEST,
                format!(
                    "The request body is not valid {coding}, as its Content-Encoding says it is: {why}."
                ),
            ),
        }
    }

    pub fn body_unreadable(e: &pingora_error::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            INVALID_REQUEST,
            format!("Could not read the request body: {e}"),
        )
    }

    /// `what` says which bound was passed.
    pub fn headers_too_large(what: String) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_header_fields_too_large",
            INVALID_REQUEST,
            format!("{what}. Send fewer or shorter headers."),
        )
    }

    /// A refusal decided by the control plane. Its status, code and type
    /// come over the wire: anything outside the closed sets AEX answers
    /// with is mapped, never trusted into a panic.
    pub fn denied(d: pb::Denial) -> Self {
        let status = u16::try_from(d.http_status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| s.is_client_error() || s.is_server_error())
            .unwrap_or(StatusCode::FORBIDDEN);
        let code = DenialCode::parse(&d.code)
            .unwrap_or(DenialCode::InvalidRequest)
            .as_str();
        let kind = ErrorType::parse(&d.r#type)
            .unwrap_or(ErrorType::InvalidRequestError)
            .as_str();
        // A rule this data plane does not know yet (a newer control plane)
        // is still named, if it is a plain name; never raw bytes in a header.
        let denied_by = match Rule::parse(&d.denied_by) {
            Some(rule) => rule.as_str().to_string(),
            None if is_plain_name(&d.denied_by) => d.denied_by,
            None => Rule::Request.as_str().to_string(),
        };
        let mut e =
            Self::new(status, code, kind, d.message).with_header("x-aex-denied-by", denied_by);
        e.param = (!d.param.is_empty()).then_some(d.param);
        if status == StatusCode::PAYMENT_REQUIRED {
            e = e.with_header("x-should-retry", "false");
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let ms = d.retry_after_ms.max(1);
            e = e
                .with_header("retry-after", ms.div_ceil(1000).clamp(1, 60).to_string())
                .with_header("retry-after-ms", ms.to_string());
        }
        e
    }

    pub fn control_unavailable(status: &tonic::Status) -> Self {
        tracing::error!(%status, "control plane unavailable");
        // Reached, but this data plane's own credential was refused (a
        // revoked sidecar credential): the operator has something to fix.
        let message = if status.code() == tonic::Code::Unauthenticated {
            "The AEX control plane refused this data plane's credential (wrong or revoked), so it \
             cannot admit requests; give the data plane a valid one (AEX_HOME/dataplane.token, or \
             `aexctl dataplane credential create`)."
        } else {
            "AEX cannot reach its control plane, so it cannot admit requests; retry shortly."
        };
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "control_plane_unavailable",
            SERVER_ERROR,
            message,
        )
        .with_header("retry-after", "1")
        .with_header("x-aex-denied-by", "control_plane")
    }

    /// Past `--max-connections` (answered before any request is parsed).
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            SERVER_ERROR,
            "AEX is serving as many connections as it is allowed (--max-connections); retry shortly.",
        )
        .with_header("retry-after", "1")
    }

    /// A request the model's provider's API cannot carry (translation).
    pub fn untranslatable(u: crate::translate::Unsupported) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            INVALID_REQUEST,
            u.message,
        )
    }

    /// A provider's answer that cannot be put in the client's API.
    pub fn untranslatable_answer(provider: &str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            SERVER_ERROR,
            format!(
                "The provider '{provider}' answered, but AEX cannot put its answer in the API you \
                 called: {why}."
            ),
        )
    }

    pub fn no_route(provider: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            SERVER_ERROR,
            format!(
                "No route to provider '{provider}' yet; the data plane is still loading its configuration."
            ),
        )
    }

    /// The provider could not be reached, or gave no answer in time.
    pub fn upstream_unreachable(failure: &UpstreamFailure, provider: &str) -> Self {
        if failure.is_timeout() {
            Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                SERVER_ERROR,
                format!("The provider '{provider}' did not answer in time: {failure}."),
            )
        } else {
            Self::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                SERVER_ERROR,
                format!("The provider '{provider}' could not be reached: {failure}."),
            )
        }
    }

    /// The provider failed after its response began (buffered calls).
    pub fn upstream_failed_answering(failure: &UpstreamFailure, provider: &str) -> Self {
        let (status, code) = if failure.is_timeout() {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
        } else {
            (StatusCode::BAD_GATEWAY, "upstream_error")
        };
        Self::new(
            status,
            code,
            SERVER_ERROR,
            format!("The provider '{provider}' failed while answering."),
        )
    }

    pub fn response_too_large(provider: &str, max_response_bytes: usize) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            SERVER_ERROR,
            format!(
                "The provider '{provider}' sent a response larger than {max_response_bytes} bytes; AEX stopped reading it. \
                 Stream the call (stream: true) or raise aex-dataplane --max-response-bytes."
            ),
        )
    }

    /// A buffered answer whose text is past the output cap AEX sent: the
    /// provider ignored it. Withheld like a stream's excess is cut off, and
    /// not retried (the SDKs honour `x-should-retry`): it would bill again.
    pub fn upstream_ignored_cap(provider: &str, cap: u64) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            SERVER_ERROR,
            format!(
                "The provider '{provider}' answered past the output cap AEX sent it ({cap} tokens); AEX withheld \
                 the answer and charged the call's reservation. Check that the provider honours max_tokens / \
                 max_completion_tokens, or stream the call (stream: true) to receive text up to the cap."
            ),
        )
        .with_header("x-should-retry", "false")
    }

    /// AEX's own provider key was refused. Relayed as is, the client would
    /// read it as its AEX token being wrong.
    pub fn provider_key_refused(provider: &str, upstream_status: u16) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            SERVER_ERROR,
            format!(
                "The provider '{provider}' refused AEX's provider key (HTTP {upstream_status}). Your AEX token is fine: \
                 the operator must set a valid key in {} (in AEX_HOME/.env or the environment of \
                 aex-dataplane) and restart the data plane.",
                aex_core::config::api_key_env(provider),
            ),
        )
    }

    /// The JSON body, in OpenAI's shape.
    pub fn body(&self) -> Bytes {
        Bytes::from(self.error_object().to_string())
    }

    /// The JSON body in the shape of the API the client called.
    pub fn body_for(&self, family: Family) -> Bytes {
        match family {
            Family::OpenAi => self.body(),
            Family::Anthropic => self.anthropic_body(),
        }
    }

    fn error_object(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }

    /// The same error as the last event of a stream that has begun, in the
    /// API's own stream shape.
    pub fn sse_event(&self, api: Api) -> String {
        let error = &self.error_object()["error"];
        match api {
            Api::Messages | Api::CountTokens => self.anthropic_sse_event(),
            Api::Responses => format!(
                "event: error\ndata: {}\n\n",
                json!({"type": "error", "error": error})
            ),
            _ => format!("data: {}\n\n", json!({"error": error})),
        }
    }

    /// The JSON body in the shape of Anthropic's Messages API, its error
    /// type by status (`AnthropicErrorType::for_status`), so that the
    /// Anthropic SDKs raise the exception and apply the retry rule they
    /// would for Anthropic's own. The headers (`retry-after`,
    /// `x-aex-denied-by`) are the same on both APIs.
    pub fn anthropic_body(&self) -> Bytes {
        Bytes::from(self.anthropic_error().to_string())
    }

    fn anthropic_error(&self) -> serde_json::Value {
        json!({"type": "error", "error": {
            "type": AnthropicErrorType::for_status(self.status.as_u16()).as_str(),
            "message": self.message,
        }})
    }

    /// The same error as the last event of a Messages stream that has
    /// begun, as Anthropic sends one (`event: error`).
    pub fn anthropic_sse_event(&self) -> String {
        format!("event: error\ndata: {}\n\n", self.anthropic_error())
    }

    /// A provider that failed mid-stream.
    pub fn upstream_failed_mid_stream() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            SERVER_ERROR,
            "The provider failed mid-stream.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(status: u32) -> pb::Denial {
        pb::Denial {
            http_status: status,
            code: "budget_exceeded".into(),
            r#type: "insufficient_quota".into(),
            message: "no".into(),
            denied_by: "budget".into(),
            ..Default::default()
        }
    }

    #[test]
    fn any_status_from_the_control_plane_is_answerable() {
        for status in [0, 1, 99, 200, 302, 402, 429, 599, 600, 70_000, u32::MAX] {
            let e = GatewayError::denied(denial(status));
            assert!(
                e.status.is_client_error() || e.status.is_server_error(),
                "{status} -> {}",
                e.status
            );
        }
        assert_eq!(
            GatewayError::denied(denial(402)).status,
            StatusCode::PAYMENT_REQUIRED
        );
    }

    #[test]
    fn both_shapes_carry_the_same_error() {
        let e = GatewayError::upstream_failed_mid_stream();
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        let event = e.sse_event(Api::ChatCompletions);
        let data: serde_json::Value =
            serde_json::from_str(event.strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(body, data);
        let event = e.sse_event(Api::Responses);
        assert!(event.starts_with("event: error\ndata: "));
        assert!(event.contains("\"code\":\"upstream_error\""));
    }

    #[test]
    fn on_the_messages_api_an_error_has_anthropics_shape() {
        let e = GatewayError::denied(denial(402));
        let body: serde_json::Value = serde_json::from_slice(&e.anthropic_body()).unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": "billing_error", "message": "no"}})
        );
        let mut d = denial(429);
        d.retry_after_ms = 1_200;
        let e = GatewayError::denied(d);
        let body: serde_json::Value = serde_json::from_slice(&e.anthropic_body()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(
            e.headers
                .iter()
                .any(|(k, v)| *k == "retry-after-ms" && v == "1200")
        );
        let event = GatewayError::upstream_failed_mid_stream().anthropic_sse_event();
        let data = event
            .strip_prefix("event: error\ndata: ")
            .expect("an error event")
            .trim();
        let data: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(data["error"]["type"], "api_error");
        assert_eq!(data["error"]["message"], "The provider failed mid-stream.");
    }

    #[test]
    fn rate_limits_tell_clients_when_to_retry() {
        let mut d = denial(429);
        d.retry_after_ms = 2_500;
        let e = GatewayError::denied(d);
        let header = |n: &str| {
            e.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("retry-after"), Some("3"));
        assert_eq!(header("retry-after-ms"), Some("2500"));
        assert_eq!(header("x-aex-denied-by"), Some("budget"));
    }

    #[test]
    fn what_the_control_plane_names_is_kept_and_what_it_garbles_is_mapped() {
        let header = |e: &GatewayError, n: &str| {
            e.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.clone())
        };
        let mut d = denial(409);
        d.code = "request_already_closed".into();
        d.r#type = "invalid_request_error".into();
        d.denied_by = "request".into();
        let e = GatewayError::denied(d);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, "request_already_closed")
        );
        let mut d = denial(403);
        d.code = "something_new".into();
        d.r#type = "new_kind".into();
        d.denied_by = "group".into();
        let e = GatewayError::denied(d);
        assert_eq!((e.code, e.kind), ("invalid_request", INVALID_REQUEST));
        assert_eq!(header(&e, "x-aex-denied-by").as_deref(), Some("group"));
        let mut d = denial(403);
        d.denied_by = "rpm\r\nset-cookie: x".into();
        let e = GatewayError::denied(d);
        assert_eq!(header(&e, "x-aex-denied-by").as_deref(), Some("request"));
    }
}
