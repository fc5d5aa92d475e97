//! Async fallbacks against real PostgreSQL servers: a primary that is killed, and a second,
//! independent server standing in as a backup database. An async fallback serves like a sync
//! one; it has what is left of the call's timeout and is dropped after it; its failure never
//! hides the call's own error; a query error never runs it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::fallback::{FallbackPanicked, FallbackTimedOut};
use protected_pool::{
    Error, FallbackRequest, PoolBuilder, Postgres, ProtectedPool, Route, Source, telemetry,
};
use protected_pool_testkit::PgServer;

/// The read route's operation timeout: what an async fallback has, at most.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A pool on `server` with a `users` table holding `name` for user 1; `configure` adds
/// route fallbacks.
async fn pool_on(
    server: &PgServer,
    name: &str,
    configure: impl FnOnce(PoolBuilder<Postgres>) -> PoolBuilder<Postgres>,
) -> ProtectedPool<Postgres> {
    let builder = ProtectedPool::<Postgres>::builder()
        .primary(server.url())
        .breaker(Route::Read, strict(BreakerConfig::read()))
        .timeout(Route::Read, READ_TIMEOUT)
        .recovery_probes(false);
    let pool = configure(builder).connect().await.expect("connect");
    pool.write(sqlx::query(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)",
    ))
    .execute()
    .await
    .expect("schema");
    pool.write(sqlx::query("INSERT INTO users VALUES (1, $1)").bind(name.to_owned()))
        .execute()
        .await
        .expect("row");
    pool
}

const NAME_OF_1: &str = "SELECT name FROM users WHERE id = 1";

fn name_of_1() -> sqlx::query::QueryScalar<'static, Postgres, String, sqlx::postgres::PgArguments> {
    sqlx::query_scalar(NAME_OF_1)
}

/// The backup's answer to the SQL the call carried.
async fn ask(
    backup: &ProtectedPool<Postgres>,
    request: FallbackRequest,
) -> protected_pool::Result<Option<String>> {
    let sql = request.sql.expect("a query builder's call carries its SQL");
    backup
        .read(sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)))
        .fetch_optional()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_falls_back_on_a_backup_database() {
    let (server, backup_server) = tokio::join!(PgServer::start(), PgServer::start());
    let (server, backup_server) = (server.expect("server"), backup_server.expect("backup"));
    let pool = pool_on(&server, "Ada", |builder| builder).await;
    let backup = pool_on(&backup_server, "Ada (backup)", |builder| builder).await;
    let requests = Arc::new(Mutex::new(Vec::new()));
    let read = || {
        let (backup, requests) = (backup.clone(), requests.clone());
        pool.read(name_of_1())
            .or_fallback_async(move |request: FallbackRequest| async move {
                requests.lock().unwrap().push(request.clone());
                ask(&backup, request).await
            })
            .fetch_one()
    };

    let fresh = read().await.expect("the primary answers");
    assert_eq!(*fresh, "Ada");
    assert!(!fresh.is_stale());
    assert!(requests.lock().unwrap().is_empty(), "no fallback while up");

    server.kill9().await.expect("kill -9");
    // The connection dies under the call: unavailable, and the backup answers.
    let lost = read().await.expect("served by the backup");
    assert_eq!(*lost, "Ada (backup)");
    let Source::Fallback { cause } = lost.source() else {
        panic!("not a fallback's value: {:?}", lost.source());
    };
    assert!(
        cause.is_unavailable() && !cause.is_circuit_open(),
        "{cause}"
    );
    assert_eq!(
        pool.breaker(Route::Read, "primary").unwrap().state(),
        State::Open
    );
    // The breaker is open now: refused at once, and the backup answers again.
    let refused = read().await.expect("served by the backup");
    assert_eq!(*refused, "Ada (backup)");
    assert!(refused.is_stale());
    assert_eq!(refused.endpoint(), None);
    assert!(refused.cause().expect("cause").is_circuit_open());

    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    for (request, circuit_open) in requests.iter().zip([false, true]) {
        assert_eq!(request.route, Route::Read);
        assert_eq!(request.sql.as_deref(), Some(NAME_OF_1));
        assert_eq!(request.key, None);
        assert_eq!(request.cause.endpoint.as_deref(), Some("primary"));
        assert_eq!(
            request.cause.circuit_open, circuit_open,
            "{}",
            request.cause
        );
        assert!(!request.cause.message.is_empty());
        assert!(request.budget <= READ_TIMEOUT, "{:?}", request.budget);
    }
    // Refused without waiting: nearly the whole timeout is left for the fallback.
    assert!(
        requests[1].budget > READ_TIMEOUT / 2,
        "{:?}",
        requests[1].budget
    );
    assert!(requests[1].cause.retry_after.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_falls_back_on_a_backup_database() {
    let (server, backup_server) = tokio::join!(PgServer::start(), PgServer::start());
    let (server, backup_server) = (server.expect("server"), backup_server.expect("backup"));
    let backup = pool_on(&backup_server, "Ada (backup)", |builder| builder).await;
    let pool = pool_on(&server, "Ada", move |builder| {
        builder
            // Replaced by the async one below: one fallback per route and result type.
            .fallback(Route::Read, |_| Some("the sync fallback".to_owned()))
            .fallback_async(Route::Read, move |request| {
                let backup = backup.clone();
                async move { ask(&backup, request).await }
            })
            // Another result type keeps its own.
            .fallback(Route::Read, |_| Some(-1_i64))
    })
    .await;
    assert_eq!(pool.read(name_of_1()).fetch_one().await.unwrap(), "Ada");

    server.kill9().await.expect("kill -9");
    // A plain call gets the route's fallback.
    let name = pool.read(name_of_1()).fetch_one().await.expect("backup");
    assert_eq!(name, "Ada (backup)");
    // After the call's own, which declines.
    let served = pool
        .read(name_of_1())
        .or_fallback(|_| None)
        .fetch_one()
        .await
        .expect("backup");
    assert_eq!(*served, "Ada (backup)");
    assert!(matches!(served.source(), Source::Fallback { cause } if cause.is_circuit_open()));
    let count = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
        .fetch_one()
        .await
        .expect("the sync fallback for counts");
    assert_eq!(count, -1);
    // The backup has no such row: the fallback declines, and the call's error comes back.
    let error = pool
        .read(sqlx::query_scalar::<_, String>(
            "SELECT name FROM users WHERE id = 2",
        ))
        .fetch_one()
        .await
        .expect_err("nothing to serve");
    assert!(error.is_circuit_open(), "{error}");
    assert!(error.fallback_error().is_none(), "declining is not failing");
}

/// Sets its flag when dropped: whether a fallback's future was let go.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fallback_is_dropped_at_the_calls_deadline() {
    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server, "Ada", |builder| builder).await;
    server.kill9().await.expect("kill -9");
    pool.read(name_of_1())
        .fetch_one()
        .await
        .expect_err("opens the breaker");

    let dropped = Arc::new(AtomicBool::new(false));
    let flag = DropFlag(dropped.clone());
    let started = Instant::now();
    let error = pool
        .read(name_of_1())
        .or_fallback_async(move |_| async move {
            let _flag = flag;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::io::Error>(Some("too late".to_owned()))
        })
        .fetch_one()
        .await
        .expect_err("the fallback ran out of time");
    let elapsed = started.elapsed();

    // The call's own error, as without a fallback.
    assert!(error.is_circuit_open(), "{error}");
    assert!(error.is_unavailable());
    assert_eq!(error.endpoint(), Some("primary"));
    assert!(error.retry_after().is_some());
    assert!(
        matches!(&error, Error::FallbackFailed { cause, .. } if matches!(**cause, Error::CircuitOpen { .. }))
    );
    // Given about the route's timeout, no more.
    assert!(elapsed >= READ_TIMEOUT / 2, "{elapsed:?}");
    assert!(
        elapsed < READ_TIMEOUT + Duration::from_secs(3),
        "{elapsed:?}"
    );
    let failure = error.fallback_error().expect("the fallback's failure");
    let timed_out = failure
        .downcast_ref::<FallbackTimedOut>()
        .unwrap_or_else(|| panic!("not a timeout: {failure}"));
    assert!(timed_out.budget <= READ_TIMEOUT, "{:?}", timed_out.budget);
    assert!(
        error.to_string().contains("the fallback failed too"),
        "{error}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the fallback's future was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fallback_leaves_the_calls_error_whole() {
    // The only recorder of this test binary; only this test makes fallbacks fail with an error.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder");

    let server = PgServer::start().await.expect("server");
    let pool = pool_on(&server, "Ada", |builder| {
        builder.fallback(Route::Read, |_| Some(-1_i64))
    })
    .await;
    server.kill9().await.expect("kill -9");
    let failing = || {
        pool.read(name_of_1())
            .or_fallback_async(|_| async {
                Err::<Option<String>, _>(std::io::Error::other("the backup is down too"))
            })
            .fetch_one()
    };

    // The connection dies under the call: a classified failure on the primary.
    let lost = failing().await.expect_err("nothing served");
    assert!(lost.is_unavailable() && !lost.is_circuit_open(), "{lost}");
    assert!(lost.class().is_some(), "{lost}");
    assert_eq!(lost.endpoint(), Some("primary"));
    assert_eq!(lost.route(), Some(Route::Read));
    let failure = lost.fallback_error().expect("the fallback's failure");
    assert_eq!(failure.to_string(), "the backup is down too");
    assert!(
        lost.to_string().contains("the backup is down too"),
        "{lost}"
    );
    // Through sqlx's error type and back, still whole.
    let through_sqlx = sqlx::Error::from(lost);
    let back = Error::from_sqlx(&through_sqlx).expect("the pool's error inside");
    assert!(
        back.fallback_error().is_some() && back.is_unavailable(),
        "{back}"
    );

    // Refused by the open breaker: still a refusal, with when to retry.
    let refused = failing().await.expect_err("nothing served");
    assert!(refused.is_circuit_open(), "{refused}");
    assert!(refused.retry_after().is_some());
    assert_eq!(refused.endpoint(), Some("primary"));
    assert!(refused.fallback_error().is_some());

    // A panic is caught and reported the same way.
    let panicked = pool
        .read(name_of_1())
        .or_fallback_async(|_| async {
            if true {
                panic!("the fallback's bug");
            }
            Ok::<_, std::io::Error>(Some(String::new()))
        })
        .fetch_one()
        .await
        .expect_err("nothing served");
    assert!(panicked.is_circuit_open(), "{panicked}");
    let failure = panicked.fallback_error().expect("the panic");
    let panic = failure
        .downcast_ref::<FallbackPanicked>()
        .unwrap_or_else(|| panic!("not a panic: {failure}"));
    assert_eq!(panic.message, "the fallback's bug");

    // The call's fallback failed; the route's still serves.
    let count = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
        .or_fallback_async(|_| async { Err::<Option<i64>, _>("no count from here") })
        .fetch_one()
        .await
        .expect("the route's fallback");
    assert_eq!(*count, -1);

    let failures: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            let key = key.key();
            key.name() == telemetry::FALLBACK_FAILURES
                && key
                    .labels()
                    .any(|label| label.key() == "reason" && label.value() == "error")
                && key
                    .labels()
                    .any(|label| label.key() == "route" && label.value() == "read")
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            other => panic!("not a counter: {other:?}"),
        })
        .sum();
    assert_eq!(failures, 4, "two errors, a panic and the count's error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_error_never_runs_an_async_fallback() {
    let server = PgServer::start().await.expect("server");
    let route_runs = Arc::new(AtomicUsize::new(0));
    let pool = pool_on(&server, "Ada", {
        let route_runs = route_runs.clone();
        move |builder| {
            builder.fallback_async(Route::Read, move |_| {
                route_runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, std::io::Error>(Some("route".to_owned())) }
            })
        }
    })
    .await;
    let call_runs = Arc::new(AtomicUsize::new(0));
    let read = |sql: &'static str| {
        let call_runs = call_runs.clone();
        pool.read(sqlx::query_scalar::<_, String>(sql))
            .or_fallback_async(move |_| async move {
                call_runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(None)
            })
            .fetch_one()
    };

    let error = read("SELEC name FROM users").await.expect_err("syntax");
    assert_eq!(error.database_code().as_deref(), Some("42601"));
    assert!(error.fallback_error().is_none());
    let error = read("SELECT name FROM users WHERE id = 42")
        .await
        .expect_err("no row");
    assert!(matches!(error.as_sqlx(), Some(sqlx::Error::RowNotFound)));
    let error = pool
        .read(sqlx::query_scalar::<_, String>("SELECT nme FROM users"))
        .fetch_one()
        .await
        .expect_err("no such column");
    assert_eq!(error.database_code().as_deref(), Some("42703"));
    assert_eq!(call_runs.load(Ordering::SeqCst), 0);
    assert_eq!(route_runs.load(Ordering::SeqCst), 0);

    // Both do run when the database is away: the call's declines, the route's serves.
    server.kill9().await.expect("kill -9");
    let served = read(NAME_OF_1).await.expect("the route's fallback");
    assert_eq!(*served, "route");
    assert_eq!(call_runs.load(Ordering::SeqCst), 1);
    assert_eq!(route_runs.load(Ordering::SeqCst), 1);
}
