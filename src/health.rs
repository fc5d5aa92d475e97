//! The report of `ProtectedPool::health()`: what every breaker and endpoint knows, for health
//! checks and dashboards.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::breaker::{BreakerSnapshot, State};
use crate::endpoint::{PoolStatus, Role};
use crate::route::Route;

/// How well the pool can serve calls right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Every breaker closed (or disabled by hand) and no replica lagging.
    Healthy,
    /// Some breaker is not closed or some replica lags, but reads can still be served (writes
    /// may not be).
    Degraded,
    /// No endpoint can serve reads: every read breaker refuses or the replicas lag.
    Unhealthy,
}

/// The pool's health report. Serializes to JSON for a `/health` endpoint; it never holds a URL
/// or a credential.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The verdict.
    pub status: HealthStatus,
    /// How long the pool has been up.
    #[serde(with = "humantime_serde")]
    pub uptime: Duration,
    /// The kind of cache cached reads fall back on (`memory`, `redis`, ...).
    pub cache: &'static str,
    /// Each endpoint, the primary first.
    pub endpoints: Vec<EndpointHealth>,
}

/// One endpoint in the health report.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct EndpointHealth {
    /// The endpoint's name.
    pub name: Arc<str>,
    /// Primary or replica.
    pub role: Role,
    /// Connections of its pool.
    pub pool: PoolStatus,
    /// Replication lag as last measured (replicas only).
    #[serde(with = "humantime_serde")]
    pub replica_lag: Option<Duration>,
    /// Whether the lag is above `max_replica_lag`, so reads pass this replica over.
    pub lagging: bool,
    /// Each route's breaker on this endpoint.
    pub breakers: Vec<RouteHealth>,
}

/// One route's breaker on one endpoint.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct RouteHealth {
    /// The route.
    pub route: Route,
    /// Its breaker's state, counts, rates and times.
    #[serde(flatten)]
    pub breaker: BreakerSnapshot,
}

impl HealthReport {
    pub(crate) fn new(
        uptime: Duration,
        cache: &'static str,
        endpoints: Vec<EndpointHealth>,
    ) -> Self {
        Self {
            status: verdict(&endpoints),
            uptime,
            cache,
            endpoints,
        }
    }
}

impl EndpointHealth {
    pub(crate) fn new(
        name: Arc<str>,
        role: Role,
        pool: PoolStatus,
        replica_lag: Option<Duration>,
        lagging: bool,
        breakers: Vec<RouteHealth>,
    ) -> Self {
        Self {
            name,
            role,
            pool,
            replica_lag,
            lagging,
            breakers,
        }
    }
}

impl RouteHealth {
    pub(crate) fn new(route: Route, breaker: BreakerSnapshot) -> Self {
        Self { route, breaker }
    }
}

fn verdict(endpoints: &[EndpointHealth]) -> HealthStatus {
    let refuses = |state: State| state.is_open();
    let can_read = endpoints.iter().any(|endpoint| {
        !endpoint.lagging
            && endpoint
                .breakers
                .iter()
                .any(|b| b.route == Route::Read && !refuses(b.breaker.state))
    });
    if !can_read {
        return HealthStatus::Unhealthy;
    }
    let all_well = endpoints.iter().all(|endpoint| {
        !endpoint.lagging
            && endpoint
                .breakers
                .iter()
                .all(|b| matches!(b.breaker.state, State::Closed | State::Disabled))
    });
    if all_well {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    }
}
