//! A [`Cache`] on Redis, shared by every process that points at the same server.
//!
//! The connection is a [`redis::aio::ConnectionManager`]: one multiplexed connection that
//! reconnects by itself after the server goes away. It is created on first use, without
//! waiting for the server, so a pool whose Redis is down still starts, and the cache starts
//! working once Redis is up, without building it again.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::runtime::Handle;

use super::{Cache, CacheError, CacheFuture, CachedValue};
use crate::telemetry;

/// The value of the `cache` label in metrics and of [`Cache::kind`].
const KIND: &str = "redis";
/// At most one warning about failed background writes per this interval; the others are
/// logged at debug level and counted in the next warning.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// The longest expiry sent to Redis, in milliseconds: Redis refuses an expiry that overflows
/// a signed 64-bit count of milliseconds when added to the current time.
const MAX_TTL_MILLIS: u64 = i64::MAX as u64 / 2;

/// A [`Cache`] on a Redis server (or Valkey, or anything speaking RESP).
///
/// Values are stored with `SET key value PX ttl` under the key prefix (default
/// `"protected-pool:"`) followed by the read's key, as [`CachedValue::to_bytes`] encodes them.
///
/// Redis being down never holds anything up for longer than the operation timeout (default
/// 200 ms):
///
/// - [`get`](Cache::get) waits at most the timeout and fails with a [`CacheError`] (a miss, to
///   the pool) when Redis is unreachable, slow, or answers with an error;
/// - [`put`](Cache::put) does not wait at all: it sends the write from a task of its own,
///   bounded by the timeout, and returns. A failed write is counted in
///   `protected_pool_cache_errors_total{cache="redis", operation="put"}` and logged: a warning
///   at most every 10 seconds, so that an outage does not flood the logs, and a debug event
///   for each of the others.
///
/// Building one does not contact the server. The connection is made on first use and remade
/// in the background after it breaks. Operations need a Tokio runtime; without one they fail
/// with a [`CacheError`] (they do not panic).
///
/// Cloning is cheap: clones share the connection.
///
/// ```no_run
/// # fn demo() -> Result<(), protected_pool::cache::CacheError> {
/// use std::time::Duration;
/// use protected_pool::cache::RedisCache;
///
/// let cache = RedisCache::builder()
///     .key_prefix("orders-api:")
///     .timeout(Duration::from_millis(100))
///     .connect("redis://:secret@cache.internal:6379/2")?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Created on first use, inside the runtime that runs it.
    manager: OnceLock<ConnectionManager>,
    key_prefix: String,
    timeout: Duration,
    warnings: WarnLimiter,
}

impl RedisCache {
    /// A cache on the server at `url` with the default settings (see
    /// [`builder`](Self::builder)).
    ///
    /// `url` is `redis://[[user]:password@]host[:port][/db]` (or `redis+unix:///path?db=N`).
    /// Nothing is sent to the server yet, so this succeeds while Redis is down; only a URL that
    /// does not parse is an error, and the error does not contain the URL.
    pub fn connect(url: &str) -> Result<Self, CacheError> {
        Self::builder().connect(url)
    }

    /// Settings for a cache, finished with `.connect(url)`:
    ///
    /// | setting | default | |
    /// |---|---|---|
    /// | `key_prefix` | `"protected-pool:"` | prepended to every key |
    /// | `timeout` | 200 ms | the longest a `get`, or the background write of a `put`, takes |
    /// | `connection_timeout` | 1 s | one attempt to connect |
    /// | `response_timeout` | 500 ms | the connection's wait for one reply |
    /// | `max_reconnect_delay` | 1 s | the longest pause between attempts to reconnect |
    pub fn builder() -> RedisCacheBuilder {
        RedisCacheBuilder::default()
    }

    /// The prefix of every key this cache writes.
    pub fn key_prefix(&self) -> &str {
        &self.inner.key_prefix
    }

    /// How long one operation may take.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn redis_key(&self, key: &str) -> String {
        let prefix = &self.inner.key_prefix;
        let mut redis_key = String::with_capacity(prefix.len() + key.len());
        redis_key.push_str(prefix);
        redis_key.push_str(key);
        redis_key
    }

    async fn fetch(&self, key: &str) -> Result<Option<CachedValue>, CacheError> {
        let (_, mut connection) = self.inner.connection("GET")?;
        let mut command = redis::cmd("GET");
        command.arg(self.redis_key(key));
        let bytes = run(
            "GET",
            self.inner.timeout,
            command.query_async::<Option<Vec<u8>>>(&mut connection),
        )
        .await?;
        bytes.as_deref().map(CachedValue::from_bytes).transpose()
    }

    fn store(&self, key: &str, value: &CachedValue, ttl: Duration) -> Result<(), CacheError> {
        let (runtime, mut connection) = self.inner.connection("SET")?;
        let mut command = redis::cmd("SET");
        command
            .arg(self.redis_key(key))
            .arg(value.to_bytes())
            .arg("PX")
            .arg(ttl_millis(ttl));
        let inner = Arc::clone(&self.inner);
        // The task ends within the timeout whatever Redis does, so puts cannot pile up tasks
        // for longer than that.
        drop(runtime.spawn(async move {
            let written = run(
                "SET",
                inner.timeout,
                command.query_async::<()>(&mut connection),
            )
            .await;
            if let Err(error) = written {
                inner.write_failed(&error);
            }
        }));
        Ok(())
    }
}

impl Inner {
    /// The current runtime and a handle on the shared connection, creating the manager on
    /// first use.
    ///
    /// The runtime is checked first: timeouts, the background writes and the manager's
    /// reconnection tasks need one, and off one they would panic. The manager is lazy:
    /// creating it sends nothing, and the first command waits for the connection (bounded by
    /// the caller's timeout). Two first uses racing may both create one; the loser is dropped
    /// unused.
    fn connection(&self, command: &str) -> Result<(Handle, ConnectionManager), CacheError> {
        let runtime = Handle::try_current().map_err(|_| no_runtime(command))?;
        if let Some(manager) = self.manager.get() {
            return Ok((runtime, manager.clone()));
        }
        let manager =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
                .map_err(|error| {
                    CacheError::with_source(
                        format!("redis {command}: cannot set up the connection: {error}"),
                        error,
                    )
                })?;
        Ok((runtime, self.manager.get_or_init(|| manager).clone()))
    }

    /// Counts and logs a background write that failed.
    fn write_failed(&self, error: &CacheError) {
        telemetry::cache_error(KIND, "put");
        match self.warnings.admit() {
            Some(0) => tracing::warn!(
                cache = KIND,
                %error,
                "a background cache write failed; the value was not stored"
            ),
            Some(suppressed) => tracing::warn!(
                cache = KIND,
                %error,
                suppressed,
                "a background cache write failed; the value was not stored \
                 ({suppressed} more failed since the last warning)"
            ),
            None => tracing::debug!(cache = KIND, %error, "a background cache write failed"),
        }
    }
}

/// Runs one command, bounded by `timeout`, and describes its failure.
async fn run<T>(
    command: &str,
    timeout: Duration,
    query: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, CacheError> {
    match tokio::time::timeout(timeout, query).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(CacheError::with_source(
            format!("redis {command} failed: {error}"),
            error,
        )),
        Err(_) => Err(CacheError::new(format!(
            "redis {command} timed out after {timeout:?}"
        ))),
    }
}

fn no_runtime(command: &str) -> CacheError {
    CacheError::new(format!(
        "redis {command}: not called from a Tokio runtime, which the connection needs"
    ))
}

/// `ttl` in whole milliseconds for `PX`: at least 1 (Redis refuses 0), at most
/// [`MAX_TTL_MILLIS`].
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_TTL_MILLIS)
}

impl fmt::Debug for RedisCache {
    // The address and database only: the URL's user name and password stay out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.inner.client.get_connection_info();
        f.debug_struct("RedisCache")
            .field("addr", &format_args!("{}", info.addr()))
            .field("db", &info.redis_settings().db())
            .field("key_prefix", &self.inner.key_prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl Cache for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> CacheFuture<'a, Option<CachedValue>> {
        Box::pin(self.fetch(key))
    }

    fn put<'a>(&'a self, key: &'a str, value: CachedValue, ttl: Duration) -> CacheFuture<'a, ()> {
        Box::pin(async move { self.store(key, &value, ttl) })
    }

    fn kind(&self) -> &'static str {
        KIND
    }
}

/// Settings of a [`RedisCache`].
///
/// ```no_run
/// # fn demo() -> Result<(), protected_pool::cache::CacheError> {
/// use std::time::Duration;
/// use protected_pool::cache::RedisCache;
///
/// let cache = RedisCache::builder()
///     .key_prefix("billing:")
///     .timeout(Duration::from_millis(50))
///     .connection_timeout(Duration::from_millis(500))
///     .connect("redis://127.0.0.1:6379")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisCacheBuilder {
    key_prefix: String,
    timeout: Duration,
    connection_timeout: Duration,
    response_timeout: Duration,
    max_reconnect_delay: Duration,
}

impl Default for RedisCacheBuilder {
    fn default() -> Self {
        Self {
            key_prefix: "protected-pool:".to_owned(),
            timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(500),
            max_reconnect_delay: Duration::from_secs(1),
        }
    }
}

impl RedisCacheBuilder {
    /// Prepended to every key (default `"protected-pool:"`), so that several applications
    /// or environments can share a server without reading each other's values.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// How long a `get`, or the background write of a `put`, may take (default 200 ms),
    /// connecting included. Past it, a `get` fails (a miss) and a write is abandoned.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long one attempt to connect may take (default 1 s). Connecting happens in the
    /// background of the operations, which stop waiting after [`timeout`](Self::timeout).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long the connection waits for a reply before failing the command (default
    /// 500 ms). Operations stop waiting after [`timeout`](Self::timeout) regardless.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The longest pause between attempts to reconnect (default 1 s). After a lost
    /// connection, attempts start 100 ms apart and double up to this, so a server that comes
    /// back is found within about this long while the cache is in use. An idle cache does
    /// not reconnect until its next operation.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// The cache on the server at `url` (see [`RedisCache::connect`]). Sends nothing: fails
    /// only if `url` does not parse, with an error that does not contain the URL.
    pub fn connect(self, url: &str) -> Result<RedisCache, CacheError> {
        let client = redis::Client::open(url).map_err(|error| {
            // The parser's messages describe what is wrong without quoting the URL.
            CacheError::with_source(format!("invalid Redis URL: {error}"), error)
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_max_delay(self.max_reconnect_delay);
        Ok(RedisCache {
            inner: Arc::new(Inner {
                client,
                config,
                manager: OnceLock::new(),
                key_prefix: self.key_prefix,
                timeout: self.timeout,
                warnings: WarnLimiter::new(WARN_INTERVAL),
            }),
        })
    }
}

/// Admits one warning per interval and counts the ones it turns down.
struct WarnLimiter {
    started: Instant,
    interval_millis: u64,
    /// Milliseconds since `started` before which no warning is admitted.
    next_millis: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnLimiter {
    fn new(interval: Duration) -> Self {
        Self {
            started: Instant::now(),
            interval_millis: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            next_millis: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(turned down since the last admitted one)` if a warning may be logged now.
    fn admit(&self) -> Option<u64> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_millis.load(Ordering::Relaxed);
        let admitted = now >= next
            && self
                .next_millis
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_millis),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        if admitted {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Pa55";

    #[test]
    fn ttl_is_sent_in_whole_milliseconds_at_least_one() {
        assert_eq!(ttl_millis(Duration::from_secs(3)), 3_000);
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::from_micros(10)), 1);
        assert_eq!(ttl_millis(Duration::MAX), MAX_TTL_MILLIS);
    }

    #[test]
    fn builds_without_a_runtime_or_a_server() {
        // Port 1: nothing listens there, and nothing is sent yet.
        let cache = RedisCache::connect("redis://127.0.0.1:1/3").unwrap();
        assert_eq!(cache.kind(), "redis");
        assert_eq!(cache.key_prefix(), "protected-pool:");
        assert_eq!(cache.timeout(), Duration::from_millis(200));
        let debug = format!("{cache:?}");
        assert!(
            debug.contains("127.0.0.1:1") && debug.contains("db: 3"),
            "{debug}"
        );
    }

    #[test]
    fn debug_leaves_out_the_credentials() {
        let cache =
            RedisCache::connect(&format!("redis://app:{SECRET}@cache.example:6380/1")).unwrap();
        let debug = format!("{cache:?}");
        assert!(!debug.contains(SECRET) && !debug.contains("app"), "{debug}");
        assert!(debug.contains("cache.example:6380"), "{debug}");
    }

    #[test]
    fn a_bad_url_is_an_error_without_the_url() {
        for url in [
            format!("http://app:{SECRET}@cache.example"),
            format!("redis://app:{SECRET}@cache.example/not-a-db"),
            format!("not a url {SECRET}"),
        ] {
            let error = RedisCache::connect(&url).unwrap_err();
            let text = format!("{error} {error:?}");
            assert!(!text.contains(SECRET), "{text}");
            assert!(text.contains("invalid Redis URL"), "{text}");
        }
    }

    #[test]
    fn operations_off_a_runtime_fail_instead_of_panicking() {
        let cache = RedisCache::connect("redis://127.0.0.1:1").unwrap();
        let value = CachedValue::new(b"1".to_vec());
        let put = futures_executor_block_on(cache.put("k", value, Duration::from_secs(1)));
        assert!(put.unwrap_err().to_string().contains("Tokio runtime"));
        let get = futures_executor_block_on(cache.get("k"));
        assert!(get.unwrap_err().to_string().contains("Tokio runtime"));
    }

    /// Polls a future that must finish at its first poll.
    fn futures_executor_block_on<T>(future: impl Future<Output = T>) -> T {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => panic!("the operation waited instead of failing"),
        }
    }

    #[test]
    fn warnings_are_admitted_once_per_interval_and_count_the_rest() {
        let limiter = WarnLimiter::new(Duration::from_secs(3600));
        assert_eq!(limiter.admit(), Some(0));
        assert_eq!(limiter.admit(), None);
        assert_eq!(limiter.admit(), None);
        assert_eq!(limiter.suppressed.load(Ordering::Relaxed), 2);

        let limiter = WarnLimiter::new(Duration::ZERO);
        assert_eq!(limiter.admit(), Some(0));
        assert_eq!(limiter.admit(), Some(0));
    }
}
