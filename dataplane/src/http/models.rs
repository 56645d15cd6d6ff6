//! `GET /v1/models` and `GET /v1/models/{id}`: the models an agent may use,
//! in OpenAI's shape or, asked with `anthropic-version`, in Anthropic's.
//! A valid token is all they need (the `Models` admission).

use super::errors::GatewayError;
use super::{Gateway, intake};
use aex_proto::v1 as pb;
use http::StatusCode;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

impl Gateway {
    /// The agent a models request is for: its token is all it needs (the
    /// `Models` admission). `Err`: refused, and answered (whether the
    /// connection may be reused).
    async fn models_caller(
        &self,
        session: &mut ServerSession,
        request_id: &str,
    ) -> Result<String, bool> {
        let request = intake::credential(session).admit_request(request_id, pb::Endpoint::Models);
        let refused = match self.control.admit(request).await {
            Err(status) => GatewayError::control_unavailable(&status),
            Ok(r) => match r.outcome {
                Some(pb::admit_response::Outcome::Admitted(a)) => return Ok(a.agent_id),
                Some(pb::admit_response::Outcome::Denied(d)) => GatewayError::denied(d),
                None => return Ok(String::new()),
            },
        };
        Err(Self::respond_error(session, request_id, refused).await)
    }

    /// Anthropic's clients send `anthropic-version` (its API requires it)
    /// and read its shape of a model.
    fn model_object(id: &str, anthropic: bool) -> serde_json::Value {
        if anthropic {
            json!({"type": "model", "id": id, "display_name": id,
                "created_at": "1970-01-01T00:00:00Z"})
        } else {
            json!({"id": id, "object": "model", "created": 0, "owned_by": "aex"})
        }
    }

    pub(super) async fn list_models(&self, session: &mut ServerSession, request_id: &str) -> bool {
        let agent_id = match self.models_caller(session, request_id).await {
            Ok(id) => id,
            Err(keep) => return keep,
        };
        let ids = self.control.cache.models_for(&agent_id);
        let anthropic = session
            .req_header()
            .headers
            .contains_key("anthropic-version");
        let data: Vec<_> = ids
            .iter()
            .map(|id| Self::model_object(id, anthropic))
            .collect();
        let body = if anthropic {
            json!({"data": data, "has_more": false,
                "first_id": ids.first(), "last_id": ids.last()})
        } else {
            json!({"object": "list", "data": data})
        };
        Self::respond(
            session,
            StatusCode::OK,
            "application/json",
            &[("x-aex-request-id", request_id.to_string())],
            body.to_string().into(),
        )
        .await
    }

    /// `GET /v1/models/{id}` (the SDKs' `models.retrieve`): one of the
    /// agent's models, or a 404 for any other.
    pub(super) async fn get_model(
        &self,
        session: &mut ServerSession,
        request_id: &str,
        id: &str,
    ) -> bool {
        let agent_id = match self.models_caller(session, request_id).await {
            Ok(agent) => agent,
            Err(keep) => return keep,
        };
        if !self
            .control
            .cache
            .models_for(&agent_id)
            .iter()
            .any(|m| m == id)
        {
            return Self::respond_error(session, request_id, GatewayError::model_not_found(id))
                .await;
        }
        let anthropic = session
            .req_header()
            .headers
            .contains_key("anthropic-version");
        Self::respond(
            session,
            StatusCode::OK,
            "application/json",
            &[("x-aex-request-id", request_id.to_string())],
            Self::model_object(id, anthropic).to_string().into(),
        )
        .await
    }
}
