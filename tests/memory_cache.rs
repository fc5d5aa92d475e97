//! The memory cache is bounded by the bytes it holds, not only by how many values: values
//! totalling many times its bound leave it at or under the bound, a value larger than the
//! whole cache is refused, and what it holds is still found.

use std::time::Duration;

use protected_pool::cache::{Cache, CachedValue, MemoryCache};

const TTL: Duration = Duration::from_secs(60);

fn payload(bytes: usize) -> CachedValue {
    CachedValue::new(vec![b'x'; bytes])
}

#[tokio::test]
async fn values_far_over_the_bound_leave_it_at_or_under_the_bound() {
    let max_bytes = 100 * 1024;
    let cache = MemoryCache::with_max_bytes(max_bytes);
    // 200 values of 4 KiB: 800 KiB stored into 100 KiB.
    for index in 0..200 {
        cache
            .put(&format!("report-{index}"), payload(4096), TTL)
            .await
            .unwrap();
    }
    cache.run_pending_tasks().await;
    assert!(
        cache.weighted_size() <= max_bytes,
        "{} bytes held, bound {max_bytes}",
        cache.weighted_size()
    );
    assert!(cache.len() <= 25, "{} values of 4 KiB held", cache.len());
    // What was kept is found, and nothing else.
    let mut found = 0;
    for index in 0..200 {
        if let Some(value) = cache.get(&format!("report-{index}")).await.unwrap() {
            assert_eq!(value.payload().len(), 4096);
            found += 1;
        }
    }
    assert!(found > 0, "the cache still holds values");
    assert_eq!(found, cache.len());
}

#[tokio::test]
async fn a_value_larger_than_the_whole_cache_is_not_stored() {
    let cache = MemoryCache::with_max_bytes(1024);
    let small = payload(100);
    cache.put("small", small.clone(), TTL).await.unwrap();
    let error = cache
        .put("huge", payload(2048), TTL)
        .await
        .expect_err("larger than the cache");
    assert!(error.to_string().contains("larger than"), "{error}");
    cache.run_pending_tasks().await;
    assert_eq!(cache.get("huge").await.unwrap(), None);
    assert_eq!(cache.get("small").await.unwrap(), Some(small));
    assert!(cache.weighted_size() <= 1024);
}

#[tokio::test]
async fn stored_values_are_found_and_replaced() {
    let cache = MemoryCache::with_max_bytes(64 * 1024);
    let first = payload(10);
    let second = CachedValue::new(b"{\"id\":2}".to_vec());
    cache.put("user:1", first.clone(), TTL).await.unwrap();
    assert_eq!(cache.get("user:1").await.unwrap(), Some(first));
    cache.put("user:1", second.clone(), TTL).await.unwrap();
    assert_eq!(cache.get("user:1").await.unwrap(), Some(second));
    assert_eq!(cache.get("user:2").await.unwrap(), None);
    cache.run_pending_tasks().await;
    assert_eq!(cache.len(), 1);
    assert_eq!(cache.weighted_size(), ("user:1".len() + 8) as u64);
}

#[tokio::test]
async fn the_entry_bound_holds_for_values_small_enough_to_fit_the_byte_bound() {
    let cache = MemoryCache::with_limits(10, 1024 * 1024);
    for index in 0..100 {
        cache
            .put(&format!("k{index}"), payload(8), TTL)
            .await
            .unwrap();
    }
    cache.run_pending_tasks().await;
    assert!(cache.len() <= 10, "{} values held", cache.len());
    assert!(cache.weighted_size() <= cache.max_bytes());
}

#[test]
fn the_default_holds_ten_thousand_values_and_64_mib() {
    let cache = MemoryCache::default();
    assert_eq!(cache.max_bytes(), 64 * 1024 * 1024);
    assert_eq!(MemoryCache::DEFAULT_MAX_ENTRIES, 10_000);
}
