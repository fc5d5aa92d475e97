//! The one public error type.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{ConfigError, Rejected};
use crate::classify::ErrorClass;
use crate::route::Route;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call through the pool failed. Every variant that concerns a call names the route and
/// the endpoint (by its name, never its URL).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The route's breaker on the endpoint refused the call: nothing was sent.
    #[error("{route} call refused by endpoint {endpoint}: {rejected}")]
    CircuitOpen {
        /// The route.
        route: Route,
        /// The endpoint.
        endpoint: Arc<str>,
        /// The breaker's answer, with when to retry.
        rejected: Rejected,
    },
    /// The database or the connection to it failed.
    #[error(
        "{route} call on endpoint {endpoint} failed ({class}){}: {source}",
        if *outcome_unknown { "; the statement may or may not have run" } else { "" }
    )]
    Database {
        /// The route.
        route: Route,
        /// The endpoint.
        endpoint: Arc<str>,
        /// What kind of failure, as classified.
        class: ErrorClass,
        /// The statement may have reached the server: a write may or may not have happened.
        outcome_unknown: bool,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The route's operation timeout elapsed.
    #[error(
        "{route} call on endpoint {endpoint} timed out after {after:?}{}",
        if *outcome_unknown { "; the statement may or may not have run" } else { " before anything was sent" }
    )]
    Timeout {
        /// The route.
        route: Route,
        /// The endpoint.
        endpoint: Arc<str>,
        /// The timeout that elapsed.
        after: Duration,
        /// The statement may have reached the server.
        outcome_unknown: bool,
    },
    /// The pool was closed.
    #[error("the pool is closed")]
    Closed,
    /// No endpoint of that name.
    #[error("no endpoint named {0:?}")]
    UnknownEndpoint(String),
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Error {
    /// The route of the failed call.
    pub fn route(&self) -> Option<Route> {
        match self {
            Self::CircuitOpen { route, .. }
            | Self::Database { route, .. }
            | Self::Timeout { route, .. } => Some(*route),
            _ => None,
        }
    }

    /// The endpoint that failed or refused.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Self::CircuitOpen { endpoint, .. }
            | Self::Database { endpoint, .. }
            | Self::Timeout { endpoint, .. } => Some(endpoint),
            _ => None,
        }
    }

    /// The failure's class; `None` for a refusal, a closed pool or bad configuration.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            Self::Database { class, .. } => Some(*class),
            Self::Timeout { .. } => Some(ErrorClass::Timeout),
            _ => None,
        }
    }

    /// Whether a breaker refused the call.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, Self::CircuitOpen { .. })
    }

    /// When a refused call may be retried.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::CircuitOpen { rejected, .. } => rejected.retry_after,
            _ => None,
        }
    }

    /// Whether the statement may have run although the call failed (timeout or connection lost
    /// after it was sent). A write with an unknown outcome is never replayed by the pool.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            Self::Database {
                outcome_unknown: true,
                ..
            } | Self::Timeout {
                outcome_unknown: true,
                ..
            }
        )
    }

    /// The driver's error, for SQLSTATE codes and constraint names.
    pub fn as_sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            Self::Database { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The database's error code (SQLSTATE for PostgreSQL, result code for SQLite).
    pub fn database_code(&self) -> Option<String> {
        match self.as_sqlx()? {
            sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
            _ => None,
        }
    }
}
