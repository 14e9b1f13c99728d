//! Usage: each key's totals per period, and its last use and denial.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::Pool;
use uuid::Uuid;

use super::backend::{Backend, Columns, query, values};
use super::{get, time, unavailable, uuid};
use crate::domain::budget::{Counters, UsageBucket};
use crate::domain::key::ResetPeriod;
use crate::store::{Granularity, HistoryQuery, HistoryRow, HistoryScope, StoreError, to_micros};

/// Fills in each live key's latest period: the latest under the key's current rule (a
/// reset-period change can move usage to a period that starts earlier: MONTHLY -> NEVER).
pub(crate) async fn load_latest<D: Backend>(
    pool: &Pool<D>,
    usage: &mut HashMap<Uuid, Counters>,
) -> Result<(), StoreError> {
    let rows = query(
        "SELECT u.* FROM key_usage u JOIN api_keys k ON k.id = u.key_id AND k.deleted_at IS NULL \
         WHERE u.reset_period = k.reset_period AND u.period_start = (SELECT MAX(x.period_start) \
             FROM key_usage x WHERE x.key_id = u.key_id AND x.reset_period = k.reset_period)",
    )
    .fetch_all(pool)
    .await
    .map_err(unavailable)?;
    for r in &rows {
        let row = from_row(r)?;
        let c = usage
            .entry(row.key_id)
            .or_insert_with(|| Counters::empty(row.key_id, row.reset_period, DateTime::UNIX_EPOCH));
        (c.reset_period, c.period_start, c.period_end) = (row.reset_period, row.period_start, row.period_end);
        (c.requests, c.prompt_tokens, c.completion_tokens, c.cost_micros) =
            (row.requests, row.prompt_tokens, row.completion_tokens, row.cost_micros);
    }
    Ok(())
}

/// Ledger rows (totals of every replica's increments) written at or after `since` by the
/// database's clock, for reconciling the shared counters, and that clock when they were
/// read (the next `since`, less a margin for transactions still running).
pub(crate) async fn changed_since<D: Backend>(
    pool: &Pool<D>,
    since: DateTime<Utc>,
) -> Result<(Vec<Counters>, DateTime<Utc>), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    let now = query(format!("SELECT {} AS now", database_now::<D>()))
        .fetch_optional(&mut tx)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| StoreError::Corrupt("the database's clock: no row".into()))?;
    let now = time(&now, "now")?;
    let rows = query("SELECT * FROM key_usage WHERE updated_at >= $1")
        .bind(to_micros(since))
        .fetch_all(&mut tx)
        .await
        .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    Ok((rows.iter().map(from_row).collect::<Result<_, _>>()?, now))
}

/// A key's usage in the period starting `period_start`, as the ledger holds it (every
/// replica's increments): what shared counters Redis lost are seeded from.
pub(crate) async fn of_period<D: Backend>(
    pool: &Pool<D>,
    key_id: Uuid,
    period_start: DateTime<Utc>,
) -> Result<Option<Counters>, StoreError> {
    let row = query("SELECT * FROM key_usage WHERE key_id = $1 AND period_start = $2")
        .bind(key_id.to_string())
        .bind(to_micros(period_start))
        .fetch_optional(pool)
        .await
        .map_err(unavailable)?;
    row.as_ref().map(from_row).transpose()
}

/// The database's clock in µs, as SQL: what `key_usage.updated_at` is stamped with, so
/// reconciliation compares times of one clock, never replicas' clocks with each other.
fn database_now<D: Backend>() -> &'static str {
    if D::NAME == "SQLite" {
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)"
    } else {
        "CAST(EXTRACT(EPOCH FROM now()) * 1000000 AS BIGINT)"
    }
}

/// One ledger row: a key's usage in one period.
fn from_row(r: &impl Columns) -> Result<Counters, StoreError> {
    let key_id = uuid(r, "key_id")?;
    let period: String = get(r, "reset_period")?;
    let reset_period =
        ResetPeriod::parse(&period).ok_or_else(|| StoreError::Corrupt(format!("reset_period: '{period}'")))?;
    let mut c = Counters::empty(key_id, reset_period, time(r, "period_start")?);
    c.requests = stored_count(get(r, "requests")?);
    c.prompt_tokens = stored_count(get(r, "prompt_tokens")?);
    c.completion_tokens = stored_count(get(r, "completion_tokens")?);
    let cost: i64 = get(r, "cost_micros")?;
    c.cost_micros = if cost < 0 { i64::MAX } else { cost };
    Ok(c)
}

/// Keys written per statement: 8 bound values each, far below what SQLite (32,766) and
/// PostgreSQL (65,535) accept in one statement.
const KEYS_PER_STATEMENT: usize = 500;

/// Adds usage increments (per key and period: what this replica metered since its last
/// flush; other replicas add theirs, nobody overwrites a total) and moves last use/denial
/// forward (never back: replicas flush in any order), in one transaction: two statements
/// per 500 keys, however many keys changed. Rows are stamped `updated_at` with the
/// database's clock (`now`, the replica's, is not compared with another replica's).
pub(crate) async fn save<D: Backend>(pool: &Pool<D>, counters: &[Counters]) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    for chunk in counters.chunks(KEYS_PER_STATEMENT) {
        let rows = values::<D>(chunk.len(), &["TEXT", "BIGINT", "TEXT", "BIGINT", "BIGINT", "BIGINT", "BIGINT"]);
        let mut totals = query(format!(
            "INSERT INTO key_usage (key_id, period_start, reset_period, requests, prompt_tokens, \
             completion_tokens, cost_micros, updated_at) \
             SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7, {} \
             FROM (VALUES {rows}) AS v WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = v.column1) \
             ON CONFLICT (key_id, period_start) DO UPDATE SET reset_period = excluded.reset_period, \
             {}, updated_at = excluded.updated_at",
            database_now::<D>(),
            increments::<D>("key_usage"),
        ));
        for c in chunk {
            totals = totals
                .bind(c.key_id.to_string())
                .bind(to_micros(c.period_start))
                .bind(c.reset_period.as_str())
                .bind(count_to_store(c.requests))
                .bind(count_to_store(c.prompt_tokens))
                .bind(count_to_store(c.completion_tokens))
                .bind(c.cost_micros.max(0));
        }
        totals.execute(&mut tx).await.map_err(unavailable)?;
        let rows = values::<D>(chunk.len(), &["BIGINT", "BIGINT", "TEXT", "TEXT"]);
        let mut last = query(format!(
            "UPDATE api_keys SET \
             last_used_at = CASE WHEN last_used_at IS NULL OR v.column1 > last_used_at \
                 THEN COALESCE(v.column1, last_used_at) ELSE last_used_at END, \
             last_deny_reason = CASE WHEN last_denied_at IS NULL OR v.column2 > last_denied_at \
                 THEN COALESCE(v.column3, last_deny_reason) ELSE last_deny_reason END, \
             last_denied_at = CASE WHEN last_denied_at IS NULL OR v.column2 > last_denied_at \
                 THEN COALESCE(v.column2, last_denied_at) ELSE last_denied_at END \
             FROM (VALUES {rows}) AS v WHERE api_keys.id = v.column4"
        ));
        for c in chunk {
            last = last
                .bind(c.last_used_at.map(to_micros))
                .bind(c.last_denied_at.map(to_micros))
                .bind(c.last_deny_reason.as_deref())
                .bind(c.key_id.to_string());
        }
        last.execute(&mut tx).await.map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// Adds the usage of `key_id`'s period starting `from` to its period starting `to` (a
/// reset-period change re-keys the current usage), inside the caller's transaction.
pub(crate) async fn carry<D: Backend>(
    tx: &mut sqlx::Transaction<'_, D>,
    key_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    to_period: ResetPeriod,
) -> Result<(), StoreError> {
    if from == to {
        return Ok(());
    }
    query(format!(
        "INSERT INTO key_usage (key_id, period_start, reset_period, requests, prompt_tokens, \
         completion_tokens, cost_micros, updated_at) \
         SELECT key_id, $1, $2, requests, prompt_tokens, completion_tokens, cost_micros, {} \
         FROM key_usage WHERE key_id = $3 AND period_start = $4 \
         ON CONFLICT (key_id, period_start) DO UPDATE SET reset_period = excluded.reset_period, \
         {}, updated_at = excluded.updated_at",
        database_now::<D>(),
        increments::<D>("key_usage"),
    ))
    .bind(to_micros(to))
    .bind(to_period.as_str())
    .bind(key_id.to_string())
    .bind(to_micros(from))
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// The `ON CONFLICT … DO UPDATE SET` assignments that add a row's usage counts
/// (requests, prompt and completion tokens, micro-USD) to `table`'s.
fn increments<D: Backend>(table: &str) -> String {
    ["requests", "prompt_tokens", "completion_tokens", "cost_micros"]
        .map(|column| format!("{column} = {}", added_to::<D>(table, column)))
        .join(", ")
}

/// `table.column` plus the row's increment, saturated at `i64::MAX` (a counter never wraps
/// negative): computed in 128 bits on PostgreSQL, checked against the headroom on SQLite.
fn added_to<D: Backend>(table: &str, column: &str) -> String {
    if D::NAME == "SQLite" {
        format!(
            "CASE WHEN {table}.{column} > 9223372036854775807 - excluded.{column} \
             THEN 9223372036854775807 ELSE {table}.{column} + excluded.{column} END"
        )
    } else {
        format!("LEAST({table}.{column}::NUMERIC + excluded.{column}, 9223372036854775807)::BIGINT")
    }
}

/// Adds usage-history increments (per key, hour and model), with the key's gateway, in
/// one transaction: one statement per 500 rows. Rows of keys that no longer exist are
/// skipped.
pub(crate) async fn save_history<D: Backend>(pool: &Pool<D>, buckets: &[UsageBucket]) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(unavailable)?;
    for chunk in buckets.chunks(KEYS_PER_STATEMENT) {
        let rows = values::<D>(chunk.len(), &["TEXT", "BIGINT", "TEXT", "BIGINT", "BIGINT", "BIGINT", "BIGINT"]);
        let mut add = query(format!(
            "INSERT INTO usage_buckets (key_id, gateway_id, hour, model, requests, prompt_tokens, \
             completion_tokens, cost_micros) \
             SELECT v.column1, k.gateway_id, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7 \
             FROM (VALUES {rows}) AS v JOIN api_keys k ON k.id = v.column1 \
             ON CONFLICT (key_id, hour, model) DO UPDATE SET \
             {}",
            increments::<D>("usage_buckets"),
        ));
        for b in chunk {
            add = add
                .bind(b.key_id.to_string())
                .bind(to_micros(b.hour))
                .bind(b.model.as_str())
                .bind(count_to_store(b.requests))
                .bind(count_to_store(b.prompt_tokens))
                .bind(count_to_store(b.completion_tokens))
                .bind(b.cost_micros.max(0));
        }
        add.execute(&mut tx).await.map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// Usage over time for one key or one gateway, per hour or day, optionally by model,
/// oldest first.
pub(crate) async fn history<D: Backend>(pool: &Pool<D>, q: &HistoryQuery) -> Result<Vec<HistoryRow>, StoreError> {
    let width: i64 = match q.granularity {
        Granularity::Hour => 3_600_000_000,
        Granularity::Day => 86_400_000_000,
    };
    let (column, id) = match q.scope {
        HistoryScope::Key(id) => ("key_id", id),
        HistoryScope::Gateway(id) => ("gateway_id", id),
    };
    let model = if q.by_model { "model" } else { "''" };
    // PostgreSQL sums BIGINTs as NUMERIC: saturated back into a BIGINT.
    let sum = |c: &str| {
        if D::NAME == "SQLite" {
            format!("SUM({c}) AS {c}")
        } else {
            format!("CAST(LEAST(SUM({c}), 9223372036854775807) AS BIGINT) AS {c}")
        }
    };
    let rows = query(format!(
        "SELECT (hour / {width}) * {width} AS start, {model} AS model, {}, {}, {}, {} FROM usage_buckets \
         WHERE {column} = $1 AND hour >= $2 AND hour < $3 GROUP BY 1, 2 ORDER BY 1, 2",
        sum("requests"),
        sum("prompt_tokens"),
        sum("completion_tokens"),
        sum("cost_micros"),
    ))
    .bind(id.to_string())
    .bind(to_micros(q.from))
    .bind(to_micros(q.to))
    .fetch_all(pool)
    .await
    .map_err(unavailable)?;
    rows.iter()
        .map(|r| {
            let sum = |c: &str| get::<i64>(r, c);
            let model: String = get(r, "model")?;
            Ok(HistoryRow {
                start: time(r, "start")?,
                model: q.by_model.then_some(model),
                requests: stored_count(sum("requests")?),
                prompt_tokens: stored_count(sum("prompt_tokens")?),
                completion_tokens: stored_count(sum("completion_tokens")?),
                cost_micros: sum("cost_micros")?,
            })
        })
        .collect()
}

/// Deletes up to `batch` usage-history rows from hours before `cutoff`; returns how many.
pub(crate) async fn prune_history<D: Backend>(
    pool: &Pool<D>,
    cutoff: DateTime<Utc>,
    batch: u32,
) -> Result<u64, StoreError> {
    let done = query(
        "DELETE FROM usage_buckets WHERE (key_id, hour, model) IN \
         (SELECT key_id, hour, model FROM usage_buckets WHERE hour < $1 ORDER BY hour LIMIT $2)",
    )
    .bind(to_micros(cutoff))
    .bind(i64::from(batch))
    .execute(pool)
    .await
    .map_err(unavailable)?;
    Ok(done)
}

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
