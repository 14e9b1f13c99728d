//! Operator-facing: the admin gRPC services, management-token auth and authorization,
//! the audit trail, protobuf <-> domain.

pub mod access;
pub mod audit;
pub mod auth;
mod convert;
mod error;
pub mod gateways;
pub mod keys;
pub mod pricing;

use std::future::Future;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};
use uuid::Uuid;

use crate::domain::access::{Action, AuditEvent, Principal};
use crate::state::Shared;
use crate::store::DynStore;

pub use access::AccessApi;
pub use audit::AuditApi;
pub use auth::{AdminAuth, Caller};
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
    /// Unauthenticated calls audited this minute: (minute, recorded, skipped).
    unauthenticated: Mutex<(i64, u32, u32)>,
}

/// At most this many unauthenticated calls a minute are audited one by one; the rest are
/// counted into the next one recorded, so a flood cannot fill the trail.
pub const UNAUTHENTICATED_AUDIT_PER_MINUTE: u32 = 60;

impl Admin {
    pub fn new(shared: Arc<Shared>, store: DynStore) -> Arc<Self> {
        Arc::new(Admin { shared, store, writes: tokio::sync::Mutex::new(()), unauthenticated: Mutex::new((0, 0, 0)) })
    }

    /// Whether to record this unauthenticated call, and how many went unrecorded before it.
    fn admit_unauthenticated(&self) -> Option<u32> {
        let minute = self.shared.clock.now().timestamp().div_euclid(60);
        let mut u = self.unauthenticated.lock().ok()?;
        if u.0 != minute {
            let skipped = u.2;
            *u = (minute, 1, 0);
            return Some(skipped);
        }
        if u.1 < UNAUTHENTICATED_AUDIT_PER_MINUTE {
            u.1 += 1;
            Some(0)
        } else {
            u.2 += 1;
            None
        }
    }
}

/// Whether a call changes state: mutations are always audited and run detached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Mutation,
}

/// One admin call: who makes it and what it concerns, for authorization and the audit trail.
pub struct Call {
    pub who: Principal,
    action: &'static str,
    gateway: Mutex<Option<String>>,
    target: Mutex<String>,
}

impl Call {
    /// Authorizes `action` (on `gateway`, when the call names one), noting the gateway.
    fn check(&self, action: Action, gateway: Option<&str>) -> AdminResult<()> {
        if let Some(g) = gateway {
            self.gateway(g);
        }
        Ok(self.who.authorize(action, gateway)?)
    }

    /// Authorizes an action that spans every gateway.
    fn check_global(&self, action: Action) -> AdminResult<()> {
        Ok(self.who.authorize_global(action)?)
    }

    pub(crate) fn gateway(&self, name: &str) {
        if let Ok(mut g) = self.gateway.lock() {
            *g = Some(name.to_string());
        }
    }

    fn target(&self, t: impl Into<String>) {
        if let Ok(mut target) = self.target.lock() {
            *target = t.into();
        }
    }
}

impl Admin {
    /// Starts a call: the caller the interceptor authenticated, or `UNAUTHENTICATED`
    /// (recorded in the audit trail).
    async fn begin<T>(&self, request: &Request<T>, action: &'static str) -> Result<Arc<Call>, Status> {
        match request.extensions().get::<Caller>() {
            Some(Caller::Token(who)) => Ok(Arc::new(Call {
                who: who.clone(),
                action,
                gateway: Mutex::new(None),
                target: Mutex::new(String::new()),
            })),
            _ => {
                match self.admit_unauthenticated() {
                    Some(0) => {
                        self.record(None, action, None, String::new(), "UNAUTHENTICATED: Unauthorized".into()).await
                    }
                    Some(n) => {
                        let result = format!(
                            "UNAUTHENTICATED: Unauthorized (and {n} more the minute before, not recorded one by one)"
                        );
                        self.record(None, action, None, String::new(), result).await
                    }
                    None => tracing::debug!(action, "unauthenticated admin call (audit rate-limited)"),
                }
                Err(Status::unauthenticated("Unauthorized"))
            }
        }
    }

    /// Runs a call. Mutations run detached and are always audited; reads only when refused.
    async fn finish<T: Send + 'static>(
        self: &Arc<Self>,
        call: Arc<Call>,
        kind: Kind,
        run: impl Future<Output = AdminResult<T>> + Send + 'static,
    ) -> Result<T, Status> {
        let admin = Arc::clone(self);
        let audited = async move {
            let result = run.await;
            let refused = matches!(result, Err(AdminError::PermissionDenied(_)));
            if kind == Kind::Mutation || refused {
                let outcome = match &result {
                    Ok(_) => "OK".to_string(),
                    Err(e) => {
                        let (code, message) = e.status_parts();
                        format!("{}: {message}", code_name(code))
                    }
                };
                let gateway = call.gateway.lock().ok().and_then(|g| g.clone());
                let target = call.target.lock().map(|t| t.clone()).unwrap_or_default();
                admin.record(Some(&call.who), call.action, gateway, target, outcome).await;
            }
            result
        };
        let result = match kind {
            Kind::Mutation => detached(audited).await,
            Kind::Read => audited.await,
        };
        result.map_err(Status::from)
    }

    async fn record(
        &self,
        who: Option<&Principal>,
        action: &'static str,
        gateway: Option<String>,
        target: String,
        result: String,
    ) {
        let event = AuditEvent {
            id: Uuid::now_v7(),
            at: self.shared.clock.now(),
            token_id: who.and_then(|w| w.token_id),
            token_name: who.map(|w| w.name.clone()).unwrap_or_default(),
            action: action.to_string(),
            gateway,
            target,
            result,
        };
        tracing::info!(token = %event.token_name, action, target = %event.target, result = %event.result, "admin call");
        if let Err(e) = self.store.insert_audit(&event).await {
            tracing::error!(error = %e, action, "could not write the audit event");
        }
    }
}

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// `page_size`: 0 means the default; more than the maximum is refused.
fn page_size(n: u32) -> Result<u32, crate::domain::FieldError> {
    match n {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n > MAX_PAGE_SIZE => {
            Err(crate::domain::FieldError::new("page_size", format!("must be at most {MAX_PAGE_SIZE}")))
        }
        n => Ok(n),
    }
}

/// `page_token`: the id of the last item of the previous page.
fn page_after(token: &str) -> Result<Option<String>, crate::domain::FieldError> {
    if token.is_empty() { Ok(None) } else { Ok(Some(keys::parse_id("page_token", token)?.to_string())) }
}

/// `PERMISSION_DENIED` for `Code::PermissionDenied`.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Runs an admin mutation to completion even if the caller goes away. tonic drops a
/// handler's future when the client cancels; a commit without its view update would
/// leave Check enforcing stale state (a disabled key still admitted), so the commit and
/// the view update run in their own task.
async fn detached<T: Send + 'static>(run: impl Future<Output = AdminResult<T>> + Send + 'static) -> AdminResult<T> {
    use tracing::Instrument;
    tokio::spawn(run.instrument(tracing::Span::current()))
        .await
        .map_err(|e| AdminError::Internal(format!("admin task failed: {e}")))?
}
