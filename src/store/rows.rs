//! What the SQLite and PostgreSQL stores share: row mapping and every query written
//! once in SQL both accept (`$N` parameters, `CAST`, no dialect functions), expanded for
//! each backend's types (sqlx has no row or pool type common to both).

/// Defines the row helpers and `*_from` mappers for one backend.
macro_rules! row_mappers {
    ($row:ty, $db:ty) => {
        fn unavailable(e: sqlx::Error) -> StoreError {
            StoreError::Unavailable(Box::new(e))
        }

        /// Maps a write error: a unique violation is `what` already existing.
        fn write_err(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
            move |e| match &e {
                sqlx::Error::Database(db) if db.is_unique_violation() && db.message().contains("secret_hash") => {
                    StoreError::AlreadyExists("a key with this secret")
                }
                sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists(what),
                _ => unavailable(e),
            }
        }

        fn uuid(row: &$row, col: &str) -> Result<Uuid, StoreError> {
            let s: String = row.try_get(col).map_err(unavailable)?;
            Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt(format!("{col}: '{s}' is not a UUID")))
        }

        fn time(row: &$row, col: &str) -> Result<DateTime<Utc>, StoreError> {
            from_micros(col, row.try_get(col).map_err(unavailable)?)
        }

        fn opt_time(row: &$row, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
            let v: Option<i64> = row.try_get(col).map_err(unavailable)?;
            v.map(|v| from_micros(col, v)).transpose()
        }

        fn get<'r, T: sqlx::Decode<'r, $db> + sqlx::Type<$db>>(row: &'r $row, col: &str) -> Result<T, StoreError> {
            row.try_get(col).map_err(unavailable)
        }

        fn hash(row: &$row) -> Result<SecretHash, StoreError> {
            let b: Vec<u8> = get(row, "secret_hash")?;
            SecretHash::from_slice(&b).ok_or_else(|| StoreError::Corrupt("secret_hash: not 32 bytes".into()))
        }

        fn gateway_from(row: &$row, sealer: &Sealer) -> Result<Gateway, StoreError> {
            let location: String = get(row, "key_location")?;
            let location = KeyLocation::parse(&location)
                .ok_or_else(|| StoreError::Corrupt(format!("key_location: '{location}'")))?;
            let header: Option<String> = get(row, "upstream_header")?;
            let value: Option<String> = get(row, "upstream_value")?;
            let reservation: i64 = get(row, "default_reservation_tokens")?;
            Ok(Gateway {
                id: uuid(row, "id")?,
                name: get(row, "name")?,
                inbound: InboundAuth { key_name: get(row, "key_name")?, location },
                upstream: match (header, value) {
                    (Some(header_name), Some(value)) => Some(UpstreamAuth { header_name, value: sealer.open(&value)? }),
                    _ => None,
                },
                default_reservation_tokens: u64::try_from(reservation).unwrap_or(0),
                created_at: time(row, "created_at")?,
            })
        }

        fn key_from(row: &$row) -> Result<ApiKey, StoreError> {
            let period: String = get(row, "reset_period")?;
            let token_limit: Option<i64> = get(row, "token_limit")?;
            let rpm: Option<i64> = get(row, "requests_per_minute")?;
            Ok(ApiKey {
                id: uuid(row, "id")?,
                gateway_id: uuid(row, "gateway_id")?,
                name: get(row, "name")?,
                prefix: get(row, "prefix")?,
                enabled: get(row, "enabled")?,
                legacy: get(row, "legacy")?,
                limits: Limits {
                    cost_limit_micros: get(row, "cost_limit_micros")?,
                    token_limit: token_limit.map(|t| t.max(0) as u64),
                    requests_per_minute: rpm.map(|r| r.clamp(0, u32::MAX as i64) as u32),
                    reset_period: ResetPeriod::parse(&period)
                        .ok_or_else(|| StoreError::Corrupt(format!("reset_period: '{period}'")))?,
                },
                created_at: time(row, "created_at")?,
                expires_at: opt_time(row, "expires_at")?,
                last_used_at: opt_time(row, "last_used_at")?,
            })
        }

        fn token_from(row: &$row) -> Result<AccessToken, StoreError> {
            let role: String = get(row, "role")?;
            let gateways: String = get(row, "gateways")?;
            Ok(AccessToken {
                id: uuid(row, "id")?,
                name: get(row, "name")?,
                role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role: '{role}'")))?,
                gateways: serde_json::from_str(&gateways).map_err(|e| StoreError::Corrupt(format!("gateways: {e}")))?,
                created_at: time(row, "created_at")?,
                expires_at: opt_time(row, "expires_at")?,
                revoked_at: opt_time(row, "revoked_at")?,
            })
        }

        const KEY_COLUMNS: &str = "id, gateway_id, name, secret_hash, prefix, enabled, legacy, cost_limit_micros, \
            token_limit, requests_per_minute, reset_period, created_at, expires_at, last_used_at";
        /// What loading a key for the view reads besides `KEY_COLUMNS`.
        const KEY_SECRET_COLUMNS: &str = "previous_secret_hash, previous_valid_until, last_denied_at, last_deny_reason";

        fn secrets(row: &$row) -> Result<Vec<KeySecret>, StoreError> {
            let mut out = vec![KeySecret::current(hash(row)?)];
            let previous: Option<Vec<u8>> = get(row, "previous_secret_hash")?;
            if let (Some(bytes), Some(until)) = (previous, opt_time(row, "previous_valid_until")?) {
                let hash =
                    SecretHash::from_slice(&bytes).ok_or_else(|| StoreError::Corrupt("previous_secret_hash".into()))?;
                out.push(KeySecret { hash, valid_until: Some(until) });
            }
            Ok(out)
        }

        fn price_from(row: &$row) -> Result<(String, Price), StoreError> {
            Ok((
                get(row, "model")?,
                Price {
                    input_micros_per_million: get(row, "input_micros_per_million")?,
                    output_micros_per_million: get(row, "output_micros_per_million")?,
                },
            ))
        }
    };
}

pub(crate) use row_mappers;

/// `impl Store` for a backend struct with `pool`, `sealer` and a `MIGRATOR` in scope;
/// `{ ... }` holds the methods only that backend has.
macro_rules! store_impl {
    ($store:ty, { $($own:tt)* }) => {
        #[async_trait]
        impl Store for $store {
            $($own)*

            async fn migrate(&self) -> Result<(), StoreError> {
                MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Unavailable(Box::new(e)))
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
                     WHERE u.reset_period = k.reset_period AND u.period_start = (SELECT MAX(x.period_start) \
                         FROM key_usage x WHERE x.key_id = u.key_id AND x.reset_period = k.reset_period)",
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
                    c.requests = $crate::store::rows::stored_count(get(r, "requests")?);
                    c.prompt_tokens = $crate::store::rows::stored_count(get(r, "prompt_tokens")?);
                    c.completion_tokens = $crate::store::rows::stored_count(get(r, "completion_tokens")?);
                    let cost: i64 = get(r, "cost_micros")?;
                    c.cost_micros = if cost < 0 { i64::MAX } else { cost };
                }
                let prices = self.list_prices().await?;
                let rows = sqlx::query(
                    "SELECT id, name, secret_hash, prefix, role, gateways, created_at, expires_at, last_used_at, revoked_at, \
                     bootstrap FROM access_tokens",
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
                            bootstrap: get(r, "bootstrap")?,
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
                    "INSERT INTO access_tokens (id, name, secret_hash, prefix, role, gateways, created_at, expires_at, bootstrap) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(t.id.to_string())
                .bind(&t.name)
                .bind(&s.hash.0[..])
                .bind(&s.prefix)
                .bind(t.role.as_str())
                .bind(gateways)
                .bind(to_micros(t.created_at))
                .bind(t.expires_at.map(to_micros))
                .bind(s.bootstrap)
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
                    "UPDATE access_tokens SET role = 'owner', gateways = '[]', expires_at = NULL, revoked_at = NULL, \
                     bootstrap = $2, prefix = '' WHERE secret_hash = $1",
                )
                .bind(&hash.0[..])
                .bind(true)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
                Ok(())
            }

            async fn save_token_last_used(&self, used: &[(Uuid, DateTime<Utc>)]) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await.map_err(unavailable)?;
                for (id, at) in used {
                    sqlx::query(
                        "UPDATE access_tokens SET last_used_at = CASE WHEN COALESCE(last_used_at, 0) > $1 THEN last_used_at ELSE $1 END WHERE id = $2",
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

            async fn prune_audit(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "DELETE FROM audit_events WHERE id IN \
                     (SELECT id FROM audit_events WHERE at < $1 ORDER BY at LIMIT $2)",
                )
                .bind(to_micros(cutoff))
                .bind(i64::from(batch))
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
                Ok(done.rows_affected())
            }

            async fn list_audit(
                &self,
                gateway: Option<&str>,
                before: Option<&str>,
                limit: u32,
            ) -> Result<Vec<AuditEvent>, StoreError> {
                let rows = sqlx::query(
                    "SELECT * FROM audit_events WHERE (CAST($1 AS TEXT) IS NULL OR gateway = $1) AND (CAST($2 AS TEXT) IS NULL OR id < $2) \
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
                    "UPDATE api_keys SET previous_secret_hash = CASE WHEN CAST($1 AS BIGINT) IS NULL THEN NULL ELSE secret_hash END, \
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
                    .bind($crate::store::rows::count_to_store(c.requests))
                    .bind($crate::store::rows::count_to_store(c.prompt_tokens))
                    .bind($crate::store::rows::count_to_store(c.completion_tokens))
                    .bind(c.cost_micros.max(0))
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
    };
}

pub(crate) use store_impl;

/// A usage counter for an `i64` column: saturated at `i64::MAX`, never wrapped negative.
pub(crate) fn count_to_store(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored usage counter. No write makes one negative, so a negative value is damage
/// (or a row written before writes were clamped, when a huge count wrapped): it reads as
/// exhausted, never as empty, so a budget never comes back by accident.
pub(crate) fn stored_count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_never_wrap_and_damage_reads_as_exhausted() {
        assert_eq!(count_to_store(42), 42);
        assert_eq!(count_to_store(u64::MAX), i64::MAX, "saturated, not -1");
        assert_eq!(stored_count(count_to_store(u64::MAX)), i64::MAX as u64);
        assert_eq!(stored_count(7), 7);
        assert_eq!(stored_count(-1), u64::MAX, "what a wrapped 2^64-1 was written as: exhausted, not 0");
    }
}
