//! What the listeners share: the in-memory view, the management-token registry and the clock.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::admin::auth::TokenRegistry;
use crate::domain::clock::Clock;
use crate::domain::view::View;
use crate::domain::window::RequestWindows;

pub struct Shared {
    view: RwLock<View>,
    pub tokens: RwLock<TokenRegistry>,
    /// Requests-per-minute windows of this process.
    pub windows: RequestWindows,
    pub clock: Arc<dyn Clock>,
}

/// The view's lock was poisoned by a panicking writer: the view may be half-updated,
/// so readers must fail closed.
#[derive(Debug, thiserror::Error)]
#[error("the in-memory view is unusable after a failed update")]
pub struct ViewPoisoned;

impl Shared {
    pub fn new(view: View, tokens: TokenRegistry, clock: Arc<dyn Clock>) -> Self {
        Shared { view: RwLock::new(view), tokens: RwLock::new(tokens), windows: RequestWindows::default(), clock }
    }

    pub fn view(&self) -> Result<RwLockReadGuard<'_, View>, ViewPoisoned> {
        self.view.read().map_err(|_| ViewPoisoned)
    }

    pub fn view_mut(&self) -> Result<RwLockWriteGuard<'_, View>, ViewPoisoned> {
        self.view.write().map_err(|_| ViewPoisoned)
    }
}
