//! SQLite: the embedded default (`sqlite://portcullis.db`, created if missing). The
//! queries are shared with PostgreSQL (`rows.rs`).
//!
//! The file is watched: a database file deleted or replaced under the running process
//! would otherwise keep taking writes into the unlinked file, lost at the next start.
//! Every connection handed out checks that the path still names the file opened at
//! start; once it does not, storage is unavailable until a restart opens the new file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use uuid::Uuid;

use super::rows::unavailable;
use super::sealing::Sealer;
use super::{Snapshot, Store, StoreError};
use crate::domain::access::AuditEvent;
use crate::domain::budget::{Counters, UsageBucket};
use crate::domain::gateway::Gateway;
use crate::domain::key::ApiKey;
use crate::domain::pricing::Price;
use crate::domain::secret::SecretHash;
use crate::domain::tokens::StoredToken;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
    sealer: Sealer,
    /// The database file, when there is one (not for `sqlite::memory:`).
    file: Option<Arc<FileIdentity>>,
}

/// Which file the database is: the device and inode the path named at start.
#[derive(Debug)]
struct FileIdentity {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// Logged once, when the file is first found gone or replaced.
    lost: AtomicBool,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity { path: path.to_path_buf(), dev: m.dev(), ino: m.ino(), lost: AtomicBool::new(false) })
    }

    /// Fails when the path no longer names the file opened at start.
    fn check(&self) -> Result<(), sqlx::Error> {
        let same = std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if same {
            return Ok(());
        }
        if !self.lost.swap(true, Ordering::Relaxed) {
            tracing::error!(
                path = %self.path.display(),
                "the database file was deleted or replaced while portcullis was running: writes are refused \
                 (admin answers UNAVAILABLE, usage stays buffered in memory); restart portcullis to open the file \
                 now at this path"
            );
        }
        Err(sqlx::Error::Configuration(
            format!("the database file {} was deleted or replaced while running; restart", self.path.display()).into(),
        ))
    }
}

impl SqliteStore {
    /// Opens the database at `url`; `create` makes the file when it is missing.
    pub async fn connect(url: &str, sealer: Sealer, create: bool) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(unavailable)?
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // A million keys at start: SQLite's thread runs ahead of the task reading its
            // rows by up to this many, instead of waiting on it every 50.
            .row_buffer_size(1024);
        let in_memory = options.get_filename() == Path::new(":memory:");
        // Create the file (and the WAL settings) once, then learn which file it is.
        if !in_memory {
            use sqlx::ConnectOptions;
            let conn = options.connect().await.map_err(unavailable)?;
            sqlx::Connection::close(conn).await.map_err(unavailable)?;
        }
        let file = match in_memory {
            true => None,
            false => Some(Arc::new(FileIdentity::of(options.get_filename()).map_err(|e| {
                StoreError::Unavailable(format!("reading {}: {e}", options.get_filename().display()).into())
            })?)),
        };
        // Later connections never create a file: a deleted database must not come back empty.
        let options = options.create_if_missing(false);
        let (on_connect, on_acquire) = (file.clone(), file.clone());
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |_, _| {
                let file = on_connect.clone();
                Box::pin(async move { file.map_or(Ok(()), |f| f.check()) })
            })
            .before_acquire(move |_, _| {
                let file = on_acquire.clone();
                Box::pin(async move { file.map_or(Ok(true), |f| f.check().map(|()| true)) })
            })
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        Ok(SqliteStore { pool, sealer, file })
    }
}

super::rows::store_impl!(SqliteStore, {
    /// Folds the write-ahead log into the database file, so the file alone (copied,
    /// backed up) holds every change, then closes the connections.
    async fn release(&self) {
        let checkpoint = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&self.pool).await;
        match checkpoint {
            Ok(row) if row.try_get::<i64, _>(0).unwrap_or(1) == 0 => {}
            Ok(_) => tracing::warn!("the write-ahead log could not be fully checkpointed (a reader held it)"),
            Err(e) => tracing::warn!(error = %e, "the write-ahead log could not be checkpointed"),
        }
        self.pool.close().await;
    }

    async fn backup(&self, to: &Path) -> Result<(), StoreError> {
        if self.file.is_none() {
            return Err(StoreError::Unsupported("an in-memory database has nothing to back up".into()));
        }
        if to.exists() {
            return Err(StoreError::Unsupported(format!("{} already exists; not overwriting it", to.display())));
        }
        let target = to.to_str().ok_or_else(|| StoreError::Unsupported("the backup path is not UTF-8".into()))?;
        // One read transaction: a consistent copy of the committed state, WAL included,
        // while the server keeps writing.
        sqlx::query("VACUUM INTO $1").bind(target).execute(&self.pool).await.map_err(unavailable)?;
        Ok(())
    }
});

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
