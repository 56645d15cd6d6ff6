//! The provider's answer back to the client: buffered (read whole within
//! the response limit, metered from the body) or streamed (SSE metered as
//! it passes and cut off at the reservation), with the provider's headers
//! minus the hop-by-hop ones and AEX's own added.

use super::errors::GatewayError;
use super::intake::forwardable_headers;
use super::settle::Finished;
use super::upstream::{Upstream, UpstreamFailure, response_head, retry_after_ms};
use super::{Call, Gateway};
use crate::alias::Rename;
use crate::api::Api;
use crate::control::Route;
use crate::metering::cut_off_bytes;
use crate::sse::{SseMeter, output_text_bytes, usage_of};
use crate::translate::{self, Translated, Untranslated};
use aex_core::reservation::Outcome;
use bytes::Bytes;
use http::StatusCode;
use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;
use serde_json::json;
use std::time::Instant;

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
    // The body is relayed as AEX read it: identity.
    "content-encoding",
];

/// The head the client gets for a provider's response.
pub(super) fn relayed_head(upstream: &ResponseHeader, request_id: &str) -> ResponseHeader {
    let mut h = response_head(upstream.status, upstream.headers.len() + 2);
    for (name, value) in upstream.headers.iter() {
        // The provider's CORS answers are about its own pages; AEX's are
        // its own (`cors.rs`), and never reflect an unlisted origin.
        if !NOT_RELAYED.contains(&name.as_str()) && !name.as_str().starts_with("access-control-") {
            let _ = h.append_header(name.clone(), value.clone());
        }
    }
    let _ = h.insert_header("x-aex-request-id", request_id);
    h
}

/// The clean end of a stream AEX stopped at its output cap: what the API
/// itself sends at its output limit. A Messages stream's open content
/// block is closed first, and its message ends with `max_tokens` and the
/// output it was allowed (`output_tokens`).
fn cut_off_event(api: Api, open_block: Option<u64>, output_tokens: u64) -> String {
    match api {
        Api::Messages | Api::CountTokens => {
            let mut events = String::new();
            if let Some(index) = open_block {
                events += &format!(
                    "event: content_block_stop\ndata: {}\n\n",
                    json!({"type": "content_block_stop", "index": index})
                );
            }
            events += &format!(
                "event: message_delta\ndata: {}\n\nevent: message_stop\ndata: {}\n\n",
                json!({"type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
                    "usage": {"output_tokens": output_tokens}}),
                json!({"type": "message_stop"})
            );
            events
        }
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

/// How a call goes to its provider: in the client's API, or translated
/// into the other.
struct Wire {
    /// The API the provider is spoken to in.
    api: Api,
    translated: bool,
    untranslated: Untranslated,
}

impl Wire {
    /// The rename of the provider's model id to the one the client asked
    /// for (`alias.rs`): a translated answer is written with it already.
    fn rename(&self, call: &Call<'_>) -> Option<Rename> {
        if self.translated {
            return None;
        }
        Rename::new(&call.admission.provider_model, call.inspected.model())
    }

    /// Names the request's hints the translation did not carry.
    fn name_untranslated(&self, head: &mut ResponseHeader) {
        if !self.untranslated.is_empty() {
            let _ = head.insert_header("x-aex-untranslated", self.untranslated.names().join(", "));
        }
    }
}

/// Which model of its provider answered: the id the answer's `model` said
/// before AEX named it as the client asked.
fn name_provider_model(head: &mut ResponseHeader, call: &Call<'_>) {
    let model = &call.admission.provider_model;
    if !model.is_empty() {
        let _ = head.insert_header("x-aex-provider-model", model.as_str());
    }
}

fn outcome_of(failure: &UpstreamFailure) -> Outcome {
    if failure.is_timeout() {
        Outcome::UpstreamTimeout
    } else {
        Outcome::UpstreamError
    }
}

impl Gateway {
    /// Sends the request upstream and the response back. Returns whether the
    /// client connection may be reused, and how the call ended.
    /// `translated`: the request as translated before admission, when the
    /// model's provider speaks the other API.
    pub(super) async fn forward(
        &self,
        session: &mut ServerSession,
        call: &Call<'_>,
        translated: Option<Translated>,
    ) -> (bool, Finished) {
        let mut finished = Finished::new();
        let provider = &call.admission.provider;
        let Some(route) = self.control.cache.route(provider) else {
            finished.outcome = Outcome::UpstreamError;
            let e = GatewayError::no_route(provider);
            return (
                Self::respond_error(session, call.request_id, e).await,
                finished,
            );
        };
        let client_api = call.inspected.api();
        let translated = match (&route, translated) {
            (Route::Http { family, .. }, t) if *family != client_api.family() => match t {
                Some(t) => Ok(Some(t)),
                // The models changed between the request's reading and now.
                None => translate::upstream_request(client_api, call.inspected.body()).map(Some),
            },
            _ => Ok(None),
        };
        let (model, cap) = (
            &call.admission.provider_model,
            call.admission.output_tokens_cap,
        );
        let (wire, body) = match translated {
            Ok(Some(mut t)) => {
                let body = t.upstream_body(model, cap);
                (
                    Wire {
                        api: t.api,
                        translated: true,
                        untranslated: t.untranslated,
                    },
                    body,
                )
            }
            Ok(None) => (
                Wire {
                    api: client_api,
                    translated: false,
                    untranslated: Untranslated::default(),
                },
                call.inspected.upstream_body(model, cap),
            ),
            Err(u) => {
                // Nothing was sent: nothing generated, nothing billed.
                finished.outcome = Outcome::UpstreamRejected;
                let e = GatewayError::untranslatable(u);
                return (
                    Self::respond_error(session, call.request_id, e).await,
                    finished,
                );
            }
        };
        let client_headers = forwardable_headers(session, &route);
        finished.upstream_started = Some(Instant::now());
        let opened = tokio::select! {
            r = self.open_upstream(&route, call, wire.api, body, &client_headers) => Some(r),
            _ = session.read_body_or_idle(true) => None,
        };
        let (mut upstream, header) = match opened {
            None => {
                finished.outcome = Outcome::ClientDisconnected;
                return (false, finished);
            }
            Some(Err(failure)) => {
                finished.outcome = outcome_of(&failure);
                let e = GatewayError::upstream_unreachable(&failure, provider);
                return (
                    Self::respond_error(session, call.request_id, e).await,
                    finished,
                );
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
                .stream(session, &mut upstream, &header, call, &wire, &mut finished)
                .await;
            finished.upstream_done();
            let complete = finished.outcome == Outcome::Completed;
            self.release(upstream, complete).await;
            return (keep, finished);
        }
        let keep = self
            .buffered(session, upstream, header, call, &wire, &mut finished)
            .await;
        (keep, finished)
    }

    async fn buffered(
        &self,
        session: &mut ServerSession,
        mut upstream: Upstream,
        header: ResponseHeader,
        call: &Call<'_>,
        wire: &Wire,
        finished: &mut Finished,
    ) -> bool {
        let provider = &call.admission.provider;
        let mut body = Vec::new();
        let complete = loop {
            let next = tokio::select! {
                r = Self::read_chunk(&mut upstream, self.limits.idle_timeout) => r,
                _ = session.read_body_or_idle(true) => {
                    finished.outcome = Outcome::ClientDisconnected;
                    self.release(upstream, false).await;
                    return false;
                }
            };
            match next {
                Ok(Some(chunk)) if body.len() + chunk.len() > self.limits.max_response_bytes => {
                    // The provider generated (and may bill) what it sent:
                    // settle it as delivered output, capped by the reservation.
                    finished.outcome = Outcome::UpstreamError;
                    finished.output_bytes = (body.len() + chunk.len()) as u64;
                    self.release(upstream, false).await;
                    let e =
                        GatewayError::response_too_large(provider, self.limits.max_response_bytes);
                    return Self::respond_error(session, call.request_id, e).await;
                }
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break true,
                Err(failure) => {
                    finished.outcome = outcome_of(&failure);
                    self.release(upstream, false).await;
                    let e = GatewayError::upstream_failed_answering(&failure, provider);
                    return Self::respond_error(session, call.request_id, e).await;
                }
            }
        };
        finished.upstream_done();
        self.release(upstream, complete).await;
        let status = header.status.as_u16();
        let mut head = relayed_head(&header, call.request_id);
        wire.name_untranslated(&mut head);
        name_provider_model(&mut head, call);
        if header.status.is_success() {
            // Metered in the provider's API, whatever the client's.
            let api = wire.api;
            let parsed = serde_json::from_slice::<serde_json::Value>(&body).ok();
            finished.usage = parsed.as_ref().and_then(|v| usage_of(api, v));
            // The generated text, which usage must account for; a body that
            // is not JSON counts whole.
            finished.output_bytes = parsed
                .as_ref()
                .map_or(body.len() as u64, |v| output_text_bytes(api, v));
            // Bounded like a stream: text past the cut-off means the
            // provider ignored the cap; the client does not get it.
            let cap = call.output_cap_total();
            if api != Api::Embeddings && finished.output_bytes > cut_off_bytes(cap) {
                finished.outcome = Outcome::CutOff;
                let e = GatewayError::upstream_ignored_cap(provider, cap);
                return Self::respond_error(session, call.request_id, e).await;
            }
            if wire.translated {
                let answer = parsed
                    .as_ref()
                    .ok_or_else(|| "its answer is not JSON".to_string())
                    .and_then(|v| {
                        translate::response(call.inspected.api(), v, call.inspected.model())
                    });
                match answer {
                    Ok(answer) => body = answer.to_string().into_bytes(),
                    Err(why) => {
                        // Generated and billed, but not deliverable.
                        finished.outcome = Outcome::UpstreamError;
                        let e = GatewayError::untranslatable_answer(provider, &why);
                        return Self::respond_error(session, call.request_id, e).await;
                    }
                }
            }
            if let Some(renamed) = wire.rename(call).and_then(|r| r.apply(&body)) {
                body = renamed;
            }
            let cost = finished.account(call).charge.charged_micro;
            let _ = head.insert_header("x-aex-cost-micro", cost.to_string());
            let remaining = call.admission.remaining_micro + call.admission.reserved_micro - cost;
            let _ = head.insert_header("x-aex-remaining-micro", remaining.to_string());
        } else {
            finished.upstream_retry_after_ms = retry_after_ms(&header);
            finished.outcome = match status {
                429 => Outcome::UpstreamRateLimited,
                500.. => Outcome::UpstreamError,
                // The provider refused the request: nothing generated, nothing billed.
                _ => Outcome::UpstreamRejected,
            };
            if status == 429 {
                // The provider's limit, not AEX's: say so, keep its Retry-After.
                let _ = head.insert_header("x-aex-denied-by", "upstream");
            }
            if matches!(status, 401 | 403) {
                tracing::warn!(provider = %provider, status, "provider refused AEX's key");
                let e = GatewayError::provider_key_refused(provider, status);
                return Self::respond_error(session, call.request_id, e).await;
            }
            if wire.translated {
                // The provider's error, in the shape of the client's API.
                body = translate::error(call.inspected.api(), status, &body);
                let _ = head.insert_header("content-type", "application/json");
            }
        }
        let _ = head.insert_header("content-length", body.len().to_string());
        super::cors::decorate(session, &mut head);
        let ok = session.write_response_header(Box::new(head)).await.is_ok()
            && session
                .write_response_body(Bytes::from(body), true)
                .await
                .is_ok();
        if !ok {
            finished.outcome = Outcome::ClientDisconnected;
        }
        ok
    }

    async fn stream(
        &self,
        session: &mut ServerSession,
        upstream: &mut Upstream,
        header: &ResponseHeader,
        call: &Call<'_>,
        wire: &Wire,
        finished: &mut Finished,
    ) -> bool {
        let api = call.inspected.api();
        let mut head = relayed_head(header, call.request_id);
        wire.name_untranslated(&mut head);
        name_provider_model(&mut head, call);
        let _ = head.insert_header(
            "x-aex-remaining-micro",
            call.admission.remaining_micro.to_string(),
        );
        let _ = head.insert_header("cache-control", "no-cache");
        // Chunked, so the connection outlives the stream: without it pingora
        // delimits the body by closing (while saying keep-alive), and every
        // request pipelined or sent after a stream was lost. HTTP/1.0
        // clients get the close-delimited body they expect.
        if session.req_header().version == http::Version::HTTP_11 {
            let _ = head.insert_header("transfer-encoding", "chunked");
        }
        super::cors::decorate(session, &mut head);
        if session.write_response_header(Box::new(head)).await.is_err() {
            finished.outcome = Outcome::ClientDisconnected;
            return false;
        }
        let cap = call.output_cap_total();
        // Metered in the provider's API; a translated stream's usage chunk
        // is the translator's to read (it re-encodes every event).
        let strip = !call.inspected.client_wants_usage() && !wire.translated;
        let mut meter = SseMeter::new(wire.api, strip)
            .cut_off_at(cut_off_bytes(cap))
            .renaming(wire.rename(call));
        let mut translator = wire
            .translated
            .then(|| {
                translate::Stream::new(
                    api,
                    call.inspected.model(),
                    call.inspected.client_wants_usage(),
                )
            })
            .flatten();
        let mut out = Vec::new();
        loop {
            let next = tokio::select! {
                r = Self::read_chunk(upstream, self.limits.idle_timeout) => r,
                _ = session.read_body_or_idle(true) => {
                    finished.outcome = Outcome::ClientDisconnected;
                    break;
                }
            };
            let ended = match next {
                Ok(Some(chunk)) => {
                    meter.feed(&chunk, &mut out);
                    false
                }
                Ok(None) => {
                    meter.finish(&mut out);
                    true
                }
                Err(failure) => {
                    finished.outcome = outcome_of(&failure);
                    // Best effort: the provider's failure is the outcome.
                    let event = GatewayError::upstream_failed_mid_stream().sse_event(api);
                    let _ = session.write_response_body(Bytes::from(event), false).await;
                    break;
                }
            };
            if let Some(t) = translator.as_mut() {
                let upstream_events = std::mem::take(&mut out);
                t.feed(&upstream_events, &mut out);
                if ended {
                    t.finish(false, &mut out);
                }
            }
            // The buffer is handed over whole: no copy per chunk.
            if !out.is_empty()
                && session
                    .write_response_body(Bytes::from(std::mem::take(&mut out)), false)
                    .await
                    .is_err()
            {
                finished.outcome = Outcome::ClientDisconnected;
                break;
            }
            if ended {
                break;
            }
            // A provider that ignores the output cap is cut off once its text
            // is far past it, so spent never passes budget. Tokens average
            // about 4 bytes; the margin (12 bytes a token) keeps an honest
            // provider with long tokens from ever being cut. Counted from
            // what was streamed, whatever usage the provider claims so far.
            if meter.output_bytes() > cut_off_bytes(cap) {
                finished.outcome = Outcome::CutOff;
                let end = match translator.as_mut() {
                    Some(t) => {
                        let mut end = Vec::new();
                        t.finish(true, &mut end);
                        end
                    }
                    None => cut_off_event(api, meter.open_block(), cap).into_bytes(),
                };
                let _ = session.write_response_body(Bytes::from(end), false).await;
                break;
            }
        }
        finished.usage = meter.usage();
        finished.output_bytes = meter.output_bytes();
        if finished.outcome == Outcome::ClientDisconnected {
            return false;
        }
        session
            .write_response_body(Bytes::new(), true)
            .await
            .is_ok()
            && finished.outcome == Outcome::Completed
    }
}
