//! PostgreSQL (`postgres://…`): the same schema and queries as SQLite, in PostgreSQL's dialect.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use uuid::Uuid;

use super::sealing::Sealer;
use super::{Page, Snapshot, Store, StoreError, from_micros, to_micros};
use crate::admin::auth::StoredToken;
use crate::domain::access::{AccessToken, AuditEvent, Role};
use crate::domain::budget::Counters;
use crate::domain::gateway::{Gateway, InboundAuth, KeyLocation, UpstreamAuth};
use crate::domain::key::{ApiKey, Limits, ResetPeriod};
use crate::domain::pricing::Price;
use crate::domain::secret::SecretHash;
use crate::domain::view::KeySecret;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/postgres");

pub struct PostgresStore {
    pool: PgPool,
    url: String,
    /// Holds the advisory lock that makes this process the database's only replica.
    claim: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    sealer: Sealer,
}

super::rows::row_mappers!(PgRow, sqlx::Postgres);

impl PostgresStore {
    pub async fn connect(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(unavailable)?;
        Ok(PostgresStore { pool, url: url.to_string(), claim: tokio::sync::Mutex::new(None), sealer })
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Unavailable(Box::new(e)))
    }

    async fn claim(&self) -> Result<(), StoreError> {
        use sqlx::Connection;
        /// Arbitrary, fixed: "portcullis" on a phone keypad.
        const LOCK: i64 = 7_678_285_547;
        let mut held = self.claim.lock().await;
        if held.is_some() {
            return Ok(());
        }
        let mut conn = sqlx::PgConnection::connect(&self.url).await.map_err(unavailable)?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK)
            .fetch_one(&mut conn)
            .await
            .map_err(unavailable)?;
        if !got {
            return Err(StoreError::Unavailable(
                "another portcullis process is serving from this database; several replicas need scale-out \
                 (shared counters), which this version does not have"
                    .into(),
            ));
        }
        *held = Some(conn);
        Ok(())
    }

    async fn release(&self) {
        if let Some(conn) = self.claim.lock().await.take() {
            use sqlx::Connection;
            let _ = conn.close().await;
        }
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        let gateways = self.list_gateways().await?;
        let rows =
            sqlx::query(&format!("SELECT {KEY_COLUMNS}, {KEY_SECRET_COLUMNS} FROM api_keys WHERE deleted_at IS NULL"))
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
        let mut keys = Vec::with_capacity(rows.len());
        let mut usage = std::collections::HashMap::new();
        for r in &rows {
            let key = key_from(r)?;
            let last_denied_at = opt_time(r, "last_denied_at")?;
            if key.last_used_at.is_some() || last_denied_at.is_some() {
                let mut c = Counters::empty(key.id, key.limits.reset_period, DateTime::UNIX_EPOCH);
                c.last_used_at = key.last_used_at;
                c.last_denied_at = last_denied_at;
                c.last_deny_reason = get(r, "last_deny_reason")?;
                usage.insert(key.id, c);
            }
            keys.push((key, secrets(r)?));
        }
        // Each live key's latest period.
        let rows = sqlx::query(
            // The latest period under the key's current rule: a reset-period change can move
            // usage to a period that starts earlier (MONTHLY -> NEVER).
            "SELECT u.* FROM key_usage u JOIN api_keys k ON k.id = u.key_id AND k.deleted_at IS NULL \
             WHERE (u.key_id, u.period_start) IN (SELECT DISTINCT ON (x.key_id) x.key_id, x.period_start \
                 FROM key_usage x JOIN api_keys y ON y.id = x.key_id WHERE x.reset_period = y.reset_period \
                 ORDER BY x.key_id, x.period_start DESC)",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        for r in &rows {
            let key_id = uuid(r, "key_id")?;
            let period: String = get(r, "reset_period")?;
            let reset_period =
                ResetPeriod::parse(&period).ok_or_else(|| StoreError::Corrupt(format!("reset_period: '{period}'")))?;
            let c = usage.entry(key_id).or_insert_with(|| Counters::empty(key_id, reset_period, DateTime::UNIX_EPOCH));
            c.reset_period = reset_period;
            c.period_start = time(r, "period_start")?;
            c.period_end = crate::domain::period::bounds(reset_period, c.period_start).1;
            c.requests = get::<i64>(r, "requests")?.max(0) as u64;
            c.prompt_tokens = get::<i64>(r, "prompt_tokens")?.max(0) as u64;
            c.completion_tokens = get::<i64>(r, "completion_tokens")?.max(0) as u64;
            c.cost_micros = get(r, "cost_micros")?;
        }
        let prices = self.list_prices().await?;
        let rows = sqlx::query(
            "SELECT id, name, secret_hash, prefix, role, gateways, created_at, expires_at, last_used_at, revoked_at \
             FROM access_tokens",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let access_tokens = rows
            .iter()
            .map(|r| {
                Ok(StoredToken {
                    token: token_from(r)?,
                    hash: hash(r)?,
                    prefix: get(r, "prefix")?,
                    last_used_at: opt_time(r, "last_used_at")?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(Snapshot { gateways, keys, access_tokens, prices, usage: usage.into_values().collect() })
    }

    async fn insert_gateway(&self, g: &Gateway) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO gateways (id, name, key_name, key_location, upstream_header, upstream_value, \
             default_reservation_tokens, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(g.id.to_string())
        .bind(&g.name)
        .bind(&g.inbound.key_name)
        .bind(g.inbound.location.as_str())
        .bind(g.upstream.as_ref().map(|u| u.header_name.as_str()))
        .bind(g.upstream.as_ref().map(|u| self.sealer.seal(&u.value)).transpose()?)
        .bind(g.default_reservation_tokens as i64)
        .bind(to_micros(g.created_at))
        .execute(&self.pool)
        .await
        .map_err(write_err("gateway"))?;
        Ok(())
    }

    async fn update_gateway(&self, g: &Gateway) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE gateways SET key_name = $1, key_location = $2, upstream_header = $3, upstream_value = $4, \
             default_reservation_tokens = $5 WHERE id = $6 AND deleted_at IS NULL",
        )
        .bind(&g.inbound.key_name)
        .bind(g.inbound.location.as_str())
        .bind(g.upstream.as_ref().map(|u| u.header_name.as_str()))
        .bind(g.upstream.as_ref().map(|u| self.sealer.seal(&u.value)).transpose()?)
        .bind(g.default_reservation_tokens as i64)
        .bind(g.id.to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        if done.rows_affected() == 0 { Err(StoreError::NotFound) } else { Ok(()) }
    }

    async fn delete_gateway(&self, id: Uuid, force: bool, now: DateTime<Utc>) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let rows = sqlx::query("SELECT id FROM api_keys WHERE gateway_id = $1 AND deleted_at IS NULL")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let key_ids = rows.iter().map(|r| uuid(r, "id")).collect::<Result<Vec<_>, _>>()?;
        if !key_ids.is_empty() && !force {
            return Err(StoreError::GatewayHasKeys(key_ids.len() as u64));
        }
        sqlx::query("UPDATE api_keys SET deleted_at = $1 WHERE gateway_id = $2 AND deleted_at IS NULL")
            .bind(to_micros(now))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let done = sqlx::query("UPDATE gateways SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(to_micros(now))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(key_ids)
    }

    async fn get_gateway(&self, name: &str) -> Result<Option<Gateway>, StoreError> {
        let row = sqlx::query("SELECT * FROM gateways WHERE name = $1 AND deleted_at IS NULL")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(|r| gateway_from(r, &self.sealer)).transpose()
    }

    async fn list_gateways(&self) -> Result<Vec<Gateway>, StoreError> {
        let rows = sqlx::query("SELECT * FROM gateways WHERE deleted_at IS NULL ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(|r| gateway_from(r, &self.sealer)).collect()
    }

    async fn insert_key(&self, k: &ApiKey, hash: &SecretHash) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
        ))
        .bind(k.id.to_string())
        .bind(k.gateway_id.to_string())
        .bind(&k.name)
        .bind(&hash.0[..])
        .bind(&k.prefix)
        .bind(k.enabled)
        .bind(k.legacy)
        .bind(k.limits.cost_limit_micros)
        .bind(k.limits.token_limit.map(|t| t as i64))
        .bind(k.limits.requests_per_minute.map(i64::from))
        .bind(k.limits.reset_period.as_str())
        .bind(to_micros(k.created_at))
        .bind(k.expires_at.map(to_micros))
        .bind(k.last_used_at.map(to_micros))
        .execute(&self.pool)
        .await
        .map_err(write_err("a key with this name in the gateway"))?;
        Ok(())
    }

    async fn update_key(&self, k: &ApiKey) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET name = $1, enabled = $2, cost_limit_micros = $3, token_limit = $4, \
             requests_per_minute = $5, reset_period = $6, expires_at = $7 WHERE id = $8 AND deleted_at IS NULL",
        )
        .bind(&k.name)
        .bind(k.enabled)
        .bind(k.limits.cost_limit_micros)
        .bind(k.limits.token_limit.map(|t| t as i64))
        .bind(k.limits.requests_per_minute.map(i64::from))
        .bind(k.limits.reset_period.as_str())
        .bind(k.expires_at.map(to_micros))
        .bind(k.id.to_string())
        .execute(&self.pool)
        .await
        .map_err(write_err("a key with this name in the gateway"))?;
        if done.rows_affected() == 0 { Err(StoreError::NotFound) } else { Ok(()) }
    }

    async fn delete_key(&self, id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE api_keys SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(to_micros(now))
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 { Err(StoreError::NotFound) } else { Ok(()) }
    }

    async fn get_key(&self, id: Uuid) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND deleted_at IS NULL"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(key_from).transpose()
    }

    async fn list_keys(&self, gateway_id: Uuid, page: Page<'_>) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE gateway_id = $1 AND deleted_at IS NULL AND id > $2 \
             ORDER BY id LIMIT $3"
        ))
        .bind(gateway_id.to_string())
        .bind(page.after.unwrap_or(""))
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(key_from).collect()
    }

    async fn insert_access_token(&self, s: &StoredToken) -> Result<(), StoreError> {
        let t = &s.token;
        let gateways = serde_json::to_string(&t.gateways).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO access_tokens (id, name, secret_hash, prefix, role, gateways, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(t.id.to_string())
        .bind(&t.name)
        .bind(&s.hash.0[..])
        .bind(&s.prefix)
        .bind(t.role.as_str())
        .bind(gateways)
        .bind(to_micros(t.created_at))
        .bind(t.expires_at.map(to_micros))
        .execute(&self.pool)
        .await
        .map_err(write_err("access token"))?;
        Ok(())
    }

    async fn revoke_access_token(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE access_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(to_micros(at))
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 { Err(StoreError::NotFound) } else { Ok(()) }
    }

    async fn restore_owner_token(&self, hash: &SecretHash) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE access_tokens SET role = 'owner', gateways = '[]', expires_at = NULL, revoked_at = NULL \
             WHERE secret_hash = $1",
        )
        .bind(&hash.0[..])
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn save_token_last_used(&self, used: &[(Uuid, DateTime<Utc>)]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for (id, at) in used {
            sqlx::query(
                "UPDATE access_tokens SET last_used_at = GREATEST(COALESCE(last_used_at, 0), $1) WHERE id = $2",
            )
            .bind(to_micros(*at))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn insert_audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_events (id, at, token_id, token_name, action, gateway, target, result) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(e.id.to_string())
        .bind(to_micros(e.at))
        .bind(e.token_id.map(|t| t.to_string()))
        .bind(&e.token_name)
        .bind(&e.action)
        .bind(e.gateway.as_deref())
        .bind(&e.target)
        .bind(&e.result)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn list_audit(
        &self,
        gateway: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM audit_events WHERE ($1::TEXT IS NULL OR gateway = $1) AND ($2::TEXT IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(gateway)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                let token_id: Option<String> = get(r, "token_id")?;
                Ok(AuditEvent {
                    id: uuid(r, "id")?,
                    at: time(r, "at")?,
                    token_id: token_id.and_then(|t| Uuid::parse_str(&t).ok()),
                    token_name: get(r, "token_name")?,
                    action: get(r, "action")?,
                    gateway: get(r, "gateway")?,
                    target: get(r, "target")?,
                    result: get(r, "result")?,
                })
            })
            .collect()
    }

    async fn rotate_key(
        &self,
        id: Uuid,
        new_hash: &SecretHash,
        new_prefix: &str,
        previous_valid_until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET previous_secret_hash = CASE WHEN $1::BIGINT IS NULL THEN NULL ELSE secret_hash END, \
             previous_valid_until = $1, secret_hash = $2, prefix = $3 WHERE id = $4 AND deleted_at IS NULL",
        )
        .bind(previous_valid_until.map(to_micros))
        .bind(&new_hash.0[..])
        .bind(new_prefix)
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(write_err("a key with this secret"))?;
        if done.rows_affected() == 0 { Err(StoreError::NotFound) } else { Ok(()) }
    }

    async fn save_usage(&self, counters: &[Counters], now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        for c in counters {
            sqlx::query(
                "INSERT INTO key_usage (key_id, period_start, reset_period, requests, prompt_tokens, \
                 completion_tokens, cost_micros, updated_at) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = $1) \
                 ON CONFLICT (key_id, period_start) DO UPDATE SET reset_period = excluded.reset_period, \
                 requests = excluded.requests, prompt_tokens = excluded.prompt_tokens, \
                 completion_tokens = excluded.completion_tokens, cost_micros = excluded.cost_micros, \
                 updated_at = excluded.updated_at",
            )
            .bind(c.key_id.to_string())
            .bind(to_micros(c.period_start))
            .bind(c.reset_period.as_str())
            .bind(c.requests as i64)
            .bind(c.prompt_tokens as i64)
            .bind(c.completion_tokens as i64)
            .bind(c.cost_micros)
            .bind(to_micros(now))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            sqlx::query(
                "UPDATE api_keys SET last_used_at = COALESCE($1, last_used_at), \
                 last_denied_at = COALESCE($2, last_denied_at), last_deny_reason = COALESCE($3, last_deny_reason) \
                 WHERE id = $4",
            )
            .bind(c.last_used_at.map(to_micros))
            .bind(c.last_denied_at.map(to_micros))
            .bind(c.last_deny_reason.as_deref())
            .bind(c.key_id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn set_price(&self, model: &str, price: &Price, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO model_prices (model, input_micros_per_million, output_micros_per_million, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (model) DO UPDATE SET \
             input_micros_per_million = excluded.input_micros_per_million, \
             output_micros_per_million = excluded.output_micros_per_million, updated_at = excluded.updated_at",
        )
        .bind(model)
        .bind(price.input_micros_per_million)
        .bind(price.output_micros_per_million)
        .bind(to_micros(now))
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn delete_price(&self, model: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM model_prices WHERE model = $1")
            .bind(model)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 { Err(StoreError::NotFound) } else { Ok(()) }
    }

    async fn list_prices(&self) -> Result<Vec<(String, Price)>, StoreError> {
        let rows = sqlx::query("SELECT * FROM model_prices ORDER BY model")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(price_from).collect()
    }
}
