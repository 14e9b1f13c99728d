//! Management-token authentication for every admin RPC.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use uuid::Uuid;

use crate::domain::access::{AccessToken, Role};
use crate::domain::check::strip_bearer;
use crate::domain::secret::SecretHash;
use crate::state::Shared;

/// The literal token `--dev` accepts as an owner.
pub const DEV_TOKEN: &str = "test-token";

/// Who is calling. Put into request extensions by the interceptor.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `None` for the `--dev` token, which has no row.
    pub token_id: Option<Uuid>,
    pub name: String,
    pub role: Role,
    pub gateways: Vec<String>,
}

/// Every management token, by hash, kept in memory so authentication needs no query.
#[derive(Debug, Default)]
pub struct TokenRegistry {
    by_hash: HashMap<SecretHash, AccessToken>,
    dev: bool,
}

impl TokenRegistry {
    pub fn new(tokens: Vec<(AccessToken, SecretHash)>, dev: bool) -> Self {
        TokenRegistry { by_hash: tokens.into_iter().map(|(t, h)| (h, t)).collect(), dev }
    }

    pub fn insert(&mut self, token: AccessToken, hash: SecretHash) {
        self.by_hash.insert(hash, token);
    }

    pub fn contains(&self, hash: &SecretHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Whether any owner token was ever created (usable or not).
    pub fn has_owner(&self) -> bool {
        self.by_hash.values().any(|t| t.role == Role::Owner)
    }

    /// The principal for a presented secret, if it is a usable token.
    pub fn authenticate(&self, presented: &str, now: DateTime<Utc>) -> Option<Principal> {
        if self.dev && presented == DEV_TOKEN {
            return Some(Principal { token_id: None, name: "dev".into(), role: Role::Owner, gateways: vec![] });
        }
        let t = self.by_hash.get(&SecretHash::of(presented))?;
        t.is_usable(now).then(|| Principal {
            token_id: Some(t.id),
            name: t.name.clone(),
            role: t.role,
            gateways: t.gateways.clone(),
        })
    }
}

/// Rejects calls without a usable `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct AdminAuth {
    shared: Arc<Shared>,
}

impl AdminAuth {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminAuth { shared }
    }
}

fn unauthorized() -> Status {
    Status::unauthenticated("Unauthorized")
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).ok_or_else(unauthorized)?;
        let trimmed = value.trim();
        let has_scheme = trimmed.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer "));
        let presented = strip_bearer(trimmed);
        if !has_scheme || presented.is_empty() {
            return Err(unauthorized());
        }
        let now = self.shared.clock.now();
        let principal = {
            let tokens = self.shared.tokens.read().map_err(|_| Status::unavailable("token registry unavailable"))?;
            tokens.authenticate(presented, now)
        };
        let principal = principal.ok_or_else(unauthorized)?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}
