//! The pool's errors as `sqlx::Error`, for code written against sqlx's own traits (an
//! `Executor`, an `Acquire`): what the server said comes back as sqlx said it, and what the
//! pool decided (a refusal, a timeout) comes back inside an `Io` error that
//! [`Error::from_sqlx`] gives back.

use std::io;

use crate::error::Error;

impl From<Error> for sqlx::Error {
    /// - An error of the database or the connection: the driver's own error, unchanged
    ///   (`as_database_error()`, `is_unique_violation()` work as with a plain sqlx pool).
    /// - A saturated pool: [`sqlx::Error::PoolTimedOut`], as sqlx's pool reports it.
    /// - A closed pool: [`sqlx::Error::PoolClosed`].
    /// - Everything else (a breaker's refusal, a timeout, no primary, every endpoint failed,
    ///   any of these with an async fallback's failure attached): [`sqlx::Error::Io`] of kind
    ///   `ConnectionRefused` (nothing was sent) or `TimedOut`, holding the whole [`Error`];
    ///   [`Error::from_sqlx`] gives it back.
    fn from(error: Error) -> Self {
        match error {
            Error::Database { source, .. } | Error::InvalidQuery { source, .. } => source,
            Error::Saturated { .. } => sqlx::Error::PoolTimedOut,
            Error::Closed => sqlx::Error::PoolClosed,
            other => wrap(other),
        }
    }
}

/// `error` whole inside an `Io` error.
pub(crate) fn wrap(error: Error) -> sqlx::Error {
    let kind = if error.is_outcome_unknown() || matches!(error.original(), Error::Timeout { .. }) {
        io::ErrorKind::TimedOut
    } else {
        io::ErrorKind::ConnectionRefused
    };
    sqlx::Error::Io(io::Error::new(kind, error))
}

/// The pool's error inside `error`, taken out; `Err` with `error` itself when there is none.
pub(crate) fn unwrap(error: sqlx::Error) -> Result<Error, sqlx::Error> {
    match error {
        sqlx::Error::Io(io) if Error::from_io(&io).is_some() => {
            let inner = io.into_inner().expect("checked above");
            Ok(*inner.downcast::<Error>().expect("checked above"))
        }
        other => Err(other),
    }
}

impl Error {
    /// The pool's error inside a `sqlx::Error` that a call through a pool's executor or
    /// connection returned (see `From<Error> for sqlx::Error`): a refusal, a timeout, no
    /// primary. `None` for an error of the database itself.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) {
    /// match sqlx::query("SELECT 1").execute(&pool).await {
    ///     Err(error) => match protected_pool::Error::from_sqlx(&error) {
    ///         Some(refused) if refused.is_unavailable() => {
    ///             eprintln!("database unavailable, retry after {:?}", refused.retry_after());
    ///         }
    ///         _ => eprintln!("query failed: {error}"),
    ///     },
    ///     Ok(_) => {}
    /// }
    /// # }
    /// ```
    pub fn from_sqlx(error: &sqlx::Error) -> Option<&Error> {
        match error {
            sqlx::Error::Io(io) => Self::from_io(io),
            _ => None,
        }
    }

    fn from_io(error: &io::Error) -> Option<&Error> {
        error.get_ref()?.downcast_ref::<Error>()
    }
}
