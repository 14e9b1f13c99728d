//! Model prices, per million tokens.

use chrono::{DateTime, Utc};
use sqlx::{Pool, Transaction};

use super::backend::{Backend, Columns, query};
use super::{found, get, unavailable, version};
use crate::domain::pricing::Price;
use crate::store::{StoreError, to_micros};

fn price_from(row: &impl Columns) -> Result<(String, Price), StoreError> {
    Ok((
        get(row, "model")?,
        Price {
            input_micros_per_million: get(row, "input_micros_per_million")?,
            output_micros_per_million: get(row, "output_micros_per_million")?,
        },
    ))
}

pub(crate) async fn set<D: Backend>(
    pool: &Pool<D>,
    model: &str,
    price: &Price,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    query(
        "INSERT INTO model_prices (model, input_micros_per_million, output_micros_per_million, updated_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (model) DO UPDATE SET \
         input_micros_per_million = excluded.input_micros_per_million, \
         output_micros_per_million = excluded.output_micros_per_million, updated_at = excluded.updated_at",
    )
    .bind(model)
    .bind(price.input_micros_per_million)
    .bind(price.output_micros_per_million)
    .bind(to_micros(now))
    .execute(pool)
    .await
    .map_err(unavailable)?;
    Ok(())
}

pub(crate) async fn delete<D: Backend>(pool: &Pool<D>, model: &str) -> Result<(), StoreError> {
    let done =
        query("DELETE FROM model_prices WHERE model = $1").bind(model).execute(pool).await.map_err(unavailable)?;
    found(done)
}

pub(crate) async fn list<D: Backend>(pool: &Pool<D>) -> Result<Vec<(String, Price)>, StoreError> {
    let rows = query("SELECT * FROM model_prices ORDER BY model").fetch_all(pool).await.map_err(unavailable)?;
    rows.iter().map(price_from).collect()
}

/// Prices set, and models whose price was deleted (tombstones in `model_price_deletions`),
/// by transactions from `since` on (PostgreSQL, see `PostgresStore::changes_since`), and
/// the highest version.
pub(crate) async fn changed_since<D: Backend>(
    tx: &mut Transaction<'_, D>,
    since: i64,
) -> Result<(Vec<(String, Price)>, Vec<String>, i64), StoreError> {
    let set = query("SELECT * FROM model_prices WHERE txid >= $1 ORDER BY version")
        .bind(since)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
    let gone = query("SELECT model, version FROM model_price_deletions WHERE txid >= $1 ORDER BY version")
        .bind(since)
        .fetch_all(tx)
        .await
        .map_err(unavailable)?;
    let mut max = 0;
    let mut prices = Vec::with_capacity(set.len());
    for r in &set {
        max = max.max(version(r)?);
        prices.push(price_from(r)?);
    }
    let mut removed = Vec::with_capacity(gone.len());
    for r in &gone {
        max = max.max(version(r)?);
        removed.push(get(r, "model")?);
    }
    Ok((prices, removed, max))
}
