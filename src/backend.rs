//! The databases the pool speaks to: what differs between PostgreSQL and SQLite.

use std::future::Future;
use std::time::Duration;

use sqlx::{Database, Executor, Postgres, Sqlite};

use crate::classify::{self, ErrorClass};

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database `ProtectedPool` supports: [`Postgres`] and [`Sqlite`].
pub trait Backend:
    Database<Arguments: Clone + Sync> + sqlx::database::HasStatementCache + sealed::Sealed
{
    /// The database's name in traces (OpenTelemetry `db.system`): `postgresql`, `sqlite`.
    const SYSTEM: &'static str;

    /// The executor a query runs on: a mutable connection.
    type Executor<'c>: Executor<'c, Database = Self>
    where
        Self: 'c;

    /// The connection as an executor.
    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_>;

    /// This database's rule from error code (SQLSTATE, result code) to class.
    #[doc(hidden)]
    fn classify_code(code: &str) -> ErrorClass;

    /// How far this server's data is behind its primary; `None` for a server that is not a
    /// replica or a database without replication.
    #[doc(hidden)]
    fn replication_lag(
        connection: &mut Self::Connection,
    ) -> impl Future<Output = Result<Option<Duration>, sqlx::Error>> + Send;

    /// The class of any sqlx error from this database.
    fn classify(error: &sqlx::Error) -> ErrorClass {
        classify::classify_sqlx(error, Self::classify_code)
    }
}

impl Backend for Postgres {
    const SYSTEM: &'static str = "postgresql";
    type Executor<'c> = &'c mut sqlx::PgConnection;

    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_> {
        connection
    }

    fn classify_code(code: &str) -> ErrorClass {
        classify::postgres_sqlstate(code)
    }

    fn classify(error: &sqlx::Error) -> ErrorClass {
        let class = classify::classify_sqlx(error, Self::classify_code);
        // A FATAL or PANIC error ends the session whatever its code says (an idle timeout,
        // for one): the connection is gone, so it must be treated as lost, not reused.
        let session_ended = match error {
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                }),
            _ => false,
        };
        if session_ended
            && matches!(
                class,
                ErrorClass::Query | ErrorClass::Transient | ErrorClass::Unknown
            )
        {
            ErrorClass::Connection
        } else {
            class
        }
    }

    async fn replication_lag(
        connection: &mut Self::Connection,
    ) -> Result<Option<Duration>, sqlx::Error> {
        // Caught up (everything received is replayed) means no lag, however old the last
        // replayed transaction is: an idle primary sends nothing new. Behind with nothing
        // replayed since the server started, its data is at least as old as its start.
        let lag: Option<f64> = sqlx::query_scalar(
            "SELECT CASE
                 WHEN NOT pg_is_in_recovery() THEN NULL
                 WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
                     THEN 0
                 ELSE EXTRACT(EPOCH FROM now() - COALESCE(
                     pg_last_xact_replay_timestamp(), pg_postmaster_start_time()))
             END::float8",
        )
        .fetch_one(&mut *connection)
        .await?;
        Ok(lag.map(|secs| Duration::from_secs_f64(secs.max(0.0))))
    }
}

impl Backend for Sqlite {
    const SYSTEM: &'static str = "sqlite";
    type Executor<'c> = &'c mut sqlx::SqliteConnection;

    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_> {
        connection
    }

    fn classify_code(code: &str) -> ErrorClass {
        classify::sqlite_result_code(code)
    }

    async fn replication_lag(
        _connection: &mut Self::Connection,
    ) -> Result<Option<Duration>, sqlx::Error> {
        Ok(None)
    }
}
