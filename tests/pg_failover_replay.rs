//! A connection to the primary reset mid-statement, by a proxy in front of it: the read is
//! replayed on the replica and succeeds; the write is not replayed and reports that its
//! outcome is unknown, and its row is there at most once.
//!
//! Every test starts its own servers, so tests run in parallel. Timing assertions are generous
//! sanity bounds, not measurements; every loop is bounded in count and time.

use std::time::{Duration, Instant};

use protected_pool::{ErrorClass, Route};
use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use changes::Changes;
use failover::{
    PRIMARY, REPLICA, failover_pool, primary_server, read_on_replica, replica_of, timed,
};
use scenario::ms;

/// Polls the primary until a statement matching `like` is running; returns its pid.
async fn wait_for_active(pg: &PgServer, like: &str) -> String {
    let sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '{like}' AND state = 'active' \
         AND pid <> pg_backend_pid()"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = pg.psql(&sql).await.expect("psql");
        if !out.is_empty() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{like:?} never ran on the server"
        );
        tokio::time::sleep(ms(10)).await;
    }
}

/// Resets every connection through `proxy`, then lets traffic pass again.
async fn reset_connections(proxy: &FaultProxy) {
    proxy.set_mode(FaultMode::Reset);
    tokio::time::sleep(ms(20)).await;
    proxy.set_mode(FaultMode::Pass);
}

/// Scenario 4: A connection reset mid-statement: the read is replayed on the replica and succeeds;
/// the write is not replayed and reports that its outcome is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_statement_replays_the_read_on_the_replica_but_never_the_write() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let proxy = FaultProxy::to_server(&primary)
        .await
        .expect("start a proxy");
    let changes = Changes::default();
    let pool = failover_pool(primary.url_via(&proxy), Some(replica.url()), &changes)
        .timeout(Route::Read, Duration::from_secs(6))
        .timeout(Route::Write, Duration::from_secs(6))
        .connect()
        .await
        .expect("connect");
    assert!(!read_on_replica(&pool).await.expect("healthy read"));

    // The read, by `read` and by `read_with`: one second of sleep on the primary, reset 300 ms
    // or so in.
    const SLEEPY_READ: &str = "SELECT pg_sleep(1)::text, pg_is_in_recovery()";
    for with in [false, true] {
        let primary_read = pool.breaker(Route::Read, PRIMARY).unwrap().snapshot();
        let replica_read = pool.breaker(Route::Read, REPLICA).unwrap().snapshot();
        let read = tokio::spawn({
            let pool = pool.clone();
            async move {
                let read = async {
                    if with {
                        pool.read_with(async |conn| {
                            sqlx::query_as::<_, (String, bool)>(SLEEPY_READ)
                                .fetch_one(&mut *conn)
                                .await
                        })
                        .await
                    } else {
                        pool.read(sqlx::query_as::<_, (String, bool)>(SLEEPY_READ))
                            .fetch_one()
                            .await
                    }
                };
                timed(read).await
            }
        });
        wait_for_active(&primary, "SELECT pg_sleep(1)%").await;
        tokio::time::sleep(ms(300)).await;
        reset_connections(&proxy).await;
        let (result, elapsed) = read.await.expect("the read task");
        let (_, on_replica) =
            result.unwrap_or_else(|e| panic!("read_with={with}: not replayed on the replica: {e}"));
        assert!(on_replica, "read_with={with}: not served by the replica");
        assert!(
            elapsed >= ms(1300),
            "read_with={with}: a 1 s sleep, reset after 300 ms, took {elapsed:?}"
        );
        let after = pool.breaker(Route::Read, PRIMARY).unwrap().snapshot();
        assert_eq!(
            after.total_failures - primary_read.total_failures,
            1,
            "read_with={with}: {after:?}"
        );
        let after = pool.breaker(Route::Read, REPLICA).unwrap().snapshot();
        assert_eq!(
            after.total_successes - replica_read.total_successes,
            1,
            "read_with={with}: {after:?}"
        );
    }

    // The write: reset mid-flight, reported as of unknown outcome, never run twice.
    tokio::time::sleep(ms(100)).await;
    let write_before = pool.breaker(Route::Write, PRIMARY).unwrap().snapshot();
    let write = tokio::spawn({
        let pool = pool.clone();
        async move {
            timed(
                pool.write(sqlx::query(
                    "INSERT INTO events (n) SELECT 1 FROM pg_sleep(1)",
                ))
                .execute(),
            )
            .await
        }
    });
    wait_for_active(&primary, "INSERT INTO events%").await;
    tokio::time::sleep(ms(300)).await;
    reset_connections(&proxy).await;
    let (result, elapsed) = write.await.expect("the write task");
    let error = result.expect_err("a write whose connection was reset succeeded");
    assert!(error.is_outcome_unknown(), "{error}");
    assert_eq!(error.route(), Some(Route::Write), "{error}");
    assert_eq!(error.endpoint(), Some(PRIMARY), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    assert!(
        error.attempts().is_empty(),
        "tried more than one endpoint: {error}"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "the reset write returned after {elapsed:?}"
    );
    let write_after = pool.breaker(Route::Write, PRIMARY).unwrap().snapshot();
    assert_eq!(
        write_after.total_calls - write_before.total_calls,
        1,
        "the write was attempted more than once: {write_after:?}"
    );

    // Long after the server's one second of sleep: the row is there at most once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let running = primary
        .psql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE 'INSERT INTO events%' AND state = 'active'",
        )
        .await
        .expect("psql");
    assert_eq!(running, "0", "an insert is still running");
    let rows: i64 = primary
        .psql("SELECT count(*) FROM events")
        .await
        .expect("psql")
        .parse()
        .expect("a count");
    assert!(rows <= 1, "the write ran {rows} times");
}
