//! `KeyService`: create, read, list, update and delete API keys.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{from_timestamp, key_to_pb, limits_from_pb, timestamp};
use super::error::store_err;
use super::{Admin, AdminError, AdminResult, detached, principal};
use crate::domain::FieldError;
use crate::domain::key::Limits;
use crate::domain::key::{ApiKey, validate_expiry, validate_key_name};
use crate::domain::money;
use crate::domain::period;
use crate::domain::secret::{self, Secret, SecretKind, Shape};
use crate::domain::view::KeySecret;
use crate::pb;
use crate::pb::key_service_server::KeyService;

pub use crate::pb::key_service_server::KeyServiceServer;

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Clone)]
pub struct KeyApi(pub Arc<Admin>);

fn parse_id(field: &'static str, id: &str) -> Result<Uuid, FieldError> {
    if id.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    Uuid::parse_str(id).map_err(|_| FieldError::new(field, format!("'{id}' is not a key id")))
}

/// Legacy keys authenticate but take no limits.
fn refuse_legacy_limits(key: &ApiKey) -> Result<(), FieldError> {
    if key.legacy && key.limits != Limits::default() {
        return Err(FieldError::new("limits", "legacy keys take no limits; create a new key to get limits"));
    }
    Ok(())
}

/// A legacy secret clients already hold: 16 to 512 visible ASCII characters.
fn validate_legacy_secret(s: &str) -> Result<(), FieldError> {
    if s.len() < 16 || s.len() > 512 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new("secret", "must be 16 to 512 visible ASCII characters without spaces"));
    }
    if secret::shape(s, SecretKind::ApiKey) == Shape::BadChecksum {
        return Err(FieldError::new("secret", "looks like a Portcullis key but its checksum is wrong"));
    }
    Ok(())
}

impl Admin {
    async fn key_by_id(&self, id: &str) -> AdminResult<ApiKey> {
        let id = parse_id("id", id)?;
        self.store.get_key(id).await?.ok_or(AdminError::NotFound("key"))
    }

    fn key_pb(&self, key: &ApiKey) -> AdminResult<pb::ApiKey> {
        let view = self.shared.view()?;
        let gateway = view.gateway_name(key.gateway_id).unwrap_or_default();
        Ok(key_to_pb(key, gateway, self.shared.clock.now()))
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[tracing::instrument(skip_all, fields(gateway, key_id))]
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("gateway", req.gateway.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let now = admin.shared.clock.now();
            validate_key_name("name", &req.name)?;
            let limits = limits_from_pb(req.limits.as_ref())?;
            let expires_at = req.expires_at.as_ref().map(|t| from_timestamp("expires_at", t)).transpose()?;
            if let Some(at) = expires_at {
                validate_expiry("expires_at", at, now)?;
            }
            // Under the write lock: the gateway cannot be deleted between lookup and insert.
            let _w = admin.writes.lock().await;
            let gateway = admin.gateway_by_name("gateway", &req.gateway).await?;
            let secret = Secret::generate(SecretKind::ApiKey);
            let key = ApiKey {
                id: Uuid::now_v7(),
                gateway_id: gateway.id,
                name: req.name.trim().to_string(),
                prefix: secret.display_prefix(),
                enabled: true,
                legacy: false,
                limits,
                created_at: now,
                expires_at,
                last_used_at: None,
            };
            tracing::Span::current().record("key_id", key.id.to_string());
            admin.store.insert_key(&key, &secret.hash()).await?;
            admin.shared.view_mut()?.upsert_key(key.clone(), vec![KeySecret::current(secret.hash())]);
            tracing::info!(token = %who.name, "key created");
            AdminResult::Ok(pb::CreateKeyResponse {
                key: Some(key_to_pb(&key, &gateway.name, now)),
                secret: secret.expose().to_string(),
            })
        };
        Ok(Response::new(detached(run).await?))
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        principal(&request)?;
        let key = self.0.key_by_id(&request.get_ref().id).await?;
        Ok(Response::new(self.0.key_pb(&key)?))
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysResponse>, Status> {
        principal(&request)?;
        let req = request.into_inner();
        let run = async {
            let page_size = match req.page_size {
                0 => DEFAULT_PAGE_SIZE,
                n if n > MAX_PAGE_SIZE => {
                    return Err(FieldError::new("page_size", format!("must be at most {MAX_PAGE_SIZE}")).into());
                }
                n => n,
            };
            let after = if req.page_token.is_empty() {
                None
            } else {
                Some(parse_id("page_token", &req.page_token)?.to_string())
            };
            let gateway = self.0.gateway_by_name("gateway", &req.gateway).await?;
            let page = crate::store::Page { after: after.as_deref(), limit: page_size + 1 };
            let mut keys = self.0.store.list_keys(gateway.id, page).await?;
            let next_page_token = if keys.len() > page_size as usize {
                keys.truncate(page_size as usize);
                keys.last().map(|k| k.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            };
            let now = self.0.shared.clock.now();
            AdminResult::Ok(pb::ListKeysResponse {
                keys: keys.iter().map(|k| key_to_pb(k, &gateway.name, now)).collect(),
                next_page_token,
            })
        };
        Ok(Response::new(run.await?))
    }

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn update_key(&self, request: Request<pb::UpdateKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("key_id", req.id.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let now = admin.shared.clock.now();
            if req.clear_expires_at && req.expires_at.is_some() {
                return Err(FieldError::new("clear_expires_at", "cannot be combined with expires_at").into());
            }
            let _w = admin.writes.lock().await;
            let mut key = admin.key_by_id(&req.id).await?;
            if let Some(name) = &req.name {
                validate_key_name("name", name)?;
                key.name = name.trim().to_string();
            }
            if let Some(enabled) = req.enabled {
                key.enabled = enabled;
            }
            if let Some(limits) = &req.limits {
                key.limits = limits_from_pb(Some(limits))?;
                refuse_legacy_limits(&key)?;
            }
            if let Some(t) = &req.expires_at {
                let at = from_timestamp("expires_at", t)?;
                validate_expiry("expires_at", at, now)?;
                key.expires_at = Some(at);
            }
            if req.clear_expires_at {
                key.expires_at = None;
            }
            admin.store.update_key(&key).await.map_err(store_err("key"))?;
            admin.shared.view_mut()?.replace_key(key.clone());
            tracing::info!(token = %who.name, enabled = key.enabled, "key updated");
            admin.key_pb(&key)
        };
        Ok(Response::new(detached(run).await?))
    }

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn delete_key(
        &self,
        request: Request<pb::DeleteKeyRequest>,
    ) -> Result<Response<pb::DeleteKeyResponse>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("key_id", req.id.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let id = parse_id("id", &req.id)?;
            let _w = admin.writes.lock().await;
            admin.store.delete_key(id, admin.shared.clock.now()).await.map_err(store_err("key"))?;
            admin.shared.view_mut()?.remove_key(id);
            tracing::info!(token = %who.name, "key deleted");
            AdminResult::Ok(pb::DeleteKeyResponse {})
        };
        Ok(Response::new(detached(run).await?))
    }

    #[tracing::instrument(skip_all, fields(gateway, key_id))]
    async fn import_legacy_key(
        &self,
        request: Request<pb::ImportLegacyKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("gateway", req.gateway.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let now = admin.shared.clock.now();
            validate_key_name("name", &req.name)?;
            if req.limits.as_ref().is_some_and(|l| *l != pb::Limits::default()) {
                return Err(
                    FieldError::new("limits", "legacy keys take no limits; create a new key to get limits").into()
                );
            }
            validate_legacy_secret(&req.secret)?;
            let secret = Secret::from_plaintext(req.secret);
            let _w = admin.writes.lock().await;
            let gateway = admin.gateway_by_name("gateway", &req.gateway).await?;
            let key = ApiKey {
                id: Uuid::now_v7(),
                gateway_id: gateway.id,
                name: req.name.trim().to_string(),
                // A legacy secret may be short: show less of it than of ours.
                prefix: secret.expose().chars().take(6).collect(),
                enabled: true,
                legacy: true,
                limits: Limits::default(),
                created_at: now,
                expires_at: None,
                last_used_at: None,
            };
            tracing::Span::current().record("key_id", key.id.to_string());
            admin.store.insert_key(&key, &secret.hash()).await?;
            admin.shared.view_mut()?.upsert_key(key.clone(), vec![KeySecret::current(secret.hash())]);
            tracing::info!(token = %who.name, "legacy key imported");
            AdminResult::Ok(key_to_pb(&key, &gateway.name, now))
        };
        Ok(Response::new(detached(run).await?))
    }

    async fn get_key_usage(&self, request: Request<pb::GetKeyUsageRequest>) -> Result<Response<pb::KeyUsage>, Status> {
        principal(&request)?;
        let key = self.0.key_by_id(&request.get_ref().id).await?;
        let now = self.0.shared.clock.now();
        let limiters = &self.0.shared.limiters;
        let c = limiters
            .meters
            .snapshot(key.id, key.limits.reset_period, now)
            .ok_or_else(|| AdminError::Internal("meters lock poisoned".into()))?;
        let (_, period_end) = period::bounds(key.limits.reset_period, now);
        Ok(Response::new(pb::KeyUsage {
            key_id: key.id.to_string(),
            limits: Some(super::convert::limits_to_pb(&key.limits)),
            period_start: Some(timestamp(c.period_start)),
            period_end: period_end.map(timestamp),
            requests: c.requests,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            total_tokens: c.total_tokens(),
            cost_usd: money::format_usd(c.cost_micros),
            requests_last_minute: limiters.windows.count(key.id, now).try_into().unwrap_or(u32::MAX),
            last_denied_at: c.last_denied_at.map(timestamp),
            last_deny_reason: c.last_deny_reason.unwrap_or_default(),
            reserved_tokens: c.reserved_tokens,
            reserved_usd: money::format_usd(c.reserved_micros),
        }))
    }

    #[tracing::instrument(skip_all, fields(key_id))]
    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("key_id", req.id.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let now = admin.shared.clock.now();
            let grace = match &req.grace_period {
                None => chrono::Duration::zero(),
                Some(d) if d.seconds < 0 || d.nanos < 0 || d.seconds > 90 * 86_400 => {
                    return Err(FieldError::new("grace_period", "must be between 0 and 90 days").into());
                }
                Some(d) => chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(i64::from(d.nanos)),
            };
            let _w = admin.writes.lock().await;
            let mut key = admin.key_by_id(&req.id).await?;
            if key.legacy {
                return Err(AdminError::FailedPrecondition(
                    "legacy keys cannot be rotated: create a new key, then disable the legacy one".into(),
                ));
            }
            let secret = Secret::generate(SecretKind::ApiKey);
            let until = (grace > chrono::Duration::zero()).then(|| now + grace);
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
            tracing::info!(token = %who.name, grace_secs = grace.num_seconds(), "key rotated");
            let key_pb = admin.key_pb(&key)?;
            AdminResult::Ok(pb::CreateKeyResponse { key: Some(key_pb), secret: secret.expose().to_string() })
        };
        Ok(Response::new(detached(run).await?))
    }
}
