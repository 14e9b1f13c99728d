//! What runs in the background of a server: the usage flush (every
//! `--usage-flush-interval`), the sweep of request windows and unsettled reservations
//! (every minute), and the audit retention (hourly). Each stops with the server.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::state::Shared;
use crate::store::{DynStore, Store};

/// How the background work is set.
#[derive(Debug, Clone, Copy)]
pub struct Upkeep {
    /// A reservation whose response never started metering is released after this.
    pub reservation_ttl: chrono::Duration,
    /// Audit events older than this are deleted; zero keeps them all.
    pub audit_retention: chrono::Duration,
    /// Usage-history hours older than this are deleted; zero keeps them all.
    pub usage_history_retention: chrono::Duration,
    /// How often changed usage is written.
    pub flush_every: Duration,
}

/// Starts the background work of a server; each task ends once `shared` is dropped.
pub fn spawn(shared: &Arc<Shared>, store: &DynStore, upkeep: Upkeep) {
    let ttl = upkeep.reservation_ttl;
    every(Duration::from_secs(60), shared, move |shared| async move {
        sweep(&shared, ttl);
    });
    for (what, retention) in
        [(Retained::Audit, upkeep.audit_retention), (Retained::UsageHistory, upkeep.usage_history_retention)]
    {
        if retention > chrono::Duration::zero() {
            let store = Arc::clone(store);
            every(Duration::from_secs(3600), shared, move |shared| {
                let (store, cutoff) = (Arc::clone(&store), shared.clock.now() - retention);
                async move {
                    drop(shared);
                    prune(&*store, what, cutoff).await;
                }
            });
        }
    }
    if let Some(counters) = &shared.shared_counters {
        // Counters a Check seeded from memory (Redis lacked them) are raised to the ledger
        // here, off the request path.
        let ledger = Arc::clone(store);
        crate::shared_counters::SharedCounters::spawn_seeder(counters, move |key_id, period_start| {
            let ledger = Arc::clone(&ledger);
            Box::pin(async move { ledger.period_usage(key_id, period_start).await.map_err(|e| e.to_string()) })
        });
        every(Duration::from_secs(1), shared, |shared| async move {
            if let Some(counters) = &shared.shared_counters {
                counters.tick(shared.clock.monotonic()).await;
            }
        });
        let (store, since) = (Arc::clone(store), Arc::new(std::sync::Mutex::new(None)));
        every(RECONCILE_EVERY, shared, move |shared| {
            let (store, since) = (Arc::clone(&store), Arc::clone(&since));
            async move { reconcile(&*store, &shared, &since).await }
        });
    }
    if store.is_shared() {
        let store = Arc::clone(store);
        every(CLAIM_CHECK_EVERY, shared, move |shared| {
            let store = Arc::clone(&store);
            async move {
                drop(shared);
                keep_claim(&*store).await;
            }
        });
    }
    let store = Arc::clone(store);
    every(upkeep.flush_every.max(Duration::from_millis(10)), shared, move |shared| {
        let store = Arc::clone(&store);
        async move {
            flush_usage(&*store, &shared, false).await;
        }
    });
}

/// Runs `task` every `period` (the first time at once) while the server lives.
fn every<F, Fut>(period: Duration, shared: &Arc<Shared>, task: F)
where
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak: Weak<Shared> = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            task(shared).await;
        }
    });
}

/// How often a claim on a shared database is checked (and taken again if it was lost).
const CLAIM_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Takes the database's claim again if the connection holding it was lost.
async fn keep_claim(store: &dyn Store) {
    match store.keep_claim().await {
        Ok(true) => tracing::warn!("the database claim was lost (connection gone) and is taken again"),
        Ok(false) => {}
        // Down: tried again at the next check (the flush logs the outage).
        Err(e) if e.is_transient() => tracing::debug!(error = %e, "the database claim cannot be checked now"),
        // Refused: a process that serves alone took the database meanwhile.
        Err(e) => tracing::error!(error = %e, "the database claim was lost and cannot be taken again"),
    }
}

/// Writes changed usage counters and token last-use times; on failure they stay in memory
/// for the next attempt. The database going away and coming back is logged once each
/// (and shown by `portcullis_database_up`), not at every attempt.
pub async fn flush_usage(store: &dyn Store, shared: &Shared, last: bool) -> bool {
    let _one_at_a_time = shared.flush.lock().await;
    let mut failure = None;
    let used = shared.tokens.read().map(|t| t.last_used_to_write(last)).unwrap_or_default();
    if !used.is_empty() {
        match store.save_token_last_used(&used).await {
            Ok(()) => {
                if let Ok(mut t) = shared.tokens.write() {
                    t.persisted(&used);
                }
            }
            Err(e) => failure = Some(("management-token use", e)),
        }
    }
    let history = shared.limiters.meters.take_history();
    if !history.is_empty()
        && let Err(e) = store.save_usage_history(&history).await
    {
        shared.limiters.meters.restore_history(history);
        failure = failure.or(Some(("usage history", e)));
    }
    let dirty = shared.limiters.meters.take_dirty();
    if !dirty.is_empty()
        && let Err(e) = store.save_usage(&dirty, shared.clock.now()).await
    {
        shared.metrics.flush_failed();
        let keys = dirty.len();
        shared.limiters.meters.restore(dirty);
        failure = Some(("usage", e));
        tracing::debug!(keys, "usage kept in memory for the next flush");
    }
    match failure {
        None => {
            if shared.metrics.database(true) {
                tracing::warn!("the database answers again: usage kept in memory is written");
            }
            true
        }
        Some((what, e)) => {
            if shared.metrics.database(false) {
                tracing::error!(error = %e, "could not write {what}: the database is unreachable; usage is kept in memory and written when it answers");
            } else {
                tracing::debug!(error = %e, "could not write {what}; will retry");
            }
            false
        }
    }
}

/// The once-a-minute sweep: forgets idle request windows and releases reservations older
/// than `ttl` whose response never started metering (ages on the monotonic clock; one
/// whose metering stream is open is kept until it ends). Returns how many it released.
pub fn sweep(shared: &Shared, ttl: chrono::Duration) -> usize {
    let expired = shared.limiters.counters.sweep(shared.clock.monotonic(), ttl);
    if expired > 0 {
        tracing::warn!(expired, "released budget reservations that metering never settled");
    }
    expired
}

/// How often the shared counters are compared with the usage ledger.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Compares the shared counters with the ledger rows written since the last pass (by the
/// database's clock, which stamps them, with a minute's margin for transactions still
/// running when the last pass read), raising Redis to the ledger where it is behind and
/// what this replica knows of each key.
pub async fn reconcile(
    store: &dyn Store,
    shared: &Shared,
    since: &std::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>>,
) {
    let Some(counters) = &shared.shared_counters else { return };
    let now = shared.clock.read();
    let from =
        since.lock().ok().and_then(|s| *s).map_or(chrono::DateTime::UNIX_EPOCH, |t| t - chrono::Duration::minutes(1));
    let (rows, read_at) = match store.usage_changed_since(from).await {
        Ok(read) => read,
        Err(e) => {
            tracing::debug!(error = %e, "reconciliation skipped: the ledger cannot be read");
            return;
        }
    };
    let budgeted = |id| {
        shared
            .view_for_metering()
            .key_by_id(id)
            .is_some_and(|k| k.limits.token_limit.is_some() || k.limits.cost_limit_micros.is_some())
    };
    counters.reconcile(&rows, budgeted, now).await;
    if let Ok(mut s) = since.lock() {
        *s = Some(read_at);
    }
}

/// Rows deleted per statement: small batches keep each write short.
const PRUNE_BATCH: u32 = 5_000;

/// What is deleted once old enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    /// Audit events (`--audit-retention`).
    Audit,
    /// Usage-history hours (`--usage-history-retention`).
    UsageHistory,
}

/// Deletes the audit events from before `cutoff`, a batch at a time; returns how many.
pub async fn prune_audit(store: &dyn Store, cutoff: chrono::DateTime<chrono::Utc>) -> u64 {
    prune(store, Retained::Audit, cutoff).await
}

/// Deletes `what` from before `cutoff`, a batch at a time; returns how many.
pub async fn prune(store: &dyn Store, what: Retained, cutoff: chrono::DateTime<chrono::Utc>) -> u64 {
    let (name, flag) = match what {
        Retained::Audit => ("audit events", "--audit-retention"),
        Retained::UsageHistory => ("usage-history hours", "--usage-history-retention"),
    };
    let mut deleted = 0;
    loop {
        let batch = match what {
            Retained::Audit => store.prune_audit(cutoff, PRUNE_BATCH).await,
            Retained::UsageHistory => store.prune_usage_history(cutoff, PRUNE_BATCH).await,
        };
        match batch {
            Ok(n) => {
                deleted += n;
                if n < u64::from(PRUNE_BATCH) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not delete old {name}; next hour again");
                break;
            }
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, %cutoff, "deleted {name} older than {flag}");
    }
    deleted
}
