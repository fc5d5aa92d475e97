//! Reads through a crash of the primary, against a real primary and streaming replica: the
//! primary is SIGKILLed while tasks read, and not one read fails (they are replayed on, and
//! then routed to, the replica); writes fail, and fast once their breaker is open. With 1,000
//! readers on 10 connections per endpoint, through the crash and a restart, every reader
//! finishes and every connection slot is accounted for.
//!
//! Every test starts its own servers, so tests run in parallel. Timing assertions are generous
//! sanity bounds, not measurements; every loop is bounded in count and time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use protected_pool::breaker::State;
use protected_pool::{EndpointOptions, Route};

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use changes::Changes;
use failover::{
    HEALTH_INTERVAL, PRIMARY, REJECTION_BOUND, REPLICA, ReadTally, failover_pool, primary_server,
    read_on_replica, replica_of, spawn_readers, timed, write_event,
};
use scenario::{HANG_GUARD, OPEN_MAX, eventually, ms};

/// Scenario 1: The primary is SIGKILLed while 16 tasks read: not one read fails (they are replayed
/// on, and then routed to, the replica); writes fail, and fast once their breaker is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_reads_fail_over_to_the_replica_without_a_single_error() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let changes = Changes::default();
    let pool = failover_pool(primary.url(), Some(replica.url()), &changes)
        .connect()
        .await
        .expect("connect");
    assert!(!read_on_replica(&pool).await.expect("healthy read"));
    write_event(&pool).await.expect("healthy write");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(ReadTally::default());
    let readers = spawn_readers(&pool, 16, 100_000, ms(1), &stop, &tally);

    tokio::time::sleep(ms(700)).await;
    let (before_kill, _) = tally.counts();
    primary.kill9().await.expect("kill -9 the primary");
    let killed = Instant::now();

    // Writes during the outage: each fails; once the write breaker is open, each is refused
    // at once without reaching for the network.
    let write_breaker = pool.breaker(Route::Write, PRIMARY).unwrap();
    // Failures before the breaker first opened; refusals by the open breaker.
    let (mut failed_writes, mut refused_writes) = (0, 0);
    while killed.elapsed() < ms(2300) {
        let before = write_breaker.snapshot();
        let open = before.state == State::Open && before.retry_after.is_some_and(|r| r > ms(20));
        let (result, elapsed) = timed(write_event(&pool)).await;
        let error = result.expect_err("a write to a killed primary succeeded");
        assert_eq!(error.route(), Some(Route::Write), "{error}");
        assert_eq!(error.endpoint(), Some(PRIMARY), "{error}");
        if open {
            assert!(
                error.is_circuit_open(),
                "an open breaker let a write through: {error}"
            );
            assert!(
                elapsed < REJECTION_BOUND,
                "a refused write took {elapsed:?}"
            );
            refused_writes += 1;
        } else if !error.is_circuit_open() {
            // Before the breaker opened, or a trial call while half-open.
            let class = error.class().expect("a failure has a class");
            assert!(class.counts_as_failure(Route::Write), "{error}");
            if before.opens == 0 {
                failed_writes += 1;
            }
        }
        tokio::time::sleep(ms(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        tokio::time::timeout(HANG_GUARD, reader)
            .await
            .expect("a reader hung")
            .expect("a reader panicked");
    }

    let errors = tally.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} reads failed: {errors:#?}",
        errors.len()
    );
    let (_, by_replica) = tally.counts();
    assert!(
        before_kill > 0,
        "no read was served by the primary before the kill"
    );
    assert!(
        by_replica > 0,
        "no read was served by the replica after the kill"
    );
    let slowest = *tally.slowest.lock().unwrap();
    assert!(
        slowest < Duration::from_secs(4),
        "the slowest read took {slowest:?}"
    );
    assert!(
        changes.of(PRIMARY, Route::Read).first() == Some(&(State::Closed, State::Open)),
        "the primary's read breaker never opened: {:#?}",
        changes.describe()
    );
    assert!(
        changes.of(REPLICA, Route::Read).is_empty(),
        "the replica's read breaker moved: {:#?}",
        changes.describe()
    );
    assert_eq!(failed_writes, 3, "writes failed before the breaker opened");
    assert!(
        refused_writes >= 5,
        "only {refused_writes} writes met an open breaker"
    );
    assert_eq!(
        changes.of(PRIMARY, Route::Write).first(),
        Some(&(State::Closed, State::Open))
    );
    drop(replica);
}

/// Scenario 7: 1,000 readers share 10 connections per endpoint through a kill -9 and a restart of
/// the primary: every reader finishes, no read fails, and every connection slot is accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_readers_ride_through_a_primary_crash_and_restart() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let changes = Changes::default();
    let pool = failover_pool(primary.url(), Some(replica.url()), &changes)
        .endpoint_options(EndpointOptions {
            max_connections: 10,
            connect_timeout: ms(1000),
            wait_timeout: Duration::from_secs(30),
            ..EndpointOptions::default()
        })
        .timeout(Route::Read, Duration::from_secs(10))
        .connect()
        .await
        .expect("connect");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(ReadTally::default());
    let readers = spawn_readers(&pool, 1000, 1000, ms(20), &stop, &tally);

    tokio::time::sleep(ms(1000)).await;
    let (before_kill, _) = tally.counts();
    primary.kill9().await.expect("kill -9 the primary");
    tokio::time::sleep(ms(1500)).await;
    let (_, during_outage) = tally.counts();
    primary
        .start_again()
        .await
        .expect("start the primary again");
    let read_breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    let limit = OPEN_MAX + HEALTH_INTERVAL + Duration::from_secs(5);
    assert!(
        eventually(limit, || read_breaker.state() == State::Closed).await,
        "the primary's read breaker did not close: {:#?}",
        changes.describe()
    );
    let (after_restart, _) = tally.counts();
    tokio::time::sleep(ms(1000)).await;
    stop.store(true, Ordering::Relaxed);

    let finished = Arc::new(AtomicUsize::new(0));
    let joined = tokio::time::timeout(Duration::from_secs(60), {
        let finished = finished.clone();
        async move {
            for reader in readers {
                reader.await.expect("a reader panicked");
                finished.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
    .await;
    assert!(
        joined.is_ok(),
        "only {} of 1000 readers finished",
        finished.load(Ordering::Relaxed)
    );

    let errors = tally.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} reads failed, e.g. {:#?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    let (by_primary, by_replica) = tally.counts();
    assert!(before_kill > 0, "no read before the kill");
    assert!(
        during_outage > 0,
        "the replica served nothing during the outage"
    );
    assert!(
        by_primary > after_restart,
        "no read served by the restarted primary"
    );
    assert!(by_replica > 0);

    // Every slot is back: nobody waits, every open connection is idle (a probe may hold one
    // for a moment, so this is polled).
    for (name, _) in pool.endpoints() {
        let settled = eventually(Duration::from_secs(2), || {
            let status = pool.status(&name).unwrap();
            status.waiting == 0 && status.size == status.idle
        })
        .await;
        assert!(settled, "{name}: {:?}", pool.status(&name).unwrap());
        let status = pool.status(&name).unwrap();
        assert!(status.size <= status.max_size, "{name}: {status:?}");
    }
}
