//! SQLite: the embedded default (`sqlite://portcullis.db`, created if missing). The
//! queries are shared with PostgreSQL (`rows.rs`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow};
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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
    sealer: Sealer,
}

super::rows::row_mappers!(SqliteRow, sqlx::Sqlite);

impl SqliteStore {
    pub async fn connect(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Ok(SqliteStore { pool, sealer })
    }
}

super::rows::store_impl!(SqliteStore, {});

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    /// Tokens an earlier version's bootstrap made (named `bootstrap`, with a prefix of the
    /// chosen secret) become bootstrap tokens without a prefix; others are left alone.
    #[tokio::test]
    async fn the_bootstrap_migration_marks_earlier_bootstrap_tokens() {
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:").await.unwrap();
        for sql in [
            include_str!("migrations/sqlite/0001_core.sql"),
            include_str!("migrations/sqlite/0002_usage_prices_rotation.sql"),
            include_str!("migrations/sqlite/0003_access_audit.sql"),
        ] {
            sqlx::raw_sql(sql).execute(&mut db).await.unwrap();
        }
        sqlx::raw_sql(
            "INSERT INTO access_tokens (id, name, secret_hash, prefix, role, created_at) VALUES \
             ('a', 'bootstrap', x'01', 'owner-token-', 'owner', 0), ('b', 'ci', x'02', 'pcm_AbCdEfGh', 'admin', 0)",
        )
        .execute(&mut db)
        .await
        .unwrap();
        sqlx::raw_sql(include_str!("migrations/sqlite/0004_bootstrap_token.sql")).execute(&mut db).await.unwrap();
        let rows: Vec<(String, String, bool)> =
            sqlx::query_as("SELECT id, prefix, bootstrap FROM access_tokens ORDER BY id")
                .fetch_all(&mut db)
                .await
                .unwrap();
        assert_eq!(rows, [("a".into(), "".into(), true), ("b".into(), "pcm_AbCdEfGh".into(), false)]);
    }
}
