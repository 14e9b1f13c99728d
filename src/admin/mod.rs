//! Operator-facing: the admin gRPC services, management-token auth, protobuf <-> domain.

pub mod auth;
mod convert;
mod error;
pub mod gateways;
pub mod keys;
pub mod pricing;

use std::sync::Arc;

use tonic::Request;

use crate::state::Shared;
use crate::store::DynStore;

pub use auth::{AdminAuth, Principal};
pub use error::{AdminError, AdminResult};
pub use gateways::GatewayApi;
pub use keys::KeyApi;
pub use pricing::PricingApi;

/// What every admin service works with.
pub struct Admin {
    shared: Arc<Shared>,
    store: DynStore,
    /// Admin writes are serialised so that the order of commits and of view updates agree.
    writes: tokio::sync::Mutex<()>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>, store: DynStore) -> Arc<Self> {
        Arc::new(Admin { shared, store, writes: tokio::sync::Mutex::new(()) })
    }
}

/// Runs an admin mutation to completion even if the caller goes away. tonic drops a
/// handler's future when the client cancels; a commit without its view update would
/// leave Check enforcing stale state (a disabled key still admitted), so the commit and
/// the view update run in their own task.
async fn detached<T: Send + 'static>(
    run: impl std::future::Future<Output = AdminResult<T>> + Send + 'static,
) -> AdminResult<T> {
    use tracing::Instrument;
    tokio::spawn(run.instrument(tracing::Span::current()))
        .await
        .map_err(|e| AdminError::Internal(format!("admin task failed: {e}")))?
}

/// The caller the auth interceptor identified.
fn principal<T>(request: &Request<T>) -> AdminResult<Principal> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| AdminError::Internal("admin call reached a handler without authentication".into()))
}
