//! The default cache: in this process, on moka.

use std::fmt;
use std::time::{Duration, Instant};

use super::{Cache, CacheFuture, CachedValue};

/// A bounded in-memory cache (moka), each entry expiring after its own time to live.
///
/// When full, the entries least likely to be used again are evicted first.
#[derive(Clone)]
pub struct MemoryCache {
    entries: moka::future::Cache<String, Entry>,
}

#[derive(Clone)]
struct Entry {
    value: CachedValue,
    ttl: Duration,
}

/// Expires each entry after the time to live it was stored with.
struct PerEntryTtl;

impl moka::Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _now: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

impl MemoryCache {
    /// A cache holding at most `max_entries` values.
    pub fn new(max_entries: u64) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build(),
        }
    }

    /// Values held now (approximate: expired entries leave lazily).
    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for MemoryCache {
    /// Room for 10,000 values.
    fn default() -> Self {
        Self::new(10_000)
    }
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl Cache for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> CacheFuture<'a, Option<CachedValue>> {
        Box::pin(async move { Ok(self.entries.get(key).await.map(|entry| entry.value)) })
    }

    fn put<'a>(&'a self, key: &'a str, value: CachedValue, ttl: Duration) -> CacheFuture<'a, ()> {
        Box::pin(async move {
            self.entries
                .insert(key.to_owned(), Entry { value, ttl })
                .await;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_entry_expires_after_its_own_ttl() {
        let cache = MemoryCache::new(100);
        let value = CachedValue::new(b"1".to_vec());
        cache
            .put("short", value.clone(), Duration::from_millis(50))
            .await
            .unwrap();
        cache
            .put("long", value.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(cache.get("short").await.unwrap(), Some(value.clone()));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(cache.get("short").await.unwrap(), None);
        assert_eq!(cache.get("long").await.unwrap(), Some(value));
    }
}
