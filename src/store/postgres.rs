//! PostgreSQL (`postgres://…`): the same schema as SQLite and the shared queries
//! (`rows.rs`), plus what several replicas on one database need: the advisory lock that
//! keeps a replica without shared counters alone, the changes since a cursor and the
//! `LISTEN` connection that wakes a replica when another commits one.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use uuid::Uuid;

use super::rows::unavailable;
use super::sealing::Sealer;
use super::{ChangeListener, Changes, Snapshot, Store, StoreError};
use crate::domain::access::AuditEvent;
use crate::domain::budget::{Counters, UsageBucket};
use crate::domain::gateway::Gateway;
use crate::domain::key::ApiKey;
use crate::domain::pricing::Price;
use crate::domain::secret::SecretHash;
use crate::domain::tokens::StoredToken;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/postgres");

/// The channel the migration's triggers notify at every commit that changes the view.
const CHANNEL: &str = "portcullis_changes";

/// The oldest transaction still running (the cursor of `changes_since`).
const XMIN: &str = "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT)";

/// The advisory lock replicas claim the database with; arbitrary, fixed: "portcullis" on
/// a phone keypad.
const LOCK: i64 = 7_678_285_547;

pub struct PostgresStore {
    pool: PgPool,
    url: String,
    /// Holds the advisory lock: exclusive for a replica alone (in-process counters), shared
    /// among replicas with shared counters.
    claim: tokio::sync::Mutex<Option<Claim>>,
    sealer: Sealer,
}

/// The advisory lock this process claimed the database with, and how to take it again.
struct Claim {
    /// The connection holding it; `None` once lost and not taken again yet.
    conn: Option<sqlx::PgConnection>,
    call: &'static str,
    refusal: &'static str,
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

impl PostgresStore {
    /// Takes the advisory lock with `call` on a connection of its own, held until release.
    async fn take_lock(&self, call: &'static str, refusal: &'static str) -> Result<(), StoreError> {
        let mut held = self.claim.lock().await;
        if held.is_some() {
            return Ok(());
        }
        let conn = self.lock_on_new_connection(call).await?.ok_or_else(|| StoreError::Unavailable(refusal.into()))?;
        *held = Some(Claim { conn: Some(conn), call, refusal });
        Ok(())
    }

    /// The connection holding the lock, or `None` when another process holds it in a way
    /// that excludes this claim.
    async fn lock_on_new_connection(&self, call: &str) -> Result<Option<sqlx::PgConnection>, StoreError> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url).await.map_err(unavailable)?;
        let got: bool =
            sqlx::query_scalar(&format!("SELECT {call}")).bind(LOCK).fetch_one(&mut conn).await.map_err(unavailable)?;
        Ok(got.then_some(conn))
    }
}

/// The `LISTEN portcullis_changes` connection.
struct Listening(PgListener);

#[async_trait]
impl ChangeListener for Listening {
    async fn changed(&mut self) -> Result<(), StoreError> {
        match self.0.try_recv().await {
            Ok(Some(_)) => Ok(()),
            // sqlx would re-LISTEN by itself on the next call, but what was notified
            // meanwhile is gone: the caller must know, to read everything again.
            Ok(None) => Err(StoreError::Unavailable("the LISTEN connection was lost".into())),
            Err(e) => Err(unavailable(e)),
        }
    }
}

super::rows::store_impl!(PostgresStore, {
    async fn claim(&self) -> Result<(), StoreError> {
        self.take_lock(
            "pg_try_advisory_lock($1)",
            "another portcullis process is serving from this database; to run several replicas give every \
             replica the same --redis-url (shared counters)",
        )
        .await
    }

    async fn claim_shared(&self) -> Result<(), StoreError> {
        self.take_lock(
            "pg_try_advisory_lock_shared($1)",
            "another portcullis process is serving from this database alone (started without --redis-url, \
             its counters in process); stop it or give every replica the same --redis-url",
        )
        .await
    }

    fn is_shared(&self) -> bool {
        true
    }

    /// The cursor is a transaction id, not a change version: sequence values commit out
    /// of order (version 11 can commit, and be read, before version 10 does), so "rows
    /// with a version above the highest one read" would miss 10 for good. Instead every
    /// row carries the id of the transaction that last wrote it (`txid`, set by the
    /// trigger), and one REPEATABLE READ snapshot reads both the rows written from
    /// `cursor` on and `pg_snapshot_xmin` of that snapshot, the next cursor: every
    /// transaction below it had finished, so its rows were in this snapshot, and every one
    /// the snapshot missed (running or not yet started) has an id at or above it. A change
    /// can thus be read twice (the margin between the two), never missed; a long
    /// transaction anywhere on the server holds the cursor back and widens that margin.
    async fn changes_since_keeping(&self, cursor: i64, keep: &mut super::KeepKey<'_>) -> Result<Changes, StoreError> {
        use super::rows::{access_tokens, gateways, keys, prices};
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let next: i64 = sqlx::query_scalar(XMIN).fetch_one(&mut *tx).await.map_err(unavailable)?;
        let (gateways, removed_gateways, v1) = gateways::changed_since(&mut tx, &self.sealer, cursor).await?;
        let (keys, removed_keys, v2) = keys::changed_since(&mut tx, cursor, keep).await?;
        let (prices, removed_prices, v3) = prices::changed_since(&mut tx, cursor).await?;
        let (access_tokens, v4) = access_tokens::changed_since(&mut tx, cursor).await?;
        tx.rollback().await.map_err(unavailable)?;
        Ok(Changes {
            gateways,
            removed_gateways,
            keys,
            removed_keys,
            prices,
            removed_prices,
            access_tokens,
            next,
            version: v1.max(v2).max(v3).max(v4),
        })
    }

    /// `pg_snapshot_xmin` now: every transaction below it has finished, so a load that
    /// starts later sees its rows; one running or starting later has an id at or above it.
    async fn change_cursor(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar(XMIN).fetch_one(&self.pool).await.map_err(unavailable)
    }

    async fn listen_changes(&self) -> Result<Box<dyn ChangeListener>, StoreError> {
        // Its own connection (not from the pool, which PgBouncer-style poolers may front
        // in transaction mode, where LISTEN does not work).
        let mut listener = PgListener::connect(&self.url).await.map_err(unavailable)?;
        listener.listen(CHANNEL).await.map_err(unavailable)?;
        Ok(Box::new(Listening(listener)))
    }

    /// A session's advisory lock ends with its connection: after a restart of PostgreSQL
    /// (or `pg_terminate_backend`) nothing holds it until it is taken again here.
    async fn keep_claim(&self) -> Result<bool, StoreError> {
        use sqlx::Connection;
        let mut held = self.claim.lock().await;
        let Some(claim) = held.as_mut() else { return Ok(false) };
        if let Some(conn) = claim.conn.as_mut() {
            if conn.ping().await.is_ok() {
                return Ok(false);
            }
            claim.conn = None;
        }
        // Taken meanwhile by a process that excludes this one: not transient.
        let conn = self.lock_on_new_connection(claim.call).await?;
        claim.conn = Some(conn.ok_or_else(|| StoreError::Config(claim.refusal.into()))?);
        Ok(true)
    }

    async fn release(&self) {
        if let Some(Claim { conn: Some(conn), .. }) = self.claim.lock().await.take() {
            use sqlx::Connection;
            let _ = conn.close().await;
        }
    }
});
