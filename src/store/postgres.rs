//! PostgreSQL (`postgres://…`): the same schema as SQLite and the shared queries
//! (`rows.rs`), plus the advisory lock that keeps one serving process per database.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use super::rows::unavailable;
use super::sealing::Sealer;
use super::{Page, Snapshot, Store, StoreError};
use crate::domain::access::AuditEvent;
use crate::domain::budget::Counters;
use crate::domain::gateway::Gateway;
use crate::domain::key::ApiKey;
use crate::domain::pricing::Price;
use crate::domain::secret::SecretHash;
use crate::domain::tokens::StoredToken;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/postgres");

pub struct PostgresStore {
    pool: PgPool,
    url: String,
    /// Holds the advisory lock that makes this process the database's only replica.
    claim: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    sealer: Sealer,
}

impl PostgresStore {
    pub async fn connect(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(unavailable)?;
        Ok(PostgresStore { pool, url: url.to_string(), claim: tokio::sync::Mutex::new(None), sealer })
    }
}

super::rows::store_impl!(PostgresStore, {
    async fn claim(&self) -> Result<(), StoreError> {
        use sqlx::Connection;
        /// Arbitrary, fixed: "portcullis" on a phone keypad.
        const LOCK: i64 = 7_678_285_547;
        let mut held = self.claim.lock().await;
        if held.is_some() {
            return Ok(());
        }
        let mut conn = sqlx::PgConnection::connect(&self.url).await.map_err(unavailable)?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK)
            .fetch_one(&mut conn)
            .await
            .map_err(unavailable)?;
        if !got {
            return Err(StoreError::Unavailable(
                "another portcullis process is serving from this database; several replicas need scale-out \
                 (shared counters), which this version does not have"
                    .into(),
            ));
        }
        *held = Some(conn);
        Ok(())
    }

    async fn release(&self) {
        if let Some(conn) = self.claim.lock().await.take() {
            use sqlx::Connection;
            let _ = conn.close().await;
        }
    }
});
