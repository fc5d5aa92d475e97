//! The pool described in a file: endpoints, pool options, timeouts and breakers per route
//! (a preset plus overrides), read preference and cache. See `examples/protected-pool.toml`.
//!
//! ```
//! use protected_pool::{PoolConfig, ProtectedPool};
//!
//! let config = PoolConfig::from_toml(r#"
//!     read_preference = "prefer_replica"
//!
//!     [primary]
//!     url = "postgres://app@db-primary/app"
//!
//!     [[replicas]]
//!     url = "postgres://app@db-replica-1/app"
//!
//!     [breakers.write]
//!     preset = "write"
//!     failure_rate = 0.5
//!     open = { base = "5s" }
//! "#).unwrap();
//! # let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! # let _guard = runtime.enter();
//! let pool: ProtectedPool = ProtectedPool::from_config(&config).unwrap();
//! ```
//!
//! Every semantic problem is reported at once, each with its path:
//!
//! ```
//! use protected_pool::PoolConfig;
//!
//! let config = PoolConfig::from_toml(r#"
//!     [primary]
//!     url = "postgres://db/app"
//!     [breakers.write]
//!     failure_rate = 1.5
//!     [pool]
//!     max_connections = 0
//! "#).unwrap();
//! let error = config.validate().unwrap_err();
//! let problems: Vec<String> = error.problems.iter().map(ToString::to_string).collect();
//! assert_eq!(problems, [
//!     "pool.max_connections: 0 must be at least 1",
//!     "breakers.write.failure_rate: 1.5 is outside 0..=1 (and must be above 0)",
//! ]);
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::breaker::{BreakerConfig, SlidingWindow};
use crate::endpoint::EndpointOptions;
pub use crate::problem::{ConfigError, ConfigProblem};
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

/// Where an endpoint is: its URL, or the environment variable holding it (to keep passwords
/// out of files).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// Its name in errors, reports and metrics; default `primary` / `replica-N`.
    pub name: Option<String>,
    /// Connection URL.
    pub url: Option<String>,
    /// Environment variable holding the connection URL.
    pub url_env: Option<String>,
}

impl fmt::Debug for EndpointConfig {
    // The URL may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_env", &self.url_env)
            .finish()
    }
}

impl EndpointConfig {
    /// The URL, from the file or the environment; a problem at `path` if neither gives one.
    pub(crate) fn resolve_url(&self, path: &str) -> Result<String, ConfigProblem> {
        resolve_url(self.url.as_deref(), self.url_env.as_deref(), path)
    }
}

fn resolve_url(url: Option<&str>, env: Option<&str>, path: &str) -> Result<String, ConfigProblem> {
    match (url, env) {
        (Some(_), Some(_)) => Err(ConfigProblem::new(
            path,
            "give either url or url_env, not both",
        )),
        (Some(url), None) => Ok(url.to_owned()),
        (None, Some(name)) => std::env::var(name).map_err(|_| {
            ConfigProblem::new(
                format!("{path}.url_env"),
                format!("environment variable {name} is not set (or not UTF-8)"),
            )
        }),
        (None, None) => Err(ConfigProblem::new(path, "needs url or url_env")),
    }
}

/// A route's breaker: a preset (the route's own unless named) with fields overridden.
///
/// A rule is switched off with `"off"`: `failure_rate = "off"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// The preset to start from: `read`, `write` or `auth` (default: the route's).
    pub preset: Option<Route>,
    /// See [`BreakerConfig::consecutive_failures`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<Rule<u32>>,
    /// See [`BreakerConfig::failure_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<Rule<f64>>,
    /// See [`BreakerConfig::slow_call_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_call_rate: Option<Rule<f64>>,
    /// See [`BreakerConfig::slow_call_duration`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub slow_call_duration: Option<Duration>,
    /// See [`BreakerConfig::window`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<SlidingWindow>,
    /// See [`BreakerConfig::minimum_calls`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_calls: Option<u32>,
    /// Fields of [`BreakerConfig::open`].
    pub open: OpenSettings,
    /// See [`BreakerConfig::half_open_max_calls`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_open_max_calls: Option<u32>,
    /// See [`BreakerConfig::success_threshold`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    /// See [`BreakerConfig::max_wait_in_half_open`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_wait_in_half_open: Option<Duration>,
}

/// Overrides of a preset's open duration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenSettings {
    /// First open duration.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    /// Growth per re-open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Longest open duration.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
    /// Random fraction added or taken off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

impl BreakerSettings {
    /// The preset with the overrides applied (not validated).
    pub fn resolve(&self, route: Route) -> BreakerConfig {
        let preset = RouteConfig::for_route(self.preset.unwrap_or(route)).breaker;
        let open = &self.open;
        BreakerConfig {
            consecutive_failures: Rule::apply(
                self.consecutive_failures,
                preset.consecutive_failures,
            ),
            failure_rate: Rule::apply(self.failure_rate, preset.failure_rate),
            slow_call_rate: Rule::apply(self.slow_call_rate, preset.slow_call_rate),
            slow_call_duration: self.slow_call_duration.unwrap_or(preset.slow_call_duration),
            window: self.window.unwrap_or(preset.window),
            minimum_calls: self.minimum_calls.unwrap_or(preset.minimum_calls),
            open: crate::breaker::OpenDuration {
                base: open.base.unwrap_or(preset.open.base),
                multiplier: open.multiplier.unwrap_or(preset.open.multiplier),
                max: open.max.unwrap_or(preset.open.max),
                jitter: open.jitter.unwrap_or(preset.open.jitter),
            },
            half_open_max_calls: self
                .half_open_max_calls
                .unwrap_or(preset.half_open_max_calls),
            success_threshold: self.success_threshold.unwrap_or(preset.success_threshold),
            max_wait_in_half_open: self
                .max_wait_in_half_open
                .unwrap_or(preset.max_wait_in_half_open),
        }
    }
}

/// An optional trip rule's setting: a threshold, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule<T> {
    /// The rule is switched off.
    Off,
    /// The rule's threshold.
    At(T),
}

impl<T: Copy> Rule<T> {
    fn apply(setting: Option<Self>, preset: Option<T>) -> Option<T> {
        match setting {
            None => preset,
            Some(Self::Off) => None,
            Some(Self::At(value)) => Some(value),
        }
    }
}

impl<T: Serialize> Serialize for Rule<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => serializer.serialize_str("off"),
            Self::At(value) => value.serialize(serializer),
        }
    }
}

/// A number type a [`Rule`] can hold.
pub trait RuleValue: Sized {
    #[doc(hidden)]
    fn from_u64(value: u64) -> Option<Self>;
    #[doc(hidden)]
    fn from_f64(value: f64) -> Option<Self>;
    #[doc(hidden)]
    const EXPECTED: &'static str;
}

impl RuleValue for u32 {
    fn from_u64(value: u64) -> Option<Self> {
        u32::try_from(value).ok()
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    const EXPECTED: &'static str = "a whole number of calls or \"off\"";
}

impl RuleValue for f64 {
    fn from_u64(value: u64) -> Option<Self> {
        Some(value as f64)
    }
    fn from_f64(value: f64) -> Option<Self> {
        Some(value)
    }
    const EXPECTED: &'static str = "a rate between 0 and 1 or \"off\"";
}

impl<'de, T: RuleValue> Deserialize<'de> for Rule<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor<T>(PhantomData<T>);

        impl<T: RuleValue> Visitor<'_> for RuleVisitor<T> {
            type Value = Rule<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTED)
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Rule<T>, E> {
                T::from_u64(value)
                    .map(Rule::At)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(value), &self))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Rule<T>, E> {
                match u64::try_from(value) {
                    Ok(value) => self.visit_u64(value),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(value), &self)),
                }
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Rule<T>, E> {
                T::from_f64(value)
                    .map(Rule::At)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Float(value), &self))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Rule<T>, E> {
                if value == "off" {
                    Ok(Rule::Off)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(value), &self))
                }
            }
        }

        deserializer.deserialize_any(RuleVisitor(PhantomData))
    }
}

/// Where cached reads are kept.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `memory` (default) or `redis` (needs the crate's `redis` feature).
    pub kind: CacheKind,
    /// Most values the memory cache holds.
    pub max_entries: u64,
    /// Longest a cache operation may take before it counts as a miss.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Redis URL.
    pub url: Option<String>,
    /// Environment variable holding the Redis URL.
    pub url_env: Option<String>,
    /// Prefix of every Redis key (default `protected-pool:`).
    pub key_prefix: Option<String>,
}

impl fmt::Debug for CacheConfig {
    // The URL may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("kind", &self.kind)
            .field("max_entries", &self.max_entries)
            .field("timeout", &self.timeout)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_env", &self.url_env)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            kind: CacheKind::Memory,
            max_entries: 10_000,
            timeout: Duration::from_millis(250),
            url: None,
            url_env: None,
            key_prefix: None,
        }
    }
}

/// The cache's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheKind {
    /// In this process ([`MemoryCache`](crate::cache::MemoryCache)).
    Memory,
    /// On a Redis server (`RedisCache`, with the `redis` feature).
    Redis,
}

impl PoolConfig {
    /// Reads a TOML document. A syntax or type error names its place (line and column, and
    /// the field's path); semantic problems are all listed by [`validate`](Self::validate).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let deserializer =
            toml::Deserializer::parse(text).map_err(|error| toml_problem(text, &error))?;
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let mut problem = toml_problem(text, &inner);
            if path != "." {
                problem.path = format!("{path} ({})", problem.path);
            }
            problem.into()
        })
    }

    /// Reads a JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let place = format!("line {}, column {}", inner.line(), inner.column());
            let path = if path == "." {
                place
            } else {
                format!("{path} ({place})")
            };
            ConfigProblem::new(path, without_position(&inner.to_string())).into()
        })
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for::<sqlx::Postgres>()
    }

    /// [`validate`](Self::validate) for a pool of `DB` (its URLs are checked as `DB`'s).
    pub fn validate_for<DB: crate::Backend>(&self) -> Result<(), ConfigError> {
        crate::PoolBuilder::<DB>::configured(self, false)
            .check()
            .map(drop)
    }

    pub(crate) fn cache_problems(&self, problems: &mut Vec<ConfigProblem>) {
        let cache = &self.cache;
        if cache.max_entries == 0 {
            problems.push(ConfigProblem::new(
                "cache.max_entries",
                "0 must be at least 1",
            ));
        }
        match cache.kind {
            CacheKind::Memory => {
                if cache.url.is_some() || cache.url_env.is_some() || cache.key_prefix.is_some() {
                    problems.push(ConfigProblem::new(
                        "cache",
                        "url, url_env and key_prefix are for kind = \"redis\"",
                    ));
                }
            }
            CacheKind::Redis => {
                if !cfg!(feature = "redis") {
                    problems.push(ConfigProblem::new(
                        "cache.kind",
                        "\"redis\" needs protected-pool's `redis` feature",
                    ));
                }
                if let Err(problem) =
                    resolve_url(cache.url.as_deref(), cache.url_env.as_deref(), "cache")
                {
                    problems.push(problem);
                }
            }
        }
    }

    /// The cache as configured; `None` for the pool's default, problems appended.
    #[cfg_attr(not(feature = "redis"), allow(clippy::unnecessary_wraps))]
    pub(crate) fn build_cache(
        &self,
        problems: &mut Vec<ConfigProblem>,
    ) -> Option<std::sync::Arc<dyn crate::cache::Cache>> {
        let cache = &self.cache;
        match cache.kind {
            CacheKind::Memory => Some(std::sync::Arc::new(crate::cache::MemoryCache::new(
                cache.max_entries.max(1),
            ))),
            #[cfg(feature = "redis")]
            CacheKind::Redis => {
                let url =
                    resolve_url(cache.url.as_deref(), cache.url_env.as_deref(), "cache").ok()?;
                let mut builder = crate::cache::RedisCache::builder().timeout(cache.timeout);
                if let Some(prefix) = &cache.key_prefix {
                    builder = builder.key_prefix(prefix.clone());
                }
                match builder.connect(&url) {
                    Ok(redis) => Some(std::sync::Arc::new(redis)),
                    Err(error) => {
                        problems.push(ConfigProblem::new("cache.url", error.to_string()));
                        None
                    }
                }
            }
            #[cfg(not(feature = "redis"))]
            CacheKind::Redis => {
                let _ = problems;
                None
            }
        }
    }
}

/// A TOML error as a problem placed by line and column.
fn toml_problem(text: &str, error: &toml::de::Error) -> ConfigProblem {
    let place = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!("line {line}, column {column}")
        }
        None => "document".to_owned(),
    };
    ConfigProblem::new(place, error.message().trim().to_owned())
}

/// serde_json's message without the " at line L column C" it appends.
fn without_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
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
    fn overrides_apply_on_the_named_preset_and_off_switches_a_rule_off() {
        let config = PoolConfig::from_toml(
            r#"
            [breakers.auth]
            preset = "read"
            consecutive_failures = "off"
            failure_rate = 0.25
            open = { base = "2s" }
            "#,
        )
        .unwrap();
        let auth = config.breaker(Route::Auth);
        let read = BreakerConfig::read();
        assert_eq!(auth.consecutive_failures, None);
        assert_eq!(auth.failure_rate, Some(0.25));
        assert_eq!(auth.open.base, Duration::from_secs(2));
        assert_eq!(auth.open.max, read.open.max);
        assert_eq!(auth.window, read.window);
    }

    #[test]
    fn a_type_error_names_the_field_path_and_the_line() {
        let error =
            PoolConfig::from_toml("[breakers.write]\nminimum_calls = \"many\"\n").unwrap_err();
        let problem = &error.problems[0];
        assert!(
            problem
                .path
                .starts_with("breakers.write.minimum_calls (line 2"),
            "{problem}"
        );
    }

    #[test]
    fn an_unknown_field_is_an_error_not_ignored() {
        let error = PoolConfig::from_toml("[breakers.read]\nfailure_treshold = 3\n").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("failure_treshold"), "{message}");
        assert!(message.contains("breakers.read"), "{message}");
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
    fn urls_are_validated_as_the_named_database() {
        let config = PoolConfig::from_toml("[primary]\nurl = \"sqlite::memory:\"\n").unwrap();
        config.validate_for::<sqlx::Sqlite>().unwrap();
        let error = config.validate().unwrap_err();
        assert_eq!(error.problems[0].path, "primary.url", "{error}");
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
