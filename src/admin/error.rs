//! Admin errors and their one mapping to gRPC statuses.

use tonic::Status;

use crate::domain::FieldError;
use crate::domain::access::Refusal;
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
    #[error("{}", .0.message())]
    PermissionDenied(Refusal),
    /// A quota or rate: the message says which and when to retry.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("storage is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for AdminError {
    /// The caller's mistakes keep their own codes; a transient failure is `UNAVAILABLE`
    /// (retry), a permanent one (damaged data, a bad configuration) `INTERNAL`.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => AdminError::NotFound("object"),
            StoreError::AlreadyExists(what) => AdminError::AlreadyExists(what),
            StoreError::GatewayHasKeys(n) => AdminError::FailedPrecondition(format!(
                "the gateway still has {n} keys: delete them first or set force"
            )),
            StoreError::Unsupported(why) => AdminError::FailedPrecondition(why),
            e if e.is_transient() => AdminError::Unavailable(e),
            e => AdminError::Internal(e.to_string()),
        }
    }
}

impl From<ViewPoisoned> for AdminError {
    fn from(e: ViewPoisoned) -> Self {
        AdminError::Internal(e.to_string())
    }
}

impl From<Refusal> for AdminError {
    fn from(r: Refusal) -> Self {
        AdminError::PermissionDenied(r)
    }
}

impl AdminError {
    /// The gRPC code and the client message. Client messages are fixed or built from
    /// validated input; causes go to the log.
    pub fn status_parts(&self) -> (tonic::Code, String) {
        use tonic::Code;
        match self {
            AdminError::Invalid(f) => (Code::InvalidArgument, f.to_string()),
            AdminError::NotFound(what) => (Code::NotFound, format!("{what} not found")),
            AdminError::AlreadyExists(what) => (Code::AlreadyExists, format!("{what} already exists")),
            AdminError::FailedPrecondition(m) => (Code::FailedPrecondition, m.clone()),
            AdminError::PermissionDenied(r) => (Code::PermissionDenied, r.message().to_string()),
            AdminError::ResourceExhausted(m) => (Code::ResourceExhausted, m.clone()),
            AdminError::Unavailable(_) => (Code::Unavailable, "storage is unavailable, try again".into()),
            AdminError::Internal(_) => (Code::Internal, "internal error".into()),
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        match &e {
            AdminError::Unavailable(cause) => tracing::error!(error = %cause, "admin call failed: storage unavailable"),
            AdminError::Internal(cause) => tracing::error!(error = %cause, "admin call failed"),
            _ => {}
        }
        let (code, message) = e.status_parts();
        Status::new(code, message)
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
