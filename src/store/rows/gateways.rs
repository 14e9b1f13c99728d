//! Gateways: their rows, with the provider credential sealed at rest.

use chrono::{DateTime, Utc};
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use super::backend::{Backend, Columns, query};
use super::{found, get, split_changes, time, unavailable, uuid, write_err};
use crate::domain::gateway::{Gateway, InboundAuth, KeyLocation, UpstreamAuth};
use crate::store::sealing::Sealer;
use crate::store::{StoreError, to_micros};

fn gateway_from(row: &impl Columns, sealer: &Sealer) -> Result<Gateway, StoreError> {
    let location: String = get(row, "key_location")?;
    let location =
        KeyLocation::parse(&location).ok_or_else(|| StoreError::Corrupt(format!("key_location: '{location}'")))?;
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

pub(crate) async fn insert<D: Backend>(pool: &Pool<D>, sealer: &Sealer, g: &Gateway) -> Result<(), StoreError> {
    query(
        "INSERT INTO gateways (id, name, key_name, key_location, upstream_header, upstream_value, \
         default_reservation_tokens, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(g.id.to_string())
    .bind(&g.name)
    .bind(&g.inbound.key_name)
    .bind(g.inbound.location.as_str())
    .bind(g.upstream.as_ref().map(|u| u.header_name.as_str()))
    .bind(g.upstream.as_ref().map(|u| sealer.seal(&u.value)).transpose()?)
    .bind(g.default_reservation_tokens as i64)
    .bind(to_micros(g.created_at))
    .execute(pool)
    .await
    .map_err(write_err("gateway"))?;
    Ok(())
}

/// Replaces a live gateway's settings, found by id.
pub(crate) async fn update<D: Backend>(pool: &Pool<D>, sealer: &Sealer, g: &Gateway) -> Result<(), StoreError> {
    let done = query(
        "UPDATE gateways SET key_name = $1, key_location = $2, upstream_header = $3, upstream_value = $4, \
         default_reservation_tokens = $5 WHERE id = $6 AND deleted_at IS NULL",
    )
    .bind(&g.inbound.key_name)
    .bind(g.inbound.location.as_str())
    .bind(g.upstream.as_ref().map(|u| u.header_name.as_str()))
    .bind(g.upstream.as_ref().map(|u| sealer.seal(&u.value)).transpose()?)
    .bind(g.default_reservation_tokens as i64)
    .bind(g.id.to_string())
    .execute(pool)
    .await
    .map_err(unavailable)?;
    found(done)
}

/// Soft-deletes a live gateway; with `force` also its keys, whose ids are returned.
pub(crate) async fn delete<D: Backend>(
    pool: &Pool<D>,
    id: Uuid,
    force: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let rows = query("SELECT id FROM api_keys WHERE gateway_id = $1 AND deleted_at IS NULL")
        .bind(id.to_string())
        .fetch_all(&mut tx)
        .await
        .map_err(unavailable)?;
    let key_ids = rows.iter().map(|r| uuid(r, "id")).collect::<Result<Vec<_>, _>>()?;
    if !key_ids.is_empty() && !force {
        return Err(StoreError::GatewayHasKeys(key_ids.len() as u64));
    }
    query("UPDATE api_keys SET deleted_at = $1 WHERE gateway_id = $2 AND deleted_at IS NULL")
        .bind(to_micros(now))
        .bind(id.to_string())
        .execute(&mut tx)
        .await
        .map_err(unavailable)?;
    let done = query("UPDATE gateways SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
        .bind(to_micros(now))
        .bind(id.to_string())
        .execute(&mut tx)
        .await
        .map_err(unavailable)?;
    found(done)?;
    tx.commit().await.map_err(unavailable)?;
    Ok(key_ids)
}

/// The live gateway of this name.
pub(crate) async fn find<D: Backend>(
    pool: &Pool<D>,
    sealer: &Sealer,
    name: &str,
) -> Result<Option<Gateway>, StoreError> {
    let row = query("SELECT * FROM gateways WHERE name = $1 AND deleted_at IS NULL")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
    row.as_ref().map(|r| gateway_from(r, sealer)).transpose()
}

pub(crate) async fn list<D: Backend>(pool: &Pool<D>, sealer: &Sealer) -> Result<Vec<Gateway>, StoreError> {
    let rows = query("SELECT * FROM gateways WHERE deleted_at IS NULL ORDER BY name")
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
    rows.iter().map(|r| gateway_from(r, sealer)).collect()
}

/// Gateways written by transactions from `since` on (PostgreSQL, see
/// `PostgresStore::changes_since`): live ones, the ids of deleted ones, the highest version.
pub(crate) async fn changed_since<D: Backend>(
    tx: &mut Transaction<'_, D>,
    sealer: &Sealer,
    since: i64,
) -> Result<(Vec<Gateway>, Vec<Uuid>, i64), StoreError> {
    let rows = query("SELECT * FROM gateways WHERE txid >= $1 ORDER BY version")
        .bind(since)
        .fetch_all(tx)
        .await
        .map_err(unavailable)?;
    split_changes(&rows, |r| gateway_from(r, sealer))
}
