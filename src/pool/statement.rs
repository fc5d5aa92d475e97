//! The sqlx query builders the pool takes, taken apart into SQL and encoded arguments before
//! they run, so that a read whose connection dies under it can be built again, identically,
//! for the next endpoint.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_core::future::BoxFuture;

use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{Database, Execute, IntoArguments, SqlStr};

use crate::backend::Backend;

/// A query's future, boxed: its type then names no query lifetime, so the futures of pool
/// calls are `Send` wherever they are spawned. (Public in a private module: named by the
/// sealed methods of [`RoutableQuery`], unnameable outside the crate.)
#[allow(unreachable_pub)]
pub type QueryFuture<'c, T> = Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'c>>;

/// A statement running on a connection: the future sqlx's executor gives (sqlx boxes it, so
/// its type names no query lifetime and the call stays `Send`), and what makes its answer the
/// caller's type. No box of the pool's own on top. (Public in a private module, as
/// [`QueryFuture`].)
#[allow(unreachable_pub)]
pub struct Fetched<'c, DB: Database, T>(Running<'c, DB, T>);

type Answer<'c, R> = BoxFuture<'c, Result<R, sqlx::Error>>;

enum Running<'c, DB: Database, T> {
    Optional(
        Answer<'c, Option<DB::Row>>,
        fn(Option<DB::Row>) -> Result<T, sqlx::Error>,
    ),
    All(
        Answer<'c, Vec<DB::Row>>,
        fn(Vec<DB::Row>) -> Result<T, sqlx::Error>,
    ),
    Execute(
        Answer<'c, DB::QueryResult>,
        fn(DB::QueryResult) -> Result<T, sqlx::Error>,
    ),
}

impl<DB: Database, T> std::fmt::Debug for Fetched<'_, DB, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched").finish_non_exhaustive()
    }
}

impl<DB: Database, T> Future for Fetched<'_, DB, T> {
    type Output = Result<T, sqlx::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match &mut self.get_mut().0 {
            Running::Optional(answer, finish) => ready!(answer.as_mut().poll(cx)).and_then(*finish),
            Running::All(answer, finish) => ready!(answer.as_mut().poll(cx)).and_then(*finish),
            Running::Execute(answer, finish) => ready!(answer.as_mut().poll(cx)).and_then(*finish),
        })
    }
}

/// A query's SQL and encoded arguments, from which the same query can be built again.
#[derive(Debug)]
pub struct Statement<DB: Database> {
    pub(crate) sql: SqlStr,
    arguments: DB::Arguments,
    persistent: bool,
}

impl<DB: Backend> Statement<DB> {
    /// A statement from SQL and arguments already encoded.
    pub(crate) fn new(sql: SqlStr, arguments: DB::Arguments) -> Self {
        Self {
            sql,
            arguments,
            persistent: true,
        }
    }

    pub(crate) fn take_apart<'q, E: Execute<'q, DB>>(mut query: E) -> Result<Self, sqlx::Error> {
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

    /// The same statement, run unnamed if `unnamed` (behind a transaction pooler: a named
    /// statement lives on one server connection, see `EndpointOptions::transaction_pooler`).
    pub(crate) fn unnamed_if(mut self, unnamed: bool) -> Self {
        self.persistent &= !unnamed;
        self
    }

    /// The statement as sqlx's plain query again.
    fn query(&self) -> Query<'static, DB, Bound<DB>> {
        let arguments = Bound(self.arguments.clone());
        sqlx::query_with(self.sql.clone(), arguments).persistent(self.persistent)
    }

    /// Runs the statement on `connection` for at most one row, which `finish` turns into a
    /// `T`.
    pub(crate) fn optional_on<'c, T>(
        &self,
        connection: &'c mut DB::Connection,
        finish: fn(Option<DB::Row>) -> Result<T, sqlx::Error>,
    ) -> Fetched<'c, DB, T> {
        let answer = sqlx::Executor::fetch_optional(DB::executor(connection), self.query());
        Fetched(Running::Optional(answer, finish))
    }

    /// Runs the statement on `connection` for every row, which `finish` turns into a `T`.
    pub(crate) fn all_on<'c, T>(
        &self,
        connection: &'c mut DB::Connection,
        finish: fn(Vec<DB::Row>) -> Result<T, sqlx::Error>,
    ) -> Fetched<'c, DB, T> {
        let answer = sqlx::Executor::fetch_all(DB::executor(connection), self.query());
        Fetched(Running::All(answer, finish))
    }

    /// Runs the statement on `connection`, every result and row as it comes.
    pub(crate) fn fetch_many_on<'c>(&self, connection: &'c mut DB::Connection) -> Steps<'c, DB> {
        sqlx::Executor::fetch_many(DB::executor(connection), self.query())
    }
}

/// What a statement gives, result by result and row by row.
pub(crate) type Steps<'c, DB> = futures_core::stream::BoxStream<
    'c,
    Result<sqlx::Either<<DB as Database>::QueryResult, <DB as Database>::Row>, sqlx::Error>,
>;

/// Arguments already encoded, handed back to a rebuilt query.
struct Bound<DB: Database>(DB::Arguments);

impl<DB: Database> IntoArguments<DB> for Bound<DB> {
    fn into_arguments(self) -> DB::Arguments {
        self.0
    }
}

/// A sqlx query builder the pool can run: [`sqlx::query()`], [`sqlx::query_as()`],
/// [`sqlx::query_scalar()`] and their `_with` forms. Sealed: the pool knows how to take each
/// of them apart and build it again.
pub trait RoutableQuery<DB: Backend>: sealed::Sealed + Send + Sized {
    /// What one result row becomes.
    type Output: Send + Unpin + 'static;

    /// Takes the query apart into SQL and encoded arguments.
    #[doc(hidden)]
    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error>;

    /// What one row becomes.
    #[doc(hidden)]
    fn from_row(row: DB::Row) -> Result<Self::Output, sqlx::Error>;

    /// Runs the statement on `connection`, returning exactly one row (none is
    /// `RowNotFound`).
    #[doc(hidden)]
    fn fetch_one_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> Fetched<'c, DB, Self::Output> {
        statement.optional_on(connection, |row| {
            Self::from_row(row.ok_or(sqlx::Error::RowNotFound)?)
        })
    }

    /// Runs the statement on `connection`, returning at most one row.
    #[doc(hidden)]
    fn fetch_optional_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> Fetched<'c, DB, Option<Self::Output>> {
        statement.optional_on(connection, |row| row.map(Self::from_row).transpose())
    }

    /// Runs the statement on `connection`, returning every row.
    #[doc(hidden)]
    fn fetch_all_on<'c>(
        statement: &Statement<DB>,
        connection: &'c mut DB::Connection,
    ) -> Fetched<'c, DB, Vec<Self::Output>> {
        statement.all_on(connection, |rows| {
            rows.into_iter().map(Self::from_row).collect()
        })
    }
}

pub(super) mod sealed {
    use sqlx::query::{Query, QueryAs, QueryScalar};

    pub trait Sealed {}
    impl<DB: sqlx::Database, A> Sealed for Query<'_, DB, A> {}
    impl<DB: sqlx::Database, O, A> Sealed for QueryAs<'_, DB, O, A> {}
    impl<DB: sqlx::Database, O, A> Sealed for QueryScalar<'_, DB, O, A> {}
}

impl<'q, DB, A> RoutableQuery<DB> for Query<'q, DB, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    type Output = DB::Row;

    fn from_row(row: DB::Row) -> Result<DB::Row, sqlx::Error> {
        Ok(row)
    }

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
    }
}

impl<'q, DB, O, A> RoutableQuery<DB> for QueryAs<'q, DB, O, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
    O: Send + Unpin + 'static + for<'r> sqlx::FromRow<'r, DB::Row>,
{
    type Output = O;

    fn from_row(row: DB::Row) -> Result<O, sqlx::Error> {
        O::from_row(&row)
    }

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
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

    fn from_row(row: DB::Row) -> Result<O, sqlx::Error> {
        <(O,) as sqlx::FromRow<'_, DB::Row>>::from_row(&row).map(|(value,)| value)
    }

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
    }
}

/// Runs a statement on a connection, giving a `T`.
pub(crate) type FetchFn<DB, T> =
    for<'c> fn(&Statement<DB>, &'c mut <DB as Database>::Connection) -> Fetched<'c, DB, T>;

pub(crate) fn execute_on<'c, DB: Backend>(
    statement: &Statement<DB>,
    connection: &'c mut DB::Connection,
) -> Fetched<'c, DB, DB::QueryResult> {
    let answer = sqlx::Executor::execute(DB::executor(connection), statement.query());
    Fetched(Running::Execute(answer, Ok))
}

pub(crate) fn rows_optional_on<'c, DB: Backend>(
    statement: &Statement<DB>,
    connection: &'c mut DB::Connection,
) -> Fetched<'c, DB, Option<DB::Row>> {
    statement.optional_on(connection, Ok)
}

pub(crate) fn rows_all_on<'c, DB: Backend>(
    statement: &Statement<DB>,
    connection: &'c mut DB::Connection,
) -> Fetched<'c, DB, Vec<DB::Row>> {
    statement.all_on(connection, Ok)
}
