//! Operator-facing: the admin gRPC services, management-token auth, protobuf <-> domain.

pub mod auth;
mod convert;
mod error;
pub mod gateways;
pub mod keys;

use std::sync::Arc;

use tonic::Request;

use crate::state::Shared;
use crate::store::DynStore;

pub use auth::{AdminAuth, Principal};
pub use error::{AdminError, AdminResult};
pub use gateways::GatewayApi;
pub use keys::KeyApi;

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

/// The caller the auth interceptor identified.
fn principal<T>(request: &Request<T>) -> AdminResult<Principal> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| AdminError::Internal("admin call reached a handler without authentication".into()))
}
