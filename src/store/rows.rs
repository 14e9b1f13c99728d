//! What the SQLite and PostgreSQL stores share: row mapping and every query, written
//! once in SQL both accept (`$N` parameters, `CAST`, no dialect functions), as plain
//! functions generic over the backend ([`backend`] states once what sqlx needs of it),
//! one file per aggregate. `store_impl!` only forwards each backend's `impl Store` to
//! them, beside the methods that backend alone has.

pub(crate) mod access_tokens;
pub(crate) mod audit;
mod backend;
pub(crate) mod gateways;
pub(crate) mod keys;
pub(crate) mod prices;
pub(crate) mod usage;

use chrono::{DateTime, Utc};
use sqlx::Pool;
use uuid::Uuid;

use self::backend::{Backend, Columns, Read};
use super::sealing::Sealer;
use super::{Snapshot, StoreError, from_micros};
use crate::domain::key::ApiKey;
use crate::domain::secret::SecretHash;
use crate::domain::view::KeySecret;

pub(crate) fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

/// A statement's `$N` parameters, numbered as conditions are added.
struct Params<'a> {
    args: Vec<backend::Arg<'a>>,
}

impl<'a> Params<'a> {
    fn new() -> Self {
        Params { args: Vec::new() }
    }

    /// Adds a value; its placeholder.
    fn add(&mut self, v: impl Into<backend::Arg<'a>>) -> String {
        self.args.push(v.into());
        format!("${}", self.args.len())
    }

    /// `sql` with these values bound.
    fn query(self, sql: String) -> backend::Stmt<'a> {
        self.args.into_iter().fold(backend::query(sql), |q, a| q.bind(a))
    }
}

/// A `LIKE` pattern (with `ESCAPE '\'`) matching values that contain `s`.
fn contains_pattern(s: &str) -> String {
    let mut p = String::with_capacity(s.len() + 2);
    p.push('%');
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
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

/// Maps a write that must find its row: none changed is `NotFound`.
fn found(rows_affected: u64) -> Result<(), StoreError> {
    if rows_affected == 0 { Err(StoreError::NotFound) } else { Ok(()) }
}

fn get<T>(row: &impl Read<T>, col: &str) -> Result<T, StoreError> {
    row.read(col).map_err(unavailable)
}

fn uuid(row: &impl Columns, col: &str) -> Result<Uuid, StoreError> {
    let s: String = get(row, col)?;
    Uuid::parse_str(&s).map_err(|_| StoreError::Corrupt(format!("{col}: '{s}' is not a UUID")))
}

fn time(row: &impl Columns, col: &str) -> Result<DateTime<Utc>, StoreError> {
    from_micros(col, get(row, col)?)
}

fn opt_time(row: &impl Columns, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let v: Option<i64> = get(row, col)?;
    v.map(|v| from_micros(col, v)).transpose()
}

/// A row's change version (PostgreSQL), for `Changes::version`.
fn version(row: &impl Columns) -> Result<i64, StoreError> {
    get(row, "version")
}

/// Changed rows of a soft-deleted table (PostgreSQL, for `Changes`): the live ones
/// decoded, the ids of the deleted ones, and the highest change version among them.
fn split_changes<R: Columns, T>(
    rows: &[R],
    decode: impl Fn(&R) -> Result<T, StoreError>,
) -> Result<(Vec<T>, Vec<Uuid>, i64), StoreError> {
    let (mut live, mut removed, mut max) = (Vec::new(), Vec::new(), 0);
    for r in rows {
        let (v, row) = split_row(r, &decode)?;
        max = max.max(v);
        match row {
            Changed::Live(t) => live.push(t),
            Changed::Removed(id) => removed.push(id),
        }
    }
    Ok((live, removed, max))
}

/// A changed row of a soft-deleted table.
enum Changed<T> {
    Live(T),
    Removed(Uuid),
}

/// One changed row: its change version, and the row decoded or the id of a deleted one.
fn split_row<R: Columns, T>(
    r: &R,
    decode: impl Fn(&R) -> Result<T, StoreError>,
) -> Result<(i64, Changed<T>), StoreError> {
    let deleted_at: Option<i64> = get(r, "deleted_at")?;
    let row = if deleted_at.is_some() { Changed::Removed(uuid(r, "id")?) } else { Changed::Live(decode(r)?) };
    Ok((version(r)?, row))
}

fn hash(row: &impl Columns) -> Result<SecretHash, StoreError> {
    let b: Vec<u8> = get(row, "secret_hash")?;
    SecretHash::from_slice(&b).ok_or_else(|| StoreError::Corrupt("secret_hash: not 32 bytes".into()))
}

/// Everything the request path needs, read at start, each live key handed to `each`.
pub(crate) async fn load<D: Backend>(
    pool: &Pool<D>,
    sealer: &Sealer,
    each: &mut (dyn FnMut(ApiKey, Vec<KeySecret>) + Send),
) -> Result<Snapshot, StoreError> {
    let gateways = gateways::list(pool, sealer).await?;
    let mut usage = keys::load_live(pool, each).await?;
    usage::load_latest(pool, &mut usage).await?;
    let prices = prices::list(pool).await?;
    let access_tokens = access_tokens::load(pool).await?;
    Ok(Snapshot { gateways, keys: Vec::new(), access_tokens, prices, usage: usage.into_values().collect() })
}

/// `impl Store` for a backend struct with `pool`, `sealer` and a `MIGRATOR` in scope, by
/// the shared queries; `{ ... }` holds the methods only that backend has.
macro_rules! store_impl {
    ($store:ty, { $($own:tt)* }) => {
        #[async_trait]
        impl Store for $store {
            $($own)*

            async fn migrate(&self) -> Result<(), StoreError> {
                MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Unavailable(Box::new(e)))
            }

            async fn load_each(
                &self,
                each: &mut (dyn FnMut(ApiKey, Vec<$crate::domain::view::KeySecret>) + Send),
            ) -> Result<Snapshot, StoreError> {
                $crate::store::rows::load(&self.pool, &self.sealer, each).await
            }

            async fn insert_gateway(&self, g: &Gateway) -> Result<(), StoreError> {
                $crate::store::rows::gateways::insert(&self.pool, &self.sealer, g).await
            }

            async fn update_gateway(&self, g: &Gateway) -> Result<(), StoreError> {
                $crate::store::rows::gateways::update(&self.pool, &self.sealer, g).await
            }

            async fn delete_gateway(&self, id: Uuid, force: bool, now: DateTime<Utc>) -> Result<Vec<Uuid>, StoreError> {
                $crate::store::rows::gateways::delete(&self.pool, id, force, now).await
            }

            async fn get_gateway(&self, name: &str) -> Result<Option<Gateway>, StoreError> {
                $crate::store::rows::gateways::find(&self.pool, &self.sealer, name).await
            }

            async fn list_gateways(&self) -> Result<Vec<Gateway>, StoreError> {
                $crate::store::rows::gateways::list(&self.pool, &self.sealer).await
            }

            async fn insert_key(&self, k: &ApiKey, hash: &SecretHash) -> Result<(), StoreError> {
                $crate::store::rows::keys::insert(&self.pool, k, hash).await
            }

            async fn insert_keys(&self, keys: &[(ApiKey, SecretHash)]) -> Result<(), StoreError> {
                $crate::store::rows::keys::insert_many(&self.pool, keys).await
            }

            async fn update_key(&self, k: &ApiKey, now: DateTime<Utc>) -> Result<(), StoreError> {
                $crate::store::rows::keys::update(&self.pool, k, now).await
            }

            async fn delete_key(&self, id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
                $crate::store::rows::keys::delete(&self.pool, id, now).await
            }

            async fn count_keys(&self) -> Result<u64, StoreError> {
                $crate::store::rows::keys::count(&self.pool).await
            }

            async fn get_key(&self, id: Uuid) -> Result<Option<ApiKey>, StoreError> {
                $crate::store::rows::keys::find(&self.pool, id).await
            }

            async fn search_keys(
                &self,
                q: &$crate::store::KeyQuery,
            ) -> Result<Vec<(ApiKey, $crate::store::KeyCursor)>, StoreError> {
                $crate::store::rows::keys::search(&self.pool, q).await
            }

            async fn rotate_key(
                &self,
                id: Uuid,
                new_hash: &SecretHash,
                new_prefix: &str,
                previous_valid_until: Option<DateTime<Utc>>,
            ) -> Result<(), StoreError> {
                $crate::store::rows::keys::rotate(&self.pool, id, new_hash, new_prefix, previous_valid_until).await
            }

            async fn insert_access_token(&self, s: &StoredToken) -> Result<(), StoreError> {
                $crate::store::rows::access_tokens::insert(&self.pool, s).await
            }

            async fn revoke_access_token(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
                $crate::store::rows::access_tokens::revoke(&self.pool, id, at).await
            }

            async fn restore_owner_token(&self, hash: &SecretHash) -> Result<(), StoreError> {
                $crate::store::rows::access_tokens::restore_owner(&self.pool, hash).await
            }

            async fn save_token_last_used(&self, used: &[(Uuid, DateTime<Utc>)]) -> Result<(), StoreError> {
                $crate::store::rows::access_tokens::save_last_used(&self.pool, used).await
            }

            async fn insert_audit(&self, e: &AuditEvent) -> Result<(), StoreError> {
                $crate::store::rows::audit::insert(&self.pool, e).await
            }

            async fn prune_audit(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, StoreError> {
                $crate::store::rows::audit::prune(&self.pool, cutoff, batch).await
            }

            async fn search_audit(&self, q: &$crate::store::AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
                $crate::store::rows::audit::search(&self.pool, q).await
            }

            async fn save_usage_history(&self, buckets: &[UsageBucket]) -> Result<(), StoreError> {
                $crate::store::rows::usage::save_history(&self.pool, buckets).await
            }

            async fn usage_history(&self, q: &$crate::store::HistoryQuery) -> Result<Vec<$crate::store::HistoryRow>, StoreError> {
                $crate::store::rows::usage::history(&self.pool, q).await
            }

            async fn prune_usage_history(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, StoreError> {
                $crate::store::rows::usage::prune_history(&self.pool, cutoff, batch).await
            }

            async fn usage_changed_since(&self, since: DateTime<Utc>) -> Result<(Vec<Counters>, DateTime<Utc>), StoreError> {
                $crate::store::rows::usage::changed_since(&self.pool, since).await
            }

            async fn period_usage(&self, key_id: Uuid, period_start: DateTime<Utc>) -> Result<Option<Counters>, StoreError> {
                $crate::store::rows::usage::of_period(&self.pool, key_id, period_start).await
            }

            async fn save_usage(&self, counters: &[Counters], _now: DateTime<Utc>) -> Result<(), StoreError> {
                $crate::store::rows::usage::save(&self.pool, counters).await
            }

            async fn set_price(&self, model: &str, price: &Price, now: DateTime<Utc>) -> Result<(), StoreError> {
                $crate::store::rows::prices::set(&self.pool, model, price, now).await
            }

            async fn delete_price(&self, model: &str) -> Result<(), StoreError> {
                $crate::store::rows::prices::delete(&self.pool, model).await
            }

            async fn list_prices(&self) -> Result<Vec<(String, Price)>, StoreError> {
                $crate::store::rows::prices::list(&self.pool).await
            }
        }
    };
}

pub(crate) use store_impl;
