//! Deadlines against real PostgreSQL servers: how much of a read's deadline a statement
//! running on a healthy connection gets when replicas are configured, what waiting for a free
//! connection of our own pool is (our saturation, not the server's failure), and what becomes
//! on the server of a statement the pool gave up on.
//!
//! Every test starts its own servers, so tests run in parallel. Time bounds are generous
//! sanity bounds that only a defect exceeds, not measurements.

#[path = "support/scenario.rs"]
mod scenario;

use std::time::{Duration, Instant};

use protected_pool::{EndpointOptions, ErrorClass, Postgres, ProtectedPool, Route, RouteConfig};
use protected_pool_testkit::PgServer;
use scenario::{active_statements, guarded, ms};

const PRIMARY: &str = "primary";
const REPLICA: &str = "replica-1";

/// A read that takes 3 s on a healthy primary is well within the read route's 5 s deadline: it
/// succeeds on the primary, and neither endpoint's breaker hears of a failure.
///
/// The deadline is shared between endpoints so that a hung primary costs a share of it, not
/// the whole; but a statement already running on a healthy connection must keep the rest of
/// the deadline (DESIGN.md, section 5, "Deadlines"). Cut off at its share, it is replayed on
/// the replica, cut off there too, and a valid read fails with both breakers charged a
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_valid_read_succeeds_with_a_replica_present() {
    let primary = PgServer::start().await.expect("start the primary");
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("start a streaming replica");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(primary.url())
        .replica(replica.url())
        .connect()
        .await
        .expect("connect");
    let deadline = RouteConfig::for_route(Route::Read).timeout;
    assert_eq!(deadline, Duration::from_secs(5), "the read route's default");

    let started = Instant::now();
    let result = guarded(
        "a 3 s read",
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_sleep(3)"))
            .fetch_one(),
    )
    .await;
    let elapsed = started.elapsed();

    let one = result.unwrap_or_else(|error| {
        panic!(
            "a valid 3 s read on a healthy primary failed after {elapsed:?}, within the read \
             route's {deadline:?} deadline: {error}"
        )
    });
    assert_eq!(one, 1);
    for name in [PRIMARY, REPLICA] {
        let snapshot = pool.breaker(Route::Read, name).unwrap().snapshot();
        assert_eq!(
            snapshot.total_failures, 0,
            "{name}'s read breaker counted a failure for a read that was within its deadline: \
             {snapshot:?}"
        );
    }
}

/// Every connection of the endpoint is in use and a caller waits past `wait_timeout`: that is
/// our own pool's saturation, with the server healthy, and must not count against the
/// endpoint's breaker (DESIGN.md, section 3, Resource). Counted, a burst of traffic on a small
/// pool opens the breaker of a healthy server and refuses everyone. The error must say what
/// happened: no free connection in the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_saturation_not_a_server_failure() {
    let pg = PgServer::start().await.expect("start the server");
    let wait_timeout = ms(200);
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            max_connections: 1,
            wait_timeout,
            ..EndpointOptions::default()
        })
        .connect()
        .await
        .expect("connect");

    // One call holds the only connection for 2 s.
    let (held, holding) = tokio::sync::oneshot::channel();
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.with_connection(Route::Read, async move |conn| {
                let _ = held.send(());
                tokio::time::sleep(Duration::from_secs(2)).await;
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(&mut *conn)
                    .await
            })
            .await
        }
    });
    guarded("taking the only connection", holding)
        .await
        .expect("the holder got the only connection");

    let breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    let before = breaker.snapshot();
    let error = guarded(
        "a read on a full pool",
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one(),
    )
    .await
    .expect_err("a read got the connection another call holds");
    let after = breaker.snapshot();
    let held = guarded("the holder's call", holder)
        .await
        .expect("the holder's task");
    assert_eq!(held.expect("the holder's call succeeds"), 1);

    assert_eq!(
        after.total_failures,
        before.total_failures,
        "waiting {wait_timeout:?} for a free connection of our own pool was counted against the \
         healthy server's breaker (class {:?}): {error}",
        error.class()
    );
    assert!(
        error.to_string().contains("no free connection"),
        "the error does not say the pool had no free connection: {error}"
    );
    assert_eq!(
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one()
            .await
            .expect("a read once the connection is free"),
        1
    );
}

/// A read the pool gave up on (its deadline passed) must stop running on the server: left
/// running, it holds a backend, its locks and its snapshot for as long as it takes, and a
/// retrying client piles up such statements until the server runs out of connections. The
/// server runs with PostgreSQL's defaults (no `client_connection_check_interval`), so it does
/// not notice by itself that the client went away while the statement runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_statement_is_stopped_on_the_server() {
    const STATEMENT: &str = "pg_sleep(30)";
    let pg = PgServer::start().await.expect("start the server");
    assert_eq!(
        pg.psql("SHOW client_connection_check_interval")
            .await
            .expect("psql"),
        "0",
        "the server must run with the default: no check for a vanished client"
    );
    let timeout = Duration::from_secs(1);
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .timeout(Route::Read, timeout)
        .connect()
        .await
        .expect("connect");

    let read = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.read(sqlx::query("SELECT pg_sleep(30)"))
                .fetch_optional()
                .await
                .map(drop)
        }
    });
    // The statement reached the server.
    let seen = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if active_statements(&pg, STATEMENT).await > 0 {
                break true;
            }
            if read.is_finished() || Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(ms(10)).await;
        }
    };
    let result = guarded("a read with a 1 s deadline", read)
        .await
        .expect("the read task");
    let gave_up = Instant::now();
    let error = result.expect_err("pg_sleep(30) finished within a 1 s deadline");
    assert_eq!(error.class(), Some(ErrorClass::Timeout), "{error}");
    assert!(seen, "the statement was never seen running: {error}");

    let limit = Duration::from_secs(3);
    let mut running = active_statements(&pg, STATEMENT).await;
    while running > 0 && gave_up.elapsed() < limit {
        tokio::time::sleep(ms(50)).await;
        running = active_statements(&pg, STATEMENT).await;
    }
    assert_eq!(
        running,
        0,
        "{:?} after the call gave up ({error}), the statement still runs on the server: the \
         pool dropped its connection without cancelling it, and the server runs it to the end",
        gave_up.elapsed()
    );
}
