//! `POST /v1/messages/count_tokens`: admitted without a reservation (it
//! generates nothing and costs nothing), then answered by the provider when
//! it has the endpoint (an `anthropic` provider counts with its own
//! tokenizer), else by AEX's own count. That count is never a made-up 0:
//! Claude Code compacts its context by these counts, and a 0 would stop it.

use super::errors::GatewayError;
use super::intake::forwardable_headers;
use super::relay::relayed_head;
use super::{Call, Gateway};
use crate::api::Family;
use crate::control::Route;
use bytes::Bytes;
use http::StatusCode;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

impl Gateway {
    pub(super) async fn count_tokens(&self, session: &mut ServerSession, call: &Call<'_>) -> bool {
        let provider = &call.admission.provider;
        let route = match self.control.cache.route(provider) {
            Some(
                route @ Route::Http {
                    family: Family::Anthropic,
                    ..
                },
            ) => route,
            Some(_) => return self.own_count(session, call).await,
            None => {
                let e = GatewayError::no_route(provider);
                return Self::respond_error(session, call.request_id, e).await;
            }
        };
        let body = call
            .inspected
            .upstream_body(&call.admission.provider_model, 0);
        let client_headers = forwardable_headers(session, &route);
        let (mut upstream, header) = match self
            .open_upstream(&route, call, call.inspected.api(), body, &client_headers)
            .await
        {
            Ok(opened) => opened,
            Err(failure) => {
                let e = GatewayError::upstream_unreachable(&failure, provider);
                return Self::respond_error(session, call.request_id, e).await;
            }
        };
        let mut body = Vec::new();
        loop {
            match Self::read_chunk(&mut upstream, self.limits.idle_timeout).await {
                Ok(Some(chunk)) if body.len() + chunk.len() > self.limits.max_response_bytes => {
                    self.release(upstream, false).await;
                    let e =
                        GatewayError::response_too_large(provider, self.limits.max_response_bytes);
                    return Self::respond_error(session, call.request_id, e).await;
                }
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(failure) => {
                    self.release(upstream, false).await;
                    let e = GatewayError::upstream_failed_answering(&failure, provider);
                    return Self::respond_error(session, call.request_id, e).await;
                }
            }
        }
        self.release(upstream, true).await;
        let status = header.status.as_u16();
        if matches!(status, 401 | 403) {
            tracing::warn!(provider = %provider, status, "provider refused AEX's key");
            let e = GatewayError::provider_key_refused(provider, status);
            return Self::respond_error(session, call.request_id, e).await;
        }
        let mut head = relayed_head(&header, call.request_id);
        let _ = head.insert_header("content-length", body.len().to_string());
        super::cors::decorate(session, &mut head);
        session.write_response_header(Box::new(head)).await.is_ok()
            && session
                .write_response_body(Bytes::from(body), true)
                .await
                .is_ok()
    }

    /// The prompt's tokens by AEX's rough rule (about 4 bytes a token of
    /// the request as sent, so an over- rather than an under-count), for a
    /// provider without a count endpoint. Said so in `x-aex-token-count`.
    async fn own_count(&self, session: &mut ServerSession, call: &Call<'_>) -> bool {
        let tokens = call.inspected.estimated_prompt_tokens().max(1);
        Self::respond(
            session,
            StatusCode::OK,
            "application/json",
            &[
                ("x-aex-request-id", call.request_id.to_string()),
                ("x-aex-token-count", "estimate".to_string()),
            ],
            Bytes::from(json!({ "input_tokens": tokens }).to_string()),
        )
        .await
    }
}
