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
//!
//! The file list maps onto the parts: `file` (the whole document and reading it), `endpoint`
//! (where a database is), `breakers` (a route's breaker as a preset plus overrides), `cache`
//! (where cached reads are kept), `parse_error` (a parser's complaint as a problem that shows
//! no value of the document).

mod breakers;
mod cache;
mod endpoint;
mod file;
mod parse_error;

pub use breakers::{BreakerSettings, OpenSettings, Rule, RuleValue};
pub use cache::{CacheConfig, CacheKind};
pub use endpoint::EndpointConfig;
pub use file::{HumanDuration, PerRoute, PoolConfig};

pub use crate::problem::{ConfigError, ConfigProblem};
