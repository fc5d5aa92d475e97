//! The pool as a sqlx `Executor` and `Acquire`: existing sqlx code (`query.fetch_one(&pool)`,
//! functions taking `impl PgExecutor`, `sqlx::migrate!().run(&pool)`) runs through the pool
//! unchanged, each statement protected like any other call.

use std::fmt;

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use sqlx::{Database, Execute, SqlStr};

use super::ProtectedPool;
use super::call::{replay_for, run_statement};
use super::connection::ProtectedConnection;
use super::degrade::Plan;
use super::failover::Replay;
use super::operation::Erased;
use super::statement::{QueryFuture, Statement, execute_on, rows_all_on, rows_optional_on};
use super::stream::Step;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fallback::Served;
use crate::into_sqlx::wrap;
use crate::route::Route;

/// The pool on one route, as a sqlx [`Executor`](sqlx::Executor): from
/// [`ProtectedPool::reader`], [`writer`](ProtectedPool::writer),
/// [`authenticator`](ProtectedPool::authenticator) or [`on`](ProtectedPool::on). Cheap to
/// copy.
///
/// Each statement is one call of the route: its breakers, its timeout, its endpoints. On the
/// read route `fetch_*` calls move to the next endpoint when one fails (reads change
/// nothing), `execute` runs at most once; on the write and auth routes a statement runs at
/// most once (a standby's refusal, which ran nothing, moves it to the primary). Streams
/// (`fetch`, `fetch_many`) move on only before their first row.
///
/// Errors are `sqlx::Error`s: the server's own errors as sqlx gives them; the pool's (a
/// refusal, a timeout) inside an `Io` error, see [`Error::from_sqlx`].
///
/// ```no_run
/// # async fn demo(pool: protected_pool::ProtectedPool) -> Result<(), sqlx::Error> {
/// async fn user_name(db: impl sqlx::PgExecutor<'_>, id: i64) -> sqlx::Result<String> {
///     sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(id).fetch_one(db).await
/// }
///
/// // Reads on replicas with failover; `&pool` itself runs on the primary.
/// let name = user_name(pool.reader(), 42).await?;
/// sqlx::query("UPDATE users SET seen = now() WHERE id = $1").bind(42_i64).execute(&pool).await?;
/// # let _ = name; Ok(()) }
/// ```
pub struct OnRoute<'p, DB: Backend> {
    pool: &'p ProtectedPool<DB>,
    route: Route,
    /// Every pool error goes back whole inside an `Io` error, the driver's included, for a
    /// caller in this crate that takes it out again.
    whole: bool,
}

impl<DB: Backend> Clone for OnRoute<'_, DB> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<DB: Backend> Copy for OnRoute<'_, DB> {}

impl<DB: Backend> fmt::Debug for OnRoute<'_, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnRoute")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl<'p, DB: Backend> OnRoute<'p, DB> {
    pub(super) fn new(pool: &'p ProtectedPool<DB>, route: Route) -> Self {
        Self {
            pool,
            route,
            whole: false,
        }
    }

    /// An executor whose errors this crate takes out whole again (see
    /// `into_sqlx::unwrap`).
    pub(super) fn keeping_errors_whole(self) -> Self {
        Self {
            whole: true,
            ..self
        }
    }

    /// The route.
    pub fn route(&self) -> Route {
        self.route
    }

    fn to_sqlx(self) -> impl Fn(Error) -> sqlx::Error + Copy {
        move |error| {
            if self.whole {
                wrap(error)
            } else {
                error.into()
            }
        }
    }

    /// Runs one statement to completion through the pool.
    fn call<'e, T: Send + 'static>(
        self,
        statement: Result<Statement<DB>, sqlx::Error>,
        replayable: bool,
        fetch: super::statement::FetchFn<DB, T>,
    ) -> BoxFuture<'e, Result<T, sqlx::Error>>
    where
        'p: 'e,
    {
        let replay = replay_for(self.route, replayable);
        let call = run_statement(self.pool, self.route, replay, statement, fetch, None, None);
        let to_sqlx = self.to_sqlx();
        call.map(move |served| served.map(Served::into_inner).map_err(to_sqlx))
            .boxed()
    }

    /// Runs `operation` once on a connection of the route.
    fn once<'e, T: Send + 'static>(
        self,
        operation: BoxedOperation<'e, DB, T>,
    ) -> BoxFuture<'e, Result<T, sqlx::Error>>
    where
        'p: 'e,
    {
        let inner = &self.pool.inner;
        let to_sqlx = self.to_sqlx();
        let route = self.route;
        async move {
            let operation = &*operation;
            // Inline: the whole future is boxed once just below.
            let call = std::pin::pin!(inner.failover(route, Replay::Never, Erased(operation)));
            let served = inner.degrade(Plan::bare(route), call).await;
            served.map(Served::into_inner).map_err(to_sqlx)
        }
        .boxed()
    }
}

/// An operation on a connection, with its type erased (see `operation::Erased`).
type BoxedOperation<'e, DB, T> = Box<
    dyn for<'c> Fn(&'c mut <DB as Database>::Connection) -> QueryFuture<'c, T> + Send + Sync + 'e,
>;

impl<'p, DB: Backend> sqlx::Executor<'p> for OnRoute<'p, DB> {
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Step<DB>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        let route = self.route;
        let statement =
            Statement::take_apart(query).map_err(|source| Error::InvalidQuery { route, source });
        let to_sqlx = self.to_sqlx();
        // A stream may hold statements that write: only a read's moves on.
        let replay = replay_for(route, true);
        self.pool
            .inner
            .stream(route, replay, statement, |step| Some(Ok(step)))
            .map(move |item| item.map_err(to_sqlx))
            .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        self.call(Statement::take_apart(query), true, rows_optional_on::<DB>)
    }

    fn fetch_all<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Vec<DB::Row>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        self.call(Statement::take_apart(query), true, rows_all_on::<DB>)
    }

    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<DB::QueryResult, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        // Run for its effect: it may write, so it is never repeated on another endpoint.
        self.call(Statement::take_apart(query), false, execute_on::<DB>)
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [<DB as Database>::TypeInfo],
    ) -> BoxFuture<'e, Result<<DB as Database>::Statement, sqlx::Error>>
    where
        'p: 'e,
    {
        let parameters = parameters.to_vec();
        self.once(Box::new(move |connection| {
            let (sql, parameters) = (sql.clone(), parameters.clone());
            Box::pin(async move {
                sqlx::Executor::prepare_with(DB::executor(connection), sql, &parameters).await
            })
        }))
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx_core::describe::Describe<DB>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.once(Box::new(move |connection| {
            Box::pin(sqlx::Executor::describe(
                DB::executor(connection),
                sql.clone(),
            ))
        }))
    }
}

/// `&pool` runs each statement on the write route (the primary), as sqlx's `&PgPool` runs
/// it on its one server; use [`ProtectedPool::reader`] for reads that may go to replicas.
impl<'p, DB: Backend> sqlx::Executor<'p> for &'p ProtectedPool<DB> {
    type Database = DB;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, Result<Step<DB>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        self.writer().fetch_many(query)
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<DB::Row>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        self.writer().fetch_optional(query)
    }

    fn fetch_all<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Vec<DB::Row>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        self.writer().fetch_all(query)
    }

    fn execute<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<DB::QueryResult, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, DB>,
    {
        self.writer().execute(query)
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [<DB as Database>::TypeInfo],
    ) -> BoxFuture<'e, Result<<DB as Database>::Statement, sqlx::Error>>
    where
        'p: 'e,
    {
        self.writer().prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx_core::describe::Describe<DB>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.writer().describe(sql)
    }
}

/// `sqlx::migrate!().run(&pool)`: a connection of the write route (the primary), got
/// through its breakers and endpoints. `begin()` through this trait cannot hand out a sqlx
/// `Transaction` over the pool's connection and returns an error saying so: use
/// [`ProtectedPool::begin`] (an inherent method, which `pool.begin()` calls) or
/// [`ProtectedPool::transaction`].
///
/// Like sqlx's `impl Acquire<'c> for &'_ Pool<DB>`, the connection's lifetime `'c` is not
/// tied to the borrow of the pool (the future holds a clone of the pool instead): a future
/// that calls a function over `impl Acquire<'c>` with `&pool` can then be spawned, where a
/// tied lifetime fails to compile with "implementation of `Acquire` is not general enough".
impl<'c, DB: Backend> sqlx::Acquire<'c> for &'_ ProtectedPool<DB> {
    type Database = DB;
    type Connection = ProtectedConnection<DB>;

    fn acquire(self) -> BoxFuture<'c, Result<ProtectedConnection<DB>, sqlx::Error>> {
        let pool = self.clone();
        async move { Ok(pool.acquire(Route::Write).await?) }.boxed()
    }

    fn begin(self) -> BoxFuture<'c, Result<sqlx::Transaction<'c, DB>, sqlx::Error>> {
        async move {
            Err(sqlx::Error::Configuration(
                "a sqlx::Transaction cannot own a connection of a ProtectedPool: \
                 call pool.begin() (ProtectedPool::begin) or pool.transaction(..)"
                    .into(),
            ))
        }
        .boxed()
    }
}

impl<DB: Backend> ProtectedPool<DB> {
    /// The read route as a sqlx executor: replicas by the read preference, failover
    /// between them.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> Result<(), sqlx::Error> {
    /// let names: Vec<String> = sqlx::query_scalar("SELECT name FROM users ORDER BY id")
    ///     .fetch_all(pool.reader())
    ///     .await?;
    /// # let _ = names; Ok(()) }
    /// ```
    pub fn reader(&self) -> OnRoute<'_, DB> {
        OnRoute::new(self, Route::Read)
    }

    /// The write route as a sqlx executor: the primary of the moment.
    pub fn writer(&self) -> OnRoute<'_, DB> {
        OnRoute::new(self, Route::Write)
    }

    /// The auth route as a sqlx executor (logins, session checks).
    pub fn authenticator(&self) -> OnRoute<'_, DB> {
        OnRoute::new(self, Route::Auth)
    }

    /// `route` as a sqlx executor.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> Result<(), sqlx::Error> {
    /// use protected_pool::Route;
    ///
    /// let valid: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE token = $1)")
    ///     .bind("t0k3n")
    ///     .fetch_one(pool.on(Route::Auth))
    ///     .await?;
    /// # let _ = valid; Ok(()) }
    /// ```
    pub fn on(&self, route: Route) -> OnRoute<'_, DB> {
        OnRoute::new(self, route)
    }
}
