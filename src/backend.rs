//! The databases the pool speaks to: what differs between PostgreSQL and SQLite.

use sqlx::{Database, Executor, Postgres, Sqlite};

use crate::classify::{self, ErrorClass};

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database `ProtectedPool` supports: [`Postgres`] and [`Sqlite`].
pub trait Backend: Database + sealed::Sealed {
    /// The executor a query runs on: a mutable connection.
    type Executor<'c>: Executor<'c, Database = Self>
    where
        Self: 'c;

    /// The connection as an executor.
    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_>;

    /// This database's rule from error code (SQLSTATE, result code) to class.
    #[doc(hidden)]
    fn classify_code(code: &str) -> ErrorClass;

    /// The class of any sqlx error from this database.
    fn classify(error: &sqlx::Error) -> ErrorClass {
        classify::classify_sqlx(error, Self::classify_code)
    }
}

impl Backend for Postgres {
    type Executor<'c> = &'c mut sqlx::PgConnection;

    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_> {
        connection
    }

    fn classify_code(code: &str) -> ErrorClass {
        classify::postgres_sqlstate(code)
    }
}

impl Backend for Sqlite {
    type Executor<'c> = &'c mut sqlx::SqliteConnection;

    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_> {
        connection
    }

    fn classify_code(code: &str) -> ErrorClass {
        classify::sqlite_result_code(code)
    }
}
