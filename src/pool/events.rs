//! State changes of every breaker of a pool, tagged with route and endpoint.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;

use crate::breaker::StateChange;
use crate::route::Route;

/// A breaker of the pool changed state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PoolStateChange {
    /// The breaker's route.
    pub route: Route,
    /// The breaker's endpoint.
    pub endpoint: Arc<str>,
    /// The transition.
    pub change: StateChange,
}

impl fmt::Display for PoolStateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} breaker on {}: {} -> {} ({})",
            self.route, self.endpoint, self.change.from, self.change.to, self.change.reason
        )
    }
}

pub(crate) type PoolListener = Arc<dyn Fn(&PoolStateChange) + Send + Sync>;

/// The pool's listeners; every breaker forwards its transitions here.
#[derive(Default)]
pub(crate) struct PoolListeners {
    listeners: RwLock<Vec<PoolListener>>,
}

impl fmt::Debug for PoolListeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.listeners.read().map_or(0, |l| l.len());
        f.debug_struct("PoolListeners")
            .field("count", &count)
            .finish()
    }
}

impl PoolListeners {
    pub(crate) fn add(&self, listener: PoolListener) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    pub(crate) fn emit(&self, change: &PoolStateChange) {
        // A copy, so no lock is held while listeners run: one may register another.
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for listener in listeners {
            // Caught here, not only by the breaker that forwards the change: a panic would
            // otherwise end this loop, and the listeners after it would never hear of it.
            let _ = catch_unwind(AssertUnwindSafe(|| listener(change)));
        }
    }
}
