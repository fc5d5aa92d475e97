//! What a cached read stores, against a real SQLite file and a cache that counts what it is
//! given: the same result again soon is not stored again, whatever the cache; anything else
//! (another result, key, TTL or route, a store the cache refused, a window that has passed)
//! is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use protected_pool::cache::{Cache, CacheError, CacheFuture, CachedValue, MemoryCache};
use protected_pool::{ProtectedPool, Route, Source, Sqlite};
use sqlx::sqlite::SqliteConnectOptions;

/// A memory cache that counts the stores it is asked for, and refuses them while told to.
#[derive(Debug, Clone, Default)]
struct Counting {
    inner: MemoryCache,
    puts: Arc<AtomicUsize>,
    refuse: Arc<AtomicBool>,
}

impl Counting {
    fn puts(&self) -> usize {
        self.puts.load(Ordering::SeqCst)
    }
}

impl Cache for Counting {
    fn get<'a>(&'a self, key: &'a str) -> CacheFuture<'a, Option<CachedValue>> {
        self.inner.get(key)
    }

    fn put<'a>(&'a self, key: &'a str, value: CachedValue, ttl: Duration) -> CacheFuture<'a, ()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        if self.refuse.load(Ordering::SeqCst) {
            return Box::pin(async { Err(CacheError::new("refused")) });
        }
        self.inner.put(key, value, ttl)
    }

    fn kind(&self) -> &'static str {
        "counting"
    }
}

async fn pool_on_a_file(dir: &tempfile::TempDir, cache: &Counting) -> ProtectedPool<Sqlite> {
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("cache-stores.db"))
        .create_if_missing(true);
    let pool = ProtectedPool::sqlite()
        .primary_with("primary", options)
        .cache(cache.clone())
        .build()
        .expect("valid configuration");
    for sql in [
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        "INSERT INTO users (id, name) VALUES (1, 'Ada'), (2, 'Grace')",
    ] {
        pool.write(sqlx::query(sql)).execute().await.expect(sql);
    }
    pool
}

fn name_of(
    id: i64,
) -> sqlx::query::QueryScalar<'static, Sqlite, String, sqlx::sqlite::SqliteArguments> {
    sqlx::query_scalar("SELECT name FROM users WHERE id = ?").bind(id)
}

const LONG: Duration = Duration::from_secs(600);

#[tokio::test]
async fn the_same_result_again_soon_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Counting::default();
    let pool = pool_on_a_file(&dir, &cache).await;
    for _ in 0..20 {
        let name = pool
            .read(name_of(1))
            .cached("user:1", LONG)
            .fetch_one()
            .await;
        assert_eq!(*name.expect("read"), "Ada");
    }
    assert_eq!(cache.puts(), 1, "20 reads of one unchanged row");

    // A changed row is stored at once, and is what the cache serves when the database is
    // away.
    pool.write(sqlx::query("UPDATE users SET name = 'Ada L.' WHERE id = 1"))
        .execute()
        .await
        .expect("update");
    let name = pool
        .read(name_of(1))
        .cached("user:1", LONG)
        .fetch_one()
        .await;
    assert_eq!(*name.expect("read"), "Ada L.");
    assert_eq!(cache.puts(), 2, "the changed row");
    pool.force_open(Route::Read, "primary").unwrap();
    let served = pool
        .read(name_of(1))
        .cached("user:1", LONG)
        .fetch_one()
        .await
        .expect("served from the cache");
    assert!(
        matches!(served.source(), Source::Cache { .. }),
        "{served:?}"
    );
    assert_eq!(*served, "Ada L.");
}

#[tokio::test]
async fn another_key_ttl_or_route_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Counting::default();
    let pool = pool_on_a_file(&dir, &cache).await;
    let read = |key: &'static str, ttl| pool.read(name_of(2)).cached(key, ttl).fetch_one();
    // The same key on the auth route, and as another result type (a list of one name).
    let others = || async {
        let auth = pool.auth(name_of(2)).cached("a", LONG).fetch_one().await;
        assert_eq!(*auth.unwrap(), "Grace");
        let list = pool.read(name_of(2)).cached("a", LONG).fetch_all().await;
        assert_eq!(*list.unwrap(), ["Grace"]);
    };
    read("a", LONG).await.unwrap();
    read("b", LONG).await.unwrap();
    read("a", LONG * 2).await.unwrap();
    others().await;
    assert_eq!(cache.puts(), 5);
    // The last three and the other key again: nothing new.
    read("a", LONG * 2).await.unwrap();
    read("b", LONG).await.unwrap();
    others().await;
    assert_eq!(cache.puts(), 5);
    // The first again: the entry under "a" was since stored with the other TTL, so this one
    // replaces it.
    read("a", LONG).await.unwrap();
    assert_eq!(cache.puts(), 6);
}

#[tokio::test]
async fn a_store_the_cache_refused_is_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Counting::default();
    let pool = pool_on_a_file(&dir, &cache).await;
    cache.refuse.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let name = pool
            .read(name_of(1))
            .cached("user:1", LONG)
            .fetch_one()
            .await;
        assert_eq!(*name.expect("a refused store never fails the read"), "Ada");
    }
    assert_eq!(cache.puts(), 3, "every refused store is tried again");
    cache.refuse.store(false, Ordering::SeqCst);
    pool.read(name_of(1))
        .cached("user:1", LONG)
        .fetch_one()
        .await
        .unwrap();
    pool.read(name_of(1))
        .cached("user:1", LONG)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(cache.puts(), 4, "stored once taken");
}

#[tokio::test]
async fn the_same_result_is_stored_again_once_a_hundredth_of_its_ttl_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Counting::default();
    let pool = pool_on_a_file(&dir, &cache).await;
    // A 2 s TTL: stored again 20 ms after (less a clock tick).
    let ttl = Duration::from_secs(2);
    pool.read(name_of(1))
        .cached("user:1", ttl)
        .fetch_one()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    pool.read(name_of(1))
        .cached("user:1", ttl)
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(cache.puts(), 2);

    // A 100 ms TTL: its hundredth, 1 ms, is not longer than the coarse clock's tick (1 ms or
    // more), so every result is stored.
    let short = Duration::from_millis(100);
    for _ in 0..3 {
        pool.read(name_of(2))
            .cached("user:2", short)
            .fetch_one()
            .await
            .unwrap();
    }
    assert_eq!(cache.puts(), 5);
}
