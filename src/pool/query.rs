//! `pool.read(query)`: ordinary sqlx query builders, routed and protected.
//!
//! A query is taken apart into its SQL and its encoded arguments before it runs, so that a read
//! whose connection dies under it can be built again, identically, for the next endpoint.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{Database, Execute, IntoArguments, SqlStr};

use super::ProtectedPool;
use super::serve::{CacheRequest, Plan};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fallback::{BoxedFallback, FallbackContext, Served};
use crate::route::Route;

/// A query's future, boxed: its type then names no query lifetime, so the futures of pool
/// calls are `Send` wherever they are spawned.
pub type QueryFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// A query's SQL and encoded arguments, from which the same query can be built again.
#[derive(Debug)]
pub struct Statement<DB: Database> {
    sql: SqlStr,
    arguments: DB::Arguments,
    persistent: bool,
}

impl<DB: Backend> Statement<DB> {
    fn take_apart<'q, E: Execute<'q, DB>>(mut query: E) -> Result<Self, sqlx::Error> {
        let persistent = query.persistent();
        let arguments = query
            .take_arguments()
            .map_err(sqlx::Error::Encode)?
            .unwrap_or_default();
        Ok(Self {
            sql: query.sql(),
            arguments,
            persistent,
        })
    }

    fn parts(&self) -> (SqlStr, Bound<DB>) {
        (self.sql.clone(), Bound(self.arguments.clone()))
    }
}

/// Arguments already encoded, handed back to a rebuilt query.
struct Bound<DB: Database>(DB::Arguments);

impl<DB: Database> IntoArguments<DB> for Bound<DB> {
    fn into_arguments(self) -> DB::Arguments {
        self.0
    }
}

/// A sqlx query builder the pool can run: [`sqlx::query()`], [`sqlx::query_as()`],
/// [`sqlx::query_scalar()`] and their `_with` forms.
pub trait RoutableQuery<DB: Backend>: Send + Sized {
    /// What one result row becomes.
    type Output: Send + Unpin + 'static;

    /// Takes the query apart into SQL and encoded arguments.
    #[doc(hidden)]
    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error>;

    /// Runs the statement on `connection`, returning at most one row.
    #[doc(hidden)]
    fn fetch_optional_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<Self::Output>>;

    /// Runs the statement on `connection`, returning every row.
    #[doc(hidden)]
    fn fetch_all_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<Self::Output>>;
}

impl<'q, DB, A> RoutableQuery<DB> for Query<'q, DB, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    type Output = DB::Row;

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
    }

    fn fetch_optional_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<DB::Row>> {
        let (sql, arguments) = statement.parts();
        let query = sqlx::query_with(sql, arguments).persistent(statement.persistent);
        Box::pin(query.fetch_optional(DB::executor(connection)))
    }

    fn fetch_all_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<DB::Row>> {
        let (sql, arguments) = statement.parts();
        let query = sqlx::query_with(sql, arguments).persistent(statement.persistent);
        Box::pin(query.fetch_all(DB::executor(connection)))
    }
}

impl<'q, DB, O, A> RoutableQuery<DB> for QueryAs<'q, DB, O, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
    O: Send + Unpin + 'static + for<'r> sqlx::FromRow<'r, DB::Row>,
{
    type Output = O;

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
    }

    fn fetch_optional_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<O>> {
        let (sql, arguments) = statement.parts();
        let query = sqlx::query_as_with(sql, arguments).persistent(statement.persistent);
        Box::pin(query.fetch_optional(DB::executor(connection)))
    }

    fn fetch_all_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<O>> {
        let (sql, arguments) = statement.parts();
        let query = sqlx::query_as_with(sql, arguments).persistent(statement.persistent);
        Box::pin(query.fetch_all(DB::executor(connection)))
    }
}

impl<'q, DB, O, A> RoutableQuery<DB> for QueryScalar<'q, DB, O, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
    O: Send + Unpin + 'static,
    (O,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    type Output = O;

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
    }

    fn fetch_optional_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<O>> {
        let (sql, arguments) = statement.parts();
        let query = sqlx::query_scalar_with(sql, arguments).persistent(statement.persistent);
        Box::pin(query.fetch_optional(DB::executor(connection)))
    }

    fn fetch_all_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<O>> {
        let (sql, arguments) = statement.parts();
        let query = sqlx::query_scalar_with(sql, arguments).persistent(statement.persistent);
        Box::pin(query.fetch_all(DB::executor(connection)))
    }
}

/// A query bound to a route, run by one of its `fetch_*` / `execute` methods.
///
/// On the read route a query that loses its connection or times out is run again on the next
/// endpoint (reads change nothing); on the write and auth routes it runs at most once.
///
/// [`cached`](Self::cached) and [`or_fallback`](Self::or_fallback) give the call something to
/// fall back on when no endpoint can serve it; the `fetch_*` methods then return a
/// [`Served`] value that says where it came from.
#[must_use = "a routed query does nothing until fetched or executed"]
#[derive(Debug)]
pub struct Routed<'p, DB: Backend, Q> {
    pool: &'p ProtectedPool<DB>,
    route: Route,
    query: Q,
}

impl<'p, DB: Backend, Q> Routed<'p, DB, Q> {
    pub(crate) fn new(pool: &'p ProtectedPool<DB>, route: Route, query: Q) -> Self {
        Self { pool, route, query }
    }
}

/// A query reduced to "run me on this connection", with the builder's type erased: the future
/// of a pool call then names no query type, which keeps the compiler's `Send` check from
/// tripping over the builder's lifetime (rust#100013).
type Fetch<DB, T> =
    Box<dyn for<'c> Fn(&'c mut <DB as Database>::Connection) -> QueryFuture<'c, T> + Send + Sync>;

/// Runs a statement on a connection, giving a `T`.
type FetchFn<DB, T> =
    for<'c> fn(&Statement<DB>, &'c mut <DB as Database>::Connection) -> QueryFuture<'c, T>;

fn fetch_one_on<'c, DB: Backend, Q: RoutableQuery<DB>>(
    statement: &Statement<DB>,
    connection: &'c mut DB::Connection,
) -> QueryFuture<'c, Q::Output> {
    let row = Q::fetch_optional_on(statement, connection);
    Box::pin(async move { row.await?.ok_or(sqlx::Error::RowNotFound) })
}

fn execute_on<'c, DB: Backend>(
    statement: &Statement<DB>,
    connection: &'c mut DB::Connection,
) -> QueryFuture<'c, DB::QueryResult> {
    let (sql, arguments) = statement.parts();
    let query = sqlx::query_with(sql, arguments).persistent(statement.persistent);
    Box::pin(query.execute(DB::executor(connection)))
}

impl<'p, DB: Backend, Q: RoutableQuery<DB>> Routed<'p, DB, Q> {
    /// Exactly one row; no row is an error of class `Query`.
    pub fn fetch_one(self) -> impl Future<Output = Result<Q::Output>> + Send + 'p {
        let call = self.degradable().run(fetch_one_on::<DB, Q>, true, None);
        async move { call.await.map(Served::into_inner) }
    }

    /// At most one row.
    pub fn fetch_optional(self) -> impl Future<Output = Result<Option<Q::Output>>> + Send + 'p {
        let call = self.degradable().run(Q::fetch_optional_on, true, None);
        async move { call.await.map(Served::into_inner) }
    }

    /// Every row.
    pub fn fetch_all(self) -> impl Future<Output = Result<Vec<Q::Output>>> + Send + 'p {
        let call = self.degradable().run(Q::fetch_all_on, true, None);
        async move { call.await.map(Served::into_inner) }
    }

    /// Stores every successful result in the pool's cache under `key` for `ttl`, and serves
    /// the stored value (marked stale, with its age) when no endpoint can answer.
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
    pub fn cached(self, key: impl Into<String>, ttl: Duration) -> Degradable<'p, DB, Q, NoFallback>
    where
        Q::Output: Serialize + DeserializeOwned,
    {
        self.degradable().cached(key, ttl)
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
    pub fn or_fallback<F, R>(self, fallback: F) -> Degradable<'p, DB, Q, F>
    where
        F: FnOnce(&FallbackContext<'_>) -> Option<R> + Send + 'static,
    {
        self.degradable().or_fallback(fallback)
    }

    fn degradable(self) -> Degradable<'p, DB, Q, NoFallback> {
        Degradable {
            routed: self,
            cache: None,
            fallback: NoFallback,
        }
    }
}

impl<'p, 'q, DB, A> Routed<'p, DB, Query<'q, DB, A>>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    /// Runs a statement for its effect, at most once; returns the driver's result (rows
    /// affected, ...).
    pub fn execute(self) -> impl Future<Output = Result<DB::QueryResult>> + Send + 'p {
        // A statement run for its effect may write: never repeat it on another endpoint.
        let call = self.degradable().run(execute_on::<DB>, false, None);
        async move { call.await.map(Served::into_inner) }
    }
}

/// No fallback of the call's own (the route's may still apply).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

/// A call's own fallback for a result of type `T`: a closure
/// `FnOnce(&FallbackContext) -> Option<T>`, or [`NoFallback`].
pub trait CallFallback<T>: Send {
    /// The fallback, boxed; `None` for none.
    #[doc(hidden)]
    fn into_boxed(self) -> Option<BoxedFallback<T>>;
}

impl<T> CallFallback<T> for NoFallback {
    fn into_boxed(self) -> Option<BoxedFallback<T>> {
        None
    }
}

impl<T, F> CallFallback<T> for F
where
    F: FnOnce(&FallbackContext<'_>) -> Option<T> + Send + 'static,
{
    fn into_boxed(self) -> Option<BoxedFallback<T>> {
        Some(Box::new(self))
    }
}

/// A query with a cache key or a fallback (see [`Routed::cached`], [`Routed::or_fallback`]):
/// its `fetch_*` methods return a [`Served`] value that says whether it came from an endpoint,
/// the cache or a fallback.
#[must_use = "a routed query does nothing until fetched or executed"]
pub struct Degradable<'p, DB: Backend, Q: RoutableQuery<DB>, F> {
    routed: Routed<'p, DB, Q>,
    cache: Option<(String, Duration, CacheCodecs<Q::Output>)>,
    fallback: F,
}

impl<DB: Backend, Q: RoutableQuery<DB> + fmt::Debug, F> fmt::Debug for Degradable<'_, DB, Q, F> {
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
    one: fn(String, Duration) -> CacheRequest<O>,
    optional: fn(String, Duration) -> CacheRequest<Option<O>>,
    all: fn(String, Duration) -> CacheRequest<Vec<O>>,
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

impl<'p, DB: Backend, Q: RoutableQuery<DB>, F> Degradable<'p, DB, Q, F> {
    /// See [`Routed::cached`].
    pub fn cached(mut self, key: impl Into<String>, ttl: Duration) -> Self
    where
        Q::Output: Serialize + DeserializeOwned,
    {
        self.cache = Some((key.into(), ttl, CacheCodecs::json()));
        self
    }

    /// See [`Routed::or_fallback`]; replaces an earlier fallback of this call.
    pub fn or_fallback<G, R>(self, fallback: G) -> Degradable<'p, DB, Q, G>
    where
        G: FnOnce(&FallbackContext<'_>) -> Option<R> + Send + 'static,
    {
        Degradable {
            routed: self.routed,
            cache: self.cache,
            fallback,
        }
    }

    /// Exactly one row; no row is an error of class `Query` (and no fallback runs for it).
    pub fn fetch_one(mut self) -> impl Future<Output = Result<Served<Q::Output>>> + Send + 'p
    where
        F: CallFallback<Q::Output>,
    {
        let cache = self.take_cache(|codecs| codecs.one);
        self.run(fetch_one_on::<DB, Q>, true, cache)
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

    /// The call's cache request (its key moved, not copied), in the form of one `fetch_*`.
    fn take_cache<T>(
        &mut self,
        pick: impl FnOnce(&CacheCodecs<Q::Output>) -> fn(String, Duration) -> CacheRequest<T>,
    ) -> Option<CacheRequest<T>> {
        let (key, ttl, codecs) = self.cache.take()?;
        Some(pick(&codecs)(key, ttl))
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
        let Routed { pool, route, query } = self.routed;
        let replayable = replayable && route == Route::Read;
        let fallback = self.fallback.into_boxed();
        let prepared = query
            .into_statement()
            .map(|statement| -> (SqlStr, Fetch<DB, T>) {
                let sql = statement.sql.clone();
                (
                    sql,
                    Box::new(move |connection| fetch(&statement, connection)),
                )
            })
            .map_err(|source| Error::InvalidQuery { route, source });
        async move {
            let (sql, fetch) = prepared?;
            let inner = &pool.inner;
            inner.start_probes();
            let plan = Plan {
                route,
                sql: Some(sql.as_str()),
                cache,
                fallback,
            };
            // Boxed: the endpoint loop's future is large, and `serve` and the span move it.
            let call = Box::pin(inner.run_erased(route, replayable, &*fetch));
            inner.serve(plan, call).await
        }
    }
}

impl<'p, 'q, DB, A, F> Degradable<'p, DB, Query<'q, DB, A>, F>
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
