//! Building a `ProtectedPool`: endpoints, routes, classification, listeners.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::events::{PoolListener, PoolListeners, PoolStateChange};
use super::probe::Probes;
use super::{PoolInner, ProtectedPool};
use crate::backend::Backend;
use crate::breaker::{BreakerConfig, CircuitBreaker, State, StateChange};
use crate::cache::{Cache, MemoryCache};
use crate::classify::{Classifier, ErrorClass};
use crate::config::{EndpointConfig, PoolConfig};
use crate::endpoint::{ConnectionManager, Endpoint, EndpointOptions, Role};
use crate::error::Result;
use crate::fallback::{FallbackContext, RouteFallbacks};
use crate::problem::{ConfigError, ConfigProblem};
use crate::route::{Route, RouteConfig};
use crate::router::{ReadPreference, ReplicaSelection, Router};
use crate::telemetry;

type ConnectOptionsOf<DB> = <<DB as sqlx::Database>::Connection as Connection>::Options;

enum Target<DB: Backend> {
    Url(String),
    Options(Box<ConnectOptionsOf<DB>>),
    /// The configuration did not say where (a problem already recorded).
    Unresolved,
}

struct EndpointSpec<DB: Backend> {
    name: String,
    target: Target<DB>,
}

/// Builds a [`ProtectedPool`]. Every problem in the configuration is reported at once by
/// [`build`](Self::build) or [`connect`](Self::connect).
#[must_use]
pub struct PoolBuilder<DB: Backend> {
    primary: Option<EndpointSpec<DB>>,
    replicas: Vec<EndpointSpec<DB>>,
    options: EndpointOptions,
    routes: [RouteConfig; 3],
    read_preference: ReadPreference,
    replica_selection: ReplicaSelection,
    max_replica_lag: Option<Duration>,
    health_check_interval: Duration,
    probes: bool,
    classifier: Option<Classifier>,
    listeners: Vec<PoolListener>,
    cache: Option<Arc<dyn Cache>>,
    cache_timeout: Duration,
    fallbacks: RouteFallbacks,
    /// Problems found while reading a [`PoolConfig`], reported with the rest by `build`.
    problems: Vec<ConfigProblem>,
    _database: PhantomData<DB>,
}

impl<DB: Backend> fmt::Debug for PoolBuilder<DB> {
    // Without the URLs: they may hold passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("primary", &self.primary.as_ref().map(|spec| &spec.name))
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|spec| &spec.name)
                    .collect::<Vec<_>>(),
            )
            .field("options", &self.options)
            .field("routes", &self.routes)
            .field("cache", &self.cache)
            .field("fallbacks", &self.fallbacks)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> PoolBuilder<DB> {
    pub(crate) fn new() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            options: EndpointOptions::default(),
            routes: Route::ALL.map(RouteConfig::for_route),
            read_preference: ReadPreference::default(),
            replica_selection: ReplicaSelection::default(),
            max_replica_lag: Some(Duration::from_secs(10)),
            health_check_interval: Duration::from_secs(1),
            probes: true,
            classifier: None,
            listeners: Vec::new(),
            cache: None,
            cache_timeout: Duration::from_millis(250),
            fallbacks: RouteFallbacks::default(),
            problems: Vec::new(),
            _database: PhantomData,
        }
    }

    /// A builder set up as `config` says. Add what only code can give (listeners, a
    /// classifier, fallbacks, a custom cache) and [`build`](Self::build): that reports every
    /// problem of the configuration, those found here (an unset environment variable, ...)
    /// included.
    pub fn from_config(config: &PoolConfig) -> Self {
        Self::configured(config, true)
    }

    /// `from_config`, without making the cache when `with_cache` is false (for validation).
    pub(crate) fn configured(config: &PoolConfig, with_cache: bool) -> Self {
        let mut builder = Self::new()
            .endpoint_options(config.pool.clone())
            .read_preference(config.read_preference)
            .replica_selection(config.replica_selection)
            .max_replica_lag(config.max_replica_lag)
            .health_check_interval(config.health_check_interval)
            .recovery_probes(config.recovery_probes)
            .cache_timeout(config.cache.timeout);
        for route in Route::ALL {
            builder = builder.route(route, config.route(route));
        }
        let mut problems = Vec::new();
        let mut spec = |endpoint: &EndpointConfig, path: &str, default_name: String| {
            let target = match endpoint.resolve_url(path) {
                Ok(url) => Target::Url(url),
                Err(problem) => {
                    problems.push(problem);
                    Target::Unresolved
                }
            };
            let name = endpoint.name.clone().unwrap_or(default_name);
            EndpointSpec { name, target }
        };
        builder.primary = config
            .primary
            .as_ref()
            .map(|primary| spec(primary, "primary", "primary".to_owned()));
        builder.replicas = config
            .replicas
            .iter()
            .enumerate()
            .map(|(index, replica)| {
                spec(
                    replica,
                    &format!("replicas[{index}]"),
                    format!("replica-{}", index + 1),
                )
            })
            .collect();
        config.cache_problems(&mut problems);
        if with_cache {
            builder.cache = config.build_cache(&mut problems);
        }
        builder.problems = problems;
        builder
    }

    /// The primary endpoint, named `primary`, by URL (`postgres://..`, `sqlite://..`).
    pub fn primary(self, url: impl Into<String>) -> Self {
        self.primary_named("primary", url)
    }

    /// The primary endpoint under a name of your choosing (shown in errors, reports, metrics).
    pub fn primary_named(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.primary = Some(EndpointSpec {
            name: name.into(),
            target: Target::Url(url.into()),
        });
        self
    }

    /// The primary endpoint from sqlx connect options (`PgConnectOptions`,
    /// `SqliteConnectOptions`).
    pub fn primary_with(mut self, name: impl Into<String>, options: ConnectOptionsOf<DB>) -> Self {
        self.primary = Some(EndpointSpec {
            name: name.into(),
            target: Target::Options(Box::new(options)),
        });
        self
    }

    /// A read replica, named `replica-N` (N counting from 1 in the order added).
    pub fn replica(self, url: impl Into<String>) -> Self {
        let name = format!("replica-{}", self.replicas.len() + 1);
        self.replica_named(name, url)
    }

    /// A read replica under a name of your choosing.
    pub fn replica_named(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.replicas.push(EndpointSpec {
            name: name.into(),
            target: Target::Url(url.into()),
        });
        self
    }

    /// A read replica from sqlx connect options.
    pub fn replica_with(mut self, name: impl Into<String>, options: ConnectOptionsOf<DB>) -> Self {
        self.replicas.push(EndpointSpec {
            name: name.into(),
            target: Target::Options(Box::new(options)),
        });
        self
    }

    /// Where reads go (default: the primary, replicas as fallback).
    pub fn read_preference(mut self, preference: ReadPreference) -> Self {
        self.read_preference = preference;
        self
    }

    /// How reads choose among replicas (default: fewest calls in flight).
    pub fn replica_selection(mut self, selection: ReplicaSelection) -> Self {
        self.replica_selection = selection;
        self
    }

    /// Replicas lagging more than this behind the primary are skipped (default 10 s; `None`
    /// never skips for lag).
    pub fn max_replica_lag(mut self, max: Option<Duration>) -> Self {
        self.max_replica_lag = max;
        self
    }

    /// How often replica lag is measured, and the longest a recovery probe task sleeps
    /// (default 1 s).
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }

    /// Whether background probes close recovered breakers and measure replica lag (default
    /// on). Without them a breaker waits for a user call to try it.
    pub fn recovery_probes(mut self, enabled: bool) -> Self {
        self.probes = enabled;
        self
    }

    /// Connection pool settings of every endpoint.
    pub fn endpoint_options(mut self, options: EndpointOptions) -> Self {
        self.options = options;
        self
    }

    /// Breaker rules and timeout of `route`.
    pub fn route(mut self, route: Route, config: RouteConfig) -> Self {
        self.routes[route.index()] = config;
        self
    }

    /// Breaker rules of `route`.
    pub fn breaker(mut self, route: Route, config: BreakerConfig) -> Self {
        self.routes[route.index()].breaker = config;
        self
    }

    /// Per-operation timeout of `route`.
    pub fn timeout(mut self, route: Route, timeout: Duration) -> Self {
        self.routes[route.index()].timeout = timeout;
        self
    }

    /// Overrides classification: return `Some(class)` to decide, `None` for the built-in rule.
    pub fn classify(
        mut self,
        classifier: impl Fn(&sqlx::Error, Route) -> Option<ErrorClass> + Send + Sync + 'static,
    ) -> Self {
        self.classifier = Some(Arc::new(classifier));
        self
    }

    /// Calls `listener` on every state change of every breaker.
    pub fn on_state_change(
        mut self,
        listener: impl Fn(&PoolStateChange) + Send + Sync + 'static,
    ) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Where [`cached`](crate::Routed::cached) reads keep their results (default: a
    /// [`MemoryCache`] of 10,000 entries).
    pub fn cache(mut self, cache: impl Cache) -> Self {
        self.cache = Some(Arc::new(cache));
        self
    }

    /// The longest a cache read or write may take; one that takes longer counts as a miss or
    /// is dropped (default 250 ms). Keeps a slow cache from slowing reads.
    pub fn cache_timeout(mut self, timeout: Duration) -> Self {
        self.cache_timeout = timeout;
        self
    }

    /// A fallback for every call of `route` whose result is a `T`, run when no endpoint can
    /// serve the call, after the cache and the call's own fallback; `None` from it means no
    /// fallback. One per route and result type: a second replaces the first.
    ///
    /// ```
    /// use protected_pool::{ProtectedPool, Route};
    ///
    /// let builder = ProtectedPool::<sqlx::Postgres>::builder()
    ///     .primary("postgres://app@db/app")
    ///     // Reads that count something report zero while the database is away.
    ///     .fallback(Route::Read, |context| {
    ///         context.sql.filter(|sql| sql.starts_with("SELECT count(")).map(|_| 0_i64)
    ///     });
    /// ```
    pub fn fallback<T: Send + 'static>(
        mut self,
        route: Route,
        fallback: impl Fn(&FallbackContext<'_>) -> Option<T> + Send + Sync + 'static,
    ) -> Self {
        self.fallbacks.add(route, fallback);
        self
    }

    /// Every problem of the configuration, or the endpoints' connect options.
    #[allow(clippy::type_complexity)]
    pub(crate) fn check(
        &self,
    ) -> std::result::Result<
        (
            Option<ConnectOptionsOf<DB>>,
            Vec<Option<ConnectOptionsOf<DB>>>,
        ),
        ConfigError,
    > {
        let mut problems = self.problems.clone();
        let primary = match &self.primary {
            None => {
                problems.push(ConfigProblem::new(
                    "primary",
                    "no primary endpoint: call .primary(url)",
                ));
                None
            }
            Some(spec) => connect_options::<DB>(spec, "primary", &mut problems),
        };
        let replicas: Vec<_> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                connect_options::<DB>(spec, &format!("replicas[{index}]"), &mut problems)
            })
            .collect();
        let mut names: Vec<&str> = self.primary.iter().map(|spec| spec.name.as_str()).collect();
        for (index, spec) in self.replicas.iter().enumerate() {
            if names.contains(&spec.name.as_str()) {
                problems.push(ConfigProblem::new(
                    format!("replicas[{index}].name"),
                    format!("{:?} is already the name of another endpoint", spec.name),
                ));
            }
            names.push(&spec.name);
        }
        self.options.validate_into("pool", &mut problems);
        for route in Route::ALL {
            let config = &self.routes[route.index()];
            config
                .breaker
                .validate_into(&format!("breakers.{route}"), &mut problems);
            if config.timeout.is_zero() {
                problems.push(ConfigProblem::new(
                    format!("timeouts.{route}"),
                    "0s must be above zero",
                ));
            }
        }
        if self.cache_timeout.is_zero() {
            problems.push(ConfigProblem::new("cache.timeout", "0s must be above zero"));
        }
        if self.health_check_interval.is_zero() {
            problems.push(ConfigProblem::new(
                "health_check_interval",
                "0s must be above zero",
            ));
        }
        if !problems.is_empty() {
            return Err(ConfigError::new(problems));
        }
        Ok((primary, replicas))
    }

    /// Builds the pool without opening a connection: the first call connects. Recovery
    /// probes start now when called inside a tokio runtime, else with the first call.
    pub fn build(self) -> Result<ProtectedPool<DB>> {
        let (primary, replicas) = self.check()?;
        let listeners = Arc::new(PoolListeners::default());
        for listener in self.listeners {
            listeners.add(listener);
        }
        let specs = self.primary.into_iter().chain(self.replicas);
        let options = std::iter::once(primary)
            .chain(replicas)
            .map(|options| options.expect("validated above"));
        let endpoints: Vec<Endpoint<DB>> = specs
            .zip(options)
            .enumerate()
            .map(|(index, (spec, connect))| {
                let role = if index == 0 {
                    Role::Primary
                } else {
                    Role::Replica
                };
                let name: Arc<str> = spec.name.into();
                let wakeup = Arc::new(tokio::sync::Notify::new());
                let breakers = Route::ALL.map(|route| {
                    let config = &self.routes[route.index()];
                    route_breaker(&name, route, config, &listeners, &wakeup)
                });
                let manager = ConnectionManager::<DB>::new(connect, &self.options);
                Endpoint::new(name, role, manager, &self.options, breakers, wakeup)
            })
            .collect();
        let inner = Arc::new_cyclic(|me| PoolInner {
            me: me.clone(),
            endpoints,
            router: Router::new(self.read_preference, self.replica_selection),
            routes: self.routes,
            max_replica_lag: self.max_replica_lag,
            health_check_interval: self.health_check_interval,
            probes: Probes::new(self.probes),
            classifier: self.classifier,
            listeners,
            cache: self
                .cache
                .unwrap_or_else(|| Arc::new(MemoryCache::default())),
            cache_timeout: self.cache_timeout,
            fallbacks: self.fallbacks,
            started: std::time::Instant::now(),
        });
        inner.start_probes();
        Ok(ProtectedPool { inner })
    }

    /// Builds the pool and checks that the primary answers, so a wrong password or an
    /// unreachable server is reported now rather than at the first call. The check goes
    /// through the write route and counts toward its breaker like any call.
    pub async fn connect(self) -> Result<ProtectedPool<DB>> {
        let pool = self.build()?;
        pool.with_connection(Route::Write, async |connection| connection.ping().await)
            .await?;
        Ok(pool)
    }
}

/// The breaker of `route` on the endpoint `name`, reporting to the pool's listeners and waking
/// the endpoint's probe task when it opens.
fn route_breaker(
    name: &Arc<str>,
    route: Route,
    config: &RouteConfig,
    listeners: &Arc<PoolListeners>,
    probe_wakeup: &Arc<tokio::sync::Notify>,
) -> CircuitBreaker {
    let breaker = CircuitBreaker::new(format!("{name}/{route}"), config.breaker.clone())
        .expect("validated above");
    let (sink, endpoint, wakeup) = (listeners.clone(), name.clone(), probe_wakeup.clone());
    telemetry::breaker_state(route, name, State::Closed);
    breaker.on_state_change(move |change| {
        if change.to == State::Open {
            wakeup.notify_one();
        }
        telemetry::transition(route, &endpoint, change.from, change.to);
        log_transition(route, &endpoint, change);
        sink.emit(&PoolStateChange {
            route,
            endpoint: endpoint.clone(),
            change: change.clone(),
        });
    });
    breaker
}

/// A breaker opening is an incident (WARN); closing again is the all-clear (INFO).
fn log_transition(route: Route, endpoint: &str, change: &StateChange) {
    let (from, to, reason) = (change.from.as_str(), change.to.as_str(), change.reason);
    match change.to {
        State::Open | State::ForcedOpen => tracing::warn!(
            route = route.as_str(), endpoint, from, to, %reason,
            "circuit breaker opened"
        ),
        State::Closed => {
            tracing::info!(route = route.as_str(), endpoint, from, to, %reason, "circuit breaker closed");
        }
        State::HalfOpen | State::Disabled => {
            tracing::info!(route = route.as_str(), endpoint, from, to, %reason, "circuit breaker changed state");
        }
    }
}

/// Whether `url` is one of this database's (sqlx would parse some others without a word).
fn has_scheme<DB: Backend>(url: &str) -> bool {
    url.split_once(':').is_some_and(|(scheme, _)| {
        <DB as sqlx::Database>::URL_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str())
    })
}

fn connect_options<DB: Backend>(
    spec: &EndpointSpec<DB>,
    path: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<ConnectOptionsOf<DB>> {
    if spec.name.trim().is_empty() {
        problems.push(ConfigProblem::new(
            format!("{path}.name"),
            "an endpoint name must not be empty",
        ));
    }
    match &spec.target {
        Target::Options(options) => Some((**options).clone()),
        Target::Unresolved => None,
        Target::Url(url) if !has_scheme::<DB>(url) => {
            let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
            problems.push(ConfigProblem::new(
                format!("{path}.url"),
                format!(
                    "a {} URL starts with {}:, not {scheme:?}",
                    DB::SYSTEM,
                    <DB as sqlx::Database>::URL_SCHEMES.join(": or ")
                ),
            ));
            None
        }
        Target::Url(url) => match ConnectOptionsOf::<DB>::from_str(url) {
            Ok(options) => Some(options),
            Err(error) => {
                // The driver's message only: the URL itself may hold a password.
                problems.push(ConfigProblem::new(
                    format!("{path}.url"),
                    format!("not a valid connection URL: {error}"),
                ));
                None
            }
        },
    }
}
