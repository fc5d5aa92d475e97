//! What a call runs on a connection, in the one form the endpoint loop takes: a query taken
//! apart (run as often as asked), a caller's closure, or a caller's closure that runs once.

use std::future::Future;

use sqlx::Database;

use super::statement::{FetchFn, QueryFuture, Statement};

/// What a call runs on a connection: a query taken apart (run as often as asked), or a
/// caller's closure.
pub(crate) trait Operation<C> {
    type Output;

    /// Runs it once more on `connection`.
    fn run<'c>(
        &'c mut self,
        connection: &'c mut C,
    ) -> impl Future<Output = Result<Self::Output, sqlx::Error>> + 'c;
}

/// A caller's closure.
pub(crate) struct Closure<F>(pub(crate) F);

impl<C, T, F: AsyncFnMut(&mut C) -> Result<T, sqlx::Error>> Operation<C> for Closure<F> {
    type Output = T;

    fn run<'c>(
        &'c mut self,
        connection: &'c mut C,
    ) -> impl Future<Output = Result<T, sqlx::Error>> + 'c {
        (self.0)(connection)
    }
}

/// A caller's closure that must run at most once. `Replay::Never` never asks for a second
/// run; if it did, it would get an error, not a second run.
pub(crate) struct Once<F>(Option<F>);

impl<F> Once<F> {
    pub(crate) fn new(operation: F) -> Self {
        Self(Some(operation))
    }
}

impl<C, T, F: AsyncFnOnce(&mut C) -> Result<T, sqlx::Error>> Operation<C> for Once<F> {
    type Output = T;

    fn run<'c>(
        &'c mut self,
        connection: &'c mut C,
    ) -> impl Future<Output = Result<T, sqlx::Error>> + 'c {
        let operation = self.0.take();
        async move {
            match operation {
                Some(operation) => operation(connection).await,
                None => Err(sqlx::Error::Protocol(
                    "an operation that runs once was asked to run again".to_owned(),
                )),
            }
        }
    }
}

/// A query whose builder type has been erased (see `routed`): no closure type of this
/// crate's generic code ends up in the call's future, which keeps it `Send`.
pub(crate) struct Erased<'f, C, T>(
    pub(crate) &'f (dyn for<'c> Fn(&'c mut C) -> QueryFuture<'c, T> + Send + Sync),
);

impl<C, T> Operation<C> for Erased<'_, C, T> {
    type Output = T;

    fn run<'c>(
        &'c mut self,
        connection: &'c mut C,
    ) -> impl Future<Output = Result<T, sqlx::Error>> + 'c {
        (self.0)(connection)
    }
}

/// A statement taken apart and the function that runs it: no query builder's type and no
/// closure's in it, so the call's future stays `Send`.
pub(crate) struct Fetching<'s, DB: Database, T> {
    pub(crate) statement: &'s Statement<DB>,
    pub(crate) fetch: FetchFn<DB, T>,
}

impl<DB: Database, T> Operation<DB::Connection> for Fetching<'_, DB, T> {
    type Output = T;

    fn run<'c>(
        &'c mut self,
        connection: &'c mut DB::Connection,
    ) -> impl Future<Output = Result<T, sqlx::Error>> + 'c {
        (self.fetch)(self.statement, connection)
    }
}
