//! Where cached reads are kept: in this process or on Redis.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::endpoint::resolve_url;
use crate::cache::{Cache, MemoryCache};
use crate::problem::ConfigProblem;

/// Where cached reads are kept.
///
/// Its `Debug` shows no URL: a URL may hold a password.
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
    /// In this process ([`MemoryCache`]).
    Memory,
    /// On a Redis server (`RedisCache`, with the `redis` feature).
    Redis,
}

impl CacheConfig {
    /// Appends this section's problems, paths under `cache`.
    pub(super) fn problems(&self, problems: &mut Vec<ConfigProblem>) {
        if self.max_entries == 0 {
            problems.push(ConfigProblem::new(
                "cache.max_entries",
                "0 must be at least 1",
            ));
        }
        match self.kind {
            CacheKind::Memory => {
                if self.url.is_some() || self.url_env.is_some() || self.key_prefix.is_some() {
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
                if let Err(problem) = self.url() {
                    problems.push(problem);
                }
            }
        }
    }

    fn url(&self) -> Result<String, ConfigProblem> {
        resolve_url(self.url.as_deref(), self.url_env.as_deref(), "cache")
    }

    /// The cache this section describes; `None` for the pool's default, problems appended.
    #[cfg_attr(not(feature = "redis"), allow(clippy::unnecessary_wraps))]
    pub(super) fn build(&self, problems: &mut Vec<ConfigProblem>) -> Option<Arc<dyn Cache>> {
        match self.kind {
            CacheKind::Memory => Some(Arc::new(MemoryCache::new(self.max_entries.max(1)))),
            #[cfg(feature = "redis")]
            CacheKind::Redis => {
                let url = self.url().ok()?;
                let mut builder = crate::cache::RedisCache::builder().timeout(self.timeout);
                if let Some(prefix) = &self.key_prefix {
                    builder = builder.key_prefix(prefix.clone());
                }
                match builder.connect(&url) {
                    Ok(redis) => Some(Arc::new(redis)),
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
