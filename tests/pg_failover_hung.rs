//! Reads when the primary hangs or slows down, against a real primary and streaming replica:
//! a hung primary (SIGSTOP, or a proxy blackholing its traffic) costs each read at most its
//! share of the read timeout until the read breaker opens, then reads go straight to the
//! replica and come back once the probes find the primary answering; injected latency makes
//! reads slow but successful and trips the slow-call rule.
//!
//! Every test starts its own servers, so tests run in parallel. Timing assertions are generous
//! sanity bounds, not measurements; every loop is bounded in count and time.

use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, SlidingWindow, State, TransitionReason};
use protected_pool::{Postgres, ProtectedPool, Route};
use protected_pool_testkit::{FaultMode, FaultProxy};

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use changes::Changes;
use failover::{
    HEALTH_INTERVAL, PRIMARY, REJECTION_BOUND, ResumeOnDrop, failover_pool, primary_server,
    read_on_replica, replica_of, timed,
};
use scenario::{OPEN_MAX, eventually, ms, quick};

#[derive(Debug, Clone, Copy)]
enum Hang {
    /// SIGSTOP of the primary's postmaster and backends.
    Pause,
    /// A proxy in front of the primary drops everything.
    Blackhole,
}

/// Scenario 2: A hung primary costs each read at most its share of the read timeout until the read
/// breaker opens; then reads go straight to the replica. Once the primary answers again, the probes
/// close the breaker and reads return to it.
async fn reads_survive_a_hung_primary(hang: Hang) {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let proxy = FaultProxy::to_server(&primary)
        .await
        .expect("start a proxy");
    let primary_url = match hang {
        Hang::Pause => primary.url(),
        Hang::Blackhole => primary.url_via(&proxy),
    };
    let read_timeout = ms(1000);
    let changes = Changes::default();
    let pool = failover_pool(primary_url, Some(replica.url()), &changes)
        .timeout(Route::Read, read_timeout)
        .connect()
        .await
        .expect("connect");
    assert!(!read_on_replica(&pool).await.expect("healthy read"));

    let paused = match hang {
        Hang::Pause => {
            primary.pause().expect("SIGSTOP the primary");
            Some(ResumeOnDrop(&primary))
        }
        Hang::Blackhole => {
            proxy.set_mode(FaultMode::Blackhole);
            None
        }
    };

    let breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    let bound = read_timeout + ms(300);
    let started = Instant::now();
    let (mut reads, mut fast_reads) = (Vec::new(), 0);
    while started.elapsed() < ms(2500) {
        let before = breaker.snapshot();
        let open = before.state == State::Open && before.retry_after.is_some_and(|r| r > ms(30));
        let (result, elapsed) = timed(read_on_replica(&pool)).await;
        let on_replica = result.unwrap_or_else(|e| panic!("{hang:?}: a read failed: {e}"));
        assert!(on_replica, "{hang:?}: a hung primary answered");
        assert!(
            elapsed < bound,
            "{hang:?}: a read took {elapsed:?} (timeout {read_timeout:?})"
        );
        if open {
            assert!(
                elapsed < ms(200),
                "{hang:?}: a read took {elapsed:?} with the primary's breaker open"
            );
            fast_reads += 1;
        }
        reads.push(elapsed);
    }
    // The first read waited for the hung primary for its share (half) of the timeout.
    assert!(
        reads[0] >= read_timeout / 2 - ms(20),
        "{hang:?}: the first read took only {:?}: was the primary hung?",
        reads[0]
    );
    assert!(
        fast_reads >= 5,
        "{hang:?}: {fast_reads} reads met the open breaker"
    );
    let opened = changes.on(PRIMARY, Route::Read);
    assert_eq!(
        opened.first().map(|c| (c.change.from, c.change.to)),
        Some((State::Closed, State::Open)),
        "{hang:?}: {:#?}",
        changes.describe()
    );
    assert!(
        matches!(
            opened[0].change.reason,
            TransitionReason::ConsecutiveFailures { count: 3 }
        ),
        "{hang:?}: {}",
        opened[0]
    );

    // Recovery: the probes find the primary answering and close its read breaker.
    match hang {
        Hang::Pause => primary.resume().expect("SIGCONT the primary"),
        Hang::Blackhole => proxy.set_mode(FaultMode::Pass),
    }
    drop(paused);
    // The breaker may be open for up to OPEN_MAX, and a probe caught in the hang takes up to
    // the read timeout to give up.
    let limit = OPEN_MAX + read_timeout + HEALTH_INTERVAL + Duration::from_secs(2);
    changes
        .wait_until(limit, "closed again", |c| {
            c.of(PRIMARY, Route::Read).last() == Some(&(State::HalfOpen, State::Closed))
        })
        .await;
    let (result, elapsed) = timed(read_on_replica(&pool)).await;
    assert!(
        !result.expect("read after recovery"),
        "{hang:?}: not back on the primary"
    );
    assert!(
        elapsed < ms(500),
        "{hang:?}: read after recovery took {elapsed:?}"
    );
    // Connections abandoned in the hang were closed, not leaked.
    for (name, _) in pool.endpoints() {
        let settled = eventually(Duration::from_secs(2), || {
            let status = pool.status(&name).unwrap();
            status.waiting == 0 && status.size == status.idle
        })
        .await;
        assert!(
            settled,
            "{hang:?}: {name}: {:?}",
            pool.status(&name).unwrap()
        );
    }
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_primary_reads_fail_over_within_their_timeout_then_go_straight_to_the_replica() {
    reads_survive_a_hung_primary(Hang::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_primary_reads_fail_over_within_their_timeout_then_go_straight_to_the_replica() {
    reads_survive_a_hung_primary(Hang::Blackhole).await;
}

/// Scenario 3: 300 ms of latency each way makes every read slow but successful: the slow-call rule
/// opens the read breaker; slow probe trials keep it open; without latency it closes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_latency_trips_the_slow_call_rule() {
    let pg = primary_server().await;
    let proxy = FaultProxy::to_server(&pg).await.expect("start a proxy");
    let changes = Changes::default();
    let slow_call_duration = ms(200);
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url_via(&proxy))
        .breaker(
            Route::Read,
            BreakerConfig {
                consecutive_failures: None,
                failure_rate: None,
                slow_call_rate: Some(0.5),
                slow_call_duration,
                window: SlidingWindow::Count { size: 4 },
                minimum_calls: 2,
                ..quick(BreakerConfig::read())
            },
        )
        .timeout(Route::Read, Duration::from_secs(5))
        .health_check_interval(HEALTH_INTERVAL)
        .on_state_change(changes.listener())
        .build()
        .expect("build");
    let breaker = pool.breaker(Route::Read, PRIMARY).unwrap();

    // Fast reads do not trip it.
    for _ in 0..3 {
        let (result, elapsed) = timed(read_on_replica(&pool)).await;
        assert!(!result.expect("fast read"));
        assert!(
            elapsed < slow_call_duration,
            "a read without latency took {elapsed:?}"
        );
    }
    assert_eq!(breaker.snapshot().window_slow_calls, 0);

    proxy.set_mode(FaultMode::Latency(ms(300)));
    let mut slow_reads = 0;
    while breaker.state() == State::Closed {
        assert!(
            slow_reads < 8,
            "8 slow reads did not trip the slow-call rule"
        );
        let (result, elapsed) = timed(read_on_replica(&pool)).await;
        assert!(!result.expect("a slow read still succeeds"));
        assert!(
            elapsed >= ms(600),
            "a round trip through 2 x 300 ms took {elapsed:?}"
        );
        slow_reads += 1;
    }
    assert!(
        slow_reads >= 2,
        "opened after {slow_reads} slow reads (minimum_calls 2)"
    );
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.state, State::Open);
    assert_eq!(
        snapshot.total_failures, 0,
        "slow reads are successes: {snapshot:?}"
    );
    assert!(snapshot.total_slow_calls >= 2, "{snapshot:?}");
    let opened = changes.on(PRIMARY, Route::Read);
    assert_eq!(opened.len(), 1, "{:#?}", changes.describe());
    assert_eq!(
        (opened[0].change.from, opened[0].change.to),
        (State::Closed, State::Open)
    );
    match opened[0].change.reason {
        TransitionReason::SlowCallRate { rate, calls } => {
            assert!(rate >= 0.5, "{}", opened[0]);
            assert!(calls >= 2, "{}", opened[0]);
        }
        other => panic!("opened for {other}, not the slow-call rate"),
    }

    // No replica: while open, a read is refused at once.
    let (result, elapsed) = timed(read_on_replica(&pool)).await;
    let error = result.expect_err("an open breaker let a read through");
    assert!(error.is_circuit_open(), "{error}");
    assert!(elapsed < REJECTION_BOUND, "a refused read took {elapsed:?}");

    // A probe's trial ping is as slow as any read: it re-opens the breaker.
    changes
        .wait_until(Duration::from_secs(5), "re-opened by a slow trial", |c| {
            c.on(PRIMARY, Route::Read)
                .iter()
                .any(|c| matches!(c.change.reason, TransitionReason::TrialTooSlow))
        })
        .await;

    proxy.set_mode(FaultMode::Pass);
    changes
        .wait_until(Duration::from_secs(5), "closed without latency", |c| {
            c.of(PRIMARY, Route::Read).last() == Some(&(State::HalfOpen, State::Closed))
        })
        .await;
    let (result, elapsed) = timed(read_on_replica(&pool)).await;
    assert!(!result.expect("read after the latency"));
    assert!(elapsed < slow_call_duration, "took {elapsed:?}");
}
