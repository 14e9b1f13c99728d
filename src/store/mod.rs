//! Storage behind one async trait. SQLite is the first implementation; PostgreSQL
//! follows the same trait. The request path never calls it.

pub mod postgres;
mod rows;
pub mod sealing;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::access::AuditEvent;
use crate::domain::budget::{Counters, UsageBucket};
use crate::domain::gateway::Gateway;
use crate::domain::key::ApiKey;
use crate::domain::pricing::Price;
use crate::domain::secret::SecretHash;
use crate::domain::tokens::StoredToken;
use crate::domain::view::KeySecret;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was hit; the payload names what (e.g. "gateway name").
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    #[error("the gateway still has {0} keys")]
    GatewayHasKeys(u64),
    // The cause is in the message (not a `source`), so it is printed once.
    #[error("storage is unavailable: {0}")]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// The operation does not apply to this backend or these arguments; says why.
    #[error("{0}")]
    Unsupported(String),
    /// The configuration cannot work (an unknown database URL scheme, a sealed credential
    /// without its encryption key): retrying never helps.
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// Whether the same call may succeed later: only when the database could not be
    /// reached. Everything else (the caller's mistake, damaged data, a bad configuration)
    /// fails the same way every time. The one place errors are classed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::NotFound
            | StoreError::AlreadyExists(_)
            | StoreError::GatewayHasKeys(_)
            | StoreError::Corrupt(_)
            | StoreError::Unsupported(_)
            | StoreError::Config(_) => false,
        }
    }
}

/// Everything the request path needs, read at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub gateways: Vec<Gateway>,
    /// Live keys with every secret that authenticates them (empty from
    /// [`Store::load_each`], which hands them over one by one instead).
    pub keys: Vec<(ApiKey, Vec<KeySecret>)>,
    pub access_tokens: Vec<StoredToken>,
    pub prices: Vec<(String, Price)>,
    /// Each live key's latest usage period and last denial.
    pub usage: Vec<Counters>,
}

/// What changed in storage since a cursor: each changed row as it is now, deleted ones as
/// removals (PostgreSQL, where several replicas follow each other's changes).
#[derive(Debug, Default)]
pub struct Changes {
    pub gateways: Vec<Gateway>,
    pub removed_gateways: Vec<Uuid>,
    /// Live keys with every secret that authenticates them.
    pub keys: Vec<(ApiKey, Vec<KeySecret>)>,
    pub removed_keys: Vec<Uuid>,
    pub prices: Vec<(String, Price)>,
    pub removed_prices: Vec<String>,
    /// Tokens are revoked, never deleted: a revocation is a changed token.
    pub access_tokens: Vec<StoredToken>,
    /// The cursor to ask from next time.
    pub next: i64,
    /// The highest change version among the rows returned (0 when none).
    pub version: i64,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty()
            && self.removed_gateways.is_empty()
            && self.keys.is_empty()
            && self.removed_keys.is_empty()
            && self.prices.is_empty()
            && self.removed_prices.is_empty()
            && self.access_tokens.is_empty()
    }
}

/// Which live keys a read of changes keeps (see [`Store::changes_since_keeping`]).
pub type KeepKey<'a> = dyn for<'k> FnMut(&'k ApiKey, &'k [KeySecret]) -> bool + Send + 'a;

/// Wakes a replica when another one commits a change (PostgreSQL `LISTEN`). A wake-up
/// carries no data: the changes are read with [`Store::changes_since`].
#[async_trait]
pub trait ChangeListener: Send {
    /// Resolves at the next notification; an error when the connection was lost (drop
    /// this listener and listen anew: notifications sent meanwhile are gone).
    async fn changed(&mut self) -> Result<(), StoreError>;
}

/// Whose usage history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryScope {
    Key(Uuid),
    Gateway(Uuid),
}

/// The width of a usage-history bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

/// A usage-history question: one key's or one gateway's usage from `from` (included) to
/// `to` (excluded), per hour or day (UTC), optionally by model.
#[derive(Debug, Clone, Copy)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub granularity: Granularity,
    pub by_model: bool,
}

/// Usage in one bucket (and with one model, when asked by model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub start: DateTime<Utc>,
    pub model: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: i64,
}

/// The order ListKeys returns keys in; ties (and `Id`) go by id, i.e. creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyOrder {
    #[default]
    Id,
    /// Case-folded name.
    Name,
    CreatedAt,
    /// Never-used keys count as used before every other.
    LastUsedAt,
    /// Keys that never expire count as expiring after every other.
    ExpiresAt,
    /// USD spent in the key's current budget period, as the usage ledger has it (written
    /// every `--usage-flush-interval`, every replica's usage added up).
    Spend,
}

/// Where a page of keys starts: after the key with this id and this value of the sort
/// expression (text for `Id` and `Name`, an integer for the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCursor {
    pub value: CursorValue,
    pub id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorValue {
    Text(String),
    Int(i64),
}

/// Which keys of one gateway to list, in which order, from where.
#[derive(Debug, Clone)]
pub struct KeyQuery {
    pub gateway_id: Uuid,
    /// Keys whose name contains this, ignoring case.
    pub name_contains: Option<String>,
    /// Keys of this status at `now` (`None`: any).
    pub status: Option<crate::domain::key::KeyStatus>,
    pub order: KeyOrder,
    pub descending: bool,
    pub after: Option<KeyCursor>,
    pub limit: u32,
    /// When status and the current budget period are judged.
    pub now: DateTime<Utc>,
}

/// Which audit events to list (all filters together), newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub gateway: Option<String>,
    /// The token that made the call: its id or its name.
    pub actor: Option<String>,
    /// An RPC (`KeyService/UpdateKey`), or with no `/` every RPC of a service (`KeyService`).
    pub action: Option<String>,
    pub target: Option<String>,
    /// At or after.
    pub from: Option<DateTime<Utc>>,
    /// Before.
    pub to: Option<DateTime<Utc>>,
    /// Events before the one with this id.
    pub before: Option<Uuid>,
    pub limit: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Claims the database for this process alone (a replica without shared counters):
    /// fails when another serving process already holds it.
    async fn claim(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Claims the database as one of several replicas (each with shared counters): fails
    /// when a process that claimed it alone is serving.
    async fn claim_shared(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether several replicas can serve from this store and follow each other's changes
    /// ([`Store::changes_since`], [`Store::listen_changes`]): PostgreSQL, not SQLite.
    fn is_shared(&self) -> bool {
        false
    }
    /// Everything that changed since `cursor` (0: every row ever, deleted ones as
    /// removals), and the cursor to ask from next time. The same change may come twice:
    /// applying it must be idempotent.
    async fn changes_since(&self, cursor: i64) -> Result<Changes, StoreError> {
        self.changes_since_keeping(cursor, &mut |_, _| true).await
    }
    /// The same, with only the live keys `keep` wants (the others are dropped as they are
    /// read: following from 0 reads every key, and keeps only what differs from the view).
    async fn changes_since_keeping(&self, _cursor: i64, _keep: &mut KeepKey<'_>) -> Result<Changes, StoreError> {
        Err(StoreError::Unsupported("changes are followed on PostgreSQL only: SQLite serves one replica".into()))
    }
    /// The cursor to follow changes from (see [`Store::changes_since`]) after a load
    /// that starts once this returns: that load sees every change committed before, and
    /// one committed after has a transaction id at or above it (0 where changes are not
    /// followed).
    async fn change_cursor(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
    /// A dedicated connection that wakes this replica when another commits a change.
    async fn listen_changes(&self) -> Result<Box<dyn ChangeListener>, StoreError> {
        Err(StoreError::Unsupported("changes are followed on PostgreSQL only: SQLite serves one replica".into()))
    }
    /// Claims the database again the way it was claimed if the connection holding the
    /// claim was lost (the database restarted, the connection was killed): a claim lost
    /// for good would let a process without shared counters in beside replicas. `Ok(false)`
    /// while it holds; `Ok(true)` when it was taken again.
    async fn keep_claim(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Gives the database up (at shutdown), so the next process can claim it at once.
    async fn release(&self) {}
    /// Writes a consistent copy of the database to a new file while serving.
    async fn backup(&self, _to: &std::path::Path) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "backup writes SQLite files; back PostgreSQL up with pg_dump or its replication".into(),
        ))
    }
    /// Everything the request path needs, read at start.
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut keys = Vec::new();
        let snapshot = self.load_each(&mut |k, secrets| keys.push((k, secrets))).await?;
        Ok(Snapshot { keys, ..snapshot })
    }
    /// The same, but each live key is handed to `each` as storage reads it and
    /// `Snapshot::keys` stays empty: a million keys are never held twice, nor as rows.
    async fn load_each(&self, each: &mut (dyn FnMut(ApiKey, Vec<KeySecret>) + Send)) -> Result<Snapshot, StoreError>;

    async fn insert_gateway(&self, gateway: &Gateway) -> Result<(), StoreError>;
    /// Replaces a live gateway's settings, found by id.
    async fn update_gateway(&self, gateway: &Gateway) -> Result<(), StoreError>;
    /// Soft-deletes a live gateway; with `force` also its keys, whose ids are returned.
    async fn delete_gateway(&self, id: Uuid, force: bool, now: DateTime<Utc>) -> Result<Vec<Uuid>, StoreError>;
    async fn get_gateway(&self, name: &str) -> Result<Option<Gateway>, StoreError>;
    async fn list_gateways(&self) -> Result<Vec<Gateway>, StoreError>;

    async fn insert_key(&self, key: &ApiKey, hash: &SecretHash) -> Result<(), StoreError>;
    /// Inserts many new keys at once (an import, a bench's seed): all or none.
    async fn insert_keys(&self, keys: &[(ApiKey, SecretHash)]) -> Result<(), StoreError>;
    /// Replaces a live key's mutable fields (name, enabled, limits, expiry).
    /// Changing the reset period carries the current usage into the new period.
    async fn update_key(&self, key: &ApiKey, now: DateTime<Utc>) -> Result<(), StoreError>;
    async fn delete_key(&self, id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError>;
    async fn get_key(&self, id: Uuid) -> Result<Option<ApiKey>, StoreError>;
    /// How many live keys there are (to size the view before a load).
    async fn count_keys(&self) -> Result<u64, StoreError>;
    /// Live keys of a gateway as `q` asks, each with the cursor that starts the page after it.
    async fn search_keys(&self, q: &KeyQuery) -> Result<Vec<(ApiKey, KeyCursor)>, StoreError>;

    async fn insert_access_token(&self, token: &StoredToken) -> Result<(), StoreError>;
    async fn revoke_access_token(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Makes the token with this hash the bootstrap token: a usable, unscoped owner, with no
    /// display prefix.
    async fn restore_owner_token(&self, hash: &SecretHash) -> Result<(), StoreError>;
    async fn save_token_last_used(&self, used: &[(Uuid, DateTime<Utc>)]) -> Result<(), StoreError>;

    async fn insert_audit(&self, event: &AuditEvent) -> Result<(), StoreError>;
    /// Audit events as `q` asks, newest first.
    async fn search_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;
    /// Deletes up to `batch` audit events from before `cutoff` (oldest first); returns how
    /// many it deleted.
    async fn prune_audit(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, StoreError>;

    /// Gives a live key a new secret; the old one stays valid until `previous_valid_until`
    /// (`None`: not at all).
    async fn rotate_key(
        &self,
        id: Uuid,
        new_hash: &SecretHash,
        new_prefix: &str,
        previous_valid_until: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError>;

    /// Adds usage-history increments (per key, hour and model).
    async fn save_usage_history(&self, buckets: &[UsageBucket]) -> Result<(), StoreError>;
    /// Usage over time (see [`HistoryQuery`]), oldest first.
    async fn usage_history(&self, q: &HistoryQuery) -> Result<Vec<HistoryRow>, StoreError>;
    /// Deletes up to `batch` usage-history rows of hours before `cutoff`; returns how many.
    async fn prune_usage_history(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, StoreError>;

    /// Ledger rows (every replica's increments added up, per key and period) written at or
    /// after `since` by the database's clock: what reconciliation compares the shared
    /// counters with; and the database's clock when they were read.
    async fn usage_changed_since(&self, since: DateTime<Utc>) -> Result<(Vec<Counters>, DateTime<Utc>), StoreError>;

    /// A key's usage in the period starting `period_start` (every replica's increments
    /// added up), if the ledger has any: what lost shared counters are seeded from.
    async fn period_usage(&self, key_id: Uuid, period_start: DateTime<Utc>) -> Result<Option<Counters>, StoreError>;

    /// Adds usage increments (per key and period) and moves last use/denial forward. Rows
    /// are stamped with the database's clock, never `now` (this replica's clock, which
    /// another replica's reconciliation must not depend on); `now` is kept for callers.
    async fn save_usage(&self, counters: &[Counters], now: DateTime<Utc>) -> Result<(), StoreError>;

    async fn set_price(&self, model: &str, price: &Price, now: DateTime<Utc>) -> Result<(), StoreError>;
    async fn delete_price(&self, model: &str) -> Result<(), StoreError>;
    async fn list_prices(&self) -> Result<Vec<(String, Price)>, StoreError>;
}

pub type DynStore = Arc<dyn Store>;

/// Opens the store a database URL names; `sealer` protects provider credentials at rest.
pub async fn open(url: &str, sealer: sealing::Sealer) -> Result<DynStore, StoreError> {
    open_with(url, sealer, true).await
}

/// Opens an existing database (an SQLite file is never created).
pub async fn open_existing(url: &str, sealer: sealing::Sealer) -> Result<DynStore, StoreError> {
    open_with(url, sealer, false).await
}

async fn open_with(url: &str, sealer: sealing::Sealer, create: bool) -> Result<DynStore, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::connect(url, sealer, create).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::connect(url, sealer).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported database URL scheme in '{}': use sqlite://PATH or postgres://…",
            redact_url(url)
        )))
    }
}

/// A database URL with any password replaced, fit for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(field: &str, v: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StoreError::Corrupt(format!("{field}: timestamp {v} out of range")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted() {
        assert_eq!(super::redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact_url("sqlite://portcullis.db"), "sqlite://portcullis.db");
    }
}
