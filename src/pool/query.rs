//! `pool.read(query)`: ordinary sqlx query builders, routed and protected.
//!
//! A query is taken apart into its SQL and its encoded arguments before it runs, so that a read
//! whose connection dies under it can be built again, identically, for the next endpoint.

use std::future::Future;
use std::pin::Pin;

use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{Database, Execute, IntoArguments, SqlStr};

use super::ProtectedPool;
use crate::backend::Backend;
use crate::error::{Error, Result};
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

impl<'p, DB: Backend, Q: RoutableQuery<DB>> Routed<'p, DB, Q> {
    /// Exactly one row; no row is an error of class `Query`.
    pub fn fetch_one(self) -> impl Future<Output = Result<Q::Output>> + Send + 'p {
        self.run(|statement, connection| {
            let row = Q::fetch_optional_on(statement, connection);
            Box::pin(async move { row.await?.ok_or(sqlx::Error::RowNotFound) })
        })
    }

    /// At most one row.
    pub fn fetch_optional(self) -> impl Future<Output = Result<Option<Q::Output>>> + Send + 'p {
        self.run(Q::fetch_optional_on)
    }

    /// Every row.
    pub fn fetch_all(self) -> impl Future<Output = Result<Vec<Q::Output>>> + Send + 'p {
        self.run(Q::fetch_all_on)
    }

    fn run<T: Send + 'static>(
        self,
        fetch: for<'c> fn(&Statement<DB>, &'c mut DB::Connection) -> QueryFuture<'c, T>,
    ) -> impl Future<Output = Result<T>> + Send + 'p {
        let (pool, route) = (self.pool, self.route);
        let prepared = self
            .query
            .into_statement()
            .map(|statement| -> Fetch<DB, T> {
                Box::new(move |connection| fetch(&statement, connection))
            })
            .map_err(|source| Error::InvalidQuery { route, source });
        run_fetch(pool, route, prepared)
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
        let (pool, route, statement) = (self.pool, self.route, self.query.into_statement());
        let prepared = statement
            .map(|statement| -> Fetch<DB, DB::QueryResult> {
                Box::new(move |connection| {
                    let (sql, arguments) = statement.parts();
                    let query = sqlx::query_with(sql, arguments).persistent(statement.persistent);
                    Box::pin(query.execute(DB::executor(connection)))
                })
            })
            .map_err(|source| Error::InvalidQuery { route, source });
        async move {
            let fetch = prepared?;
            pool.inner.start_probes();
            // A statement run for its effect may write: never repeat it on another endpoint.
            pool.inner.run_erased(route, false, &*fetch).await
        }
    }
}

/// Runs an erased query: repeated on the next endpoint for reads, at most once otherwise.
async fn run_fetch<DB: Backend, T: Send + 'static>(
    pool: &ProtectedPool<DB>,
    route: Route,
    prepared: Result<Fetch<DB, T>>,
) -> Result<T> {
    let fetch = prepared?;
    pool.inner.start_probes();
    pool.inner
        .run_erased(route, route == Route::Read, &*fetch)
        .await
}
