//! What a call returns when it was served by a fallback rather than by a database, and the
//! fallbacks configured per route.
//!
//! The order is fixed: the route's endpoints (with failover), then the cache, then the call's
//! own fallback, then the route's fallback, then the error. Fallbacks run only when the
//! database could not serve: a breaker refused, every endpoint failed with an infrastructure
//! error, or the call timed out. A query error (bad SQL, a constraint, no row) is the answer
//! and is returned as it is.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::route::Route;

/// A result and where it came from.
///
/// Dereferences to the value; [`is_stale`](Self::is_stale) says whether it came from the
/// database just now.
#[derive(Debug)]
pub struct Served<T> {
    value: T,
    source: Source,
}

/// Where a [`Served`] value came from.
#[derive(Debug)]
#[non_exhaustive]
pub enum Source {
    /// The named endpoint answered the call.
    Database {
        /// The endpoint.
        endpoint: Arc<str>,
    },
    /// No endpoint could answer; this is the value cached by an earlier call.
    Cache {
        /// How long ago the value was stored.
        age: Duration,
        /// Why the database could not answer.
        cause: Error,
    },
    /// No endpoint could answer and nothing was cached; a fallback made the value.
    Fallback {
        /// Why the database could not answer.
        cause: Error,
    },
    /// A keyed write waits in the outbox, which applies it exactly once when the write
    /// route serves again (see [`Keyed::or_enqueue`](crate::Keyed::or_enqueue)).
    Queued {
        /// The write's idempotency key.
        key: String,
        /// Its place in the queue when it was queued, 1 for the next to be applied.
        position: u64,
        /// Why the write route could not take it; `None` when it joined earlier writes
        /// waiting in the queue rather than overtake them.
        cause: Option<Error>,
    },
}

impl<T> Served<T> {
    pub(crate) fn new(value: T, source: Source) -> Self {
        Self { value, source }
    }

    /// The value.
    pub fn into_inner(self) -> T {
        self.value
    }

    /// The value and where it came from.
    pub fn into_parts(self) -> (T, Source) {
        (self.value, self.source)
    }

    /// Where the value came from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Whether the value did not come from a database just now (cache, fallback, or a write
    /// queued rather than applied).
    pub fn is_stale(&self) -> bool {
        !matches!(self.source, Source::Database { .. })
    }

    /// How old a cached value is; `None` when it did not come from the cache.
    pub fn age(&self) -> Option<Duration> {
        match self.source {
            Source::Cache { age, .. } => Some(age),
            _ => None,
        }
    }

    /// The endpoint that answered; `None` for a cached or fallback value.
    pub fn endpoint(&self) -> Option<&str> {
        match &self.source {
            Source::Database { endpoint } => Some(endpoint),
            _ => None,
        }
    }

    /// Why the database could not answer, for a cached or fallback value.
    pub fn cause(&self) -> Option<&Error> {
        match &self.source {
            Source::Database { .. } => None,
            Source::Cache { cause, .. } | Source::Fallback { cause } => Some(cause),
            Source::Queued { cause, .. } => cause.as_ref(),
        }
    }
}

impl<T> Deref for Served<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl Source {
    /// `database`, `cache`, `fallback` or `queued`, as in metrics labels and traces.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Database { .. } => "database",
            Self::Cache { .. } => "cache",
            Self::Fallback { .. } => "fallback",
            Self::Queued { .. } => "queued",
        }
    }
}

/// What a fallback is told about the call it stands in for.
#[derive(Debug)]
#[non_exhaustive]
pub struct FallbackContext<'a> {
    /// The call's route.
    pub route: Route,
    /// Why the database could not answer.
    pub error: &'a Error,
    /// The statement's SQL, for calls made with a query builder.
    pub sql: Option<&'a str>,
    /// The call's cache key, if it had one.
    pub key: Option<&'a str>,
}

/// A call's own fallback, boxed.
pub type BoxedFallback<T> = Box<dyn FnOnce(&FallbackContext<'_>) -> Option<T> + Send>;

/// A route's fallback for results of type `T`.
type RouteFallback<T> = Arc<dyn Fn(&FallbackContext<'_>) -> Option<T> + Send + Sync>;

/// The fallbacks registered per route and result type.
#[derive(Default, Clone)]
pub(crate) struct RouteFallbacks {
    by_route_and_type: HashMap<(Route, TypeId), Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for RouteFallbacks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut registered: Vec<String> = self
            .by_route_and_type
            .keys()
            .map(|(route, _)| route.to_string())
            .collect();
        registered.sort();
        f.debug_struct("RouteFallbacks")
            .field("routes", &registered)
            .finish()
    }
}

impl RouteFallbacks {
    pub(crate) fn add<T: 'static>(
        &mut self,
        route: Route,
        fallback: impl Fn(&FallbackContext<'_>) -> Option<T> + Send + Sync + 'static,
    ) {
        let fallback: RouteFallback<T> = Arc::new(fallback);
        self.by_route_and_type
            .insert((route, TypeId::of::<T>()), Arc::new(fallback));
    }

    /// Runs the fallback registered for `route` and `T`, if any.
    pub(crate) fn run<T: 'static>(&self, context: &FallbackContext<'_>) -> Option<T> {
        let fallback = self
            .by_route_and_type
            .get(&(context.route, TypeId::of::<T>()))?
            .downcast_ref::<RouteFallback<T>>()?;
        fallback(context)
    }
}
