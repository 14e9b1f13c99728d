//! Operator-facing: the admin gRPC services, management-token auth and authorization,
//! the audit trail, protobuf <-> domain.

pub mod access;
pub mod audit;
pub mod auth;
pub mod bootstrap;
mod convert;
mod error;
pub mod gateways;
pub mod keys;
pub mod pricing;
pub mod usage;

use std::future::Future;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};
use uuid::Uuid;

use crate::domain::access::{Action, AuditAdmission, AuditEvent, AuditRateLimit, Principal, Rate, WriteRate};
use crate::domain::gateway::validate_gateway_name;
use crate::state::Shared;
use crate::store::DynStore;

pub use access::AccessApi;
pub use audit::AuditApi;
pub use auth::{AdminAuth, Caller};
pub use error::{AdminError, AdminResult};
pub use gateways::GatewayApi;
pub use keys::KeyApi;
pub use pricing::PricingApi;
pub use usage::UsageApi;

/// What every admin service works with.
pub struct Admin {
    shared: Arc<Shared>,
    store: DynStore,
    /// Refused calls recorded per source and minute.
    refusals: Mutex<AuditRateLimit<Source>>,
    /// Writes per token.
    writes_per_token: Mutex<WriteRate>,
    limits: AdminLimits,
}

/// What the admin API lets one token do, so that no token can grow the state or the audit
/// trail without bound.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Writes per token: a burst, then a steady rate (`--admin-write-burst`,
    /// `--admin-writes-per-second`).
    pub writes: Rate,
    /// Keys one gateway may have (`--max-keys-per-gateway`).
    pub max_keys_per_gateway: usize,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            writes: Rate { burst: 1000, interval: chrono::Duration::milliseconds(10) },
            max_keys_per_gateway: 1_000_000,
        }
    }
}

/// Tokens the write rate tracks at most (tokens are far fewer).
const WRITE_RATE_TOKENS_MAX: usize = 10_000;

/// Who a refused call is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    /// Every call without a valid token, together.
    Unauthenticated,
    /// One token (`None`: the `--dev` token).
    Token(Option<Uuid>),
}

/// At most this many refused calls a minute per token (and as many unauthenticated ones)
/// are audited one by one; the rest are counted into the next one recorded, so a flood
/// cannot fill the trail.
pub const REFUSED_AUDIT_PER_MINUTE: u32 = 60;
/// Sources the refusal counter tracks at most (tokens are far fewer).
const REFUSAL_SOURCES_MAX: usize = 10_000;

/// The largest admin request accepted (tonic's default is 4 MiB): ample for the largest
/// legitimate call (a token scoped to thousands of gateways), small enough that no call
/// costs much memory.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

impl Admin {
    pub fn new(shared: Arc<Shared>, store: DynStore, limits: AdminLimits) -> Arc<Self> {
        Arc::new(Admin {
            shared,
            store,
            refusals: Mutex::new(AuditRateLimit::new(REFUSED_AUDIT_PER_MINUTE, REFUSAL_SOURCES_MAX)),
            writes_per_token: Mutex::new(WriteRate::new(limits.writes, WRITE_RATE_TOKENS_MAX)),
            limits,
        })
    }

    /// Takes one write of `who`'s allowance, or refuses with when to retry.
    fn admit_write(&self, who: &Principal) -> AdminResult<()> {
        let now = self.shared.clock.monotonic();
        let mut rate = self.writes_per_token.lock().map_err(|_| AdminError::Internal("write rate poisoned".into()))?;
        rate.admit(who.token_id, now).map_err(|retry| {
            let Rate { burst, interval } = rate.rate();
            let per_second = 1_000_000 / interval.num_microseconds().unwrap_or(1_000_000).max(1);
            AdminError::ResourceExhausted(format!(
                "too many changes from this token (at most {burst} at once, then {per_second} a second): retry in {retry} s"
            ))
        })
    }

    /// Whether to record a refused call of `source`.
    fn admit_refusal(&self, source: Source) -> AuditAdmission {
        let now = self.shared.clock.now();
        self.refusals.lock().map_or(AuditAdmission::Skip, |mut r| r.admit(source, now))
    }
}

/// Whether a call changes state: mutations are always audited and run detached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Mutation,
}

/// One admin call: who makes it and what it concerns. The handler owns it while it runs
/// (authorizing through it and noting the gateway and target), then hands it back with
/// its result for the audit trail: nothing about a call is shared or locked.
pub struct Call {
    pub who: Principal,
    action: &'static str,
    gateway: Option<String>,
    target: String,
}

impl Call {
    /// Authorizes `action` (on `gateway`, when the call names one), noting the gateway.
    fn check(&mut self, action: Action, gateway: Option<&str>) -> AdminResult<()> {
        if let Some(g) = gateway {
            self.gateway(g);
        }
        Ok(self.who.authorize(action, gateway)?)
    }

    /// Authorizes an action that spans every gateway.
    fn check_global(&self, action: Action) -> AdminResult<()> {
        Ok(self.who.authorize_global(action)?)
    }

    /// Notes the gateway the call concerns; a name that is not a valid gateway name is
    /// not recorded (it may be anything a client sent, even a secret).
    pub(crate) fn gateway(&mut self, name: &str) {
        if validate_gateway_name("gateway", name).is_err() {
            return;
        }
        tracing::Span::current().record("gateway", name);
        self.gateway = Some(name.to_string());
    }

    /// Notes the call's target: an id, or a name that passed validation.
    fn target(&mut self, t: impl Into<String>) {
        self.target = t.into();
        tracing::Span::current().record("target", self.target.as_str());
    }
}

impl Admin {
    /// One admin call, the same for every RPC: the caller the interceptor authenticated
    /// (else `UNAUTHENTICATED`, audited), then `handler` (which authorizes through
    /// [`Call::check`] and notes the gateway and target the trail records), then the audit
    /// (every mutation; reads only when refused) and the answer. A mutation first takes one
    /// of its token's writes and then runs to completion even if the client goes away.
    async fn serve<Req, Res, F, Fut>(
        self: &Arc<Self>,
        request: Request<Req>,
        action: &'static str,
        kind: Kind,
        handler: F,
    ) -> Result<tonic::Response<Res>, Status>
    where
        F: FnOnce(Arc<Admin>, Call, Req) -> Fut + Send + 'static,
        Fut: Future<Output = (Call, AdminResult<Res>)> + Send + 'static,
        Req: Send + 'static,
        Res: Send + 'static,
    {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "admin_call",
            action,
            token = tracing::field::Empty,
            gateway = tracing::field::Empty,
            target = tracing::field::Empty
        );
        async move {
            let call = self.begin(&request, action).await?;
            tracing::Span::current().record("token", call.who.name.as_str());
            let admitted = match kind {
                Kind::Mutation => self.admit_write(&call.who),
                Kind::Read => Ok(()),
            };
            let (admin, req) = (Arc::clone(self), request.into_inner());
            let run = async move {
                match admitted {
                    Ok(()) => handler(admin, call, req).await,
                    Err(refused) => (call, Err(refused)),
                }
            };
            self.finish(kind, run).await.map(tonic::Response::new)
        }
        .instrument(span)
        .await
    }

    /// Starts a call: the caller the interceptor authenticated, or `UNAUTHENTICATED`
    /// (recorded in the audit trail).
    async fn begin<T>(&self, request: &Request<T>, action: &'static str) -> Result<Call, Status> {
        match request.extensions().get::<Caller>() {
            Some(Caller::Token(who)) => Ok(Call { who: who.clone(), action, gateway: None, target: String::new() }),
            _ => {
                let admission = self.admit_refusal(Source::Unauthenticated);
                let result = "UNAUTHENTICATED: Unauthorized".to_string();
                self.record_refusal(admission, None, action, None, String::new(), result).await;
                Err(Status::unauthenticated("Unauthorized"))
            }
        }
    }

    /// Runs a call and audits what it hands back. Mutations run detached and are always
    /// audited; reads only when refused.
    async fn finish<T: Send + 'static>(
        self: &Arc<Self>,
        kind: Kind,
        run: impl Future<Output = (Call, AdminResult<T>)> + Send + 'static,
    ) -> Result<T, Status> {
        let admin = Arc::clone(self);
        let audited = async move {
            let (call, result) = run.await;
            let refused = matches!(result, Err(AdminError::PermissionDenied(_)));
            if kind == Kind::Mutation || refused {
                let Call { who, action, gateway, target } = call;
                match &result {
                    // A change is always recorded.
                    Ok(_) => admin.record(Some(&who), action, gateway, target, "OK".into()).await,
                    // A refusal changed nothing: recorded up to a rate per token.
                    Err(e) => {
                        let (code, message) = e.status_parts();
                        let outcome = format!("{}: {message}", crate::pb::code_name(code));
                        let admission = admin.admit_refusal(Source::Token(who.token_id));
                        admin.record_refusal(admission, Some(&who), action, gateway, target, outcome).await;
                    }
                }
            }
            result
        };
        let result = match kind {
            Kind::Mutation => detached(audited).await,
            Kind::Read => audited.await,
        };
        result.map_err(Status::from)
    }

    /// Records a refused call as `admission` says, or only counts it.
    async fn record_refusal(
        &self,
        admission: AuditAdmission,
        who: Option<&Principal>,
        action: &'static str,
        gateway: Option<String>,
        target: String,
        result: String,
    ) {
        match admission {
            AuditAdmission::Skip => {
                tracing::debug!(
                    action,
                    token = who.map_or("", |w| w.name.as_str()),
                    "refused admin call (audit rate-limited)"
                )
            }
            AuditAdmission::Record => self.record(who, action, gateway, target, result).await,
            AuditAdmission::RecordWithSkipped { .. } => {
                let result = format!("{result} {}", admission.note().unwrap_or_default());
                self.record(who, action, gateway, target, result).await
            }
        }
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
        }
        .bounded();
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
            const _: () = assert!(MAX_PAGE_SIZE == 1000, "update the message below");
            Err(crate::domain::FieldError::new("page_size", "must be at most 1000"))
        }
        n => Ok(n),
    }
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
