//! API keys: their rows, their secrets (current and, while a rotation's grace lasts,
//! previous) and their soft deletion.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use super::backend::{Backend, Columns, Stmt, query, values};
use super::{
    Changed, Params, contains_pattern, found, get, hash, opt_time, split_row, time, unavailable, uuid, write_err,
};
use crate::domain::budget::Counters;
use crate::domain::key::{ApiKey, KeyStatus, Limits, ResetPeriod};
use crate::domain::period;
use crate::domain::secret::SecretHash;
use crate::domain::view::KeySecret;
use crate::store::{CursorValue, KeyCursor, KeyOrder, KeyQuery, StoreError, to_micros};

const KEY_COLUMNS: &str = "id, gateway_id, name, secret_hash, prefix, enabled, legacy, cost_limit_micros, \
    token_limit, requests_per_minute, reset_period, created_at, expires_at, last_used_at";
/// What loading a key for the view reads besides `KEY_COLUMNS`.
const KEY_SECRET_COLUMNS: &str = "previous_secret_hash, previous_valid_until, last_denied_at, last_deny_reason";

fn key_from(row: &impl Columns) -> Result<ApiKey, StoreError> {
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

fn secrets(row: &impl Columns) -> Result<Vec<KeySecret>, StoreError> {
    let mut out = vec![KeySecret::current(hash(row)?)];
    let previous: Option<Vec<u8>> = get(row, "previous_secret_hash")?;
    if let (Some(bytes), Some(until)) = (previous, opt_time(row, "previous_valid_until")?) {
        let hash = SecretHash::from_slice(&bytes).ok_or_else(|| StoreError::Corrupt("previous_secret_hash".into()))?;
        out.push(KeySecret { hash, valid_until: Some(until) });
    }
    Ok(out)
}

/// Live keys with every secret that authenticates them.
type LiveKeys = Vec<(ApiKey, Vec<KeySecret>)>;

/// Hands every live key with its secrets to `each` as its row arrives (none kept: a
/// million keys are never held twice); returns the last use and denial of those that
/// have one (as counters of no period yet: the usage rows fill that in).
pub(crate) async fn load_live<D: Backend>(
    pool: &Pool<D>,
    each: &mut (dyn FnMut(ApiKey, Vec<KeySecret>) + Send),
) -> Result<HashMap<Uuid, Counters>, StoreError> {
    let mut usage = HashMap::new();
    query(format!("SELECT {KEY_COLUMNS}, {KEY_SECRET_COLUMNS} FROM api_keys WHERE deleted_at IS NULL"))
        .for_each(pool, |r: D::Row| {
            let key = key_from(&r)?;
            let last_denied_at = opt_time(&r, "last_denied_at")?;
            if key.last_used_at.is_some() || last_denied_at.is_some() {
                let mut c = Counters::empty(key.id, key.limits.reset_period, DateTime::UNIX_EPOCH);
                c.last_used_at = key.last_used_at;
                c.last_denied_at = last_denied_at;
                c.last_deny_reason = get(&r, "last_deny_reason")?;
                usage.insert(key.id, c);
            }
            let secrets = secrets(&r)?;
            each(key, secrets);
            Ok(())
        })
        .await
        .map_err(unavailable)??;
    Ok(usage)
}

pub(crate) async fn insert<D: Backend>(pool: &Pool<D>, k: &ApiKey, hash: &SecretHash) -> Result<(), StoreError> {
    bind_key(query(format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES {}", values::<D>(1, &[""; 14]))), k, hash)
        .execute(pool)
        .await
        .map_err(write_err("a key with this name in the gateway"))?;
    Ok(())
}

/// Binds one key's `KEY_COLUMNS`, in order.
fn bind_key<'a>(stmt: Stmt<'a>, k: &'a ApiKey, hash: &'a SecretHash) -> Stmt<'a> {
    stmt.bind(k.id.to_string())
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
}

/// Keys inserted per statement: 14 bound values each, below what SQLite (32,766) and
/// PostgreSQL (65,535) accept in one statement.
const KEYS_PER_INSERT: usize = 1_000;

/// Inserts many new keys (an import, a bench's seed) in one transaction, a thousand rows
/// per statement; none is inserted if one fails.
pub(crate) async fn insert_many<D: Backend>(pool: &Pool<D>, keys: &[(ApiKey, SecretHash)]) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    for chunk in keys.chunks(KEYS_PER_INSERT) {
        let sql = format!("INSERT INTO api_keys ({KEY_COLUMNS}) VALUES {}", values::<D>(chunk.len(), &[""; 14]));
        let stmt = chunk.iter().fold(query(sql), |stmt, (k, hash)| bind_key(stmt, k, hash));
        stmt.execute(&mut tx).await.map_err(write_err("a key with this name in the gateway"))?;
    }
    tx.commit().await.map_err(unavailable)
}

/// Replaces a live key's mutable fields (name, enabled, limits, expiry). When its reset period changes, the usage of its
/// current period is carried into the period the new rule puts `now` in (added, in the
/// same transaction), as every replica's counters re-key it: the budget neither resets nor
/// inflates, also after a restart.
pub(crate) async fn update<D: Backend>(pool: &Pool<D>, k: &ApiKey, now: DateTime<Utc>) -> Result<(), StoreError> {
    // The rule the usage was counted under, read first: a transaction that reads before it
    // writes cannot take SQLite's write lock while the usage flush holds it. The update
    // below only applies while that rule is still the stored one.
    for _ in 0..3 {
        let before: Option<String> = query("SELECT reset_period FROM api_keys WHERE id = $1 AND deleted_at IS NULL")
            .bind(k.id.to_string())
            .fetch_optional(pool)
            .await
            .map_err(unavailable)?
            .map(|r| get(&r, "reset_period"))
            .transpose()?;
        let Some(before) = before else { return Err(StoreError::NotFound) };
        let mut tx = pool.begin().await.map_err(unavailable)?;
        let done = query(
            "UPDATE api_keys SET name = $1, enabled = $2, cost_limit_micros = $3, token_limit = $4, \
             requests_per_minute = $5, reset_period = $6, expires_at = $7 \
             WHERE id = $8 AND deleted_at IS NULL AND reset_period = $9",
        )
        .bind(&k.name)
        .bind(k.enabled)
        .bind(k.limits.cost_limit_micros)
        .bind(k.limits.token_limit.map(|t| t as i64))
        .bind(k.limits.requests_per_minute.map(i64::from))
        .bind(k.limits.reset_period.as_str())
        .bind(k.expires_at.map(to_micros))
        .bind(k.id.to_string())
        .bind(&before)
        .execute(&mut tx)
        .await
        .map_err(write_err("a key with this name in the gateway"))?;
        if done == 0 {
            // Deleted or re-ruled meanwhile: read again.
            continue;
        }
        if let Some(old) = ResetPeriod::parse(&before).filter(|old| *old != k.limits.reset_period) {
            let (from, _) = crate::domain::period::bounds(old, now);
            let (to, _) = crate::domain::period::bounds(k.limits.reset_period, now);
            super::usage::carry(&mut tx, k.id, from, to, k.limits.reset_period).await?;
        }
        return tx.commit().await.map_err(unavailable);
    }
    Err(StoreError::Unavailable("the key kept changing while it was updated; try again".into()))
}

pub(crate) async fn delete<D: Backend>(pool: &Pool<D>, id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
    let done = query("UPDATE api_keys SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
        .bind(to_micros(now))
        .bind(id.to_string())
        .execute(pool)
        .await
        .map_err(unavailable)?;
    found(done)
}

/// How many live keys there are.
pub(crate) async fn count<D: Backend>(pool: &Pool<D>) -> Result<u64, StoreError> {
    let row = query("SELECT COUNT(*) AS n FROM api_keys WHERE deleted_at IS NULL")
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?
        .ok_or(StoreError::NotFound)?;
    let n: i64 = get(&row, "n")?;
    Ok(n.max(0) as u64)
}

/// The live key with this id.
pub(crate) async fn find<D: Backend>(pool: &Pool<D>, id: Uuid) -> Result<Option<ApiKey>, StoreError> {
    let row = query(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND deleted_at IS NULL"))
        .bind(id.to_string())
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
    row.as_ref().map(key_from).transpose()
}

/// Live keys of a gateway as `q` asks, each with its cursor: filtered by name and status,
/// ordered by one expression and then by id (both ascending or both descending), from
/// after `q.after` (keyset paging: no offset to skip over).
pub(crate) async fn search<D: Backend>(pool: &Pool<D>, q: &KeyQuery) -> Result<Vec<(ApiKey, KeyCursor)>, StoreError> {
    let mut p = Params::new();
    let mut sql =
        format!("SELECT {}, ", KEY_COLUMNS.split(", ").map(|c| format!("k.{c}")).collect::<Vec<_>>().join(", "));
    let sort = match q.order {
        KeyOrder::Id => "k.id",
        KeyOrder::Name => "LOWER(k.name)",
        KeyOrder::CreatedAt => "k.created_at",
        KeyOrder::LastUsedAt => "COALESCE(k.last_used_at, -1)",
        KeyOrder::ExpiresAt => "COALESCE(k.expires_at, 9223372036854775807)",
        KeyOrder::Spend => "COALESCE(u.cost_micros, 0)",
    };
    sql.push_str(&format!("{sort} AS sort_key FROM api_keys k"));
    if q.order == KeyOrder::Spend {
        // The ledger row of each key's current period (NEVER: the one period, from 0).
        let start = |r: ResetPeriod| to_micros(period::bounds(r, q.now).0);
        sql.push_str(&format!(
            " LEFT JOIN key_usage u ON u.key_id = k.id AND u.reset_period = k.reset_period AND u.period_start = \
             CASE k.reset_period WHEN 'daily' THEN {} WHEN 'weekly' THEN {} WHEN 'monthly' THEN {} ELSE {} END",
            p.add(start(ResetPeriod::Daily)),
            p.add(start(ResetPeriod::Weekly)),
            p.add(start(ResetPeriod::Monthly)),
            p.add(start(ResetPeriod::Never)),
        ));
    }
    sql.push_str(&format!(" WHERE k.gateway_id = {} AND k.deleted_at IS NULL", p.add(q.gateway_id.to_string())));
    if let Some(part) = q.name_contains.as_deref() {
        // SQLite's LOWER folds ASCII letters only: fold the same way.
        let folded = if D::NAME == "SQLite" { part.to_ascii_lowercase() } else { part.to_lowercase() };
        sql.push_str(&format!(" AND LOWER(k.name) LIKE {} ESCAPE '\\'", p.add(contains_pattern(&folded))));
    }
    // As `ApiKey::status` decides it.
    match q.status {
        None => {}
        Some(KeyStatus::Disabled) => sql.push_str(" AND k.enabled = FALSE"),
        Some(KeyStatus::Active) => sql.push_str(&format!(
            " AND k.enabled = TRUE AND (k.expires_at IS NULL OR k.expires_at > {})",
            p.add(to_micros(q.now))
        )),
        Some(KeyStatus::Expired) => {
            sql.push_str(&format!(" AND k.enabled = TRUE AND k.expires_at <= {}", p.add(to_micros(q.now))))
        }
    }
    let (cmp, dir) = if q.descending { ("<", "DESC") } else { (">", "ASC") };
    if let Some(after) = &q.after {
        let value = match &after.value {
            CursorValue::Text(t) => p.add(t.clone()),
            CursorValue::Int(i) => p.add(*i),
        };
        let id = p.add(after.id.to_string());
        if q.order == KeyOrder::Id {
            sql.push_str(&format!(" AND k.id {cmp} {id}"));
        } else {
            sql.push_str(&format!(" AND ({sort} {cmp} {value} OR ({sort} = {value} AND k.id {cmp} {id}))"));
        }
    }
    sql.push_str(&format!(" ORDER BY sort_key {dir}, k.id {dir} LIMIT {}", p.add(i64::from(q.limit))));
    let rows = p.query(sql).fetch_all(pool).await.map_err(unavailable)?;
    rows.iter()
        .map(|r| {
            let key = key_from(r)?;
            let value = match q.order {
                KeyOrder::Id | KeyOrder::Name => CursorValue::Text(get(r, "sort_key")?),
                _ => CursorValue::Int(get(r, "sort_key")?),
            };
            let id = key.id;
            Ok((key, KeyCursor { value, id }))
        })
        .collect()
}

/// Gives a live key a new secret; the old one stays valid until `previous_valid_until`
/// (`None`: not at all).
pub(crate) async fn rotate<D: Backend>(
    pool: &Pool<D>,
    id: Uuid,
    new_hash: &SecretHash,
    new_prefix: &str,
    previous_valid_until: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    let done = query(
        "UPDATE api_keys SET previous_secret_hash = CASE WHEN CAST($1 AS BIGINT) IS NULL THEN NULL ELSE secret_hash END, \
         previous_valid_until = $1, secret_hash = $2, prefix = $3 WHERE id = $4 AND deleted_at IS NULL",
    )
    .bind(previous_valid_until.map(to_micros))
    .bind(&new_hash.0[..])
    .bind(new_prefix)
    .bind(id.to_string())
    .execute(pool)
    .await
    .map_err(write_err("a key with this secret"))?;
    found(done)
}

/// Keys written by transactions from `since` on (PostgreSQL, see
/// `PostgresStore::changes_since`): the live ones `keep` wants, with all their secrets
/// (the others dropped as they are read: a full read of a million keys keeps only what
/// differs from the view), the ids of deleted ones, the highest version.
pub(crate) async fn changed_since<D: Backend>(
    tx: &mut Transaction<'_, D>,
    since: i64,
    keep: &mut crate::store::KeepKey<'_>,
) -> Result<(LiveKeys, Vec<Uuid>, i64), StoreError> {
    let (mut live, mut removed, mut max) = (Vec::new(), Vec::new(), 0);
    query(format!(
        "SELECT {KEY_COLUMNS}, {KEY_SECRET_COLUMNS}, deleted_at, version FROM api_keys WHERE txid >= $1 ORDER BY version"
    ))
    .bind(since)
    .for_each(tx, |r: D::Row| {
        let (v, row) = split_row(&r, |r| Ok((key_from(r)?, secrets(r)?)))?;
        max = max.max(v);
        match row {
            Changed::Live((k, secrets)) => {
                if keep(&k, &secrets) {
                    live.push((k, secrets));
                }
            }
            Changed::Removed(id) => removed.push(id),
        }
        Ok::<_, StoreError>(())
    })
    .await
    .map_err(unavailable)??;
    Ok((live, removed, max))
}
