//! The report of `ProtectedPool::health()`: what every breaker and endpoint knows, for health
//! checks and dashboards.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::breaker::{BreakerSnapshot, State};
use crate::endpoint::PoolStatus;
use crate::role::Role;
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
    /// No endpoint can serve reads (every read breaker refuses or the replicas lag), or two
    /// endpoints say they are the primary (split brain: no write goes anywhere).
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
    /// Each endpoint, the declared primary first.
    pub endpoints: Vec<EndpointHealth>,
    /// The endpoints that all say they are the primary, when more than one does (split
    /// brain: writes go to none of them); empty otherwise.
    pub split_brain: Vec<Arc<str>>,
    /// The outbox, if the pool has one. Writes waiting in it, or dead letters kept, make the
    /// verdict at least `degraded`.
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub outbox: Option<crate::outbox::OutboxHealth>,
}

/// One endpoint in the health report.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct EndpointHealth {
    /// The endpoint's name.
    pub name: Arc<str>,
    /// The role the endpoint is taken for: the one its server reported, else the declared
    /// one.
    pub role: Role,
    /// Declared and discovered roles, and when the discovered one last changed.
    pub roles: EndpointRole,
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

/// An endpoint's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EndpointRole {
    /// As declared when the pool was built (`primary(..)`, `replica(..)`): a hint.
    pub declared: Role,
    /// As its server last reported (`pg_is_in_recovery()`); `None` before the first
    /// connection, or while it cannot be reached.
    pub discovered: Option<Role>,
    /// When the discovered role last changed.
    #[serde(with = "humantime_serde")]
    pub changed_at: Option<SystemTime>,
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
        split_brain: Vec<Arc<str>>,
        #[cfg(feature = "outbox")] outbox: Option<crate::outbox::OutboxHealth>,
    ) -> Self {
        let status = if split_brain.is_empty() {
            verdict(&endpoints)
        } else {
            HealthStatus::Unhealthy
        };
        #[cfg(feature = "outbox")]
        let status = if status == HealthStatus::Healthy
            && outbox.is_some_and(|outbox| outbox.depth > 0 || outbox.dead_letters > 0)
        {
            HealthStatus::Degraded
        } else {
            status
        };
        Self {
            status,
            uptime,
            cache,
            endpoints,
            split_brain,
            #[cfg(feature = "outbox")]
            outbox,
        }
    }
}

impl EndpointHealth {
    pub(crate) fn new(
        name: Arc<str>,
        roles: EndpointRole,
        pool: PoolStatus,
        replica_lag: Option<Duration>,
        lagging: bool,
        breakers: Vec<RouteHealth>,
    ) -> Self {
        Self {
            name,
            role: roles.discovered.unwrap_or(roles.declared),
            roles,
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
