//! `pool.query(q)` (feature `route-by-sql`): a query whose route is read from its SQL. sqlx
//! gives a query's SQL only by consuming it, so the query is taken apart here, once, and runs
//! from its parts as it would have run whole.

use std::fmt;
use std::marker::PhantomData;

use super::statement::{RoutableQuery, Statement};
use crate::backend::Backend;
use crate::route::Route;
use crate::route_by_sql::route_of_sql;

impl<DB: Backend, Q> super::statement::sealed::Sealed for BySql<DB, Q> {}

/// A query handed to [`ProtectedPool::query`](crate::ProtectedPool::query): `Q` taken apart
/// into its SQL and encoded arguments, its route read from the SQL. It runs as `Q` would,
/// with `Q`'s rows.
pub struct BySql<DB: Backend, Q> {
    statement: Result<Statement<DB>, sqlx::Error>,
    _query: PhantomData<fn() -> Q>,
}

impl<DB: Backend, Q: RoutableQuery<DB>> BySql<DB, Q> {
    /// `query` taken apart, and its route: a query whose arguments do not encode has no
    /// statement to read, and goes to the write route to fail there with its error.
    pub(super) fn route(query: Q) -> (Route, Self) {
        let statement = query.into_statement();
        let route = match &statement {
            Ok(statement) => route_of_sql(statement.sql.as_str(), DB::SQL_DIALECT),
            Err(_) => Route::Write,
        };
        let query = Self {
            statement,
            _query: PhantomData,
        };
        (route, query)
    }
}

impl<DB: Backend, Q> fmt::Debug for BySql<DB, Q> {
    /// The SQL, never the arguments.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sql = self
            .statement
            .as_ref()
            .map(|statement| statement.sql.as_str());
        f.debug_struct("BySql")
            .field("sql", &sql.ok())
            .finish_non_exhaustive()
    }
}

impl<DB: Backend, Q: RoutableQuery<DB>> RoutableQuery<DB> for BySql<DB, Q> {
    type Output = Q::Output;

    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        self.statement
    }

    fn from_row(row: DB::Row) -> Result<Self::Output, sqlx::Error> {
        Q::from_row(row)
    }
}

impl Route {
    /// The route of `sql` for the database `DB`, by [`route_of_sql`](crate::route_by_sql::route_of_sql) in `DB`'s dialect:
    /// [`Route::Read`] only when the statement is provably read-only.
    ///
    /// ```
    /// use protected_pool::{Route, Sqlite};
    ///
    /// assert_eq!(Route::of_sql::<Sqlite>("SELECT name FROM users"), Route::Read);
    /// assert_eq!(Route::of_sql::<Sqlite>("INSERT OR REPLACE INTO users VALUES (1)"), Route::Write);
    /// ```
    #[cfg_attr(docsrs, doc(cfg(feature = "route-by-sql")))]
    pub fn of_sql<DB: Backend>(sql: &str) -> Route {
        route_of_sql(sql, DB::SQL_DIALECT)
    }
}
