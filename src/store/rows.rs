//! Row mapping shared by the SQLite and PostgreSQL stores: one definition, expanded
//! for each backend's row type (sqlx has no row type common to both).

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
