//! `pool.read(query)`: ordinary sqlx query builders, routed and protected.

use std::future::Future;
use std::pin::Pin;

use sqlx::IntoArguments;
use sqlx::query::{Query, QueryAs, QueryScalar};

use super::ProtectedPool;
use crate::backend::Backend;
use crate::error::Result;
use crate::route::Route;

/// A query's future, boxed: its type then names no query lifetime, so the futures of pool
/// calls are `Send` wherever they are spawned.
pub type QueryFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// A sqlx query builder the pool can run: [`sqlx::query`], [`sqlx::query_as`],
/// [`sqlx::query_scalar`] and their `_with` forms.
pub trait RoutableQuery<DB: Backend>: Send {
    /// What one result row becomes.
    type Output: Send + Unpin;

    /// Runs the query on `connection`, returning at most one row.
    fn fetch_optional_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<Self::Output>>
    where
        Self: 'c;

    /// Runs the query on `connection`, returning every row.
    fn fetch_all_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<Self::Output>>
    where
        Self: 'c;
}

impl<'q, DB, A> RoutableQuery<DB> for Query<'q, DB, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    type Output = DB::Row;

    fn fetch_optional_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<Self::Output>>
    where
        Self: 'c,
    {
        Box::pin(Query::fetch_optional(self, DB::executor(connection)))
    }

    fn fetch_all_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<Self::Output>>
    where
        Self: 'c,
    {
        Box::pin(Query::fetch_all(self, DB::executor(connection)))
    }
}

impl<'q, DB, O, A> RoutableQuery<DB> for QueryAs<'q, DB, O, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
    O: Send + Unpin + for<'r> sqlx::FromRow<'r, DB::Row>,
{
    type Output = O;

    fn fetch_optional_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<Self::Output>>
    where
        Self: 'c,
    {
        Box::pin(QueryAs::fetch_optional(self, DB::executor(connection)))
    }

    fn fetch_all_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<Self::Output>>
    where
        Self: 'c,
    {
        Box::pin(QueryAs::fetch_all(self, DB::executor(connection)))
    }
}

impl<'q, DB, O, A> RoutableQuery<DB> for QueryScalar<'q, DB, O, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
    O: Send + Unpin,
    (O,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    type Output = O;

    fn fetch_optional_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Option<Self::Output>>
    where
        Self: 'c,
    {
        Box::pin(QueryScalar::fetch_optional(self, DB::executor(connection)))
    }

    fn fetch_all_on<'c>(
        self,
        connection: &'c mut DB::Connection,
    ) -> QueryFuture<'c, Vec<Self::Output>>
    where
        Self: 'c,
    {
        Box::pin(QueryScalar::fetch_all(self, DB::executor(connection)))
    }
}

/// A query bound to a route, run by one of its `fetch_*` / `execute` methods.
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

impl<DB: Backend, Q: RoutableQuery<DB>> Routed<'_, DB, Q> {
    /// Exactly one row; no row is an error of class `Query`.
    pub async fn fetch_one(self) -> Result<Q::Output> {
        let query = self.query;
        self.pool.inner.start_probes();
        self.pool
            .inner
            .run_once(self.route, async move |connection: &mut DB::Connection| {
                query
                    .fetch_optional_on(connection)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)
            })
            .await
    }

    /// At most one row.
    pub async fn fetch_optional(self) -> Result<Option<Q::Output>> {
        let query = self.query;
        self.pool.inner.start_probes();
        self.pool
            .inner
            .run_once(self.route, async move |connection: &mut DB::Connection| {
                query.fetch_optional_on(connection).await
            })
            .await
    }

    /// Every row.
    pub async fn fetch_all(self) -> Result<Vec<Q::Output>> {
        let query = self.query;
        self.pool.inner.start_probes();
        self.pool
            .inner
            .run_once(self.route, async move |connection: &mut DB::Connection| {
                query.fetch_all_on(connection).await
            })
            .await
    }
}

impl<'q, DB, A> Routed<'_, DB, Query<'q, DB, A>>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    /// Runs a statement for its effect; returns the driver's result (rows affected, ...).
    pub async fn execute(self) -> Result<DB::QueryResult> {
        let query = self.query;
        self.pool.inner.start_probes();
        self.pool
            .inner
            .run_once(self.route, async move |connection: &mut DB::Connection| {
                query.execute(DB::executor(connection)).await
            })
            .await
    }
}
