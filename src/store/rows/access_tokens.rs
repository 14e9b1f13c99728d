//! Management (access) tokens: stored by hash, revoked rather than deleted.

use chrono::{DateTime, Utc};
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use super::backend::{Backend, Columns, query};
use super::{found, get, hash, opt_time, time, unavailable, uuid, version, write_err};
use crate::domain::access::{AccessToken, Role};
use crate::domain::secret::SecretHash;
use crate::domain::tokens::StoredToken;
use crate::store::{StoreError, to_micros};

fn token_from(row: &impl Columns) -> Result<AccessToken, StoreError> {
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

const TOKEN_COLUMNS: &str =
    "id, name, secret_hash, prefix, role, gateways, created_at, expires_at, last_used_at, revoked_at, bootstrap";

fn stored_from(r: &impl Columns) -> Result<StoredToken, StoreError> {
    Ok(StoredToken {
        token: token_from(r)?,
        hash: hash(r)?,
        prefix: get(r, "prefix")?,
        last_used_at: opt_time(r, "last_used_at")?,
        bootstrap: get(r, "bootstrap")?,
    })
}

/// Every token, revoked ones included.
pub(crate) async fn load<D: Backend>(pool: &Pool<D>) -> Result<Vec<StoredToken>, StoreError> {
    let rows =
        query(format!("SELECT {TOKEN_COLUMNS} FROM access_tokens")).fetch_all(pool).await.map_err(unavailable)?;
    rows.iter().map(stored_from).collect()
}

/// Tokens written by transactions from `since` on (PostgreSQL, see
/// `PostgresStore::changes_since`), revoked ones included, and the highest version.
pub(crate) async fn changed_since<D: Backend>(
    tx: &mut Transaction<'_, D>,
    since: i64,
) -> Result<(Vec<StoredToken>, i64), StoreError> {
    let rows = query(format!("SELECT {TOKEN_COLUMNS}, version FROM access_tokens WHERE txid >= $1 ORDER BY version"))
        .bind(since)
        .fetch_all(tx)
        .await
        .map_err(unavailable)?;
    let mut max = 0;
    let mut tokens = Vec::with_capacity(rows.len());
    for r in &rows {
        max = max.max(version(r)?);
        tokens.push(stored_from(r)?);
    }
    Ok((tokens, max))
}

pub(crate) async fn insert<D: Backend>(pool: &Pool<D>, s: &StoredToken) -> Result<(), StoreError> {
    let t = &s.token;
    let gateways = serde_json::to_string(&t.gateways).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    query(
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
    .execute(pool)
    .await
    .map_err(write_err("access token"))?;
    Ok(())
}

pub(crate) async fn revoke<D: Backend>(pool: &Pool<D>, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
    let done = query("UPDATE access_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
        .bind(to_micros(at))
        .bind(id.to_string())
        .execute(pool)
        .await
        .map_err(unavailable)?;
    found(done)
}

/// Makes the token with this hash the bootstrap token: a usable, unscoped owner, with no
/// display prefix.
pub(crate) async fn restore_owner<D: Backend>(pool: &Pool<D>, hash: &SecretHash) -> Result<(), StoreError> {
    query(
        "UPDATE access_tokens SET role = 'owner', gateways = '[]', expires_at = NULL, revoked_at = NULL, \
         bootstrap = $2, prefix = '' WHERE secret_hash = $1",
    )
    .bind(&hash.0[..])
    .bind(true)
    .execute(pool)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// Records when tokens were last used, never moving a time back; in one transaction.
pub(crate) async fn save_last_used<D: Backend>(
    pool: &Pool<D>,
    used: &[(Uuid, DateTime<Utc>)],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    for (id, at) in used {
        query(
            "UPDATE access_tokens SET last_used_at = CASE WHEN COALESCE(last_used_at, 0) > $1 THEN last_used_at ELSE $1 END WHERE id = $2",
        )
        .bind(to_micros(*at))
        .bind(id.to_string())
        .execute(&mut tx)
        .await
        .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}
