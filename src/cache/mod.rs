//! The cache fallback: results of reads stored under a key, served (marked stale) when no
//! endpoint can answer.
//!
//! A read opts in with [`Routed::cached`](crate::Routed::cached). Every successful result is
//! stored, serialized as JSON, under the caller's key for the caller's time to live (unless the
//! pool stored the same result there less than a hundredth of that time before); when every
//! endpoint fails or refuses, the stored value is returned instead of the error, together with
//! its age. The cache is never consulted while an endpoint can serve, and a cache that fails
//! (a Redis server that is down, a value that no longer decodes) never fails a read: its errors
//! are logged, counted in metrics and otherwise ignored.

pub(crate) mod lately;
mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use memory::MemoryCache;
#[cfg(feature = "redis")]
pub use redis::{RedisCache, RedisCacheBuilder};

/// The future of a cache operation.
pub type CacheFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CacheError>> + Send + 'a>>;

/// Where cached read results are kept.
///
/// Implementations must be cheap to call concurrently. The pool bounds every call with its
/// cache timeout and treats errors as misses, so an implementation need not retry. A `put`
/// that talks to a remote store should not make the read wait for it: send it in the
/// background and return.
pub trait Cache: Send + Sync + fmt::Debug + 'static {
    /// The value stored under `key`, if it has not expired.
    fn get<'a>(&'a self, key: &'a str) -> CacheFuture<'a, Option<CachedValue>>;

    /// Stores `value` under `key` for `ttl`, replacing what was there.
    fn put<'a>(&'a self, key: &'a str, value: CachedValue, ttl: Duration) -> CacheFuture<'a, ()>;

    /// A short name for logs, metrics and the health report (`memory`, `redis`).
    fn kind(&self) -> &'static str;
}

/// The pool's cache: the one it was given, or the default memory cache, made when a read
/// first uses it (a pool that caches nothing pays nothing for it).
#[derive(Debug)]
pub(crate) struct PoolCache {
    given: Option<Arc<dyn Cache>>,
    default: OnceLock<MemoryCache>,
}

impl PoolCache {
    /// `given`, or the default memory cache.
    pub(crate) fn new(given: Option<Arc<dyn Cache>>) -> Self {
        Self {
            given,
            default: OnceLock::new(),
        }
    }

    pub(crate) fn get(&self) -> &dyn Cache {
        match &self.given {
            Some(cache) => &**cache,
            None => self.default.get_or_init(MemoryCache::default),
        }
    }

    /// The cache's kind, without making the default one.
    pub(crate) fn kind(&self) -> &'static str {
        match &self.given {
            Some(cache) => cache.kind(),
            None => MemoryCache::KIND,
        }
    }
}

/// A serialized read result and when it was stored.
#[derive(Clone, PartialEq, Eq)]
pub struct CachedValue {
    stored_at: SystemTime,
    payload: Vec<u8>,
}

impl fmt::Debug for CachedValue {
    // The payload is user data: its size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedValue")
            .field("stored_at", &self.stored_at)
            .field("bytes", &self.payload.len())
            .finish()
    }
}

impl CachedValue {
    /// A value stored now.
    pub fn new(payload: Vec<u8>) -> Self {
        Self::stored_at(payload, SystemTime::now())
    }

    /// A value stored at `stored_at`.
    pub fn stored_at(payload: Vec<u8>, stored_at: SystemTime) -> Self {
        Self { stored_at, payload }
    }

    /// When the value was stored.
    pub fn stored_at_time(&self) -> SystemTime {
        self.stored_at
    }

    /// When the value was stored, in milliseconds since the Unix epoch (0 before it).
    fn stored_at_millis(&self) -> u64 {
        self.stored_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }

    /// How long ago the value was stored (zero if the clock went back).
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.stored_at)
            .unwrap_or_default()
    }

    /// The serialized result (JSON).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The value as one byte string for a remote store: the storage time in milliseconds
    /// since the Unix epoch (8 bytes, big-endian), then the payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let millis = self.stored_at_millis();
        let mut bytes = Vec::with_capacity(8 + self.payload.len());
        bytes.extend_from_slice(&millis.to_be_bytes());
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// Reads back what [`to_bytes`](Self::to_bytes) wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CacheError> {
        let Some((millis, payload)) = bytes.split_first_chunk::<8>() else {
            return Err(CacheError::new(format!(
                "a cached value of {} bytes is too short to hold its storage time",
                bytes.len()
            )));
        };
        let stored_at = UNIX_EPOCH + Duration::from_millis(u64::from_be_bytes(*millis));
        Ok(Self::stored_at(payload.to_vec(), stored_at))
    }
}

/// A cache operation failed.
#[derive(Debug, thiserror::Error)]
#[error("cache: {message}")]
pub struct CacheError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl CacheError {
    /// An error described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// An error described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_keeps_the_storage_time_to_the_millisecond() {
        let stored_at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let value = CachedValue::stored_at(b"{\"id\":1}".to_vec(), stored_at);
        let back = CachedValue::from_bytes(&value.to_bytes()).unwrap();
        assert_eq!(back, value);
    }

    #[tokio::test]
    async fn the_default_cache_is_made_when_first_used() {
        let cache = PoolCache::new(None);
        assert_eq!(cache.kind(), "memory");
        assert!(cache.default.get().is_none(), "made before any use");
        let value = CachedValue::new(b"1".to_vec());
        cache
            .get()
            .put("k", value.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(cache.get().get("k").await.unwrap(), Some(value));
        assert!(cache.default.get().is_some());
    }

    #[test]
    fn short_bytes_are_an_error_not_a_panic() {
        let error = CachedValue::from_bytes(&[1, 2, 3]).unwrap_err();
        assert!(error.to_string().contains("3 bytes"), "{error}");
    }
}
