//! What a call returns when it was served by a fallback rather than by a database, and the
//! fallbacks configured per route.
//!
//! The order is fixed: the route's endpoints (with failover), then the cache, then the call's
//! own fallback, then the route's fallback, then the error. Fallbacks run only when the
//! database could not serve: a breaker refused, every endpoint failed with an infrastructure
//! error, or the call timed out. A query error (bad SQL, a constraint, no row) is the answer
//! and is returned as it is.
//!
//! A fallback is a closure given a [`FallbackContext`], or an async one given an owned
//! [`FallbackRequest`] (to query a backup database, a Redis, an HTTP service). An async
//! fallback has what is left of the route's operation timeout, counted from the start of the
//! call, and is dropped when that runs out. Its failure (its error, running out of time, a
//! panic) never replaces the call's error: the call returns its own error with the fallback's
//! failure attached ([`Error::fallback_error`]), and the next fallback in the order is still
//! tried.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::classify::ErrorClass;
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

/// What an async fallback is told about the call it stands in for: an owned copy of what a
/// [`FallbackContext`] lends, so that the fallback's future can be `'static` and `Send` (a
/// backup pool, a Redis, an HTTP service can be awaited with it).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FallbackRequest {
    /// The call's route.
    pub route: Route,
    /// The statement's SQL, for calls made with a query builder.
    pub sql: Option<String>,
    /// The call's cache key, if it had one.
    pub key: Option<String>,
    /// Why the database could not answer.
    pub cause: FallbackCause,
    /// How long the fallback has: what is left of the route's operation timeout, counted from
    /// the start of the call. A fallback still running then is dropped. With nothing left it
    /// is still polled once: a fallback that answers without waiting serves.
    pub budget: Duration,
}

/// Why the database could not answer a call an async fallback stands in for: what the call's
/// [`Error`] says about itself (the error stays with the call, which returns it if the fallback
/// does not serve).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FallbackCause {
    /// The failure's class ([`Error::class`]).
    pub class: Option<ErrorClass>,
    /// The endpoint that failed or refused ([`Error::endpoint`]).
    pub endpoint: Option<Arc<str>>,
    /// Whether breakers refused the call without reaching a database
    /// ([`Error::is_circuit_open`]).
    pub circuit_open: bool,
    /// Whether the statement may have run although the call failed
    /// ([`Error::is_outcome_unknown`]): a write may or may not have happened.
    pub outcome_unknown: bool,
    /// When a refused call may be retried ([`Error::retry_after`]).
    pub retry_after: Option<Duration>,
    /// The error's message.
    pub message: String,
}

impl FallbackCause {
    fn of(error: &Error) -> Self {
        Self {
            class: error.class(),
            endpoint: error.endpoint().map(Arc::from),
            circuit_open: error.is_circuit_open(),
            outcome_unknown: error.is_outcome_unknown(),
            retry_after: error.retry_after(),
            message: error.to_string(),
        }
    }
}

impl fmt::Display for FallbackCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl FallbackRequest {
    pub(crate) fn new(context: &FallbackContext<'_>, budget: Duration) -> Self {
        Self {
            route: context.route,
            sql: context.sql.map(str::to_owned),
            key: context.key.map(str::to_owned),
            cause: FallbackCause::of(context.error),
            budget,
        }
    }
}

/// An async fallback that did not finish within what was left of the call's timeout: it was
/// dropped. The error [`Error::fallback_error`] gives for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the fallback did not finish within {budget:?}, what was left of the call's timeout")]
#[non_exhaustive]
pub struct FallbackTimedOut {
    /// How long the fallback had.
    pub budget: Duration,
}

/// An async fallback that panicked: the panic was caught, and counts as the fallback's
/// failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the fallback panicked: {message}")]
#[non_exhaustive]
pub struct FallbackPanicked {
    /// The panic's message, when it was a string.
    pub message: String,
}

/// An async fallback's failure.
pub(crate) type FallbackFailure = Arc<dyn std::error::Error + Send + Sync>;

/// What an async fallback's future gives back, its error boxed.
pub(crate) type AsyncOutcome<T> =
    Pin<Box<dyn Future<Output = Result<Option<T>, FallbackFailure>> + Send>>;

/// A call's own async fallback, boxed.
pub(crate) type BoxedAsyncFallback<T> = Box<dyn FnOnce(FallbackRequest) -> AsyncOutcome<T> + Send>;

pub(crate) use own::OwnFallback;

mod own {
    use super::{BoxedAsyncFallback, BoxedFallback};

    /// A call's own fallback, sync or async. Public in a private module: the sealed trait
    /// that hands it over is public.
    pub enum OwnFallback<T> {
        Sync(BoxedFallback<T>),
        Async(BoxedAsyncFallback<T>),
    }

    impl<T> std::fmt::Debug for OwnFallback<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(if self.is_async() { "Async" } else { "Sync" })
        }
    }

    impl<T> OwnFallback<T> {
        pub(crate) fn is_async(&self) -> bool {
            matches!(self, Self::Async(_))
        }
    }
}

/// What an async fallback's future gives: `Result<Option<T>, E>`, its error to be boxed. A
/// trait rather than a type parameter `E`, so that a boxed fallback's type does not name `E`
/// (which need not be `'static`).
pub(crate) trait IntoOutcome<T> {
    fn into_outcome(self) -> Result<Option<T>, FallbackFailure>;
}

impl<T, E> IntoOutcome<T> for Result<Option<T>, E>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn into_outcome(self) -> Result<Option<T>, FallbackFailure> {
        self.map_err(|error| FallbackFailure::from(error.into()))
    }
}

/// `fallback` with its error boxed and its future pinned.
pub(crate) fn box_async<T, F, Fut>(fallback: F) -> impl Fn(FallbackRequest) -> AsyncOutcome<T>
where
    F: Fn(FallbackRequest) -> Fut,
    Fut: Future<Output: IntoOutcome<T>> + Send + 'static,
{
    move |request| box_future(fallback(request))
}

/// `future` with its error boxed, pinned.
pub(crate) fn box_future<T, Fut>(future: Fut) -> AsyncOutcome<T>
where
    Fut: Future<Output: IntoOutcome<T>> + Send + 'static,
{
    Box::pin(async move { future.await.into_outcome() })
}

/// Runs an async fallback's future for at most `budget`, a panic caught: its value, `None`
/// when it declined, or why it failed (and whether it timed out).
pub(crate) async fn run_bounded<T>(
    future: AsyncOutcome<T>,
    budget: Duration,
) -> Result<Option<T>, (FallbackFailure, &'static str)> {
    match tokio::time::timeout(budget, CatchPanic(future)).await {
        Ok(Ok(outcome)) => outcome.map_err(|failure| (failure, "error")),
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|message| (*message).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err((Arc::new(FallbackPanicked { message }), "error"))
        }
        Err(_) => Err((Arc::new(FallbackTimedOut { budget }), "timeout")),
    }
}

/// A future whose panic is caught and returned.
struct CatchPanic<F>(F);

impl<F: Future + Unpin> Future for CatchPanic<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.get_mut().0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// A route's fallback for results of type `T`.
type SyncRouteFallback<T> = Box<dyn Fn(&FallbackContext<'_>) -> Option<T> + Send + Sync>;

/// A route's async fallback for results of type `T`.
type AsyncRouteFallback<T> = Box<dyn Fn(FallbackRequest) -> AsyncOutcome<T> + Send + Sync>;

/// A route's fallback for results of type `T`, sync or async.
pub(crate) enum RouteFallback<T> {
    Sync(SyncRouteFallback<T>),
    Async(AsyncRouteFallback<T>),
}

/// The fallbacks registered per route and result type.
#[derive(Default, Clone)]
pub(crate) struct RouteFallbacks {
    /// Each fallback (a `RouteFallback<T>`) and whether it is async.
    by_route_and_type: HashMap<(Route, TypeId), (Arc<dyn Any + Send + Sync>, bool)>,
    /// Per route (by index): whether an async fallback is registered for it, which is when a
    /// call of the route notes when it started.
    any_async: [bool; Route::ALL.len()],
    /// Per route: whether any fallback is registered for it.
    any: [bool; Route::ALL.len()],
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
        self.insert(route, RouteFallback::Sync(Box::new(fallback)));
    }

    pub(crate) fn add_async<T: 'static>(
        &mut self,
        route: Route,
        fallback: impl Fn(FallbackRequest) -> AsyncOutcome<T> + Send + Sync + 'static,
    ) {
        self.insert(route, RouteFallback::Async(Box::new(fallback)));
    }

    /// Replaces the fallback of `route` for `T`, sync or async.
    fn insert<T: 'static>(&mut self, route: Route, fallback: RouteFallback<T>) {
        let is_async = matches!(fallback, RouteFallback::Async(_));
        self.by_route_and_type
            .insert((route, TypeId::of::<T>()), (Arc::new(fallback), is_async));
        self.any_async[route.index()] = self
            .by_route_and_type
            .iter()
            .any(|(&(other, _), &(_, is_async))| other == route && is_async);
        self.any[route.index()] = true;
    }

    /// The fallback registered for `route` and `T`, if any.
    pub(crate) fn get<T: 'static>(&self, route: Route) -> Option<&RouteFallback<T>> {
        self.by_route_and_type
            .get(&(route, TypeId::of::<T>()))?
            .0
            .downcast_ref::<RouteFallback<T>>()
    }

    /// Whether `route` has a fallback, for any result type.
    pub(crate) fn any(&self, route: Route) -> bool {
        self.any[route.index()]
    }

    /// Whether `route` has an async fallback, for any result type.
    pub(crate) fn any_async(&self, route: Route) -> bool {
        self.any_async[route.index()]
    }
}
