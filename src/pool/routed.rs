//! `pool.read(query)`: an ordinary sqlx query builder, routed and protected. The first stage
//! of a call: it takes the query apart (see `statement`), says what the call may fall back on
//! (see `degrade`) and hands the endpoints' loop (see `failover`) a way to run it.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::query::{Map, Query};
use sqlx::{Either, IntoArguments};

use super::ProtectedPool;
#[cfg(feature = "route-by-sql")]
use super::by_sql::BySql;
use super::call::{replay_for, run_statement};
use super::degrade::CacheRequest;
use super::executor::OnRoute;
use super::statement::{FetchFn, RoutableQuery, execute_on};
use super::stream::RowStream;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fallback::{FallbackContext, FallbackRequest, OwnFallback, Served};
use crate::route::Route;

/// Marks a call whose results may be cached: a read or an auth call.
#[derive(Debug, Clone, Copy)]
pub struct Cacheable;

/// Marks a write: its result is never cached (a cached write would serve an old `RETURNING`
/// row), so [`Routed::cached`] is not there to call.
#[derive(Debug, Clone, Copy)]
pub struct NotCacheable;

/// A query bound to a route, run by one of its `fetch_*` / `execute` methods.
///
/// On the read route a query that loses its endpoint (refused, unreachable, hung, connection
/// lost) is run again on the next one (reads change nothing); on the write and auth routes it
/// runs at most once. An error the server answered with is the call's answer on every route.
///
/// [`cached`](Self::cached) (reads and auth calls only) and [`or_fallback`](Self::or_fallback)
/// give the call something to fall back on when no endpoint can serve it; the `fetch_*`
/// methods then return a [`Served`] value that says where it came from.
#[must_use = "a routed query does nothing until fetched or executed"]
pub struct Routed<'p, DB: Backend, Q, C = Cacheable> {
    pool: &'p ProtectedPool<DB>,
    route: Route,
    query: Q,
    _caching: PhantomData<C>,
}

impl<DB: Backend, Q: fmt::Debug, C> fmt::Debug for Routed<'_, DB, Q, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routed")
            .field("route", &self.route)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

impl<'p, DB: Backend, Q, C> Routed<'p, DB, Q, C> {
    pub(crate) fn new(pool: &'p ProtectedPool<DB>, route: Route, query: Q) -> Self {
        Self {
            pool,
            route,
            query,
            _caching: PhantomData,
        }
    }
}

impl<'p, DB: Backend, Q, C> Routed<'p, DB, Q, C> {
    /// The pool, the route and the query.
    pub(super) fn into_parts(self) -> (&'p ProtectedPool<DB>, Route, Q) {
        (self.pool, self.route, self.query)
    }
}

/// The value of a call whose caller did not ask where it came from. A combinator rather than
/// an `async` block around the call: such a block keeps the call's future twice in its state
/// (once as captured, once as awaited), and a call's future is moved several times.
fn unserved<T>(served: Result<Served<T>>) -> Result<T> {
    served.map(Served::into_inner)
}

impl<'p, DB: Backend, Q: RoutableQuery<DB>, C> Routed<'p, DB, Q, C> {
    /// Exactly one row; no row is an error of class `Query`.
    pub fn fetch_one(self) -> impl Future<Output = Result<Q::Output>> + Send + 'p {
        let call = self.degradable().run(Q::fetch_one_on, true, None);
        call.map(unserved)
    }

    /// At most one row.
    pub fn fetch_optional(self) -> impl Future<Output = Result<Option<Q::Output>>> + Send + 'p {
        let call = self.degradable().run(Q::fetch_optional_on, true, None);
        call.map(unserved)
    }

    /// Every row.
    pub fn fetch_all(self) -> impl Future<Output = Result<Vec<Q::Output>>> + Send + 'p {
        let call = self.degradable().run(Q::fetch_all_on, true, None);
        call.map(unserved)
    }

    /// Every row, as a stream, read as the caller goes. Until the first row arrives the
    /// call is like `fetch_all` (a read moves to the next endpoint when one fails); after
    /// it, a failure ends the stream with its error and nothing is replayed. No cache or
    /// fallback applies.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use futures_util::TryStreamExt;
    ///
    /// let mut names = pool.read(sqlx::query_scalar::<_, String>("SELECT name FROM users")).fetch();
    /// while let Some(name) = names.try_next().await? {
    ///     println!("{name}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn fetch(self) -> RowStream<'p, Q::Output> {
        let route = self.route;
        let statement = self
            .query
            .into_statement()
            .map_err(|source| Error::InvalidQuery { route, source });
        let replay = replay_for(route, true);
        self.pool
            .inner
            .stream(route, replay, statement, |step| match step {
                Either::Left(_) => None,
                Either::Right(row) => Some(Q::from_row(row)),
            })
    }

    /// Calls `fallback` when no endpoint can serve the call (after the cache, if the call is
    /// [`cached`](Self::cached)); `None` from it means "no fallback either" and the error is
    /// returned.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// let greeting = pool
    ///     .read(sqlx::query_scalar::<_, String>("SELECT greeting FROM settings"))
    ///     .or_fallback(|_| Some("Hello".to_owned()))
    ///     .fetch_one()
    ///     .await?;
    /// assert!(!greeting.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn or_fallback<F, R>(self, fallback: F) -> Degradable<'p, DB, Q, F, C>
    where
        F: FnOnce(&FallbackContext<'_>) -> Option<R> + Send + 'static,
    {
        self.degradable().or_fallback(fallback)
    }

    /// Like [`or_fallback`](Self::or_fallback), with a fallback that can await: another
    /// database, a Redis, an HTTP service. It is given an owned [`FallbackRequest`] (the route,
    /// the SQL, the cache key, the cause and how long it has) and runs when no endpoint can
    /// serve the call, after the cache and before the route's fallback.
    ///
    /// It has what is left of the route's operation timeout, counted from the start of the
    /// call ([`FallbackRequest::budget`]), with no minimum; when that runs out it is dropped.
    /// A call refused by an open breaker fails fast and leaves it nearly the whole timeout; a
    /// call that timed out on its endpoints leaves it nothing, and only a fallback that
    /// answers without waiting serves then. `Ok(None)` declines, like `None` from a
    /// sync fallback. If it fails (its `Err`, running out of time, a panic), the route's
    /// fallback is still tried, and if nothing serves, the call returns its own error with the
    /// failure attached: [`Error::fallback_error`] (the error's other accessors answer for the
    /// call, as without a fallback). Failures are counted in
    /// `protected_pool_fallback_failures_total` and logged at level warn.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool, backup: protected_pool::ProtectedPool)
    /// # -> protected_pool::Result<()> {
    /// // While the main database is away, names come from a backup copy of it.
    /// let name = pool
    ///     .read(sqlx::query_scalar::<_, String>("SELECT name FROM users WHERE id = $1").bind(42_i64))
    ///     .or_fallback_async(move |_request| async move {
    ///         backup
    ///             .read(sqlx::query_scalar::<_, String>("SELECT name FROM users WHERE id = $1").bind(42_i64))
    ///             .fetch_optional()
    ///             .await
    ///     })
    ///     .fetch_one()
    ///     .await?;
    /// println!("{}", *name);
    /// # Ok(()) }
    /// ```
    pub fn or_fallback_async<F, Fut, R, E>(
        self,
        fallback: F,
    ) -> Degradable<'p, DB, Q, AsyncFallback<F>, C>
    where
        F: FnOnce(FallbackRequest) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<R>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.degradable().or_fallback_async(fallback)
    }

    fn degradable(self) -> Degradable<'p, DB, Q, NoFallback, C> {
        Degradable {
            routed: self,
            cache: None,
            fallback: NoFallback,
        }
    }
}

impl<'p, DB: Backend, Q: RoutableQuery<DB>> Routed<'p, DB, Q, Cacheable> {
    /// Stores every successful result in the pool's cache under `key` for `ttl`, and serves
    /// the stored value (marked stale, with its age) when no endpoint can answer. The key is
    /// scoped by route and result type, so calls that share a key but not a type never serve
    /// each other's data. Not on writes.
    ///
    /// A result the pool stored under the key with the same `ttl` less than `ttl / 100`
    /// before is not stored again (its hash is compared, nothing is serialized): the entry
    /// then expires, and reports an age, at most 1 % of `ttl` sooner and older than a fresh
    /// store would, and one the cache evicted meanwhile comes back at most that much later.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use std::time::Duration;
    ///
    /// let name = pool
    ///     .read(sqlx::query_scalar::<_, String>("SELECT name FROM users WHERE id = $1").bind(42_i64))
    ///     .cached("user:42:name", Duration::from_secs(600))
    ///     .fetch_one()
    ///     .await?;
    /// if let Some(age) = name.age() {
    ///     println!("database unavailable; showing the name as of {age:?} ago");
    /// }
    /// println!("{}", *name);
    /// # Ok(()) }
    /// ```
    ///
    /// ```compile_fail
    /// # async fn demo(pool: protected_pool::ProtectedPool) {
    /// // A write's result is never cached: this does not compile.
    /// let _ = pool
    ///     .write(sqlx::query_scalar::<_, i64>("INSERT INTO t DEFAULT VALUES RETURNING id"))
    ///     .cached("t", std::time::Duration::from_secs(1));
    /// # }
    /// ```
    pub fn cached(
        self,
        key: impl Into<String>,
        ttl: Duration,
    ) -> Degradable<'p, DB, Q, NoFallback, Cacheable>
    where
        Q::Output: Serialize + DeserializeOwned,
    {
        self.degradable().cached(key, ttl)
    }
}

impl<'p, 'q, DB, A, C> Routed<'p, DB, Query<'q, DB, A>, C>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    /// Runs a statement for its effect, at most once; returns the driver's result (rows
    /// affected, ...).
    pub fn execute(self) -> impl Future<Output = Result<DB::QueryResult>> + Send + 'p {
        // A statement run for its effect may write: never repeat it on another endpoint.
        let call = self.degradable().run(execute_on::<DB>, false, None);
        call.map(unserved)
    }
}

/// A plain query routed by its SQL ([`ProtectedPool::query`]).
#[cfg(feature = "route-by-sql")]
impl<'p, 'q, DB, A, C> Routed<'p, DB, BySql<DB, Query<'q, DB, A>>, C>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    /// Runs a statement for its effect, at most once, even on the read route; returns the
    /// driver's result (rows affected, ...).
    pub fn execute(self) -> impl Future<Output = Result<DB::QueryResult>> + Send + 'p {
        let call = self.degradable().run(execute_on::<DB>, false, None);
        call.map(unserved)
    }
}

/// The compile-time checked macros (`sqlx::query!`, `query_as!`, which build a
/// [`Map`]): run through the route's executor ([`OnRoute`]), so a read moves to the next
/// endpoint like any other. No cache or fallback applies (the macros' record types are not
/// serializable). A row that does not decode, and no row for `fetch_one`, are
/// [`Error::InvalidQuery`].
impl<'p, 'q, DB, F, O, A, C> Routed<'p, DB, Map<'q, DB, F, A>, C>
where
    DB: Backend,
    F: FnMut(DB::Row) -> Result<O, sqlx::Error> + Send,
    O: Send + Unpin,
    A: 'q + IntoArguments<DB> + Send,
{
    fn executor(&self) -> OnRoute<'p, DB> {
        OnRoute::new(self.pool, self.route).keeping_errors_whole()
    }

    /// Exactly one row.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use sqlx::Row;
    ///
    /// // `query!("SELECT id, name FROM users WHERE id = $1", 42_i64)` builds such a `Map`.
    /// let (id, name): (i64, String) = pool
    ///     .read(
    ///         sqlx::query("SELECT id, name FROM users WHERE id = $1")
    ///             .bind(42_i64)
    ///             .try_map(|row: sqlx::postgres::PgRow| Ok((row.try_get(0)?, row.try_get(1)?))),
    ///     )
    ///     .fetch_one()
    ///     .await?;
    /// println!("{id} {name}");
    /// # Ok(()) }
    /// ```
    pub async fn fetch_one(self) -> Result<O> {
        let (route, executor) = (self.route, self.executor());
        self.query
            .fetch_one(executor)
            .await
            .map_err(|error| whole(route, error))
    }

    /// At most one row.
    pub async fn fetch_optional(self) -> Result<Option<O>> {
        let (route, executor) = (self.route, self.executor());
        self.query
            .fetch_optional(executor)
            .await
            .map_err(|error| whole(route, error))
    }

    /// Every row.
    pub async fn fetch_all(self) -> Result<Vec<O>> {
        let (route, executor) = (self.route, self.executor());
        self.query
            .fetch_all(executor)
            .await
            .map_err(|error| whole(route, error))
    }

    /// Every row, as a stream (see [`Routed::fetch`]).
    pub fn fetch(self) -> impl futures_core::Stream<Item = Result<O>> + Send + 'p
    where
        'q: 'p,
        F: 'p,
        O: 'p,
        A: 'p,
    {
        use futures_util::StreamExt;
        let (route, executor) = (self.route, self.executor());
        self.query
            .fetch(executor)
            .map(move |item| item.map_err(|error| whole(route, error)))
    }
}

/// The pool's error back from an executor that kept it whole; the driver's own (a row that
/// did not decode) as an invalid query.
fn whole(route: Route, error: sqlx::Error) -> Error {
    crate::into_sqlx::unwrap(error).unwrap_or_else(|source| Error::InvalidQuery { route, source })
}

/// No fallback of the call's own (the route's may still apply).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

/// A call's own async fallback (see [`Routed::or_fallback_async`]): the closure, kept apart
/// from a sync one by its type.
pub struct AsyncFallback<F>(F);

impl<F> fmt::Debug for AsyncFallback<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncFallback").finish_non_exhaustive()
    }
}

/// A call's own fallback for a result of type `T`: a closure
/// `FnOnce(&FallbackContext) -> Option<T>`, an [`AsyncFallback`] or [`NoFallback`]. Sealed.
pub trait CallFallback<T>: sealed::IntoBoxed<T> + Send {}

impl<T, F: sealed::IntoBoxed<T> + Send> CallFallback<T> for F {}

mod sealed {
    use std::future::Future;

    use crate::fallback::{FallbackContext, FallbackRequest, OwnFallback, box_future};

    /// The fallback, boxed; `None` for none.
    pub trait IntoBoxed<T> {
        fn into_boxed(self) -> Option<OwnFallback<T>>;
    }

    impl<T> IntoBoxed<T> for super::NoFallback {
        fn into_boxed(self) -> Option<OwnFallback<T>> {
            None
        }
    }

    impl<T, F> IntoBoxed<T> for F
    where
        F: FnOnce(&FallbackContext<'_>) -> Option<T> + Send + 'static,
    {
        fn into_boxed(self) -> Option<OwnFallback<T>> {
            Some(OwnFallback::Sync(Box::new(self)))
        }
    }

    impl<T, F, Fut, E> IntoBoxed<T> for super::AsyncFallback<F>
    where
        F: FnOnce(FallbackRequest) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Option<T>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        fn into_boxed(self) -> Option<OwnFallback<T>> {
            let fallback = self.0;
            Some(OwnFallback::Async(Box::new(move |request| {
                box_future(fallback(request))
            })))
        }
    }
}

/// A query with a cache key or a fallback (see [`Routed::cached`], [`Routed::or_fallback`]):
/// its `fetch_*` methods return a [`Served`] value that says whether it came from an endpoint,
/// the cache or a fallback.
#[must_use = "a routed query does nothing until fetched or executed"]
pub struct Degradable<'p, DB: Backend, Q: RoutableQuery<DB>, F, C = Cacheable> {
    routed: Routed<'p, DB, Q, C>,
    cache: Option<(String, Duration, CacheCodecs<Q::Output>)>,
    fallback: F,
}

impl<DB: Backend, Q: RoutableQuery<DB> + fmt::Debug, F, C> fmt::Debug
    for Degradable<'_, DB, Q, F, C>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Degradable")
            .field("routed", &self.routed)
            .field("cache_key", &self.cache.as_ref().map(|(key, ..)| key))
            .field("cache_ttl", &self.cache.as_ref().map(|(_, ttl, _)| ttl))
            .finish_non_exhaustive()
    }
}

/// How each `fetch_*` result of rows of type `O` goes in and out of the cache, fixed when
/// [`Routed::cached`] checks that `O` is serializable.
struct CacheCodecs<O> {
    one: fn(Route, String, Duration) -> CacheRequest<O>,
    optional: fn(Route, String, Duration) -> CacheRequest<Option<O>>,
    all: fn(Route, String, Duration) -> CacheRequest<Vec<O>>,
}

impl<O: Serialize + DeserializeOwned> CacheCodecs<O> {
    fn json() -> Self {
        Self {
            one: CacheRequest::json,
            optional: CacheRequest::json,
            all: CacheRequest::json,
        }
    }
}

impl<'p, DB: Backend, Q: RoutableQuery<DB>, F> Degradable<'p, DB, Q, F, Cacheable> {
    /// See [`Routed::cached`].
    pub fn cached(mut self, key: impl Into<String>, ttl: Duration) -> Self
    where
        Q::Output: Serialize + DeserializeOwned,
    {
        self.cache = Some((key.into(), ttl, CacheCodecs::json()));
        self
    }
}

impl<'p, DB: Backend, Q: RoutableQuery<DB>, F, C> Degradable<'p, DB, Q, F, C> {
    /// See [`Routed::or_fallback`]; replaces an earlier fallback of this call.
    pub fn or_fallback<G, R>(self, fallback: G) -> Degradable<'p, DB, Q, G, C>
    where
        G: FnOnce(&FallbackContext<'_>) -> Option<R> + Send + 'static,
    {
        Degradable {
            routed: self.routed,
            cache: self.cache,
            fallback,
        }
    }

    /// See [`Routed::or_fallback_async`]; replaces an earlier fallback of this call.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use std::time::Duration;
    ///
    /// let count = pool
    ///     .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders"))
    ///     .cached("orders:count", Duration::from_secs(60))
    ///     .or_fallback_async(|request| async move {
    ///         // Nothing cached either: an estimate from elsewhere, within the time left.
    ///         tokio::time::sleep(request.budget / 10).await;
    ///         Ok::<_, std::io::Error>(Some(0_i64))
    ///     })
    ///     .fetch_one()
    ///     .await?;
    /// println!("{}", *count);
    /// # Ok(()) }
    /// ```
    pub fn or_fallback_async<G, Fut, R, E>(
        self,
        fallback: G,
    ) -> Degradable<'p, DB, Q, AsyncFallback<G>, C>
    where
        G: FnOnce(FallbackRequest) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<Option<R>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Degradable {
            routed: self.routed,
            cache: self.cache,
            fallback: AsyncFallback(fallback),
        }
    }

    /// Exactly one row; no row is an error of class `Query` (and no fallback runs for it).
    pub fn fetch_one(mut self) -> impl Future<Output = Result<Served<Q::Output>>> + Send + 'p
    where
        F: CallFallback<Q::Output>,
    {
        let cache = self.take_cache(|codecs| codecs.one);
        self.run(Q::fetch_one_on, true, cache)
    }

    /// At most one row.
    pub fn fetch_optional(
        mut self,
    ) -> impl Future<Output = Result<Served<Option<Q::Output>>>> + Send + 'p
    where
        F: CallFallback<Option<Q::Output>>,
    {
        let cache = self.take_cache(|codecs| codecs.optional);
        self.run(Q::fetch_optional_on, true, cache)
    }

    /// Every row.
    pub fn fetch_all(mut self) -> impl Future<Output = Result<Served<Vec<Q::Output>>>> + Send + 'p
    where
        F: CallFallback<Vec<Q::Output>>,
    {
        let cache = self.take_cache(|codecs| codecs.all);
        self.run(Q::fetch_all_on, true, cache)
    }

    /// The call's cache request, in the form of one `fetch_*`.
    fn take_cache<T>(
        &mut self,
        pick: impl FnOnce(&CacheCodecs<Q::Output>) -> fn(Route, String, Duration) -> CacheRequest<T>,
    ) -> Option<CacheRequest<T>> {
        let (key, ttl, codecs) = self.cache.take()?;
        Some(pick(&codecs)(self.routed.route, key, ttl))
    }

    /// Runs the query through the pool; `replayable` reads may be repeated on the next
    /// endpoint.
    fn run<T: Send + 'static>(
        self,
        fetch: FetchFn<DB, T>,
        replayable: bool,
        cache: Option<CacheRequest<T>>,
    ) -> impl Future<Output = Result<Served<T>>> + Send + 'p
    where
        F: CallFallback<T>,
    {
        let Routed {
            pool, route, query, ..
        } = self.routed;
        let replay = replay_for(route, replayable);
        let fallback: Option<OwnFallback<T>> = sealed::IntoBoxed::into_boxed(self.fallback);
        run_statement(
            pool,
            route,
            replay,
            query.into_statement(),
            fetch,
            cache,
            fallback,
        )
    }
}

impl<'p, 'q, DB, A, F, C> Degradable<'p, DB, Query<'q, DB, A>, F, C>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    /// Runs a statement for its effect, at most once, with the call's fallback for when no
    /// endpoint can take it (see [`Error::is_outcome_unknown`] in the fallback's context
    /// before standing in for a write that may have happened).
    pub fn execute(self) -> impl Future<Output = Result<Served<DB::QueryResult>>> + Send + 'p
    where
        F: CallFallback<DB::QueryResult>,
    {
        self.run(execute_on::<DB>, false, None)
    }
}

/// A plain query routed by its SQL ([`ProtectedPool::query`]), with a fallback.
#[cfg(feature = "route-by-sql")]
impl<'p, 'q, DB, A, F, C> Degradable<'p, DB, BySql<DB, Query<'q, DB, A>>, F, C>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    /// Runs a statement for its effect, at most once, with the call's fallback for when no
    /// endpoint can take it (as for a plain query's).
    pub fn execute(self) -> impl Future<Output = Result<Served<DB::QueryResult>>> + Send + 'p
    where
        F: CallFallback<DB::QueryResult>,
    {
        self.run(execute_on::<DB>, false, None)
    }
}
