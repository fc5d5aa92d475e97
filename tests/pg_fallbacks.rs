//! Cache and caller fallbacks against a real PostgreSQL server that is killed: the order is
//! endpoints, cache, the call's fallback, the route's fallback, error; query errors never
//! fall back; the cache never counts against a breaker.

use std::time::Duration;

use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::{ErrorClass, Postgres, ProtectedPool, Route, Served, Source};
use protected_pool_testkit::PgServer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
struct User {
    id: i64,
    name: String,
}

/// A breaker that opens on the first failure and stays open for the whole test.
fn strict(config: BreakerConfig) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(1),
        open: OpenDuration {
            base: Duration::from_secs(60),
            max: Duration::from_secs(60),
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..config
    }
}

async fn pool_on(server: &PgServer) -> ProtectedPool<Postgres> {
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(server.url())
        .breaker(Route::Read, strict(BreakerConfig::read()))
        .breaker(Route::Write, strict(BreakerConfig::write()))
        .timeout(Route::Read, Duration::from_secs(2))
        .recovery_probes(false)
        // Counts stand in for any count read while the database is away.
        .fallback(Route::Read, |context| {
            context
                .sql
                .is_some_and(|sql| sql.contains("count(*)"))
                .then_some(-1_i64)
        })
        .connect()
        .await
        .expect("connect");
    for statement in [
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)",
        "INSERT INTO users VALUES (1, 'Ada'), (2, 'Grace')",
    ] {
        pool.write(sqlx::query(statement))
            .execute()
            .await
            .expect("schema");
    }
    pool
}

fn user_query(
    id: i64,
) -> sqlx::query::QueryAs<'static, Postgres, User, sqlx::postgres::PgArguments> {
    sqlx::query_as("SELECT id, name FROM users WHERE id = $1").bind(id)
}

const TTL: Duration = Duration::from_secs(600);

/// User 1, cached, with a fallback of its own.
async fn ada_or_nobody(pool: &ProtectedPool<Postgres>) -> protected_pool::Result<Served<User>> {
    let nobody = User {
        id: 0,
        name: "nobody".into(),
    };
    pool.read(user_query(1))
        .cached("user:1", TTL)
        .or_fallback(move |_| Some(nobody))
        .fetch_one()
        .await
}

async fn all_users(pool: &ProtectedPool<Postgres>) -> protected_pool::Result<Served<Vec<User>>> {
    pool.read(sqlx::query_as("SELECT id, name FROM users ORDER BY id"))
        .cached("users:all", TTL)
        .fetch_all()
        .await
}

/// A user that does not exist: `None` is cached like any answer.
async fn user_99(pool: &ProtectedPool<Postgres>) -> protected_pool::Result<Served<Option<User>>> {
    pool.read(user_query(99))
        .cached("user:99", TTL)
        .fetch_optional()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fall_back_in_order_when_the_database_is_down() {
    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server).await;
    let ttl = Duration::from_secs(600);

    // Up: answered by the database, and stored.
    let fresh = ada_or_nobody(&pool).await.expect("fresh read");
    assert!(!fresh.is_stale());
    assert_eq!(fresh.endpoint(), Some("primary"));
    assert_eq!(fresh.age(), None);
    assert_eq!(fresh.name, "Ada");
    let all = all_users(&pool).await.expect("fresh list");
    assert_eq!(all.len(), 2);
    // A miss on a row that does not exist is cached as such.
    let missing = user_99(&pool).await.expect("fresh miss");
    assert_eq!(*missing, None);

    tokio::time::sleep(Duration::from_millis(20)).await;
    server.kill9().await.expect("kill -9");

    // 1. The cache: the same value as before, marked stale, with its age and the cause.
    let cached = ada_or_nobody(&pool).await.expect("served from the cache");
    assert!(cached.is_stale());
    assert_eq!(*cached, *fresh, "the cache wins over the call's fallback");
    assert!(cached.age().expect("a cached value has an age") >= Duration::from_millis(20));
    assert!(cached.cause().expect("cause").is_unavailable());
    assert!(matches!(cached.source(), Source::Cache { .. }));
    let list = all_users(&pool).await.expect("list from the cache");
    assert_eq!(*list, *all);
    let missing = user_99(&pool).await.expect("the cached miss");
    assert!(missing.is_stale());
    assert_eq!(*missing, None);
    assert_eq!(
        pool.breaker(Route::Read, "primary").unwrap().state(),
        State::Open,
        "the first failure opened the read breaker"
    );

    // 2. Nothing cached under the key: the call's own fallback.
    let guest = pool
        .read(user_query(2))
        .cached("user:2", ttl)
        .or_fallback(|context| {
            assert_eq!(context.route, Route::Read);
            assert_eq!(context.key, Some("user:2"));
            assert!(context.error.is_circuit_open(), "{}", context.error);
            Some(User {
                id: 2,
                name: "guest".into(),
            })
        })
        .fetch_one()
        .await
        .expect("served by the call's fallback");
    assert!(guest.is_stale());
    assert!(matches!(guest.source(), Source::Fallback { .. }));
    assert_eq!(guest.name, "guest");

    // 3. The call's fallback declines: the route's fallback (for this result type).
    let count = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
        .or_fallback(|_| None)
        .fetch_one()
        .await
        .expect("served by the route's fallback");
    assert_eq!(*count, -1);
    // Plain reads get the route's fallback too, without knowing it (metrics and traces do).
    let plain: i64 = pool
        .read(sqlx::query_scalar(
            "SELECT count(*) FROM users WHERE id > 0",
        ))
        .fetch_one()
        .await
        .expect("route fallback for a plain read");
    assert_eq!(plain, -1);

    // 4. Nothing to fall back on: the error, untouched.
    let error = pool
        .read(user_query(2))
        .cached("user:2", ttl)
        .fetch_one()
        .await
        .expect_err("no cache entry, no fallback");
    assert!(error.is_circuit_open(), "{error}");
    let error = pool
        .read(sqlx::query_scalar::<_, String>(
            "SELECT name FROM users LIMIT 1",
        ))
        .fetch_one()
        .await
        .expect_err("the route's fallback is for i64 counts only");
    assert!(error.is_unavailable(), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_and_missing_rows_never_fall_back() {
    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server).await;
    let ttl = Duration::from_secs(600);
    pool.read(user_query(1))
        .cached("user:1", ttl)
        .fetch_one()
        .await
        .expect("stored");

    // The server is up and says the row is not there: that is the answer.
    let error = pool
        .read(user_query(42))
        .cached("user:1", ttl)
        .or_fallback(|_| {
            Some(User {
                id: 0,
                name: "fallback".into(),
            })
        })
        .fetch_one()
        .await
        .expect_err("no row is not an outage");
    assert_eq!(error.class(), Some(ErrorClass::Query));
    assert!(matches!(error.as_sqlx(), Some(sqlx::Error::RowNotFound)));

    // A syntax error is the caller's bug, not a reason to show old data.
    let error = pool
        .read(sqlx::query_as::<_, User>("SELEC id, name FROM users"))
        .cached("user:1", ttl)
        .or_fallback(|_| {
            Some(User {
                id: 0,
                name: "fallback".into(),
            })
        })
        .fetch_one()
        .await
        .expect_err("syntax error");
    assert_eq!(error.database_code().as_deref(), Some("42601"));

    // Count reads with bad SQL do not reach the route's fallback either.
    let error = pool
        .read(sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM no_such_table",
        ))
        .fetch_one()
        .await
        .expect_err("undefined table");
    assert_eq!(error.database_code().as_deref(), Some("42P01"));
    assert_eq!(
        pool.breaker(Route::Read, "primary").unwrap().state(),
        State::Closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_lookups_are_never_breaker_outcomes() {
    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server).await;
    let before = pool.breaker(Route::Read, "primary").unwrap().snapshot();
    for id in [1, 2, 1, 2] {
        pool.read(user_query(id))
            .cached(format!("user:{id}"), Duration::from_secs(600))
            .fetch_one()
            .await
            .expect("read");
    }
    let after = pool.breaker(Route::Read, "primary").unwrap().snapshot();
    assert_eq!(after.total_successes - before.total_successes, 4);
    assert_eq!(after.total_failures, before.total_failures);

    server.kill9().await.expect("kill -9");
    // The first read fails on the server (one breaker failure) and is served from the cache;
    // the rest are refused by the open breaker and served from the cache without a failure.
    for id in [1, 2, 1, 2] {
        let served = pool
            .read(user_query(id))
            .cached(format!("user:{id}"), Duration::from_secs(600))
            .fetch_one()
            .await
            .expect("from the cache");
        assert!(served.is_stale());
    }
    // A miss while down is not a failure either: still refused, still one failure.
    pool.read(user_query(3))
        .cached("user:3", Duration::from_secs(600))
        .fetch_one()
        .await
        .expect_err("cache miss while down");
    let down = pool.breaker(Route::Read, "primary").unwrap().snapshot();
    assert_eq!(down.total_failures - after.total_failures, 1);
    assert_eq!(down.total_rejected - after.total_rejected, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_is_not_served() {
    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server).await;
    pool.read(user_query(1))
        .cached("user:1", Duration::from_millis(100))
        .fetch_one()
        .await
        .expect("stored for 100 ms");
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9().await.expect("kill -9");
    let error = pool
        .read(user_query(1))
        .cached("user:1", Duration::from_millis(100))
        .fetch_one()
        .await
        .expect_err("expired: nothing to serve");
    assert!(error.is_unavailable(), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_fallback_is_told_whether_the_write_may_have_happened() {
    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server).await;
    server.kill9().await.expect("kill -9");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for _ in 0..2 {
        let seen = seen.clone();
        let served = pool
            .write(sqlx::query("INSERT INTO users VALUES (3, 'Edsger')"))
            .or_fallback(move |context| {
                seen.lock().unwrap().push((
                    context.error.is_circuit_open(),
                    context.error.is_outcome_unknown(),
                ));
                None
            })
            .execute()
            .await;
        assert!(served.is_err(), "the fallback declined");
    }
    let seen = seen.lock().unwrap().clone();
    // The first write went out on the pooled connection the server died under: it may have
    // run, and the fallback is told so. The second was refused by the breaker: it did not.
    assert_eq!(seen, [(false, true), (true, false)]);
}
