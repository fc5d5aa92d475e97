//! One whole call: the endpoints (see `failover`), then, when none could serve, the cache, the
//! call's fallback and the route's fallback; with the call's span and its cache and fallback
//! metrics.

use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::Either;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use tracing::field::Empty;

use super::PoolInner;
use super::attempt::Done;
use crate::backend::Backend;
use crate::cache::CachedValue;
use crate::cache::lately::Stamp;
use crate::error::{Error, Result};
use crate::fallback::{
    AsyncOutcome, FallbackContext, FallbackFailure, FallbackRequest, OwnFallback, RouteFallback,
    Served, Source, run_bounded,
};
use crate::route::Route;
use crate::telemetry;

/// Where and how long a read's results are cached, and how a result of type `T` is
/// (de)serialized.
pub(crate) struct CacheRequest<T> {
    route: Route,
    /// The key the caller gave; stored scoped by route and result type (see
    /// [`CacheRequest::key`]).
    own_key: String,
    pub(crate) ttl: Duration,
    stamp: fn(&Self, &T) -> Option<Stamp>,
    encode: fn(&T) -> serde_json::Result<Vec<u8>>,
    decode: fn(&[u8]) -> serde_json::Result<T>,
}

impl<T> CacheRequest<T> {
    /// The key the caller gave.
    pub(crate) fn own_key(&self) -> &str {
        &self.own_key
    }

    /// The key the result is stored under, `{route}:{result type}:{key}`: two calls that
    /// happen to share a key but not a route or a result type (a user and a count of users,
    /// one row and every row) must not serve each other's data. Made when the cache is
    /// used, not on every read.
    fn key(&self) -> String {
        let (route, type_name) = (self.route.as_str(), std::any::type_name::<T>());
        let mut key = String::with_capacity(route.len() + type_name.len() + self.own_key.len() + 2);
        for part in [route, ":", type_name, ":", &self.own_key] {
            key.push_str(part);
        }
        key
    }
}

impl<T: Serialize + DeserializeOwned> CacheRequest<T> {
    /// The caller's `key` and `ttl` for results of `route`, stored as JSON.
    pub(crate) fn json(route: Route, key: String, ttl: Duration) -> Self {
        Self {
            route,
            own_key: key,
            ttl,
            stamp: |request, value| {
                Stamp::of(
                    request.route,
                    std::any::type_name::<T>(),
                    &request.own_key,
                    request.ttl,
                    value,
                )
            },
            encode: |value| serde_json::to_vec(value),
            decode: |bytes| serde_json::from_slice(bytes),
        }
    }
}

/// What a call may fall back on, and what to say about it in its span.
pub(crate) struct Plan<'a, T> {
    pub(crate) route: Route,
    pub(crate) sql: Option<&'a str>,
    pub(crate) cache: Option<CacheRequest<T>>,
    pub(crate) fallback: Option<OwnFallback<T>>,
}

impl<'a, T> Plan<'a, T> {
    /// What the fallbacks are told about a call that failed with `error`.
    fn context<'c>(&'c self, error: &'c Error) -> FallbackContext<'c> {
        FallbackContext {
            route: self.route,
            error,
            sql: self.sql,
            key: self.cache.as_ref().map(CacheRequest::own_key),
        }
    }

    /// A call with no SQL to show (a closure on a connection), no cache and no fallback of
    /// its own.
    pub(crate) fn bare(route: Route) -> Self {
        Self {
            route,
            sql: None,
            cache: None,
            fallback: None,
        }
    }
}

impl<DB: Backend> PoolInner<DB> {
    /// Runs `call` and, if no endpoint could serve it, what `plan` falls back on.
    ///
    /// A call with no cache, nothing to fall back on and no span to record is the endpoints'
    /// answer as it is: it gets no layer of its own, which every poll would go through and
    /// every result be moved through.
    pub(crate) fn degrade<T: 'static>(
        &self,
        plan: Plan<'_, T>,
        call: impl Future<Output = Result<Done<T>>>,
    ) -> impl Future<Output = Result<Served<T>>> {
        if self.may_fall_back(&plan) || tracing::dispatcher::has_been_set() {
            Either::Right(self.degrade_with(plan, call))
        } else {
            Either::Left(call.map(|done| done.map(Done::served)))
        }
    }

    /// Whether a call of `plan` has anything to fall back on when no endpoint can serve it.
    fn may_fall_back<T>(&self, plan: &Plan<'_, T>) -> bool {
        plan.cache.is_some() || plan.fallback.is_some() || self.fallbacks.any(plan.route)
    }

    /// [`degrade`](Self::degrade) with its span, its cache and its fallbacks.
    async fn degrade_with<T: 'static>(
        &self,
        plan: Plan<'_, T>,
        call: impl Future<Output = Result<Done<T>>>,
    ) -> Result<Served<T>> {
        // No span at all until a tracing subscriber was ever installed: sqlx turns on
        // tracing's `log` feature, with which a span that no subscriber records still goes
        // through `log` on every poll, and its fields are still worked out.
        let span = if tracing::dispatcher::has_been_set() {
            tracing::info_span!(
                "db.call",
                db.system = DB::SYSTEM,
                db.operation = plan.sql.and_then(operation_of),
                route = plan.route.as_str(),
                endpoint = Empty,
                outcome = Empty,
                error.class = Empty,
            )
        } else {
            tracing::Span::none()
        };
        let served = async {
            // An async fallback gets what is left of the route's timeout from here, where the
            // endpoints' loop starts; only then is the clock read.
            let started = (plan.fallback.as_ref().is_some_and(OwnFallback::is_async)
                || self.fallbacks.any_async(plan.route))
            .then(tokio::time::Instant::now);
            match call.await {
                Ok(done) => {
                    // Worked out first: the value itself is not borrowed across the cache's
                    // await. Storing is boxed, as falling back is: each would otherwise sit
                    // in every call's future, which is moved several times per call.
                    if let Some(request) = &plan.cache
                        && let Some((payload, stamp)) = self.to_store(request, &done.value)
                    {
                        Box::pin(self.store(request, payload, stamp)).await;
                    }
                    Ok(done.served())
                }
                // Nothing to fall back on (a call refused by its breaker, typically): the
                // error as it is, with no box.
                Err(error) if error.is_unavailable() && self.may_fall_back(&plan) => {
                    Box::pin(self.fall_back(plan, error, started)).await
                }
                Err(error) => Err(error),
            }
        };
        // Entering a span that records nothing still costs, on every poll. One future either
        // way: two awaits would hold the call twice over in this one's state.
        let served = if span.is_disabled() {
            Either::Left(served)
        } else {
            Either::Right(served.instrument(span.clone()))
        }
        .await;
        if !span.is_disabled() {
            record_outcome(&span, &served);
        }
        served
    }

    /// What to store for a result the database answered with, and its stamp: nothing when
    /// the same result was stored under its key less than a hundredth of its TTL ago.
    fn to_store<T>(
        &self,
        request: &CacheRequest<T>,
        value: &T,
    ) -> Option<(Vec<u8>, Option<Stamp>)> {
        let stamp = (request.stamp)(request, value);
        if stamp.is_some_and(|stamp| self.recent_stores.stored_lately(stamp, request.ttl)) {
            return None;
        }
        Some((self.encode(request, value)?, stamp))
    }

    fn encode<T>(&self, request: &CacheRequest<T>, value: &T) -> Option<Vec<u8>> {
        (request.encode)(value)
            .inspect_err(|error| {
                telemetry::cache_error(self.cache.kind(), "encode");
                tracing::warn!(key = %request.key(), %error, "result not cached: it does not serialize");
            })
            .ok()
    }

    /// Stores `payload`; once the cache took it, notes `stamp` among the recent stores.
    async fn store<T>(&self, request: &CacheRequest<T>, payload: Vec<u8>, stamp: Option<Stamp>) {
        let kind = self.cache.kind();
        let key = request.key();
        let put = self
            .cache
            .get()
            .put(&key, CachedValue::new(payload), request.ttl);
        // No timer unless the cache makes the call wait (a memory cache never does).
        let failure = match crate::timer::within(self.cache_timeout, put).await {
            Some(Ok(())) => {
                if let Some(stamp) = stamp {
                    self.recent_stores.note(stamp);
                }
                return;
            }
            Some(Err(error)) => error.to_string(),
            None => format!("no answer within {:?}", self.cache_timeout),
        };
        telemetry::cache_error(kind, "put");
        tracing::debug!(%key, cache = kind, error = %failure, "result not cached");
    }

    /// No endpoint could serve: the cache, the call's fallback, the route's fallback, in that
    /// order; else the error, with the failure of an async fallback attached if one failed.
    /// `started`: when the call started, if it has an async fallback.
    async fn fall_back<T: 'static>(
        &self,
        plan: Plan<'_, T>,
        error: Error,
        started: Option<tokio::time::Instant>,
    ) -> Result<Served<T>> {
        let route = plan.route;
        if let Some(request) = &plan.cache
            && let Some((value, age)) = self.lookup(route, request).await
        {
            telemetry::served_without_endpoint(route, "cache");
            tracing::debug!(key = request.own_key(), ?age, %error, "served from the cache");
            return Ok(Served::new(value, Source::Cache { age, cause: error }));
        }
        // Sync fallbacks run at once; when one may be async, they all run on a boxed future,
        // kept out of every call's future (which is moved several times per call).
        let (value, failure) = if plan.fallback.as_ref().is_some_and(OwnFallback::is_async)
            || self.fallbacks.any_async(route)
        {
            Box::pin(self.run_fallbacks(plan, &error, started)).await
        } else {
            (self.run_sync_fallbacks(plan, &error), None)
        };
        match value {
            Some(value) => {
                telemetry::served_without_endpoint(route, "fallback");
                tracing::debug!(%error, "served by a fallback");
                Ok(Served::new(value, Source::Fallback { cause: error }))
            }
            None => Err(match failure {
                Some(fallback) => Error::FallbackFailed {
                    cause: Box::new(error),
                    fallback,
                },
                None => error,
            }),
        }
    }

    /// The call's fallback, then the route's, when neither is async.
    fn run_sync_fallbacks<T: 'static>(&self, mut plan: Plan<'_, T>, error: &Error) -> Option<T> {
        let fallback = plan.fallback.take();
        let context = plan.context(error);
        let route = plan.route;
        match fallback {
            Some(OwnFallback::Sync(fallback)) => fallback(&context),
            // An async one is run by `run_fallbacks`.
            Some(OwnFallback::Async(_)) | None => None,
        }
        .or_else(|| match self.fallbacks.get::<T>(route) {
            Some(RouteFallback::Sync(fallback)) => fallback(&context),
            Some(RouteFallback::Async(_)) | None => None,
        })
    }

    /// The call's fallback, then the route's, either of them async: the value, and the first
    /// failure of an async one. Each async one has until the route's timeout from `started`.
    async fn run_fallbacks<T: 'static>(
        &self,
        mut plan: Plan<'_, T>,
        error: &Error,
        started: Option<tokio::time::Instant>,
    ) -> (Option<T>, Option<FallbackFailure>) {
        let fallback = plan.fallback.take();
        let context = plan.context(error);
        let route = plan.route;
        let deadline = started.map(|started| started + self.routes[route.index()].timeout);
        let mut failure = None;
        let mut value = match fallback {
            Some(OwnFallback::Sync(fallback)) => fallback(&context),
            Some(OwnFallback::Async(fallback)) => {
                self.run_async(&context, deadline, fallback, &mut failure)
                    .await
            }
            None => None,
        };
        if value.is_none() {
            value = match self.fallbacks.get::<T>(route) {
                Some(RouteFallback::Sync(fallback)) => fallback(&context),
                Some(RouteFallback::Async(fallback)) => {
                    self.run_async(&context, deadline, fallback, &mut failure)
                        .await
                }
                None => None,
            };
        }
        (value, failure)
    }

    /// Runs an async fallback until `deadline`: its value, or `None` when it declined or
    /// failed. The first failure of the call's fallbacks goes into `failure`.
    async fn run_async<T>(
        &self,
        context: &FallbackContext<'_>,
        deadline: Option<tokio::time::Instant>,
        fallback: impl FnOnce(FallbackRequest) -> AsyncOutcome<T>,
        failure: &mut Option<FallbackFailure>,
    ) -> Option<T> {
        let route = context.route;
        let budget = deadline.map_or(self.routes[route.index()].timeout, |deadline| {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        });
        let request = FallbackRequest::new(context, budget);
        match run_bounded(fallback(request), budget).await {
            Ok(value) => value,
            Err((error, reason)) => {
                telemetry::fallback_failed(route, reason);
                tracing::warn!(
                    route = route.as_str(),
                    reason,
                    fallback.error = %error,
                    cause = %context.error,
                    "fallback failed"
                );
                failure.get_or_insert(error);
                None
            }
        }
    }

    /// The cached value and its age; a miss, a cache failure or a value that no longer
    /// decodes are all `None`.
    async fn lookup<T>(&self, route: Route, request: &CacheRequest<T>) -> Option<(T, Duration)> {
        let kind = self.cache.kind();
        let key = request.key();
        let get = self.cache.get().get(&key);
        let failure = match tokio::time::timeout(self.cache_timeout, get).await {
            Ok(Ok(Some(cached))) => match (request.decode)(cached.payload()) {
                Ok(value) => {
                    telemetry::cache_lookup(route, "hit");
                    return Some((value, cached.age()));
                }
                Err(error) => {
                    telemetry::cache_error(kind, "decode");
                    format!("the cached value does not decode: {error}")
                }
            },
            Ok(Ok(None)) => {
                telemetry::cache_lookup(route, "miss");
                return None;
            }
            Ok(Err(error)) => {
                telemetry::cache_error(kind, "get");
                error.to_string()
            }
            Err(_) => {
                telemetry::cache_error(kind, "get");
                format!("no answer within {:?}", self.cache_timeout)
            }
        };
        telemetry::cache_lookup(route, "error");
        tracing::warn!(%key, cache = kind, error = %failure, "cache fallback failed");
        None
    }
}

fn record_outcome<T>(span: &tracing::Span, served: &Result<Served<T>>) {
    match served {
        Ok(served) => {
            let outcome = match served.source() {
                Source::Database { .. } => "success",
                source => source.as_str(),
            };
            span.record("outcome", outcome);
            match served.endpoint() {
                Some(endpoint) => span.record("endpoint", endpoint),
                None => span.record("endpoint", telemetry::NO_ENDPOINT),
            };
        }
        Err(error) => {
            let outcome = if error.is_circuit_open() {
                "rejected"
            } else {
                "failure"
            };
            span.record("outcome", outcome);
            if let Some(endpoint) = error.endpoint() {
                span.record("endpoint", endpoint);
            }
            if let Some(class) = error.class() {
                span.record("error.class", class.as_str());
            }
        }
    }
}

/// The statement's first keyword (`SELECT`, `INSERT`, ...), for `db.operation`.
fn operation_of(sql: &str) -> Option<&str> {
    sql.split_whitespace()
        .next()
        .map(|word| word.trim_end_matches(|c: char| !c.is_ascii_alphabetic()))
        .filter(|word| !word.is_empty())
}
