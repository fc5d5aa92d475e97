//! Error classes: which failures are the database's fault and so count against a breaker.
//!
//! A syntax error or a unique violation means the server is up and answering: the breaker must
//! not open because of it. A refused connection, a dead backend or a timeout means it is not.

use std::fmt;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::route::Route;

/// What kind of failure an error is, as far as the breakers are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorClass {
    /// The connection failed or the server went away: I/O, TLS, protocol errors, SQLSTATE
    /// class `08`, `57P01`-`57P05`, `25P03` (idle-in-transaction timeout), any other error the
    /// server raised as FATAL (it ends the session); SQLite `CANTOPEN`, `IOERR`, `NOTADB`.
    Connection,
    /// Our operation or connect timeout elapsed, or the server cancelled the statement
    /// (`57014`, statement_timeout); SQLite `INTERRUPT`.
    Timeout,
    /// Out of something: SQLSTATE class `53` (too many connections, disk full, out of memory),
    /// our pool's wait timeout; SQLite `BUSY`, `LOCKED`, `FULL`, `NOMEM`.
    Resource,
    /// A write reached a read-only server (`25006`, e.g. a demoted primary); SQLite
    /// `READONLY`. Counts on the write route only.
    ReadOnly,
    /// The server failed internally: `XX000`-`XX002`, class `58`; SQLite `CORRUPT`.
    Server,
    /// The server rejected our credentials or the database does not exist (`28000`, `28P01`,
    /// `3D000`); SQLite `AUTH`, `PERM`. Configuration, not an outage: fails fast, never trips.
    Auth,
    /// The server answered but asks for a retry: `40001` serialization failure, `40P01`
    /// deadlock, `55P03` lock not available; SQLite `ABORT`, `SCHEMA`.
    Transient,
    /// The statement was wrong or met the data: syntax, undefined objects, privileges (`42`),
    /// data (`22`), constraints (`23`), any other code a server answered with that is not
    /// listed under another class (`54000` program limit, `P0001` and custom codes raised by
    /// the caller's functions, ...), no row, decode and encode errors. The server is healthy:
    /// for the breaker this is a success.
    Query,
    /// The request could not be made as configured (a malformed URL or option).
    Configuration,
    /// Anything else. Counted as a failure, to be safe.
    Unknown,
}

impl ErrorClass {
    /// Whether an error of this class counts as a breaker failure on `route`.
    pub fn counts_as_failure(self, route: Route) -> bool {
        match self {
            Self::Connection | Self::Timeout | Self::Resource | Self::Server | Self::Unknown => {
                true
            }
            Self::ReadOnly => route == Route::Write,
            Self::Auth | Self::Transient | Self::Query | Self::Configuration => false,
        }
    }

    /// Whether retrying the same call later may succeed (the server asked for it, or the
    /// failure was in the infrastructure).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Connection | Self::Timeout | Self::Resource | Self::Transient | Self::ReadOnly
        )
    }

    /// Lower-case name, as used in reports and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Timeout => "timeout",
            Self::Resource => "resource",
            Self::ReadOnly => "read_only",
            Self::Server => "server",
            Self::Auth => "auth",
            Self::Transient => "transient",
            Self::Query => "query",
            Self::Configuration => "configuration",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller's override: return `Some(class)` to decide, `None` to keep the built-in answer.
pub type Classifier = Arc<dyn Fn(&sqlx::Error, Route) -> Option<ErrorClass> + Send + Sync>;

/// The class of an error returned by sqlx for a database with the given per-driver rule.
pub(crate) fn classify_sqlx(error: &sqlx::Error, database: fn(&str) -> ErrorClass) -> ErrorClass {
    use sqlx::Error as E;
    match error {
        E::Database(db) => match db.code() {
            Some(code) => database(&code),
            // The server (or the embedded engine) answered, without a code.
            None => ErrorClass::Query,
        },
        E::Io(io) => classify_io(io),
        E::Tls(_) | E::Protocol(_) | E::WorkerCrashed | E::BeginFailed => ErrorClass::Connection,
        E::PoolTimedOut => ErrorClass::Resource,
        E::PoolClosed => ErrorClass::Connection,
        E::Configuration(_) => ErrorClass::Configuration,
        E::RowNotFound
        | E::TypeNotFound { .. }
        | E::ColumnIndexOutOfBounds { .. }
        | E::ColumnNotFound(_)
        | E::ColumnDecode { .. }
        | E::Encode(_)
        | E::Decode(_)
        | E::InvalidArgument(_)
        | E::InvalidSavePointStatement => ErrorClass::Query,
        E::Migrate(_) => ErrorClass::Query,
        _ => ErrorClass::Unknown,
    }
}

fn classify_io(error: &io::Error) -> ErrorClass {
    match error.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorClass::Timeout,
        io::ErrorKind::OutOfMemory => ErrorClass::Resource,
        _ => ErrorClass::Connection,
    }
}

/// PostgreSQL, by SQLSTATE.
#[cfg(feature = "postgres")]
pub(crate) fn postgres_sqlstate(code: &str) -> ErrorClass {
    match code {
        "57P01" | "57P02" | "57P03" | "57P04" | "57P05" | "25P03" => ErrorClass::Connection,
        "57014" => ErrorClass::Timeout,
        "25006" => ErrorClass::ReadOnly,
        "28000" | "28P01" | "3D000" => ErrorClass::Auth,
        "40001" | "40P01" | "55P03" => ErrorClass::Transient,
        "XX000" | "XX001" | "XX002" => ErrorClass::Server,
        _ => match code.get(..2) {
            Some("08") => ErrorClass::Connection,
            Some("53") => ErrorClass::Resource,
            Some("58") => ErrorClass::Server,
            Some("28") => ErrorClass::Auth,
            Some("40") => ErrorClass::Transient,
            // Any other code came in an error the server answered with: it understood us
            // and said no (the statement, the data, a limit, a code raised by the caller's own
            // function). A server that answers is alive. An error that ended the session is
            // raised as FATAL, which `Backend::classify` turns into Connection whatever its
            // code.
            _ => ErrorClass::Query,
        },
    }
}

/// SQLite, by (extended) result code; the primary code is the low byte.
#[cfg(feature = "sqlite")]
pub(crate) fn sqlite_result_code(code: &str) -> ErrorClass {
    let Ok(code) = code.parse::<i32>() else {
        return ErrorClass::Unknown;
    };
    match code & 0xff {
        5 | 6 | 7 | 13 => ErrorClass::Resource, // BUSY, LOCKED, NOMEM, FULL
        10 | 14 | 26 => ErrorClass::Connection, // IOERR, CANTOPEN, NOTADB
        8 => ErrorClass::ReadOnly,              // READONLY
        9 => ErrorClass::Timeout,               // INTERRUPT
        11 => ErrorClass::Server,               // CORRUPT
        3 | 23 => ErrorClass::Auth,             // PERM, AUTH
        4 | 17 => ErrorClass::Transient,        // ABORT, SCHEMA
        1 | 18 | 19 | 20 | 25 => ErrorClass::Query, // ERROR, TOOBIG, CONSTRAINT, MISMATCH, RANGE
        _ => ErrorClass::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "postgres")]
    fn postgres_codes_map_to_the_design_table() {
        for (code, class) in [
            ("08006", ErrorClass::Connection),
            ("57P01", ErrorClass::Connection),
            ("57014", ErrorClass::Timeout),
            ("53300", ErrorClass::Resource),
            ("53100", ErrorClass::Resource),
            ("25006", ErrorClass::ReadOnly),
            ("XX000", ErrorClass::Server),
            ("58030", ErrorClass::Server),
            ("28P01", ErrorClass::Auth),
            ("40001", ErrorClass::Transient),
            ("40P01", ErrorClass::Transient),
            ("55P03", ErrorClass::Transient),
            ("42601", ErrorClass::Query),
            ("23505", ErrorClass::Query),
            ("22012", ErrorClass::Query),
            // Answered, not listed: the server is alive.
            ("F0000", ErrorClass::Query),
            ("54000", ErrorClass::Query),
            ("0B000", ErrorClass::Query),
            ("HV000", ErrorClass::Query),
            ("72000", ErrorClass::Query),
            ("ZZ123", ErrorClass::Query),
        ] {
            assert_eq!(postgres_sqlstate(code), class, "{code}");
        }
    }

    #[test]
    #[cfg(feature = "sqlite")]
    fn sqlite_extended_codes_use_their_primary_code() {
        assert_eq!(sqlite_result_code("5"), ErrorClass::Resource);
        assert_eq!(sqlite_result_code("517"), ErrorClass::Resource); // BUSY_SNAPSHOT
        assert_eq!(sqlite_result_code("2067"), ErrorClass::Query); // CONSTRAINT_UNIQUE
        assert_eq!(sqlite_result_code("1032"), ErrorClass::ReadOnly); // READONLY_DBMOVED
        assert_eq!(sqlite_result_code("14"), ErrorClass::Connection);
        assert_eq!(sqlite_result_code("x"), ErrorClass::Unknown);
    }

    #[test]
    fn only_infrastructure_classes_trip() {
        assert!(ErrorClass::Connection.counts_as_failure(Route::Read));
        assert!(!ErrorClass::Query.counts_as_failure(Route::Write));
        assert!(!ErrorClass::Auth.counts_as_failure(Route::Auth));
        assert!(ErrorClass::ReadOnly.counts_as_failure(Route::Write));
        assert!(!ErrorClass::ReadOnly.counts_as_failure(Route::Read));
    }
}
