//! Replicas on one PostgreSQL follow each other's admin changes (SPEC §6: within 1 s).
//!
//! Two tasks per replica: one holds a dedicated `LISTEN portcullis_changes` connection
//! and only wakes the other; the other reads what changed since its cursor
//! (`Store::changes_since`) when woken and every 250 ms whatever happens (a notification
//! is lost while the listener is disconnected, and a half-open connection may wait
//! forever), everything again after the listener (re)connects and every five minutes as a
//! safety net, and applies it to the view, the price book and the token registry.
//! Applying is idempotent: a change this replica made itself, or one read twice, changes
//! nothing. The database down: Check keeps answering from the view it has; both tasks
//! retry with backoff and log once when they lose and when they regain the database.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::domain::gateway::Gateway;
use crate::domain::key::ApiKey;
use crate::domain::pricing::Price;
use crate::domain::view::{KeySecret, View};
use crate::state::Shared;
use crate::store::{Changes, DynStore};

/// How often storage is read when nothing woke this replica: the bound on how late a
/// change arrives when its notification was lost.
const POLL: Duration = Duration::from_millis(250);
/// Everything is read again this often, whatever the cursor says.
const FULL_RELOAD_EVERY: Duration = Duration::from_secs(300);
/// The longest wait between two attempts while the database is unreachable.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the listener tells the reader.
#[derive(Default)]
struct Wake {
    changed: Notify,
    /// Read everything: notifications may have been lost.
    reload: AtomicBool,
}

/// Starts following the changes other replicas make, if the store is shared by replicas
/// (PostgreSQL), from `cursor` (`Store::change_cursor` before the view was loaded); both
/// tasks end once `shared` is dropped.
pub fn spawn(shared: &Arc<Shared>, store: &DynStore, cursor: i64) {
    if !store.is_shared() {
        return;
    }
    let wake = Arc::new(Wake::default());
    // Dropped when the reader ends, which stops the listener.
    let (alive, gone) = watch::channel(());
    tokio::spawn(listen(Arc::clone(store), Arc::clone(&wake), gone));
    tokio::spawn(follow(Arc::downgrade(shared), Arc::clone(store), cursor, wake, alive));
}

/// Doubling waits between failed attempts, up to `BACKOFF_MAX`.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(POLL)
    }

    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }

    fn reset(&mut self) {
        self.0 = POLL;
    }
}

/// Holds the `LISTEN` connection: each notification wakes the reader; after every
/// (re)connection the reader reads everything, since what was notified meanwhile is gone.
async fn listen(store: DynStore, wake: Arc<Wake>, mut stop: watch::Receiver<()>) {
    let mut backoff = Backoff::new();
    let mut lost = false;
    // The reader starts from the cursor of the view loaded at start.
    let mut first = true;
    loop {
        let connected = tokio::select! {
            _ = stop.changed() => return,
            c = store.listen_changes() => c,
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                if !lost {
                    tracing::warn!(error = %e, "cannot listen for changes of other replicas; polling meanwhile, retrying");
                    lost = true;
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff.next()) => continue,
                }
            }
        };
        backoff.reset();
        if lost {
            tracing::info!("listening for changes of other replicas again");
        }
        if !first {
            wake.reload.store(true, Ordering::SeqCst);
            wake.changed.notify_one();
        }
        first = false;
        loop {
            let r = tokio::select! {
                _ = stop.changed() => return,
                r = listener.changed() => r,
            };
            match r {
                Ok(()) => wake.changed.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "lost the connection listening for changes of other replicas; polling meanwhile, reconnecting");
                    lost = true;
                    break;
                }
            }
        }
    }
}

/// Reads and applies changes while the server lives.
async fn follow(shared: Weak<Shared>, store: DynStore, start: i64, wake: Arc<Wake>, _alive: watch::Sender<()>) {
    // `None`: read everything (after the listener reconnected, periodically); the view
    // loaded at start is everything up to `start`.
    let mut cursor: Option<i64> = Some(start);
    let mut last_full = Instant::now();
    let mut backoff = Backoff::new();
    let mut failing = false;
    loop {
        if wake.reload.swap(false, Ordering::SeqCst) || last_full.elapsed() >= FULL_RELOAD_EVERY {
            cursor = None;
        }
        let Some(shared) = shared.upgrade() else { return };
        let read = {
            // No admin write of this replica between reading and applying: a change read
            // before that write committed is never applied over it.
            let _writes = shared.writes.lock().await;
            // Keys unchanged in the view are dropped as they are read (reading from 0
            // reads every key).
            let mut changed =
                |k: &ApiKey, secrets: &[KeySecret]| shared.view().is_ok_and(|v| !unchanged(&v, k, secrets));
            match store.changes_since_keeping(cursor.unwrap_or(0), &mut changed).await {
                Ok(changes) => {
                    let (next, version) = (changes.next, changes.version);
                    apply(&shared, changes).map(|applied| (next, version, applied))
                }
                Err(e) => Err(e.to_string()),
            }
        };
        let pause = match read {
            Ok((next, version, applied)) => {
                if cursor.is_none() {
                    last_full = Instant::now();
                }
                cursor = Some(next);
                shared.metrics.synced(version);
                if applied > 0 {
                    tracing::debug!(applied, version, "applied changes of other replicas");
                }
                if failing {
                    tracing::info!("the view follows the database again");
                    failing = false;
                }
                backoff.reset();
                POLL
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot bring the view up to date with the database; Check answers from the view it has, retrying");
                    failing = true;
                }
                backoff.next()
            }
        };
        drop(shared);
        tokio::select! {
            _ = wake.changed.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// What differs between the view and the changes read, decided under the read lock.
#[derive(Default)]
struct Plan {
    gateways: Vec<Gateway>,
    /// Gateways to remove, with the keys the view still has of each.
    removed_gateways: Vec<(Uuid, Vec<Uuid>)>,
    keys: Vec<(ApiKey, Vec<KeySecret>)>,
    removed_keys: Vec<Uuid>,
}

impl Plan {
    fn new(view: &View, c: &mut Changes) -> Plan {
        let mut plan = Plan::default();
        for g in c.gateways.drain(..) {
            if view.gateway(&g.name).is_none_or(|have| **have != g) {
                plan.gateways.push(g);
            }
        }
        for &id in &c.removed_gateways {
            if view.gateway_name(id).is_some() {
                plan.removed_gateways.push((id, view.key_ids_in(id)));
            }
        }
        for (k, secrets) in c.keys.drain(..) {
            if !unchanged(view, &k, &secrets) {
                plan.keys.push((k, secrets));
            }
        }
        plan.removed_keys = c.removed_keys.iter().copied().filter(|&id| view.key_by_id(id).is_some()).collect();
        plan
    }

    fn len(&self) -> usize {
        self.gateways.len() + self.removed_gateways.len() + self.keys.len() + self.removed_keys.len()
    }
}

/// Whether the view has this key as read, with these secrets. Last use is written by the
/// usage flush without a new version: not a change.
fn unchanged(view: &View, k: &ApiKey, secrets: &[KeySecret]) -> bool {
    let Some(have) = view.key_by_id(k.id) else { return false };
    // Every field named, so that a new one is compared too.
    let ApiKey { id, gateway_id, name, prefix, enabled, legacy, limits, created_at, expires_at, last_used_at: _ } = k;
    let same = (*id, *gateway_id, *enabled, *legacy, *limits, *created_at, *expires_at)
        == (have.id, have.gateway_id, have.enabled, have.legacy, have.limits, have.created_at, have.expires_at)
        && *name == have.name
        && *prefix == have.prefix;
    same && view.secrets_of(k.id).as_deref() == Some(secrets)
}

/// Applies what differs; returns how many things changed here.
fn apply(shared: &Shared, mut changes: Changes) -> Result<usize, String> {
    let plan = Plan::new(&*shared.view().map_err(|e| e.to_string())?, &mut changes);
    let mut applied = plan.len();
    if applied > 0 {
        let mut forget = plan.removed_keys.clone();
        {
            let mut view = shared.view_mut().map_err(|e| e.to_string())?;
            for (id, keys) in &plan.removed_gateways {
                view.remove_gateway_by_id(*id);
                for &k in keys {
                    view.remove_key(k);
                }
            }
            for &id in &plan.removed_keys {
                view.remove_key(id);
            }
            for g in plan.gateways {
                view.upsert_gateway(g);
            }
            for (k, secrets) in plan.keys {
                view.upsert_key(k, secrets);
            }
        }
        forget.extend(plan.removed_gateways.into_iter().flat_map(|(_, keys)| keys));
        shared.keys_removed(&forget);
    }
    applied += apply_prices(shared, changes.prices, &changes.removed_prices)?;
    if !changes.access_tokens.is_empty() {
        let mut tokens = shared.tokens.write().map_err(|_| "the token registry lock is poisoned".to_string())?;
        for t in changes.access_tokens {
            applied += usize::from(tokens.apply(t));
        }
    }
    Ok(applied)
}

fn poisoned<T>(_: T) -> String {
    "the price book lock is poisoned".to_string()
}

fn apply_prices(shared: &Shared, set: Vec<(String, Price)>, removed: &[String]) -> Result<usize, String> {
    let (set, removed): (Vec<_>, Vec<_>) = {
        let book = shared.limiters.prices.read().map_err(poisoned)?;
        (
            set.into_iter().filter(|(m, p)| book.get(m) != Some(p)).collect(),
            removed.iter().filter(|m| book.get(m).is_some()).collect(),
        )
    };
    let n = set.len() + removed.len();
    if n > 0 {
        let mut book = shared.limiters.prices.write().map_err(poisoned)?;
        for m in removed {
            book.remove(m);
        }
        for (m, p) in set {
            book.set(m, p);
        }
    }
    Ok(n)
}
