//! The whole document: [`PoolConfig`], its defaults, and reading it from TOML or JSON.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::breakers::BreakerSettings;
use super::cache::CacheConfig;
use super::endpoint::EndpointConfig;
use super::parse_error;
use crate::breaker::BreakerConfig;
use crate::cache::Cache;
use crate::endpoint::EndpointOptions;
use crate::problem::{ConfigError, ConfigProblem};
use crate::route::{Route, RouteConfig};
use crate::router::{ReadPreference, ReplicaSelection};

/// Everything a pool is made of that can live in a file (TOML or JSON).
///
/// Listeners, classifiers and fallbacks are code: add them to the builder from
/// [`PoolBuilder::from_config`](crate::PoolBuilder::from_config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// The primary.
    pub primary: Option<EndpointConfig>,
    /// Read replicas, in order.
    pub replicas: Vec<EndpointConfig>,
    /// Connection pool settings of every endpoint.
    pub pool: EndpointOptions,
    /// Where reads go.
    pub read_preference: ReadPreference,
    /// How reads choose among replicas.
    pub replica_selection: ReplicaSelection,
    /// Replicas lagging more than this are skipped.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Option<Duration>,
    /// How often replica lag is measured; the longest a recovery probe sleeps.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Whether background probes close recovered breakers.
    pub recovery_probes: bool,
    /// Per-operation timeout of each route; unset keeps the route's preset.
    pub timeouts: PerRoute<Option<HumanDuration>>,
    /// Breaker of each route: a preset and overrides.
    pub breakers: PerRoute<BreakerSettings>,
    /// The cache fallback.
    pub cache: CacheConfig,
    /// Where keyed writes record their keys.
    pub idempotency: crate::IdempotencyConfig,
    /// The outbox of keyed writes, if any.
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub outbox: Option<crate::outbox::OutboxConfig>,
}

impl Default for PoolConfig {
    /// What the builder does when told nothing (no endpoints).
    fn default() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            pool: EndpointOptions::default(),
            read_preference: ReadPreference::default(),
            replica_selection: ReplicaSelection::default(),
            max_replica_lag: Some(Duration::from_secs(10)),
            health_check_interval: Duration::from_secs(1),
            recovery_probes: true,
            timeouts: PerRoute::default(),
            breakers: PerRoute::default(),
            cache: CacheConfig::default(),
            idempotency: crate::IdempotencyConfig::default(),
            #[cfg(feature = "outbox")]
            outbox: None,
        }
    }
}

/// One value per route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerRoute<T> {
    /// The read route's.
    pub read: T,
    /// The write route's.
    pub write: T,
    /// The auth route's.
    pub auth: T,
}

impl<T> PerRoute<T> {
    /// The value of `route`.
    pub fn get(&self, route: Route) -> &T {
        match route {
            Route::Read => &self.read,
            Route::Write => &self.write,
            Route::Auth => &self.auth,
        }
    }
}

/// A duration written like `"5s"` or `"250ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HumanDuration(#[serde(with = "humantime_serde")] pub Duration);

impl PoolConfig {
    /// Reads a TOML document. A syntax or type error names its place (line and column, and
    /// the field's path); semantic problems are all listed by [`validate`](Self::validate).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|error| parse_error::toml_error(text, &error))?;
        serde_path_to_error::deserialize(deserializer)
            .map_err(|error| parse_error::toml_shape(text, error).into())
    }

    /// Reads a JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|error| parse_error::json(error).into())
    }

    /// Reads a file: JSON if its name ends in `.json`, TOML otherwise.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::from(ConfigProblem::new(
                path.display().to_string(),
                format!("cannot read: {error}"),
            ))
        })?;
        let parsed = if path.extension().is_some_and(|ext| ext == "json") {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        };
        parsed.map_err(|mut error| {
            for problem in &mut error.problems {
                problem.path = format!("{}: {}", path.display(), problem.path);
            }
            error
        })
    }

    /// The breaker of `route` as configured: its preset with the overrides.
    pub fn breaker(&self, route: Route) -> BreakerConfig {
        self.breakers.get(route).resolve(route)
    }

    /// Breaker and timeout of `route` as configured.
    pub fn route(&self, route: Route) -> RouteConfig {
        RouteConfig {
            breaker: self.breaker(route),
            timeout: self
                .timeouts
                .get(route)
                .map_or(RouteConfig::for_route(route).timeout, |timeout| timeout.0),
        }
    }

    /// Every problem of a PostgreSQL pool's configuration, each with its path: missing URLs
    /// or environment variables, malformed URLs, out-of-range thresholds, zero sizes and
    /// durations. For SQLite, [`validate_for::<Sqlite>`](Self::validate_for).
    #[cfg(feature = "postgres")]
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for::<sqlx::Postgres>()
    }

    /// [`validate`](Self::validate) for a pool of `DB` (its URLs are checked as `DB`'s).
    pub fn validate_for<DB: crate::Backend>(&self) -> Result<(), ConfigError> {
        crate::PoolBuilder::<DB>::configured(self, false)
            .check()
            .map(drop)
    }

    /// Appends the cache section's problems (the builder reports them with its own).
    pub(crate) fn cache_problems(&self, problems: &mut Vec<ConfigProblem>) {
        self.cache.problems(problems);
    }

    /// The cache as configured; `None` for the pool's default, problems appended.
    pub(crate) fn build_cache(&self, problems: &mut Vec<ConfigProblem>) -> Option<Arc<dyn Cache>> {
        self.cache.build(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_document_is_the_builder_defaults() {
        let config = PoolConfig::from_toml("").unwrap();
        assert_eq!(config, PoolConfig::default());
        for route in Route::ALL {
            assert_eq!(config.route(route), RouteConfig::for_route(route));
        }
    }

    #[test]
    fn json_reads_the_same_settings() {
        let config = PoolConfig::from_json(
            r#"{"primary": {"url": "postgres://db/app"}, "breakers": {"read": {"failure_rate": "off"}}}"#,
        )
        .unwrap();
        assert_eq!(config.breaker(Route::Read).failure_rate, None);
        let error = PoolConfig::from_json(r#"{"pool": {"max_connections": -1}}"#).unwrap_err();
        assert!(
            error.problems[0]
                .path
                .starts_with("pool.max_connections (line 1"),
            "{error}"
        );
    }

    #[test]
    fn the_debug_form_hides_urls() {
        let config = PoolConfig::from_toml(
            "[primary]\nurl = \"postgres://app:hunter2@db/app\"\n[cache]\nkind = \"redis\"\nurl = \"redis://:hunter2@cache\"\n",
        )
        .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
