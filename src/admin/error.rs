//! Admin errors and their one mapping to gRPC statuses.

use tonic::Status;

use crate::domain::FieldError;
use crate::state::ViewPoisoned;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("storage is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => AdminError::NotFound("object"),
            StoreError::AlreadyExists(what) => AdminError::AlreadyExists(what),
            StoreError::GatewayHasKeys(n) => AdminError::FailedPrecondition(format!(
                "the gateway still has {n} keys: delete them first or set force"
            )),
            StoreError::Unavailable(_) | StoreError::Corrupt(_) => AdminError::Unavailable(e),
        }
    }
}

impl From<ViewPoisoned> for AdminError {
    fn from(e: ViewPoisoned) -> Self {
        AdminError::Internal(e.to_string())
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        // Client messages are fixed or built from validated input; causes go to the log.
        match e {
            AdminError::Invalid(f) => Status::invalid_argument(f.to_string()),
            AdminError::NotFound(what) => Status::not_found(format!("{what} not found")),
            AdminError::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
            AdminError::FailedPrecondition(m) => Status::failed_precondition(m),
            AdminError::Unavailable(cause) => {
                tracing::error!(error = %cause, "admin call failed: storage unavailable");
                Status::unavailable("storage is unavailable, try again")
            }
            AdminError::Internal(cause) => {
                tracing::error!(error = %cause, "admin call failed");
                Status::internal("internal error")
            }
        }
    }
}

pub type AdminResult<T> = Result<T, AdminError>;

/// Maps a storage error for an operation on one `what` (e.g. "gateway").
pub fn store_err(what: &'static str) -> impl FnOnce(StoreError) -> AdminError {
    move |e| match e {
        StoreError::NotFound => AdminError::NotFound(what),
        other => other.into(),
    }
}
