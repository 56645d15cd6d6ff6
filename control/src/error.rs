//! The control plane's one error type, mapped once to a gRPC status.

use crate::storage::StoreError;
use aex_core::config::ConfigError;
use aex_core::home::HomeError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("{0}")]
    InvalidArgument(String),
    /// A name already taken (other than an agent's).
    #[error("{0}")]
    AlreadyExists(String),
    /// Something named that does not exist (other than an agent).
    #[error("{0}")]
    NotFound(String),
    /// A scoped data-plane credential acting for an agent it does not serve.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bug (a worker that panicked), never a caller's mistake.
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::Store(StoreError::AgentNotFound(_)) => Code::NotFound,
            Error::Store(StoreError::DuplicateName(_)) => Code::AlreadyExists,
            Error::Store(StoreError::Invalid(_)) => Code::FailedPrecondition,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(_) | Error::Home(_) | Error::Internal(_) => Code::Internal,
            Error::Config(_) | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
        };
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
