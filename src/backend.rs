//! The databases the pool speaks to: what differs between PostgreSQL and SQLite.

use std::future::Future;
use std::time::Duration;

use sqlx::{Database, Executor};

use crate::classify::{self, ErrorClass};
use crate::role::Observed;
use crate::route::Route;

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

/// A database `ProtectedPool` supports: [`Postgres`](sqlx::Postgres) (feature `postgres`) and
/// [`Sqlite`](sqlx::Sqlite) (feature `sqlite`).
pub trait Backend:
    Database<Arguments: Clone + Sync> + sqlx::database::HasStatementCache + sealed::Sealed
{
    /// The database's name in traces (OpenTelemetry `db.system`): `postgresql`, `sqlite`.
    const SYSTEM: &'static str;

    /// Whether its servers can change role (a standby promoted, a primary demoted), so the
    /// health loop asks them.
    #[doc(hidden)]
    const CHANGES_ROLES: bool;

    /// The query parameters this database's connection URLs may carry. Checked before the
    /// driver reads a URL: it would log an unknown one with its value (a misspelt
    /// `pasword=...` included), or echo a bad value in its error.
    #[doc(hidden)]
    const URL_PARAMETERS: &'static [&'static str];

    /// The dialect its SQL is read in, to pick a statement's route from it (see
    /// [`route_by_sql`](crate::route_by_sql)).
    #[cfg(feature = "route-by-sql")]
    #[doc(hidden)]
    const SQL_DIALECT: crate::route_by_sql::SqlDialect;

    /// The executor a query runs on: a mutable connection.
    type Executor<'c>: Executor<'c, Database = Self>
    where
        Self: 'c;

    /// The connection as an executor.
    fn executor(connection: &mut Self::Connection) -> Self::Executor<'_>;

    /// The rows a statement changed, as its result says.
    #[doc(hidden)]
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// A [`DurableWrite`](crate::DurableWrite)'s values as this database's arguments.
    #[doc(hidden)]
    fn durable_arguments(values: &[crate::Value]) -> Result<Self::Arguments, sqlx::Error>;

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

    /// Whether `error` leaves the connection unusable. Decided from the error itself, never
    /// from its class: a custom classifier may call anything `Query`, and must not make the
    /// pool keep a dead socket.
    #[doc(hidden)]
    fn breaks_connection(error: &sqlx::Error) -> bool {
        lost_transport(error)
    }

    /// A recovery probe's check that the endpoint can serve `route`: a real statement, so
    /// that what fails a call fails the probe too.
    #[doc(hidden)]
    fn probe(
        connection: &mut Self::Connection,
        route: Route,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    /// The server process behind `connection` (for stopping a statement we gave up on;
    /// `None` where there is no server) and what the server is now.
    #[doc(hidden)]
    fn describe(
        connection: &mut Self::Connection,
    ) -> impl Future<Output = Result<(Option<i32>, Observed), sqlx::Error>> + Send;

    /// What the server behind `connection` is now (a primary, or a standby), and which
    /// server it is.
    #[doc(hidden)]
    fn role(
        connection: &mut Self::Connection,
    ) -> impl Future<Output = Result<Observed, sqlx::Error>> + Send;

    /// Asks the server to stop whatever the process `pid` is running, over a connection of
    /// its own (the one running the statement is busy).
    #[doc(hidden)]
    fn cancel(
        options: &<Self::Connection as sqlx::Connection>::Options,
        pid: i32,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// Whether the connection's transport failed. A pool's own error carried in an `Io` error (a
/// call through another pool's executor, made from inside an operation) is not this
/// connection's failure.
fn lost_transport(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => crate::Error::from_sqlx(error).is_none(),
        other => matches!(
            other,
            sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed
        ),
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::Duration;

    use sqlx::{Postgres, Row};

    use super::{Backend, lost_transport};
    use crate::classify::{self, ErrorClass};
    use crate::role::{Observed, Role};
    use crate::route::Route;

    impl Backend for Postgres {
        const SYSTEM: &'static str = "postgresql";
        const CHANGES_ROLES: bool = true;
        const URL_PARAMETERS: &'static [&'static str] = &[
            "sslmode",
            "ssl-mode",
            "sslrootcert",
            "ssl-root-cert",
            "ssl-ca",
            "sslcert",
            "ssl-cert",
            "sslkey",
            "ssl-key",
            "statement-cache-capacity",
            "host",
            "hostaddr",
            "port",
            "dbname",
            "user",
            "password",
            "application_name",
            "options",
        ];
        #[cfg(feature = "route-by-sql")]
        const SQL_DIALECT: crate::route_by_sql::SqlDialect =
            crate::route_by_sql::SqlDialect::Postgres;
        type Executor<'c> = &'c mut sqlx::PgConnection;

        fn executor(connection: &mut Self::Connection) -> Self::Executor<'_> {
            connection
        }

        fn rows_affected(result: &Self::QueryResult) -> u64 {
            result.rows_affected()
        }

        fn durable_arguments(values: &[crate::Value]) -> Result<Self::Arguments, sqlx::Error> {
            crate::durable::arguments::<Self>(values)
        }

        fn classify_code(code: &str) -> ErrorClass {
            classify::postgres_sqlstate(code)
        }

        fn classify(error: &sqlx::Error) -> ErrorClass {
            let class = classify::classify_sqlx(error, Self::classify_code);
            // A FATAL or PANIC error ends the session whatever its code says (an idle timeout,
            // for one): the connection is gone, so it must be treated as lost, not reused.
            if ends_session(error)
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

        fn breaks_connection(error: &sqlx::Error) -> bool {
            match error {
                sqlx::Error::Database(_) => ends_session(error),
                other => lost_transport(other),
            }
        }

        async fn probe(
            connection: &mut Self::Connection,
            _route: Route,
        ) -> Result<(), sqlx::Error> {
            sqlx::Connection::ping(connection).await
        }

        async fn describe(
            connection: &mut Self::Connection,
        ) -> Result<(Option<i32>, Observed), sqlx::Error> {
            let row = simple_query(
                connection,
                concat!(
                    "SELECT pg_backend_pid(), pg_is_in_recovery(), ",
                    server_identity!()
                ),
            )
            .await?;
            let (pid, standby, server) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            Ok((Some(pid), observed(standby, server)))
        }

        async fn role(connection: &mut Self::Connection) -> Result<Observed, sqlx::Error> {
            let row = simple_query(
                connection,
                concat!("SELECT pg_is_in_recovery(), ", server_identity!()),
            )
            .await?;
            Ok(observed(row.try_get(0)?, row.try_get(1)?))
        }

        async fn cancel(
            options: &sqlx::postgres::PgConnectOptions,
            pid: i32,
        ) -> Result<(), sqlx::Error> {
            // pg_cancel_backend, not a CancelRequest: sqlx keeps the session's secret key to
            // itself. A role may cancel its own sessions, so no privilege is needed.
            let mut connection = sqlx::ConnectOptions::connect(options).await?;
            simple_query(&mut connection, &format!("SELECT pg_cancel_backend({pid})")).await?;
            sqlx::Connection::close(connection).await
        }

        async fn replication_lag(
            connection: &mut Self::Connection,
        ) -> Result<Option<Duration>, sqlx::Error> {
            // Caught up (everything received is replayed) means no lag, however old the last
            // replayed transaction is: an idle primary sends nothing new. Behind with nothing
            // replayed since the server started, its data is at least as old as its start.
            let row = simple_query(
                connection,
                "SELECT CASE
                     WHEN NOT pg_is_in_recovery() THEN NULL
                     WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
                         THEN 0
                     ELSE EXTRACT(EPOCH FROM now() - COALESCE(
                         pg_last_xact_replay_timestamp(), pg_postmaster_start_time()))
                 END::float8",
            )
            .await?;
            let lag: Option<f64> = row.try_get(0)?;
            Ok(lag.map(|secs| Duration::from_secs_f64(secs.max(0.0))))
        }
    }

    /// The one row `sql` returns, over the simple query protocol: one message, so one
    /// transaction of a transaction-mode pooler. (The extended protocol that sqlx uses for
    /// `sqlx::query` sends a statement's parse and its execution in two round trips, which
    /// such a pooler may put on different server connections.) `sql` takes no parameters.
    async fn simple_query(
        connection: &mut sqlx::PgConnection,
        sql: &str,
    ) -> Result<sqlx::postgres::PgRow, sqlx::Error> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(connection)
            .await
    }

    /// Which server answers, as the server sees itself: its address and port, and when its
    /// postmaster started (to the microsecond). Two endpoints that reach one server (a moved
    /// address and the server's own) get the same answer; a promoted standby and its old
    /// primary never do.
    macro_rules! server_identity {
        () => {
            "concat_ws('/', inet_server_addr(), inet_server_port(), pg_postmaster_start_time())"
        };
    }
    use server_identity;

    fn observed(in_recovery: bool, server: String) -> Observed {
        let role = if in_recovery {
            Role::Replica
        } else {
            Role::Primary
        };
        Observed {
            role,
            server: Some(server),
        }
    }

    /// Whether PostgreSQL raised `error` as FATAL or PANIC, which ends the session whatever its
    /// code.
    fn ends_session(error: &sqlx::Error) -> bool {
        let sqlx::Error::Database(db) = error else {
            return false;
        };
        db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|pg| {
                matches!(
                    pg.severity(),
                    sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                )
            })
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use std::time::Duration;

    use sqlx::Sqlite;

    use super::Backend;
    use crate::classify::{self, ErrorClass};
    use crate::role::{Observed, Role};
    use crate::route::Route;

    /// A file takes writes; a read-only one says so when written to.
    fn file_role() -> Observed {
        Observed {
            role: Role::Primary,
            server: None,
        }
    }

    impl Backend for Sqlite {
        const SYSTEM: &'static str = "sqlite";
        const CHANGES_ROLES: bool = false;
        const URL_PARAMETERS: &'static [&'static str] = &["mode", "cache", "immutable", "vfs"];
        #[cfg(feature = "route-by-sql")]
        const SQL_DIALECT: crate::route_by_sql::SqlDialect =
            crate::route_by_sql::SqlDialect::Sqlite;
        type Executor<'c> = &'c mut sqlx::SqliteConnection;

        fn executor(connection: &mut Self::Connection) -> Self::Executor<'_> {
            connection
        }

        fn rows_affected(result: &Self::QueryResult) -> u64 {
            result.rows_affected()
        }

        fn durable_arguments(values: &[crate::Value]) -> Result<Self::Arguments, sqlx::Error> {
            crate::durable::arguments::<Self>(values)
        }

        fn classify_code(code: &str) -> ErrorClass {
            classify::sqlite_result_code(code)
        }

        fn breaks_connection(error: &sqlx::Error) -> bool {
            match error {
                // IOERR, CORRUPT, CANTOPEN, NOTADB: the file under the connection is not usable.
                sqlx::Error::Database(db) => db
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| matches!(code & 0xff, 10 | 11 | 14 | 26)),
                other => matches!(other, sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed),
            }
        }

        async fn probe(connection: &mut Self::Connection, route: Route) -> Result<(), sqlx::Error> {
            // sqlx's ping never touches the file: a locked or vanished file would pass it. Reading
            // the schema version takes a shared lock; a write probe takes the write lock a write
            // would need, and gives it back at once.
            sqlx::query("PRAGMA schema_version")
                .execute(&mut *connection)
                .await?;
            if route == Route::Write {
                sqlx::raw_sql("BEGIN IMMEDIATE; ROLLBACK")
                    .execute(&mut *connection)
                    .await?;
            }
            Ok(())
        }

        async fn describe(
            _connection: &mut Self::Connection,
        ) -> Result<(Option<i32>, Observed), sqlx::Error> {
            Ok((None, file_role()))
        }

        async fn role(_connection: &mut Self::Connection) -> Result<Observed, sqlx::Error> {
            Ok(file_role())
        }

        async fn cancel(
            _options: &sqlx::sqlite::SqliteConnectOptions,
            _pid: i32,
        ) -> Result<(), sqlx::Error> {
            Ok(())
        }

        async fn replication_lag(
            _connection: &mut Self::Connection,
        ) -> Result<Option<Duration>, sqlx::Error> {
            Ok(None)
        }
    }
}
