//! `KeyService`: API keys, their usage, rotation and legacy import.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{from_duration, from_timestamp, key_to_pb, limits_from_pb, limits_to_pb, timestamp};
use super::error::store_err;
use super::{Admin, AdminError, AdminResult, Call, Kind, page_size};
use crate::domain::FieldError;
use crate::domain::access::Action;
use crate::domain::clock::Now;
use crate::domain::key::{
    ApiKey, KeyStatus, LEGACY_TAKES_NO_LIMITS, NewKey, RotationRefused, validate_expiry, validate_key_name,
    validate_legacy_secret,
};
use crate::domain::secret::{Secret, SecretKind};
use crate::domain::view::KeySecret;
use crate::domain::{money, period};
use crate::pb;
use crate::pb::key_service_server::KeyService;
use crate::store::{CursorValue, KeyCursor, KeyOrder, KeyQuery, StoreError};

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
    pub(super) async fn key_for(&self, call: &mut Call, action: Action, id: &str) -> AdminResult<(ApiKey, String)> {
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
    /// The key's usage in its current period against its limits (the Overview).
    async fn usage_of(&self, key: &ApiKey, at: Now) -> AdminResult<pb::KeyUsage> {
        let now = at.wall;
        let u = self
            .shared
            .limiters
            .counters
            .usage(key, at)
            .await
            .map_err(|e| AdminError::Unavailable(StoreError::Unavailable(format!("usage counters: {e}").into())))?;
        let (_, period_end) = period::bounds(key.limits.reset_period, now);
        // A budget that never resets counts from the key's creation.
        let period_start = match (period_end, u.period_start) {
            (Some(_), Some(start)) => start,
            _ => key.created_at,
        };
        let last = self.shared.limiters.meters.snapshot(key.id, key.limits.reset_period, now);
        let (last_denied_at, last_deny_reason) =
            last.map(|c| (c.last_denied_at, c.last_deny_reason)).unwrap_or_default();
        Ok(pb::KeyUsage {
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
}

/// The filters and order of a ListKeys request (the gateway and page size are the
/// caller's to fill in).
fn key_query(req: &pb::ListKeysRequest, now: DateTime<Utc>) -> Result<KeyQuery, FieldError> {
    let name_contains = match req.name_contains.as_str() {
        "" => None,
        s if s.chars().count() > 128 => return Err(FieldError::new("name_contains", "must be at most 128 characters")),
        s if s.chars().any(char::is_control) => {
            return Err(FieldError::new("name_contains", "must not contain control characters"));
        }
        s => Some(s.to_string()),
    };
    let status = match pb::KeyStatus::try_from(req.status) {
        Ok(pb::KeyStatus::Unspecified) => None,
        Ok(pb::KeyStatus::Active) => Some(KeyStatus::Active),
        Ok(pb::KeyStatus::Disabled) => Some(KeyStatus::Disabled),
        Ok(pb::KeyStatus::Expired) => Some(KeyStatus::Expired),
        Err(_) => return Err(FieldError::new("status", "must be a KeyStatus")),
    };
    let order = match pb::KeyOrder::try_from(req.order_by) {
        Ok(pb::KeyOrder::Unspecified) => KeyOrder::Id,
        Ok(pb::KeyOrder::Name) => KeyOrder::Name,
        Ok(pb::KeyOrder::CreatedAt) => KeyOrder::CreatedAt,
        Ok(pb::KeyOrder::LastUsedAt) => KeyOrder::LastUsedAt,
        Ok(pb::KeyOrder::ExpiresAt) => KeyOrder::ExpiresAt,
        Ok(pb::KeyOrder::Spend) => KeyOrder::Spend,
        Err(_) => return Err(FieldError::new("order_by", "must be a KeyOrder")),
    };
    let after = parse_page_token(&req.page_token, order, req.descending)?;
    Ok(KeyQuery {
        gateway_id: Uuid::nil(),
        name_contains,
        status,
        order,
        descending: req.descending,
        after,
        limit: 0,
        now,
    })
}

/// How an order is named in page tokens.
fn order_code(order: KeyOrder) -> &'static str {
    match order {
        KeyOrder::Id => "id",
        KeyOrder::Name => "name",
        KeyOrder::CreatedAt => "created",
        KeyOrder::LastUsedAt => "used",
        KeyOrder::ExpiresAt => "expires",
        KeyOrder::Spend => "spend",
    }
}

/// The page token that continues after `cursor`: the key's id alone in creation order
/// (as before ordering existed); else `<order>.<a|d>.<value>.<id>`, a name's value in hex.
fn page_token(order: KeyOrder, descending: bool, cursor: &KeyCursor) -> String {
    if order == KeyOrder::Id && !descending {
        return cursor.id.to_string();
    }
    let value = match &cursor.value {
        CursorValue::Int(i) => i.to_string(),
        CursorValue::Text(t) => t.bytes().map(|b| format!("{b:02x}")).collect(),
    };
    let dir = if descending { "d" } else { "a" };
    format!("{}.{dir}.{value}.{}", order_code(order), cursor.id)
}

/// Reads a page token made by [`page_token`] for this order and direction.
fn parse_page_token(token: &str, order: KeyOrder, descending: bool) -> Result<Option<KeyCursor>, FieldError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || FieldError::new("page_token", "is not a page token of this listing");
    if order == KeyOrder::Id && !descending {
        let id = parse_id("page_token", token)?;
        return Ok(Some(KeyCursor { value: CursorValue::Text(id.to_string()), id }));
    }
    let mut parts = token.split('.');
    let (Some(code), Some(dir), Some(value), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    if code != order_code(order) || dir != if descending { "d" } else { "a" } {
        return Err(FieldError::new("page_token", "belongs to another order_by or direction"));
    }
    let id = Uuid::parse_str(id).map_err(|_| invalid())?;
    let value = match order {
        KeyOrder::Id => CursorValue::Text(id.to_string()),
        KeyOrder::Name => {
            if value.len() % 2 != 0 || value.len() > 2048 {
                return Err(invalid());
            }
            let bytes = (0..value.len())
                .step_by(2)
                .map(|i| value.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(invalid)?;
            CursorValue::Text(String::from_utf8(bytes).map_err(|_| invalid())?)
        }
        _ => CursorValue::Int(value.parse().map_err(|_| invalid())?),
    };
    Ok(Some(KeyCursor { value, id }))
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
                    let at = admin.shared.clock.read();
                    let mut q = key_query(&req, at.wall)?;
                    q.limit = size + 1;
                    let gateway = admin.gateway_by_name("gateway", &req.gateway).await?;
                    q.gateway_id = gateway.id;
                    let mut keys = admin.store.search_keys(&q).await?;
                    let next_page_token = if keys.len() > size as usize {
                        keys.truncate(size as usize);
                        keys.last().map(|(_, cursor)| page_token(q.order, q.descending, cursor)).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    let mut out = Vec::with_capacity(keys.len());
                    for (key, _) in &keys {
                        let mut pb_key = key_to_pb(key, &gateway.name, at.wall);
                        pb_key.usage = Some(admin.usage_of(key, at).await?);
                        out.push(pb_key);
                    }
                    AdminResult::Ok(pb::ListKeysResponse { keys: out, next_page_token })
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
                    admin.usage_of(&key, admin.shared.clock.read()).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_carry_their_order_and_refuse_another() {
        let id = Uuid::now_v7();
        let cases = [
            (KeyOrder::Id, false, CursorValue::Text(id.to_string())),
            (KeyOrder::Id, true, CursorValue::Text(id.to_string())),
            (KeyOrder::Name, false, CursorValue::Text("é.x ä".into())),
            (KeyOrder::Spend, true, CursorValue::Int(-1)),
            (KeyOrder::ExpiresAt, false, CursorValue::Int(i64::MAX)),
        ];
        for (order, desc, value) in cases {
            let cursor = KeyCursor { value, id };
            let token = page_token(order, desc, &cursor);
            assert_eq!(parse_page_token(&token, order, desc).unwrap(), Some(cursor.clone()), "{token}");
            if order != KeyOrder::Id {
                let e = parse_page_token(&token, KeyOrder::CreatedAt, !desc).unwrap_err();
                assert_eq!(e.field, "page_token");
            }
        }
        assert_eq!(
            page_token(KeyOrder::Id, false, &KeyCursor { value: CursorValue::Text(String::new()), id }),
            id.to_string()
        );
        for bad in ["name.a.zz.x", "spend.d.1", "spend.d.x.", "pcs_secret"] {
            assert!(parse_page_token(bad, KeyOrder::Spend, true).is_err(), "{bad}");
        }
    }
}
