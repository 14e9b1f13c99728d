//! `KeyService`: API keys, their usage, rotation and legacy import.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{from_duration, from_timestamp, key_to_pb, limits_from_pb, limits_to_pb, timestamp};
use super::error::store_err;
use super::{Admin, AdminError, AdminResult, Call, Kind, page_after, page_size};
use crate::domain::FieldError;
use crate::domain::access::Action;
use crate::domain::key::{
    ApiKey, LEGACY_TAKES_NO_LIMITS, NewKey, RotationRefused, validate_expiry, validate_key_name, validate_legacy_secret,
};
use crate::domain::secret::{Secret, SecretKind};
use crate::domain::view::KeySecret;
use crate::domain::{money, period};
use crate::pb;
use crate::pb::key_service_server::KeyService;
use crate::store::StoreError;

pub use crate::pb::key_service_server::KeyServiceServer;

#[derive(Clone)]
pub struct KeyApi(pub Arc<Admin>);

pub(crate) fn parse_id(field: &'static str, id: &str) -> Result<Uuid, FieldError> {
    if id.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    // The value is not echoed: a secret pasted where an id belongs must not reach the
    // audit trail, the log or the response.
    Uuid::parse_str(id).map_err(|_| FieldError::new(field, "is not a valid id"))
}

impl Admin {
    /// Loads a key by id and authorizes `action` on its gateway.
    async fn key_for(&self, call: &mut Call, action: Action, id: &str) -> AdminResult<(ApiKey, String)> {
        call.check(action, None)?;
        let id = parse_id("id", id)?;
        call.target(id.to_string());
        let key = self.store.get_key(id).await?.ok_or(AdminError::NotFound("key"))?;
        let gateway = self.shared.view()?.gateway_name(key.gateway_id).unwrap_or_default().to_string();
        call.check(action, Some(&gateway))?;
        Ok((key, gateway))
    }
}

impl Admin {
    /// Stores a new key of gateway `gateway` with its secret and makes it authenticate;
    /// returns it as the API shows it.
    async fn add_key(
        &self,
        call: &mut Call,
        gateway: &str,
        name: &str,
        secret: &Secret,
        kind: NewKey,
    ) -> AdminResult<pb::ApiKey> {
        validate_key_name("name", name)?;
        // Under the write lock: the gateway cannot be deleted between lookup and insert.
        let _w = self.shared.writes.lock().await;
        let gateway = self.gateway_by_name("gateway", gateway).await?;
        let max = self.limits.max_keys_per_gateway;
        if self.shared.view()?.keys_in(gateway.id) >= max {
            return Err(AdminError::ResourceExhausted(format!(
                "the gateway has {max} keys, the most it may have (--max-keys-per-gateway): delete keys first"
            )));
        }
        let key = ApiKey::new(gateway.id, name, secret.expose(), kind, self.shared.clock.now());
        call.target(key.id.to_string());
        self.store.insert_key(&key, &secret.hash()).await?;
        self.shared.view_mut()?.upsert_key(key.clone(), vec![KeySecret::current(secret.hash())]);
        Ok(key_to_pb(&key, &gateway.name, key.created_at))
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.0
            .serve(request, "KeyService/CreateKey", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    c.check(Action::WriteKeys, Some(&req.gateway))?;
                    let limits = limits_from_pb(req.limits.as_ref())?;
                    let expires_at = req.expires_at.as_ref().map(|t| from_timestamp("expires_at", t)).transpose()?;
                    if let Some(at) = expires_at {
                        validate_expiry("expires_at", at, admin.shared.clock.now())?;
                    }
                    let secret = Secret::generate(SecretKind::ApiKey);
                    let kind = NewKey::Managed { limits, expires_at };
                    let key = admin.add_key(&mut c, &req.gateway, &req.name, &secret, kind).await?;
                    AdminResult::Ok(pb::CreateKeyResponse { key: Some(key), secret: secret.expose().to_string() })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        self.0
            .serve(request, "KeyService/GetKey", Kind::Read, |admin, mut c, req| async move {
                let result = async {
                    let id = req.id;
                    let (key, gateway) = admin.key_for(&mut c, Action::ReadKeys, &id).await?;
                    Ok(key_to_pb(&key, &gateway, admin.shared.clock.now()))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        self.0
            .serve(request, "KeyService/ListKeys", Kind::Read, |admin, mut c, req| async move {
                let result = async {
                    // Keys of a gateway out of scope are refused, not silently filtered.
                    c.check(Action::ReadKeys, Some(&req.gateway))?;
                    let size = page_size(req.page_size)?;
                    let after = page_after(&req.page_token)?;
                    let gateway = admin.gateway_by_name("gateway", &req.gateway).await?;
                    let page = crate::store::Page { after: after.as_deref(), limit: size + 1 };
                    let mut keys = admin.store.list_keys(gateway.id, page).await?;
                    let next_page_token = if keys.len() > size as usize {
                        keys.truncate(size as usize);
                        keys.last().map(|k| k.id.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    let now = admin.shared.clock.now();
                    AdminResult::Ok(pb::ListKeysResponse {
                        keys: keys.iter().map(|k| key_to_pb(k, &gateway.name, now)).collect(),
                        next_page_token,
                    })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn update_key(&self, request: Request<pb::UpdateKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        self.0
            .serve(request, "KeyService/UpdateKey", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    let now = admin.shared.clock.now();
                    let _w = admin.shared.writes.lock().await;
                    let (mut key, gateway) = admin.key_for(&mut c, Action::WriteKeys, &req.id).await?;
                    if req.clear_expires_at && req.expires_at.is_some() {
                        return Err(FieldError::new("clear_expires_at", "cannot be combined with expires_at").into());
                    }
                    if let Some(name) = &req.name {
                        validate_key_name("name", name)?;
                        key.name = name.trim().to_string();
                    }
                    if let Some(enabled) = req.enabled {
                        key.enabled = enabled;
                    }
                    if let Some(limits) = &req.limits {
                        key.limits = limits_from_pb(Some(limits))?;
                        key.check_limits()?;
                    }
                    if let Some(t) = &req.expires_at {
                        let at = from_timestamp("expires_at", t)?;
                        validate_expiry("expires_at", at, now)?;
                        key.expires_at = Some(at);
                    }
                    if req.clear_expires_at {
                        key.expires_at = None;
                    }
                    admin.store.update_key(&key, now).await.map_err(store_err("key"))?;
                    admin.shared.view_mut()?.replace_key(key.clone());
                    AdminResult::Ok(key_to_pb(&key, &gateway, now))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        self.0
            .serve(request, "KeyService/DeleteKey", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    let id = req.id;
                    let _w = admin.shared.writes.lock().await;
                    let (key, _) = admin.key_for(&mut c, Action::WriteKeys, &id).await?;
                    admin.store.delete_key(key.id, admin.shared.clock.now()).await.map_err(store_err("key"))?;
                    admin.shared.key_deleted(key.id)?;
                    AdminResult::Ok(pb::DeleteKeyResponse {})
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn import_legacy_key(
        &self,
        request: Request<pb::ImportLegacyKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        self.0
            .serve(request, "KeyService/ImportLegacyKey", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    c.check(Action::WriteKeys, Some(&req.gateway))?;
                    if req.limits.as_ref().is_some_and(|l| *l != pb::Limits::default()) {
                        return Err(FieldError::new("limits", LEGACY_TAKES_NO_LIMITS).into());
                    }
                    validate_legacy_secret(&req.secret)?;
                    let secret = Secret::from_plaintext(req.secret);
                    admin.add_key(&mut c, &req.gateway, &req.name, &secret, NewKey::Legacy).await
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn get_key_usage(&self, request: Request<pb::GetKeyUsageRequest>) -> Result<Response<pb::KeyUsage>, Status> {
        self.0
            .serve(request, "KeyService/GetKeyUsage", Kind::Read, |admin, mut c, req| async move {
                let result = async {
                    let id = req.id;
                    let (key, _) = admin.key_for(&mut c, Action::ReadKeys, &id).await?;
                    let at = admin.shared.clock.read();
                    let now = at.wall;
                    let u = admin.shared.limiters.counters.usage(&key, at).await.map_err(|e| {
                        AdminError::Unavailable(StoreError::Unavailable(format!("usage counters: {e}").into()))
                    })?;
                    let (_, period_end) = period::bounds(key.limits.reset_period, now);
                    // A budget that never resets counts from the key's creation.
                    let period_start = match (period_end, u.period_start) {
                        (Some(_), Some(start)) => start,
                        _ => key.created_at,
                    };
                    let last = admin.shared.limiters.meters.snapshot(key.id, key.limits.reset_period, now);
                    let (last_denied_at, last_deny_reason) =
                        last.map(|c| (c.last_denied_at, c.last_deny_reason)).unwrap_or_default();
                    AdminResult::Ok(pb::KeyUsage {
                        key_id: key.id.to_string(),
                        limits: Some(limits_to_pb(&key.limits)),
                        period_start: Some(timestamp(period_start)),
                        period_end: period_end.map(timestamp),
                        requests: u.requests,
                        prompt_tokens: u.prompt_tokens,
                        completion_tokens: u.completion_tokens,
                        total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
                        cost_usd: money::format_usd(u.cost_micros),
                        requests_last_minute: u.requests_last_minute,
                        last_denied_at: last_denied_at.map(timestamp),
                        last_deny_reason: last_deny_reason.unwrap_or_default(),
                        reserved_tokens: u.reserved_tokens,
                        reserved_usd: money::format_usd(u.reserved_micros),
                    })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        self.0
            .serve(request, "KeyService/RotateKey", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    let now = admin.shared.clock.now();
                    let _w = admin.shared.writes.lock().await;
                    let (mut key, gateway) = admin.key_for(&mut c, Action::WriteKeys, &req.id).await?;
                    let grace = match &req.grace_period {
                        None => chrono::Duration::zero(),
                        Some(d) => from_duration("grace_period", d)?,
                    };
                    let until = key.rotation_grace(grace, now).map_err(|refused| match refused {
                        RotationRefused::Invalid(e) => AdminError::from(e),
                        RotationRefused::Legacy => AdminError::FailedPrecondition(
                            "legacy keys cannot be rotated: create a new key, then disable the legacy one".into(),
                        ),
                    })?;
                    let secret = Secret::generate(SecretKind::ApiKey);
                    admin
                        .store
                        .rotate_key(key.id, &secret.hash(), &secret.display_prefix(), until)
                        .await
                        .map_err(store_err("key"))?;
                    key.prefix = secret.display_prefix();
                    {
                        let mut view = admin.shared.view_mut()?;
                        view.replace_key(key.clone());
                        view.rotate_key(key.id, secret.hash(), until);
                    }
                    AdminResult::Ok(pb::CreateKeyResponse {
                        key: Some(key_to_pb(&key, &gateway, now)),
                        secret: secret.expose().to_string(),
                    })
                }
                .await;
                (c, result)
            })
            .await
    }
}
