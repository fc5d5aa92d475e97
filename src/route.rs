//! Routes: the three kinds of traffic, each with its own breakers and timeout.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;

/// The kind of traffic a call belongs to. Each route has its own breaker on each endpoint, so
/// a burst of failing writes does not stop reads, and login checks get the most tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// Queries that change nothing; may be served by replicas.
    Read,
    /// Statements that change data; primary only, never replayed.
    Write,
    /// Login and session checks: the auth route (not to be confused with the `Auth` error
    /// class, which is the database rejecting our credentials).
    Auth,
}

impl Route {
    /// All routes, in index order.
    pub const ALL: [Route; 3] = [Route::Read, Route::Write, Route::Auth];

    pub(crate) const fn index(self) -> usize {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Auth => 2,
        }
    }

    /// Lower-case name, as used in reports and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Auth => "auth",
        }
    }
}

impl std::str::FromStr for Route {
    type Err = UnknownRoute;

    /// `read`, `write` or `auth`, as in reports, metrics labels and config files.
    fn from_str(name: &str) -> Result<Self, UnknownRoute> {
        Route::ALL
            .into_iter()
            .find(|route| route.as_str() == name)
            .ok_or_else(|| UnknownRoute(name.to_owned()))
    }
}

/// A name that is not a route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no route named {0:?}: the routes are read, write and auth")]
pub struct UnknownRoute(pub String);

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A route's breaker rules and per-operation timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Rules of this route's breaker on every endpoint.
    pub breaker: BreakerConfig,
    /// Longest a call may take, from asking for a connection to the last row.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl RouteConfig {
    /// The read preset with a 5 s timeout.
    pub fn read() -> Self {
        Self {
            breaker: BreakerConfig::read(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The write preset with a 10 s timeout.
    pub fn write() -> Self {
        Self {
            breaker: BreakerConfig::write(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The auth preset with a 5 s timeout.
    pub fn auth() -> Self {
        Self {
            breaker: BreakerConfig::auth(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The preset for `route`.
    pub fn for_route(route: Route) -> Self {
        match route {
            Route::Read => Self::read(),
            Route::Write => Self::write(),
            Route::Auth => Self::auth(),
        }
    }
}

impl Default for RouteConfig {
    /// The write route's preset.
    fn default() -> Self {
        Self::write()
    }
}
