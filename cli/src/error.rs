//! The CLI's one error type. Every message names the cause and the fix;
//! `exit_code` gives 1 for failures and 2 for usage errors.

use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line itself is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Anything else that went wrong (exit 1).
    #[error("{0}")]
    Failed(String),
    /// Not an error: exit with this status (a supervised child's).
    #[error("exit status {0}")]
    Exit(u8),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
            CliError::Exit(code) => *code,
        }
    }

    /// Turns a gRPC status into a message with a next step.
    pub fn from_status(status: tonic::Status, control: &str) -> Self {
        let message = status.message();
        CliError::Failed(match status.code() {
            Code::Unavailable => format!(
                "cannot reach the AEX control plane at {control} ({message}).\n\
                 Start it with `aex-control` (or pass --control / set AEX_CONTROL_ADDR if it runs elsewhere)."
            ),
            Code::Unauthenticated => format!(
                "the control plane at {control} refused the admin credential: {message}.\n\
                 Make sure aexctl and aex-control use the same AEX_HOME."
            ),
            Code::NotFound => {
                format!("{message}. See `aexctl agent list` for the agents that exist.")
            }
            Code::AlreadyExists => {
                format!("{message}. Pick another name, or delete the existing agent first.")
            }
            Code::DeadlineExceeded => {
                format!("the control plane at {control} did not answer in time ({message})")
            }
            _ => message.to_string(),
        })
    }
}

impl From<aex_core::home::HomeError> for CliError {
    fn from(e: aex_core::home::HomeError) -> Self {
        CliError::Failed(e.to_string())
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
