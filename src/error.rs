//! The one public error type.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::Rejected;
use crate::classify::ErrorClass;
use crate::problem::ConfigError;
use crate::role::Role;
use crate::route::Route;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call through the pool failed. Every variant that concerns a call names the route and
/// the endpoint (by its name, never its URL).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The route's breaker on the endpoint refused the call: nothing was sent.
    #[error(
        "{route} call refused by endpoint {endpoint}: {rejected}{}",
        match cause { Some(cause) => format!("; the last recovery probe found: {cause}"), None => String::new() }
    )]
    CircuitOpen {
        /// The route.
        route: Route,
        /// The endpoint.
        endpoint: Arc<str>,
        /// The breaker's answer, with when to retry.
        rejected: Rejected,
        /// What the endpoint's recovery probe last met there, when it was not a success (a
        /// server rejecting the pool's credentials, say): why the breaker is still not closed.
        /// Also the error's [`source`](std::error::Error::source).
        #[source]
        cause: Option<Arc<Error>>,
    },
    /// Every connection of the endpoint's pool was in use for as long as the call could wait:
    /// this pool is saturated. The server was not contacted, and nothing counts against its
    /// breaker.
    #[error(
        "{route} call on endpoint {endpoint}: no free connection in the pool within {waited:?} \
         (the pool is saturated; the server was not contacted)"
    )]
    Saturated {
        /// The route.
        route: Route,
        /// The endpoint.
        endpoint: Arc<str>,
        /// How long the call waited for a connection.
        waited: Duration,
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
    /// A replica was passed over because its replication lag is above `max_replica_lag`.
    #[error("endpoint {endpoint} skipped: replication lag {lag:?} is above {max:?}")]
    ReplicaLagging {
        /// The replica.
        endpoint: Arc<str>,
        /// Its lag as last measured.
        lag: Duration,
        /// The configured limit.
        max: Duration,
    },
    /// The call must go to the primary, and no endpoint is one now: each is a standby, or
    /// could not be asked (a failover under way).
    #[error("{route} call: no endpoint is the primary now ({})", Roles(endpoints))]
    NoPrimary {
        /// The route.
        route: Route,
        /// Each endpoint and its role as last reported (`None`: not known).
        endpoints: Vec<(Arc<str>, Option<Role>)>,
    },
    /// Two or more endpoints say they are the primary (split brain): no write goes to any of
    /// them until one steps down. Nothing was sent.
    #[error(
        "{route} call refused: endpoints {} all say they are the primary (split brain); \
         nothing goes to any of them until one steps down",
        primaries.join(", ")
    )]
    SplitBrain {
        /// The route.
        route: Route,
        /// The endpoints that say they are the primary.
        primaries: Vec<Arc<str>>,
    },
    /// The endpoint was passed over: it is a standby now, and the call needs the primary.
    #[error("{route} call passed over endpoint {endpoint}: it is a standby now")]
    NotPrimary {
        /// The route.
        route: Route,
        /// The endpoint.
        endpoint: Arc<str>,
    },
    /// Every endpoint the call could use failed or refused; each attempt says why.
    #[error("{route} call failed on every endpoint: {}", Attempts(attempts))]
    AllEndpointsFailed {
        /// The route.
        route: Route,
        /// What happened on each endpoint, in the order tried.
        attempts: Vec<Attempt>,
    },
    /// The query's arguments could not be encoded (nothing was sent), or a row it returned
    /// could not be decoded.
    #[error("{route} query could not be encoded or its result decoded: {source}")]
    InvalidQuery {
        /// The route.
        route: Route,
        /// The encoding error.
        #[source]
        source: sqlx::Error,
    },
    /// A write for the outbox found it full: it was neither applied nor queued.
    #[error(
        "the outbox is full ({writes} writes, {bytes} bytes; at most {max_writes} writes, \
         {max_bytes} bytes): the write was neither applied nor queued{}",
        match cause { Some(cause) => format!("; it went to the outbox because {cause}"), None => String::new() }
    )]
    OutboxFull {
        /// Writes queued.
        writes: u64,
        /// Their bytes.
        bytes: u64,
        /// The bound on writes.
        max_writes: u64,
        /// The bound on bytes.
        max_bytes: u64,
        /// Why the write went to the outbox; `None` when it went there to wait behind
        /// earlier writes.
        #[source]
        cause: Option<Box<Error>>,
    },
    /// The outbox's file could not be opened, read or written.
    #[error("the outbox at {} could not {operation}: {source}", path.display())]
    Outbox {
        /// The file.
        path: std::path::PathBuf,
        /// What the outbox was doing.
        operation: &'static str,
        /// SQLite's error.
        #[source]
        source: sqlx::Error,
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
    /// No endpoint could serve the call, and an async fallback that stood in for it failed
    /// too (its error, no answer within the call's timeout, a panic). The call's own error
    /// comes first: [`route`](Self::route), [`class`](Self::class),
    /// [`is_circuit_open`](Self::is_circuit_open) and every other accessor answer for
    /// `cause`; [`fallback_error`](Self::fallback_error) says how the fallback failed.
    #[error("{cause}; the fallback failed too: {fallback}")]
    FallbackFailed {
        /// Why no endpoint could serve the call: the error the call returns without a
        /// fallback.
        #[source]
        cause: Box<Error>,
        /// How the fallback failed: its own error, a
        /// [`FallbackTimedOut`](crate::fallback::FallbackTimedOut) or a
        /// [`FallbackPanicked`](crate::fallback::FallbackPanicked).
        fallback: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// One endpoint's part in a call that failed everywhere.
#[derive(Debug)]
#[non_exhaustive]
pub struct Attempt {
    /// The endpoint.
    pub endpoint: Arc<str>,
    /// Why it could not serve the call.
    pub error: Error,
}

struct Roles<'a>(&'a [(Arc<str>, Option<Role>)]);

impl std::fmt::Display for Roles<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, (endpoint, role)) in self.0.iter().enumerate() {
            let separator = if index == 0 { "" } else { ", " };
            let role = role.map_or("unknown", Role::as_str);
            write!(f, "{separator}{endpoint}: {role}")?;
        }
        Ok(())
    }
}

struct Attempts<'a>(&'a [Attempt]);

impl std::fmt::Display for Attempts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, attempt) in self.0.iter().enumerate() {
            let separator = if index == 0 { "" } else { "; " };
            write!(f, "{separator}[{}] {}", attempt.endpoint, attempt.error)?;
        }
        Ok(())
    }
}

impl Error {
    /// The route of the failed call.
    pub fn route(&self) -> Option<Route> {
        match self {
            Self::CircuitOpen { route, .. }
            | Self::Saturated { route, .. }
            | Self::NoPrimary { route, .. }
            | Self::SplitBrain { route, .. }
            | Self::NotPrimary { route, .. }
            | Self::Database { route, .. }
            | Self::Timeout { route, .. }
            | Self::AllEndpointsFailed { route, .. }
            | Self::InvalidQuery { route, .. } => Some(*route),
            Self::FallbackFailed { cause, .. } => cause.route(),
            _ => None,
        }
    }

    /// The endpoint that failed or refused (the last one tried, when several were).
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Self::CircuitOpen { endpoint, .. }
            | Self::Saturated { endpoint, .. }
            | Self::NotPrimary { endpoint, .. }
            | Self::Database { endpoint, .. }
            | Self::Timeout { endpoint, .. }
            | Self::ReplicaLagging { endpoint, .. } => Some(endpoint),
            Self::AllEndpointsFailed { attempts, .. } => {
                attempts.last().map(|attempt| &*attempt.endpoint)
            }
            Self::FallbackFailed { cause, .. } => cause.endpoint(),
            _ => None,
        }
    }

    /// The failure's class (the last endpoint's, when several were tried); `None` for a
    /// refusal (its `source()` is what the recovery probe last met, if anything), a saturated
    /// pool, a skipped replica, a closed pool or bad configuration.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            Self::Database { class, .. } => Some(*class),
            Self::Timeout { .. } => Some(ErrorClass::Timeout),
            Self::InvalidQuery { .. } => Some(ErrorClass::Query),
            Self::AllEndpointsFailed { attempts, .. } => attempts
                .iter()
                .rev()
                .find_map(|attempt| attempt.error.class()),
            Self::FallbackFailed { cause, .. } => cause.class(),
            _ => None,
        }
    }

    /// Whether the call was refused by breakers without reaching any database.
    pub fn is_circuit_open(&self) -> bool {
        match self {
            Self::CircuitOpen { .. } => true,
            Self::AllEndpointsFailed { attempts, .. } => attempts.iter().all(|attempt| {
                matches!(
                    attempt.error,
                    Self::CircuitOpen { .. } | Self::ReplicaLagging { .. }
                )
            }),
            Self::FallbackFailed { cause, .. } => cause.is_circuit_open(),
            _ => false,
        }
    }

    /// Whether the database could not serve the call: a breaker refused, a replica lagged too
    /// far, or every endpoint tried failed with an infrastructure error (lost connection,
    /// timeout, exhausted resources, ...). This is when the cache and fallbacks step in; a
    /// query error, a rejected password or a closed pool is not such a case.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::CircuitOpen { .. }
            | Self::Saturated { .. }
            | Self::NoPrimary { .. }
            | Self::SplitBrain { .. }
            | Self::NotPrimary { .. }
            | Self::ReplicaLagging { .. }
            | Self::Timeout { .. }
            | Self::OutboxFull { .. } => true,
            Self::Database { route, class, .. } => class.counts_as_failure(*route),
            Self::AllEndpointsFailed { attempts, .. } => attempts
                .iter()
                .all(|attempt| attempt.error.is_unavailable()),
            Self::FallbackFailed { cause, .. } => cause.is_unavailable(),
            Self::InvalidQuery { .. }
            | Self::Outbox { .. }
            | Self::Closed
            | Self::UnknownEndpoint(_)
            | Self::Config(_) => false,
        }
    }

    /// When a refused call may be retried (the soonest, when several breakers refused).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::CircuitOpen { rejected, .. } => rejected.retry_after(),
            Self::AllEndpointsFailed { attempts, .. } => attempts
                .iter()
                .filter_map(|attempt| attempt.error.retry_after())
                .min(),
            Self::FallbackFailed { cause, .. } => cause.retry_after(),
            _ => None,
        }
    }

    /// Whether the statement may have run although the call failed (timeout or connection lost
    /// after it was sent). A write with an unknown outcome is never replayed by the pool.
    pub fn is_outcome_unknown(&self) -> bool {
        match self {
            Self::Database {
                outcome_unknown, ..
            }
            | Self::Timeout {
                outcome_unknown, ..
            } => *outcome_unknown,
            Self::AllEndpointsFailed { attempts, .. } => attempts
                .iter()
                .any(|attempt| attempt.error.is_outcome_unknown()),
            Self::FallbackFailed { cause, .. } => cause.is_outcome_unknown(),
            _ => false,
        }
    }

    /// The attempts of a call that failed on every endpoint; empty otherwise.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            Self::AllEndpointsFailed { attempts, .. } => attempts,
            Self::FallbackFailed { cause, .. } => cause.attempts(),
            _ => &[],
        }
    }

    /// The driver's error, for SQLSTATE codes and constraint names (the last endpoint's).
    pub fn as_sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            Self::Database { source, .. } | Self::InvalidQuery { source, .. } => Some(source),
            Self::AllEndpointsFailed { attempts, .. } => attempts
                .iter()
                .rev()
                .find_map(|attempt| attempt.error.as_sqlx()),
            Self::FallbackFailed { cause, .. } => cause.as_sqlx(),
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

    /// How an async fallback that stood in for the call failed (its own error, a
    /// [`FallbackTimedOut`](crate::fallback::FallbackTimedOut), a
    /// [`FallbackPanicked`](crate::fallback::FallbackPanicked)); `None` when none failed.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) {
    /// use protected_pool::fallback::FallbackTimedOut;
    ///
    /// let call = pool
    ///     .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
    ///     .or_fallback_async(|_request| async { Ok::<_, std::io::Error>(Some(0_i64)) })
    ///     .fetch_one()
    ///     .await;
    /// if let Err(error) = call {
    ///     match error.fallback_error() {
    ///         Some(failure) if failure.is::<FallbackTimedOut>() => eprintln!("{error}: too slow"),
    ///         Some(failure) => eprintln!("{error}; the fallback said {failure}"),
    ///         None => eprintln!("{error}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn fallback_error(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self {
            Self::FallbackFailed { fallback, .. } => Some(&**fallback),
            _ => None,
        }
    }

    /// The call's own error, without a fallback's failure attached to it.
    pub(crate) fn original(&self) -> &Error {
        match self {
            Self::FallbackFailed { cause, .. } => cause.original(),
            other => other,
        }
    }
}
