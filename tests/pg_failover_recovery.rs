//! A primary that crashed and is back: the recovery probes alone close its read and write
//! breakers, without a single call, and are not fooled by pooled connections that died with
//! the previous server.
//!
//! Every test starts its own servers, so tests run in parallel. Timing assertions are generous
//! sanity bounds, not measurements; every loop is bounded in count and time.

use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, State, TransitionReason};
use protected_pool::{Postgres, ProtectedPool, Route};

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use changes::Changes;
use failover::{
    HEALTH_INTERVAL, PRIMARY, failover_pool, primary_server, read_on_replica, write_event,
};
use scenario::{OPEN_MAX, eventually, ms, quick};

/// Scenario 6: The primary is killed, its read and write breakers opened by a few calls, then it is
/// started again and no call is made: the recovery probes alone close both breakers, within the
/// longest open duration plus one health interval (plus a margin).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_primary_breakers_close_through_probes_alone() {
    let pg = primary_server().await;
    let changes = Changes::default();
    let pool = failover_pool(pg.url(), None, &changes)
        .connect()
        .await
        .expect("connect");
    assert!(!read_on_replica(&pool).await.expect("healthy read"));
    write_event(&pool).await.expect("healthy write");

    pg.kill9().await.expect("kill -9");
    for route in [Route::Read, Route::Write] {
        let breaker = pool.breaker(route, PRIMARY).unwrap();
        for call in 0.. {
            if breaker.state() == State::Open {
                break;
            }
            assert!(
                call < 10,
                "{route}: 10 failed calls did not open the breaker"
            );
            let result = match route {
                Route::Read => read_on_replica(&pool).await.map(drop),
                _ => write_event(&pool).await,
            };
            let error = result.expect_err("a call to a killed server succeeded");
            assert!(
                error.class().is_some_and(|c| c.counts_as_failure(route)),
                "{error}"
            );
        }
    }
    // While the server is down, the probes' trials fail and re-open the breakers.
    changes
        .wait_until(
            Duration::from_secs(3),
            "re-opened by failed probe trials",
            |c| {
                [Route::Read, Route::Write].iter().all(|&route| {
                    c.on(PRIMARY, route)
                        .iter()
                        .any(|c| matches!(c.change.reason, TransitionReason::TrialFailed))
                })
            },
        )
        .await;
    let snapshots =
        [Route::Read, Route::Write].map(|r| pool.breaker(r, PRIMARY).unwrap().snapshot());

    pg.start_again().await.expect("start again");
    let restarted = Instant::now();
    let limit = OPEN_MAX + HEALTH_INTERVAL + ms(1000);
    let closed = eventually(limit, || {
        [Route::Read, Route::Write]
            .iter()
            .all(|&route| pool.breaker(route, PRIMARY).unwrap().state() == State::Closed)
    })
    .await;
    assert!(
        closed,
        "breakers not closed {:?} after the restart: {:#?}",
        restarted.elapsed(),
        changes.describe()
    );
    for (route, before) in [Route::Read, Route::Write].into_iter().zip(snapshots) {
        let transitions = changes.of(PRIMARY, route);
        assert_eq!(transitions[0], (State::Closed, State::Open), "{route}");
        assert_eq!(
            transitions[transitions.len() - 2..],
            [
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed)
            ],
            "{route}: {transitions:?}"
        );
        // No call was made: the probes' trials are what closed it.
        let after = pool.breaker(route, PRIMARY).unwrap().snapshot();
        let needed = u64::from(
            pool.breaker(route, PRIMARY)
                .unwrap()
                .config()
                .success_threshold,
        );
        assert!(
            after.total_successes - before.total_successes >= needed,
            "{route}: {after:?}"
        );
    }
    assert!(changes.of(PRIMARY, Route::Auth).is_empty());
    assert!(!read_on_replica(&pool).await.expect("read after recovery"));
    write_event(&pool).await.expect("write after recovery");
}

/// After a crash and restart of the server, every connection still pooled from before the
/// crash is dead, and connections idle for less than `idle_check_after` (30 s) are handed out
/// unchecked. A read that meets one runs again on a fresh connection (the server is fine), and
/// the health loop closes the rest, so neither a caller nor a probe trial meets them and no
/// breaker opens on a healthy server. (Before, the read failed and opened the breaker, and each
/// probe trial took another dead connection and re-opened it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_not_fooled_by_connections_that_died_with_the_previous_server() {
    let pg = primary_server().await;
    let changes = Changes::default();
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .breaker(
            Route::Read,
            BreakerConfig {
                consecutive_failures: Some(1),
                ..quick(BreakerConfig::read())
            },
        )
        .health_check_interval(HEALTH_INTERVAL)
        .on_state_change(changes.listener())
        .build()
        .expect("build");
    // Four reads at once leave four idle connections in the pool.
    let reads: Vec<_> = (0..4)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.read(sqlx::query_scalar::<_, String>(
                    "SELECT pg_sleep(0.2)::text",
                ))
                .fetch_one()
                .await
            })
        })
        .collect();
    for read in reads {
        read.await.expect("the read task").expect("healthy read");
    }
    assert_eq!(pool.status(PRIMARY).unwrap().idle, 4);

    // The server crashes and is back at once.
    pg.kill9().await.expect("kill -9");
    pg.start_again().await.expect("start again");
    assert_eq!(pg.psql("SELECT 1").await.expect("psql"), "1");

    // The first read meets a connection that died with the old server. That says nothing about
    // the server: the read runs again on a fresh connection, and the breaker hears a success.
    let breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    let before = breaker.snapshot();
    let on_replica = read_on_replica(&pool)
        .await
        .expect("a read after the restart, on a fresh connection");
    assert!(!on_replica, "the primary did not answer");
    let after = breaker.snapshot();
    assert_eq!(after.total_failures, before.total_failures, "{after:?}");
    assert_eq!(breaker.state(), State::Closed);
    assert!(
        changes.of(PRIMARY, Route::Read).is_empty(),
        "{:#?}",
        changes.describe()
    );
    // The health loop closes the other idle connections that died with the old server; the
    // probes, which check connections the same way, never meet them either.
    let settled = eventually(Duration::from_secs(3), || {
        pool.status(PRIMARY).unwrap().size <= 2
    })
    .await;
    assert!(settled, "{:?}", pool.status(PRIMARY).unwrap());
}
