//! What the listeners share: the in-memory view, the management-token registry and the clock.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use crate::domain::check::Limiters;
use crate::domain::clock::Clock;
use crate::domain::tokens::TokenRegistry;
use crate::domain::view::View;

pub struct Shared {
    view: RwLock<View>,
    pub tokens: RwLock<TokenRegistry>,
    /// Request windows, budgets and prices of this process.
    pub limiters: Limiters,
    pub clock: Arc<dyn Clock>,
    /// Metering streams not yet recorded (shutdown waits for them before the last flush).
    metering: std::sync::atomic::AtomicUsize,
    /// Signalled when the last metering stream in flight is recorded.
    metering_done: tokio::sync::Notify,
    /// One usage flush at a time: the last flush at shutdown must not miss counters a
    /// periodic flush took but has not written yet.
    pub flush: tokio::sync::Mutex<()>,
    /// Admin writes, and the application of changes other replicas made, one at a time:
    /// so that the order of commits and of view updates agree (a change read before this
    /// replica's own write committed is never applied after it).
    pub writes: tokio::sync::Mutex<()>,
    pub metrics: crate::metrics::Metrics,
    /// The counters shared with other replicas (Redis), when configured: also in
    /// `limiters.counters`; here for their upkeep and metrics.
    pub shared_counters: Option<Arc<crate::shared_counters::SharedCounters>>,
}

/// The view's lock was poisoned by a panicking writer: the view may be half-updated,
/// so readers must fail closed.
#[derive(Debug, thiserror::Error)]
#[error("the in-memory view is unusable after a failed update")]
pub struct ViewPoisoned;

impl Shared {
    pub fn new(view: View, tokens: TokenRegistry, limiters: Limiters, clock: Arc<dyn Clock>) -> Self {
        Shared {
            view: RwLock::new(view),
            tokens: RwLock::new(tokens),
            limiters,
            clock,
            metering: Default::default(),
            metering_done: Default::default(),
            flush: Default::default(),
            writes: Default::default(),
            metrics: Default::default(),
            shared_counters: None,
        }
    }

    pub fn view(&self) -> Result<RwLockReadGuard<'_, View>, ViewPoisoned> {
        self.view.read().map_err(|_| ViewPoisoned)
    }

    /// The view for metering, also after a panic poisoned its lock: a response that was
    /// served is charged to its key whatever happened to an admin write meanwhile (Check,
    /// which can refuse, denies instead).
    pub fn view_for_metering(&self) -> RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a key was deleted: Check stops knowing it and its counters are dropped (its
    /// stored usage stays for history).
    pub fn key_deleted(&self, id: Uuid) -> Result<(), ViewPoisoned> {
        self.view_mut()?.remove_key(id);
        self.keys_removed(&[id]);
        Ok(())
    }

    /// After a gateway was deleted together with `keys`: the same for each of them.
    pub fn gateway_deleted(&self, name: &str, keys: &[Uuid]) -> Result<(), ViewPoisoned> {
        self.view_mut()?.remove_gateway(name);
        self.keys_removed(keys);
        Ok(())
    }

    /// Keys gone from the view (deleted here or by another replica): their counters go.
    /// The one place counters learn that a key is gone.
    pub fn keys_removed(&self, ids: &[Uuid]) {
        for &id in ids {
            self.limiters.meters.forget(id);
        }
    }

    /// Marks a metering stream as started; the guard marks it recorded when dropped.
    pub fn metering_started(self: &Arc<Self>) -> MeteringGuard {
        self.metering.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        MeteringGuard(Arc::clone(self))
    }

    /// Resolves once no metering stream is in flight.
    pub async fn metering_recorded(&self) {
        loop {
            // Created before the check, so a wake-up between the two is not lost.
            let done = self.metering_done.notified();
            if self.metering.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    }

    pub fn view_mut(&self) -> Result<RwLockWriteGuard<'_, View>, ViewPoisoned> {
        self.view.write().map_err(|_| ViewPoisoned)
    }
}

pub struct MeteringGuard(Arc<Shared>);

impl Drop for MeteringGuard {
    fn drop(&mut self) {
        if self.0.metering.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.metering_done.notify_waiters();
        }
    }
}
