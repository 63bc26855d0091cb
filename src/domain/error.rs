//! One error type for everything a command or handler can refuse, with the exit codes
//! of docs/commands.md: 2 bad input, 3 refused, 1 anything else.

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Usage, unknown template, bad param, unknown id: the caller should fix the input.
    #[error("{0}")]
    BadInput(String),
    /// Gated, not allowed, wrong state: the input was fine, the answer is no.
    #[error("{0}")]
    Refused(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// An `OpsError` that travelled through `anyhow` (the daemons' start-up) keeps its
/// kind, and so its exit code.
impl From<anyhow::Error> for OpsError {
    fn from(err: anyhow::Error) -> Self {
        match err.downcast::<OpsError>() {
            Ok(ops) => ops,
            Err(other) => OpsError::Other(other),
        }
    }
}

impl OpsError {
    pub fn bad_input(msg: impl fmt::Display) -> Self {
        OpsError::BadInput(msg.to_string())
    }

    pub fn refused(msg: impl fmt::Display) -> Self {
        OpsError::Refused(msg.to_string())
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            OpsError::BadInput(_) => 2,
            OpsError::Refused(_) => 3,
            OpsError::Db(_) | OpsError::Other(_) => 1,
        }
    }
}

pub type OpsResult<T> = Result<T, OpsError>;
