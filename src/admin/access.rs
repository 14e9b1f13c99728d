//! `AccessService`: management tokens.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{from_timestamp, timestamp};
use super::keys::parse_id;
use super::{Admin, AdminError, AdminResult, Kind};
use crate::domain::FieldError;
use crate::domain::access::{AccessToken, Action, Role};
use crate::domain::gateway::validate_gateway_name;
use crate::domain::key::{validate_expiry, validate_key_name};
use crate::domain::secret::{Secret, SecretKind};
use crate::domain::tokens::StoredToken;
use crate::pb;
use crate::pb::access_service_server::AccessService;

pub use crate::pb::access_service_server::AccessServiceServer;

#[derive(Clone)]
pub struct AccessApi(pub Arc<Admin>);

pub fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Owner => pb::Role::Owner,
        Role::Admin => pb::Role::Admin,
        Role::Developer => pb::Role::Developer,
    }
}

fn role_from_pb(r: i32) -> Result<Role, FieldError> {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Owner) => Ok(Role::Owner),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        Ok(pb::Role::Developer) => Ok(Role::Developer),
        Ok(pb::Role::Unspecified) => {
            Err(FieldError::new("role", "is required (ROLE_OWNER, ROLE_ADMIN or ROLE_DEVELOPER)"))
        }
        Err(_) => Err(FieldError::new("role", "must be ROLE_OWNER, ROLE_ADMIN or ROLE_DEVELOPER")),
    }
}

fn token_to_pb(s: &StoredToken, last_used: DateTime<Utc>, usable: bool) -> pb::AccessToken {
    let t = &s.token;
    let status = match (t.revoked_at, usable) {
        (Some(_), _) => pb::TokenStatus::Revoked,
        (None, true) => pb::TokenStatus::Active,
        (None, false) => pb::TokenStatus::Expired,
    };
    pb::AccessToken {
        status: status as i32,
        id: t.id.to_string(),
        name: t.name.clone(),
        role: role_to_pb(t.role) as i32,
        gateways: t.gateways.clone(),
        prefix: s.prefix.clone(),
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        last_used_at: (last_used > t.created_at).then(|| timestamp(last_used)),
        revoked_at: t.revoked_at.map(timestamp),
    }
}

impl Admin {
    fn registry(&self) -> AdminResult<std::sync::RwLockWriteGuard<'_, crate::domain::tokens::TokenRegistry>> {
        self.shared.tokens.write().map_err(|_| AdminError::Internal("token registry lock poisoned".into()))
    }
}

#[tonic::async_trait]
impl AccessService for AccessApi {
    async fn create_access_token(
        &self,
        request: Request<pb::CreateAccessTokenRequest>,
    ) -> Result<Response<pb::CreateAccessTokenResponse>, Status> {
        self.0
            .serve(request, "AccessService/CreateAccessToken", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    c.check(Action::ManageTokens, None)?;
                    let now = admin.shared.clock.now();
                    validate_key_name("name", &req.name)?;
                    let role = role_from_pb(req.role)?;
                    let mut gateways = req.gateways.clone();
                    for g in &gateways {
                        validate_gateway_name("gateways", g)?;
                    }
                    gateways.sort();
                    gateways.dedup();
                    let expires_at = req.expires_at.as_ref().map(|t| from_timestamp("expires_at", t)).transpose()?;
                    if let Some(at) = expires_at {
                        validate_expiry("expires_at", at, now)?;
                    }
                    if let [only] = gateways.as_slice() {
                        c.gateway(only);
                    }
                    c.who.may_manage(role, &gateways)?;
                    let secret = Secret::generate(SecretKind::AccessToken);
                    let token = AccessToken {
                        id: Uuid::now_v7(),
                        name: req.name.trim().to_string(),
                        role,
                        gateways,
                        created_at: now,
                        expires_at,
                        revoked_at: None,
                    };
                    c.target(token.id.to_string());
                    let stored = StoredToken {
                        token,
                        hash: secret.hash(),
                        prefix: secret.display_prefix(),
                        last_used_at: None,
                        bootstrap: false,
                    };
                    let _w = admin.shared.writes.lock().await;
                    admin.store.insert_access_token(&stored).await?;
                    admin.registry()?.insert(stored.clone());
                    AdminResult::Ok(pb::CreateAccessTokenResponse {
                        token: Some(token_to_pb(&stored, now, true)),
                        secret: secret.expose().to_string(),
                    })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn list_access_tokens(
        &self,
        request: Request<pb::ListAccessTokensRequest>,
    ) -> Result<Response<pb::ListAccessTokensResponse>, Status> {
        self.0
            .serve(request, "AccessService/ListAccessTokens", Kind::Read, |admin, mut c, _req| async move {
                let result = async {
                    c.check(Action::ManageTokens, None)?;
                    let now = admin.shared.clock.now();
                    let registry = admin.registry()?;
                    let all = registry.list();
                    // A gateway-scoped owner sees the tokens it could have made.
                    let tokens = all
                        .iter()
                        .filter(|(s, _)| c.who.may_manage(s.token.role, &s.token.gateways).is_ok())
                        .map(|(s, used)| token_to_pb(s, *used, registry.usable(&s.token, *used, now)))
                        .collect();
                    AdminResult::Ok(pb::ListAccessTokensResponse { tokens })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn revoke_access_token(
        &self,
        request: Request<pb::RevokeAccessTokenRequest>,
    ) -> Result<Response<pb::AccessToken>, Status> {
        self.0
            .serve(request, "AccessService/RevokeAccessToken", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    let id = req.id;
                    c.check(Action::ManageTokens, None)?;
                    let id = parse_id("id", &id)?;
                    c.target(id.to_string());
                    let _w = admin.shared.writes.lock().await;
                    let (stored, _) = admin.registry()?.find(id).ok_or(AdminError::NotFound("access token"))?;
                    if let [only] = stored.token.gateways.as_slice() {
                        c.gateway(only);
                    }
                    c.who.may_manage(stored.token.role, &stored.token.gateways)?;
                    let now = admin.shared.clock.now();
                    admin.store.revoke_access_token(id, now).await?;
                    admin.registry()?.revoke(id, now);
                    let (stored, used) = admin.registry()?.find(id).ok_or(AdminError::NotFound("access token"))?;
                    AdminResult::Ok(token_to_pb(&stored, used, false))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::AccessToken>, Status> {
        self.0
            .serve(request, "AccessService/WhoAmI", Kind::Read, |admin, c, _req| async move {
                let result = async {
                    let Some(id) = c.who.token_id else {
                        // The --dev token has no row.
                        return Ok(pb::AccessToken {
                            status: pb::TokenStatus::Active as i32,
                            name: c.who.name.clone(),
                            role: role_to_pb(c.who.role) as i32,
                            ..Default::default()
                        });
                    };
                    let (stored, used) = admin.registry()?.find(id).ok_or(AdminError::NotFound("access token"))?;
                    // It authenticated this very call.
                    AdminResult::Ok(token_to_pb(&stored, used, true))
                }
                .await;
                (c, result)
            })
            .await
    }
}
