//! The default cache: in this process, on moka, bounded by the bytes it holds.

use std::fmt;
use std::time::{Duration, Instant};

use super::{Cache, CacheError, CacheFuture, CachedValue};

/// A bounded in-memory cache (moka), each entry expiring after its own time to live.
///
/// Bounded by bytes: an entry weighs its key's length plus its payload's, and the weights add
/// up to at most `max_bytes` (moka's bookkeeping per entry, about a hundred bytes, comes on
/// top). A count of entries alone would not bound memory: 10,000 results of a few megabytes
/// each are gigabytes. When full, the entries least likely to be used again are evicted
/// first; a value heavier than the whole cache is refused.
///
/// ```
/// use protected_pool::cache::MemoryCache;
///
/// // At most 10,000 values and 16 MiB of keys and payloads.
/// let cache = MemoryCache::with_limits(10_000, 16 * 1024 * 1024);
/// assert_eq!(cache.max_bytes(), 16 * 1024 * 1024);
/// ```
#[derive(Clone)]
pub struct MemoryCache {
    entries: moka::future::Cache<String, Entry>,
    /// About how many entries fit.
    entries_hint: u64,
    max_bytes: u64,
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

/// The bytes an entry holds that grow with what the caller stores.
fn bytes_of(key: &str, value: &CachedValue) -> u64 {
    (key.len() as u64).saturating_add(value.payload().len() as u64)
}

impl MemoryCache {
    /// What [`Cache::kind`] says.
    pub(crate) const KIND: &'static str = "memory";

    /// The byte bound of [`Default`]: 64 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

    /// The entry bound of [`Default`]: 10,000 values.
    pub const DEFAULT_MAX_ENTRIES: u64 = 10_000;

    /// A cache holding at most `max_bytes` of keys and payloads, in any number of entries.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self::weighing(max_bytes, 1)
    }

    /// A cache holding at most `max_entries` values and at most `max_bytes` of keys and
    /// payloads.
    ///
    /// Both bounds are kept by one weight: an entry counts at least
    /// `max_bytes / max_entries` bytes (rounded up), so no more than `max_entries` fit
    /// however small they are. A cache of small values is then full at `max_entries`, one of
    /// large values at `max_bytes`.
    pub fn with_limits(max_entries: u64, max_bytes: u64) -> Self {
        Self::weighing(max_bytes, max_bytes.div_ceil(max_entries.max(1)).max(1))
    }

    /// Every entry weighs its bytes, and at least `least`; moka weighs in `u32`, so weights
    /// saturate at 4 GiB.
    fn weighing(max_bytes: u64, least: u64) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |key: &String, entry: &Entry| {
                let weight = bytes_of(key, &entry.value).max(least);
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self {
            entries,
            entries_hint: max_bytes / least.max(1),
            max_bytes,
        }
    }

    /// About how many values fit: the entry bound, or the byte bound over one byte each.
    pub(crate) fn entries_hint(&self) -> u64 {
        self.entries_hint
    }

    /// The most bytes of keys and payloads this cache holds.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Values held now (approximate: evictions and expiries are applied lazily; see
    /// [`run_pending_tasks`](Self::run_pending_tasks)).
    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The weight of the entries held now: their keys' and payloads' bytes, each counted at
    /// least at the per-entry floor of [`with_limits`](Self::with_limits). At most
    /// [`max_bytes`](Self::max_bytes) once pending evictions have run.
    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// Applies the evictions and expiries moka has queued. It does so on its own as the cache
    /// is used; call this where the numbers must be exact now, in tests or before reporting.
    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
    }
}

impl Default for MemoryCache {
    /// Room for 10,000 values and 64 MiB.
    fn default() -> Self {
        Self::with_limits(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_BYTES)
    }
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.entries.entry_count())
            .field("weighted_size", &self.entries.weighted_size())
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl Cache for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> CacheFuture<'a, Option<CachedValue>> {
        Box::pin(async move { Ok(self.entries.get(key).await.map(|entry| entry.value)) })
    }

    /// Stores `value`, or refuses one heavier than the whole cache, leaving what `key` held.
    /// Admitting it would evict everything else and then the value itself.
    fn put<'a>(&'a self, key: &'a str, value: CachedValue, ttl: Duration) -> CacheFuture<'a, ()> {
        Box::pin(async move {
            let bytes = bytes_of(key, &value);
            if bytes > self.max_bytes {
                return Err(CacheError::new(format!(
                    "a value of {bytes} bytes (key included) is larger than the whole memory \
                     cache ({} bytes)",
                    self.max_bytes
                )));
            }
            self.entries
                .insert(key.to_owned(), Entry { value, ttl })
                .await;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        Self::KIND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_entry_expires_after_its_own_ttl() {
        let cache = MemoryCache::with_max_bytes(1024);
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
