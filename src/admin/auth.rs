//! Management-token authentication for every admin RPC: the interceptor reads
//! `authorization: Bearer <token>`, throttles failed guesses per address, and asks the
//! token registry (in memory, `domain::tokens`) who the caller is.

use std::sync::{Arc, Mutex};

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::domain::access::{AuthThrottle, Principal, Verdict};
use crate::domain::request::strip_bearer;
use crate::state::Shared;

/// What the interceptor found: handlers turn `Refused` into `UNAUTHENTICATED` and audit it.
#[derive(Debug, Clone)]
pub enum Caller {
    Token(Principal),
    Refused,
}

/// Authenticates `authorization: Bearer <token>` on every admin call, throttling failed
/// attempts per client address (see [`AuthThrottle`]).
#[derive(Clone)]
pub struct AdminAuth {
    shared: Arc<Shared>,
    throttle: Arc<Mutex<AuthThrottle>>,
}

impl AdminAuth {
    pub fn new(shared: Arc<Shared>) -> Self {
        let throttle = Arc::new(Mutex::new(AuthThrottle::new(shared.clock.monotonic())));
        AdminAuth { shared, throttle }
    }

    fn principal(&self, request: &Request<()>) -> Option<Principal> {
        let value = request.metadata().get("authorization")?.to_str().ok()?.trim();
        let has_scheme = value.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
        let presented = strip_bearer(value);
        if !has_scheme || presented.is_empty() {
            return None;
        }
        let (now, elapsed) = (self.shared.clock.now(), self.shared.clock.monotonic());
        let peer = request.remote_addr().map(|a| a.ip());
        // Held across the lookup, so that concurrent guesses cannot overdraw a budget.
        let mut throttle = self.throttle.lock().ok()?;
        // A throttled address gets the answer of an unknown token, without a lookup:
        // nothing it sends, not even a valid token, changes the answer until it may try again.
        if throttle.admit(peer, elapsed) == Verdict::Throttled {
            tracing::debug!(peer = ?peer, "management token refused unseen: too many failures");
            return None;
        }
        let who = self.shared.tokens.write().ok()?.authenticate(presented, now);
        match &who {
            Some(_) => throttle.succeeded(peer, elapsed),
            None => {
                if throttle.failed(peer, elapsed) {
                    tracing::warn!(peer = ?peer, "too many failed management-token attempts from this address; throttled");
                }
            }
        }
        who
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.principal(&request).map_or(Caller::Refused, Caller::Token);
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}
