//! gRPC credentials. Admin RPCs and data-plane RPCs each require their own
//! bearer token, so a leaked sidecar credential cannot create agents; a
//! data-plane RPC carries the agents its credential serves
//! ([`crate::credentials::Caller`]) to the handler, which checks them.

use crate::credentials::{Caller, CredentialBook, Refused};
use aex_core::secrets::secrets_match;
use std::sync::Arc;
use tonic::{Request, Status, service::Interceptor};

#[derive(Clone)]
pub struct RequireBearer {
    expected: Arc<str>,
    /// Which credential, for the error message.
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
}

/// The bearer token of a request, if it has one.
fn presented<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
}

impl Interceptor for RequireBearer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match presented(&request) {
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

/// The data plane's RPCs: the fleet credential, or a scoped one from the
/// book; the handler finds the [`Caller`] in the request's extensions.
#[derive(Clone)]
pub struct RequireDataPlane {
    book: Arc<CredentialBook>,
}

impl RequireDataPlane {
    pub fn new(book: Arc<CredentialBook>) -> Self {
        Self { book }
    }
}

impl Interceptor for RequireDataPlane {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = presented(&request).map(str::trim).unwrap_or("");
        match self.book.resolve(token) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(Refused::Unknown) => Err(Status::unauthenticated(
                "the data-plane credential is wrong or revoked; use AEX_HOME/dataplane.token, or a \
                 credential from `aexctl dataplane credential create` that is not revoked",
            )),
            Err(Refused::Missing) => Err(Status::unauthenticated(
                "this RPC needs a data-plane credential: send metadata `authorization: Bearer \
                 <AEX_HOME/dataplane.token>` (or a scoped credential)",
            )),
        }
    }
}

/// The data plane behind a request. Every data-plane RPC passes
/// [`RequireDataPlane`], which puts it there; a request without one (a
/// handler called some other way) serves no agent at all.
pub fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(Caller::nobody)
}
