//! `RedisCache` against a real `redis-server` that the tests start, kill and restart: values
//! round-trip with their storage time, expire, stay apart under different key prefixes; and
//! Redis being down (killed, or not yet started) costs a `get` no more than its timeout, a `put`
//! nothing, and no rebuild of the cache once Redis is back. With a pool on a real PostgreSQL
//! server: a cached read succeeds from the database while Redis is down, and is served stale
//! from Redis while the database is down.
//!
//! Needs `redis-server` (Debian package `redis-server`) and the PostgreSQL server binaries;
//! without them the tests fail. Timing assertions are generous sanity bounds, not measurements.
#![cfg(feature = "redis")]

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use protected_pool::cache::{Cache, CachedValue, RedisCache};
use protected_pool::{EndpointOptions, Postgres, ProtectedPool, Served, Source};
use protected_pool_testkit::PgServer;

#[path = "support/redis.rs"]
mod redis_support;
use redis_support::RedisServer;

/// Longest any single cache call may take before we call it a hang (the cache's own timeout
/// is 200 ms).
const HANG_GUARD: Duration = Duration::from_secs(5);
/// Longest a pool call may take in these tests (connecting to a killed database included).
const POOL_HANG_GUARD: Duration = Duration::from_secs(15);
/// How long a condition that depends on a background write or a reconnection may take.
const EVENTUALLY: Duration = Duration::from_secs(15);

/// A value stored at a whole millisecond, which is what the cache keeps.
fn value(payload: &str) -> CachedValue {
    CachedValue::stored_at(
        payload.as_bytes().to_vec(),
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
    )
}

/// Awaits `call`, failing the test instead of hanging if it takes longer than [`HANG_GUARD`].
async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for {HANG_GUARD:?}"))
}

/// Retries `check` every 25 ms until it returns `Some`, for at most [`EVENTUALLY`].
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {EVENTUALLY:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The value under `key` once the background write of a `put` has landed.
async fn stored(cache: &RedisCache, key: &str) -> CachedValue {
    eventually(&format!("the write of {key:?}"), || async {
        bounded("get", cache.get(key)).await.ok().flatten()
    })
    .await
}

/// Puts `value` and reads it back, once; `true` if that worked.
async fn round_trip(cache: &RedisCache, key: &str, value: &CachedValue) -> bool {
    if bounded(
        "put",
        cache.put(key, value.clone(), Duration::from_secs(60)),
    )
    .await
    .is_err()
    {
        return false;
    }
    // The write is in the background: give it a moment to land.
    for _ in 0..10 {
        if let Ok(Some(found)) = bounded("get", cache.get(key)).await {
            return &found == value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A plain connection to `server`, to look at what the cache wrote.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("a plain connection to the test server")
}

async fn exists(server: &RedisServer, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<bool>(&mut raw(server).await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_then_get_returns_the_value_with_its_storage_time() {
    let server = RedisServer::start();
    let cache = RedisCache::connect(&server.url()).unwrap();
    assert_eq!(cache.kind(), "redis");

    assert_eq!(
        bounded("get", cache.get("nothing-here")).await.unwrap(),
        None
    );

    let original = value(r#"{"id":7,"name":"widget"}"#);
    bounded(
        "put",
        cache.put("item:7", original.clone(), Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let back = stored(&cache, "item:7").await;
    assert_eq!(back, original);
    assert_eq!(back.stored_at_time(), original.stored_at_time());
    assert_eq!(back.payload(), original.payload());

    // A fresh value's age comes back near zero, not skewed by the encoding.
    let now = CachedValue::new(b"[]".to_vec());
    bounded("put", cache.put("fresh", now, Duration::from_secs(60)))
        .await
        .unwrap();
    let fresh = stored(&cache, "fresh").await;
    assert!(
        fresh.age() < Duration::from_secs(5),
        "age {:?}",
        fresh.age()
    );
    assert!(fresh.stored_at_time() <= SystemTime::now());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_expire_after_their_ttl() {
    let server = RedisServer::start();
    let cache = RedisCache::connect(&server.url()).unwrap();

    bounded(
        "put",
        cache.put("short", value("1"), Duration::from_millis(400)),
    )
    .await
    .unwrap();
    bounded(
        "put",
        cache.put("long", value("2"), Duration::from_secs(60)),
    )
    .await
    .unwrap();
    stored(&cache, "short").await;
    stored(&cache, "long").await;

    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(bounded("get", cache.get("short")).await.unwrap(), None);
    assert_eq!(
        bounded("get", cache.get("long")).await.unwrap(),
        Some(value("2"))
    );

    // Redis holds the expiry itself, so every process sharing it sees the same.
    let pttl: i64 = redis::cmd("PTTL")
        .arg("protected-pool:long")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert!((50_000..=60_000).contains(&pttl), "PTTL {pttl}");

    // A zero TTL is sent as the shortest Redis accepts, not refused.
    bounded("put", cache.put("zero", value("3"), Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bounded("get", cache.get("zero")).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_prefixes_keep_caches_on_one_server_apart() {
    let server = RedisServer::start();
    let default = RedisCache::connect(&server.url()).unwrap();
    let orders = RedisCache::builder()
        .key_prefix("orders:")
        .connect(&server.url())
        .unwrap();
    let billing = RedisCache::builder()
        .key_prefix("billing:")
        .connect(&server.url())
        .unwrap();

    bounded(
        "put",
        orders.put("k", value("orders"), Duration::from_secs(60)),
    )
    .await
    .unwrap();
    bounded(
        "put",
        default.put("k", value("default"), Duration::from_secs(60)),
    )
    .await
    .unwrap();
    assert_eq!(stored(&orders, "k").await, value("orders"));
    assert_eq!(stored(&default, "k").await, value("default"));
    assert_eq!(bounded("get", billing.get("k")).await.unwrap(), None);

    assert!(exists(&server, "orders:k").await);
    assert!(exists(&server, "protected-pool:k").await);
    assert!(!exists(&server, "k").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_fails_within_the_timeout_while_redis_is_killed() {
    let server = RedisServer::start();
    let cache = RedisCache::connect(&server.url()).unwrap();
    assert!(round_trip(&cache, "k", &value("1")).await);

    server.kill();
    // The first call meets the dead connection, the next ones the reconnection in progress:
    // each must come back with an error, none may wait for Redis.
    for attempt in 0..5 {
        let error = bounded("get while Redis is down", cache.get("k"))
            .await
            .expect_err("Redis is down");
        let message = error.to_string();
        assert!(message.contains("redis"), "attempt {attempt}: {message}");
        assert!(
            message.contains("timed out") || message.contains("failed"),
            "attempt {attempt}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_returns_at_once_while_redis_is_down_and_counts_the_failed_write() {
    let metrics = recorder();
    let server = RedisServer::start();
    // A long timeout: a put that waited for its write would take it, at least.
    let cache = RedisCache::builder()
        .timeout(Duration::from_secs(2))
        .connect(&server.url())
        .unwrap();
    assert!(round_trip(&cache, "k", &value("1")).await);
    server.kill();

    const PUTS: u64 = 50;
    let started = Instant::now();
    for n in 0..PUTS {
        bounded(
            "put",
            cache.put(&format!("k{n}"), value("2"), Duration::from_secs(60)),
        )
        .await
        .expect("a put does not report the background write");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "{PUTS} puts took {took:?}");

    // Every write fails in the background (within its timeout), without a panic, and is
    // counted. Other tests in this binary may add to the counter, never as many.
    let mut failed = 0;
    eventually("the failed writes counted", || {
        failed += put_errors(metrics);
        std::future::ready((failed >= PUTS).then_some(()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_again_after_redis_restarts_without_a_new_cache() {
    let server = RedisServer::start();
    // Reconnection attempts at most 100 ms apart: they give up within about a second, so the
    // outage below outlasts one round of them.
    let cache = RedisCache::builder()
        .max_reconnect_delay(Duration::from_millis(100))
        .connect(&server.url())
        .unwrap();
    assert!(round_trip(&cache, "k", &value("before")).await);

    server.kill();
    assert!(bounded("get", cache.get("k")).await.is_err());
    bounded(
        "put",
        cache.put("k", value("lost"), Duration::from_secs(60)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(bounded("get", cache.get("k")).await.is_err());

    server.start_again();
    eventually("a round trip after the restart", || async {
        round_trip(&cache, "k", &value("after")).await.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_built_while_redis_is_down_works_once_redis_starts() {
    let server = RedisServer::unstarted();
    let cache = RedisCache::connect(&server.url()).expect("built without a server");

    let error = bounded("get before Redis starts", cache.get("k"))
        .await
        .expect_err("nothing listens yet");
    assert!(error.to_string().contains("redis"), "{error}");
    bounded(
        "put before Redis starts",
        cache.put("k", value("early"), Duration::from_secs(60)),
    )
    .await
    .unwrap();

    server.start_again();
    eventually("a round trip once Redis is up", || async {
        round_trip(&cache, "k", &value("late")).await.then_some(())
    })
    .await;
}

/// A pool on `pg` whose cached reads keep their results in `cache`.
fn pool_with(pg: &PgServer, cache: RedisCache) -> ProtectedPool {
    ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            connect_timeout: Duration::from_secs(2),
            ..EndpointOptions::default()
        })
        .cache(cache)
        .build()
        .expect("a valid pool configuration")
}

/// The cached read of the pool tests: item 7's name, kept for a minute.
async fn item_name(pool: &ProtectedPool) -> protected_pool::Result<Served<String>> {
    let read = pool
        .read(sqlx::query_scalar::<_, String>("SELECT 'widget-' || $1::text").bind(7_i64))
        .cached("item:7:name", Duration::from_secs(60))
        .fetch_one();
    tokio::time::timeout(POOL_HANG_GUARD, read)
        .await
        .unwrap_or_else(|_| panic!("a cached read hung for {POOL_HANG_GUARD:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_read_is_served_by_the_database_while_redis_is_down() {
    let pg = PgServer::start().await.expect("start PostgreSQL");
    let redis = RedisServer::start();
    let pool = pool_with(&pg, RedisCache::connect(&redis.url()).unwrap());
    redis.kill();

    // Storing the result fails in the background; the read does not notice.
    for _ in 0..3 {
        let served = item_name(&pool).await.expect("the database can serve");
        assert_eq!(*served, "widget-7");
        assert!(!served.is_stale(), "{:?}", served.source());
        assert_eq!(served.age(), None);
        assert_eq!(served.endpoint(), Some("primary"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_read_is_served_stale_from_redis_once_the_database_is_killed() {
    let pg = PgServer::start().await.expect("start PostgreSQL");
    let redis = RedisServer::start();
    let cache = RedisCache::connect(&redis.url()).unwrap();
    let pool = pool_with(&pg, cache.clone());

    let fresh = item_name(&pool).await.expect("the database can serve");
    assert_eq!(*fresh, "widget-7");
    assert!(!fresh.is_stale());
    // The write to Redis is in the background: wait until it has landed. The pool scopes the
    // call's key by route and result type.
    let key = format!("read:{}:item:7:name", std::any::type_name::<String>());
    let stored = stored(&cache, &key).await;
    assert_eq!(stored.payload(), br#""widget-7""#);

    pg.kill9().await.expect("kill -9");
    let stale = item_name(&pool).await.expect("served from Redis");
    assert_eq!(*stale, "widget-7");
    assert!(stale.is_stale(), "{:?}", stale.source());
    assert!(matches!(stale.source(), Source::Cache { .. }));
    let age = stale.age().expect("a cached value has an age");
    assert!(age < Duration::from_secs(60), "age {age:?}");
    let cause = stale.cause().expect("why the database did not answer");
    assert!(cause.is_unavailable(), "{cause}");

    // The value is in Redis, not in this pool: another process's pool, on its own connection
    // to Redis and with the database down from the start, serves it too.
    let other = pool_with(&pg, RedisCache::connect(&redis.url()).unwrap());
    let shared = item_name(&other).await.expect("served from Redis");
    assert_eq!(*shared, "widget-7");
    assert!(shared.is_stale());

    // Without the cache the same read fails: the value above came from Redis.
    let uncached = pool
        .read(sqlx::query_scalar::<_, String>("SELECT 'widget-' || $1::text").bind(7_i64))
        .fetch_one()
        .await;
    assert!(uncached.is_err(), "the database is down");
}

/// The debugging recorder of this test binary, installed on first use.
fn recorder() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this binary");
        snapshotter
    })
}

/// Failed background writes counted since the last call (the recorder resets counters as it
/// reads them).
fn put_errors(snapshotter: &Snapshotter) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            let key = key.key();
            key.name() == "protected_pool_cache_errors_total"
                && key
                    .labels()
                    .any(|label| label.key() == "cache" && label.value() == "redis")
                && key
                    .labels()
                    .any(|label| label.key() == "operation" && label.value() == "put")
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(count) => count,
            other => panic!("not a counter: {other:?}"),
        })
        .sum()
}
