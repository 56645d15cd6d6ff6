//! gRPC credentials. Admin RPCs and data-plane RPCs each require their own
//! bearer token, so a leaked sidecar credential cannot create agents.

use aex_core::secrets::secrets_match;
use std::sync::Arc;
use tonic::{Request, Status, service::Interceptor};

#[derive(Clone)]
pub struct RequireBearer {
    expected: Arc<str>,
    /// Which credential, for the error message: "admin" or "data-plane".
    kind: &'static str,
    /// Where the credential lives, for the error message.
    file: &'static str,
}

impl RequireBearer {
    pub fn admin(expected: &str) -> Self {
        Self {
            expected: expected.into(),
            kind: "admin",
            file: "admin.token",
        }
    }
    pub fn dataplane(expected: &str) -> Self {
        Self {
            expected: expected.into(),
            kind: "data-plane",
            file: "dataplane.token",
        }
    }
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match presented {
            Some(token) if secrets_match(token.trim(), &self.expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated(format!(
                "the {} credential is wrong; use the one in AEX_HOME/{}",
                self.kind, self.file
            ))),
            None => Err(Status::unauthenticated(format!(
                "this RPC needs the {} credential: send metadata `authorization: Bearer <AEX_HOME/{}>`",
                self.kind, self.file
            ))),
        }
    }
}
