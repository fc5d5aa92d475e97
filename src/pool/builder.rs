//! Building a `ProtectedPool`: endpoints, routes, classification, listeners.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::events::{PoolListener, PoolListeners, PoolStateChange};
use super::{PoolInner, ProtectedPool};
use crate::backend::Backend;
use crate::breaker::{BreakerConfig, CircuitBreaker, ConfigError, ConfigProblem};
use crate::classify::{Classifier, ErrorClass};
use crate::endpoint::{ConnectionManager, Endpoint, EndpointOptions, Role};
use crate::error::Result;
use crate::route::{Route, RouteConfig};

type ConnectOptionsOf<DB> = <<DB as sqlx::Database>::Connection as Connection>::Options;

enum Target<DB: Backend> {
    Url(String),
    Options(Box<ConnectOptionsOf<DB>>),
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
    options: EndpointOptions,
    routes: [RouteConfig; 3],
    classifier: Option<Classifier>,
    listeners: Vec<PoolListener>,
    _database: PhantomData<DB>,
}

impl<DB: Backend> fmt::Debug for PoolBuilder<DB> {
    // Without the URLs: they may hold passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("primary", &self.primary.as_ref().map(|spec| &spec.name))
            .field("options", &self.options)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> PoolBuilder<DB> {
    pub(crate) fn new() -> Self {
        Self {
            primary: None,
            options: EndpointOptions::default(),
            routes: Route::ALL.map(RouteConfig::for_route),
            classifier: None,
            listeners: Vec::new(),
            _database: PhantomData,
        }
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

    /// Builds the pool without opening a connection: the first call connects.
    pub fn build(self) -> Result<ProtectedPool<DB>> {
        let mut problems = Vec::new();
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
        self.options.validate_into("endpoint", &mut problems);
        for route in Route::ALL {
            let config = &self.routes[route.index()];
            let prefix = format!("routes.{route}");
            config
                .breaker
                .validate_into(&format!("{prefix}.breaker"), &mut problems);
            if config.timeout.is_zero() {
                problems.push(ConfigProblem::new(
                    format!("{prefix}.timeout"),
                    "0s must be above zero",
                ));
            }
        }
        let (Some(primary_options), true) = (primary, problems.is_empty()) else {
            return Err(ConfigError::new(problems).into());
        };
        let spec = self.primary.expect("validated above");
        let listeners = Arc::new(PoolListeners::default());
        for listener in self.listeners {
            listeners.add(listener);
        }
        let name: Arc<str> = spec.name.into();
        let breakers = Route::ALL.map(|route| {
            let breaker = CircuitBreaker::new(
                format!("{name}/{route}"),
                self.routes[route.index()].breaker.clone(),
            )
            .expect("validated above");
            let (sink, endpoint) = (listeners.clone(), name.clone());
            breaker.on_state_change(move |change| {
                sink.emit(&PoolStateChange {
                    route,
                    endpoint: endpoint.clone(),
                    change: change.clone(),
                });
            });
            breaker
        });
        let manager = ConnectionManager::<DB>::new(primary_options, &self.options);
        let primary = Endpoint::new(name, Role::Primary, manager, &self.options, breakers);
        Ok(ProtectedPool {
            inner: Arc::new(PoolInner {
                primary,
                routes: self.routes,
                classifier: self.classifier,
                listeners,
            }),
        })
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
