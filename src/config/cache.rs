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
    /// Most bytes of keys and payloads the memory cache holds (default 64 MiB). In a file,
    /// a whole number of bytes or a size with its unit: `"64 MiB"`, `"500 KB"`.
    #[serde(with = "byte_size")]
    pub max_bytes: u64,
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
            .field("max_bytes", &self.max_bytes)
            .field("timeout", &self.timeout)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_env", &self.url_env)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl Default for CacheConfig {
    /// A memory cache of 10,000 values and 64 MiB, 250 ms per operation.
    fn default() -> Self {
        Self {
            kind: CacheKind::Memory,
            max_entries: MemoryCache::DEFAULT_MAX_ENTRIES,
            max_bytes: MemoryCache::DEFAULT_MAX_BYTES,
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
        if self.max_bytes == 0 {
            problems.push(ConfigProblem::new(
                "cache.max_bytes",
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
            CacheKind::Memory => Some(Arc::new(MemoryCache::with_limits(
                self.max_entries.max(1),
                self.max_bytes.max(1),
            ))),
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

/// A size in bytes as a file gives it: a whole number, or a number and a unit, `"64 MiB"`.
mod byte_size {
    use std::fmt;

    use serde::Serializer;
    use serde::de::{self, Deserializer, Visitor};

    /// Units by name, compared without case: decimal (`KB` = 1000) and binary (`KiB` = 1024).
    const UNITS: [(&str, u64); 7] = [
        ("b", 1),
        ("kb", 1000),
        ("mb", 1000 * 1000),
        ("gb", 1000 * 1000 * 1000),
        ("kib", 1 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
    ];

    // Written back as a plain number: exact, and read by every version of this crate.
    pub(super) fn serialize<S: Serializer>(bytes: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(*bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(ByteSize)
    }

    /// `"64 MiB"` as bytes; `None` for an unknown unit, a fraction or an overflow.
    pub(super) fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let unit = unit.trim();
        let scale = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit))?
                .1
        };
        number.checked_mul(scale)
    }

    struct ByteSize;

    impl Visitor<'_> for ByteSize {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "a number of bytes, or a size like \"64 MiB\" (B, KB, MB, GB, KiB, MiB, GiB)",
            )
        }

        fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<u64, E> {
            Ok(bytes)
        }

        fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<u64, E> {
            u64::try_from(bytes).map_err(|_| E::invalid_value(de::Unexpected::Signed(bytes), &self))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
            parse(text).ok_or_else(|| E::invalid_value(de::Unexpected::Str(text), &self))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::byte_size;
    use crate::PoolConfig;

    #[test]
    fn a_size_is_read_with_or_without_its_unit() {
        for (text, bytes) in [
            ("0", 0),
            ("1500", 1500),
            ("64 MiB", 64 << 20),
            ("64MiB", 64 << 20),
            ("500 kb", 500_000),
            ("2 GB", 2_000_000_000),
            ("3 B", 3),
        ] {
            assert_eq!(byte_size::parse(text), Some(bytes), "{text}");
        }
        for text in ["", "MiB", "1.5 MiB", "-1", "64 MB/s", "99999999999 GiB"] {
            assert_eq!(byte_size::parse(text), None, "{text}");
        }
    }

    #[test]
    fn max_bytes_is_a_number_or_a_size_and_zero_is_a_problem() {
        let config = PoolConfig::from_toml("[cache]\nmax_bytes = \"16 MiB\"\n").unwrap();
        assert_eq!(config.cache.max_bytes, 16 << 20);
        let config = PoolConfig::from_json(r#"{"cache": {"max_bytes": 1000}}"#).unwrap();
        assert_eq!(config.cache.max_bytes, 1000);

        let error = PoolConfig::from_toml("[cache]\nmax_bytes = \"16 parsecs\"\n").unwrap_err();
        assert!(
            error.problems[0]
                .path
                .starts_with("cache.max_bytes (line 2"),
            "{error}"
        );

        let config = PoolConfig::from_toml(
            "[primary]\nurl = \"postgres://db/app\"\n[cache]\nmax_bytes = 0\n",
        )
        .unwrap();
        let problems = config.validate().unwrap_err().problems;
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["cache.max_bytes"]);
    }
}
