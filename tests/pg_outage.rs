//! Breakers under real outages of a real PostgreSQL server: killed (SIGKILL), stopped, hung
//! (SIGSTOP), plus the opposite case, a healthy server answering nothing but errors; and
//! recovery, through user calls as trials (recovery probes off) and through the pool's
//! background probes.
//!
//! Timing assertions are generous sanity bounds, not measurements. `tokio::time::sleep` only
//! waits out open durations.

use std::future::Future;

use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration, State, TransitionReason};
use protected_pool::{
    EndpointOptions, Error, ErrorClass, PoolBuilder, Postgres, ProtectedPool, Route,
};
use protected_pool_testkit::PgServer;

#[path = "support/changes.rs"]
mod changes;
use changes::Changes;

/// A call the breaker refuses must come back at once; 50 ms is far above the microseconds it
/// takes, so only a call that reached for the network would fail it.
const REJECTION_BOUND: Duration = Duration::from_millis(50);
/// Longest any single pool call may take in these tests before we call it a hang.
const HANG_GUARD: Duration = Duration::from_secs(10);
const OPEN_MAX: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `preset` with a short, exact open duration: 300 ms doubling to 1 s, no jitter.
fn quick(preset: BreakerConfig) -> BreakerConfig {
    BreakerConfig {
        open: OpenDuration {
            base: ms(300),
            multiplier: 2.0,
            max: OPEN_MAX,
            jitter: 0.0,
        },
        ..preset
    }
}

fn consecutive_threshold(route: Route) -> u32 {
    let preset = match route {
        Route::Read => BreakerConfig::read(),
        Route::Write => BreakerConfig::write(),
        Route::Auth => BreakerConfig::auth(),
    };
    preset.consecutive_failures.expect("every preset has one")
}

/// Awaits `call`, failing the test instead of hanging if it takes longer than [`HANG_GUARD`];
/// returns its result and how long it took.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(HANG_GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("a pool call hung for {HANG_GUARD:?}"));
    (result, started.elapsed())
}

/// One representative call of `route`: a count on the read route, an insert on the write route,
/// a role lookup on the auth route.
async fn call(pool: &ProtectedPool, route: Route) -> Result<(), Error> {
    match route {
        Route::Read => pool
            .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events"))
            .fetch_one()
            .await
            .map(drop),
        Route::Write => pool
            .write(sqlx::query("INSERT INTO events (note) VALUES ($1)").bind("outage test"))
            .execute()
            .await
            .map(drop),
        Route::Auth => pool
            .auth(
                sqlx::query_scalar::<_, String>(
                    "SELECT rolname::text FROM pg_roles WHERE rolname = $1",
                )
                .bind("postgres"),
            )
            .fetch_optional()
            .await
            .map(drop),
    }
}

/// A refusal by an open breaker: fast, tagged, with a retry time within the open duration.
fn assert_rejected(result: Result<(), Error>, elapsed: Duration, route: Route) {
    let error = result.expect_err("an open breaker let a call through");
    assert!(error.is_circuit_open(), "{route}: not a refusal: {error}");
    assert_eq!(error.route(), Some(route));
    assert_eq!(error.endpoint(), Some("primary"));
    assert_eq!(error.class(), None, "a refusal has no failure class");
    let retry_after = error
        .retry_after()
        .unwrap_or_else(|| panic!("{route}: refusal without retry_after: {error}"));
    assert!(
        retry_after <= OPEN_MAX,
        "{route}: retry_after {retry_after:?} beyond the open duration"
    );
    assert!(
        elapsed < REJECTION_BOUND,
        "{route}: refusal took {elapsed:?}"
    );
}

/// The longest time any breaker of the pool still stays open.
fn longest_retry_after(pool: &ProtectedPool) -> Duration {
    Route::ALL
        .iter()
        .filter_map(|&route| {
            pool.breaker(route, "primary")
                .unwrap()
                .snapshot()
                .retry_after
        })
        .max()
        .unwrap_or_default()
}

/// Sleeps until every open breaker of the pool admits trial calls (plus a margin for the
/// breaker's coarse clock).
async fn wait_out_open_duration(pool: &ProtectedPool) {
    tokio::time::sleep(longest_retry_after(pool) + ms(50)).await;
}

async fn events_server() -> PgServer {
    let pg = PgServer::start().await.expect("start PostgreSQL");
    // The harness runs with synchronous_commit off: checkpoint so the table survives a kill -9.
    pg.psql("CREATE TABLE events (id bigserial PRIMARY KEY, note text NOT NULL); CHECKPOINT")
        .await
        .expect("create table");
    pg
}

/// A pool on `pg` with every route's preset trip rules, short open durations, a 2 s connect
/// timeout and `changes` listening.
fn outage_pool(pg: &PgServer, changes: &Changes) -> PoolBuilder<Postgres> {
    ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            connect_timeout: ms(2000),
            ..EndpointOptions::default()
        })
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .breaker(Route::Auth, quick(BreakerConfig::auth()))
        .on_state_change(changes.listener())
}

/// Kills the server, then makes interleaved calls on all three routes until every breaker is
/// open: each route sees infrastructure errors, and its breaker opens after exactly its
/// consecutive-failure threshold, reported to the listener.
async fn kill_and_trip_every_route(pg: &PgServer, pool: &ProtectedPool, changes: &Changes) {
    pg.kill9().await.expect("kill -9");
    let mut failures = [0_u32; 3];
    let mut open = [false; 3];
    for _round in 0..20 {
        for (index, route) in Route::ALL.into_iter().enumerate() {
            if open[index] {
                continue;
            }
            let (result, elapsed) = timed(call(pool, route)).await;
            let error = result.expect_err("a call to a killed server succeeded");
            assert!(
                !error.is_circuit_open(),
                "{route}: refused too early: {error}"
            );
            let class = error.class().expect("a failure has a class");
            assert!(
                class.counts_as_failure(route),
                "{route}: {class} is not an infrastructure failure: {error}"
            );
            assert_eq!(error.route(), Some(route));
            assert_eq!(error.endpoint(), Some("primary"));
            assert!(
                elapsed < Duration::from_millis(2500),
                "{route}: failure took {elapsed:?}"
            );
            failures[index] += 1;
            open[index] = pool.breaker(route, "primary").unwrap().state() == State::Open;
        }
        if open.iter().all(|&o| o) {
            break;
        }
    }
    for (index, route) in Route::ALL.into_iter().enumerate() {
        assert!(open[index], "{route} breaker never opened");
        let threshold = consecutive_threshold(route);
        assert_eq!(
            failures[index], threshold,
            "{route}: failures before opening"
        );
        assert_eq!(
            changes.of("primary", route).first(),
            Some(&(State::Closed, State::Open)),
            "{route}"
        );
        let opened = changes
            .all()
            .into_iter()
            .find(|c| c.route == route)
            .unwrap();
        assert!(
            matches!(
                opened.change.reason,
                TransitionReason::ConsecutiveFailures { count } if count == threshold
            ),
            "{opened}"
        );
        let snapshot = pool.breaker(route, "primary").unwrap().snapshot();
        assert_eq!(snapshot.total_failures, u64::from(threshold), "{route}");
        assert_eq!(snapshot.opens, 1, "{route}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_opens_every_route_breaker_rejects_fast_and_recovers() {
    let pg = events_server().await;
    let changes = Changes::default();
    let pool = outage_pool(&pg, &changes)
        // User calls are the trials here; probe-driven recovery has its own test.
        .recovery_probes(false)
        .connect()
        .await
        .expect("connect");
    for route in Route::ALL {
        call(&pool, route).await.expect("healthy call");
    }

    kill_and_trip_every_route(&pg, &pool, &changes).await;
    for route in Route::ALL {
        assert_eq!(
            changes.of("primary", route),
            [(State::Closed, State::Open)],
            "{route}"
        );
    }

    // While open: every call is refused at once, with a retry time.
    for route in Route::ALL {
        for _ in 0..5 {
            let (result, elapsed) = timed(call(&pool, route)).await;
            assert_rejected(result, elapsed, route);
        }
        let snapshot = pool.breaker(route, "primary").unwrap().snapshot();
        assert_eq!(snapshot.total_rejected, 5, "{route}");
        assert_eq!(
            snapshot.total_failures,
            u64::from(consecutive_threshold(route)),
            "{route}: a refusal counted as a failure"
        );
    }

    // Back up: once the open duration has passed, trial calls succeed and close every breaker.
    pg.start_again().await.expect("start again");
    wait_out_open_duration(&pool).await;
    for route in Route::ALL {
        let breaker = pool.breaker(route, "primary").unwrap();
        let needed = breaker.config().success_threshold;
        for trial in 1..=needed {
            let (result, _) = timed(call(&pool, route)).await;
            result.unwrap_or_else(|e| panic!("{route}: trial {trial} after restart failed: {e}"));
        }
        assert_eq!(breaker.state(), State::Closed, "{route}");
        assert_eq!(
            changes.of("primary", route),
            [
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed),
            ],
            "{route}"
        );
        call(&pool, route).await.expect("call after recovery");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_probes_close_the_breakers_of_a_restarted_server_without_user_calls() {
    let pg = events_server().await;
    let changes = Changes::default();
    let pool = outage_pool(&pg, &changes)
        .recovery_probes(true)
        .health_check_interval(ms(100))
        .connect()
        .await
        .expect("connect");
    for route in Route::ALL {
        call(&pool, route).await.expect("healthy call");
    }
    kill_and_trip_every_route(&pg, &pool, &changes).await;
    let refused = |route| {
        pool.breaker(route, "primary")
            .unwrap()
            .snapshot()
            .total_rejected
    };
    let refused_before = Route::ALL.map(refused);

    // No user call from here until every breaker has closed: the probes do it. While the
    // server is down their trials fail and the breakers re-open, with backoff.
    pg.start_again().await.expect("start again");
    let closed = |changes: &Changes| {
        Route::ALL.into_iter().all(|route| {
            changes.of("primary", route).last() == Some(&(State::HalfOpen, State::Closed))
        })
    };
    changes
        .wait_until(Duration::from_secs(10), "closed by the probes", closed)
        .await;
    // A probe that finds no trial to make is not a refused call.
    assert_eq!(
        Route::ALL.map(refused),
        refused_before,
        "probes counted as refusals"
    );
    for route in Route::ALL {
        let transitions = changes.of("primary", route);
        // Open, then any number of failed trials, then the trials that closed it.
        assert_eq!(transitions[0], (State::Closed, State::Open), "{route}");
        for pair in transitions[1..].chunks(2) {
            assert_eq!(
                pair[0],
                (State::Open, State::HalfOpen),
                "{route}: {transitions:?}"
            );
            assert!(
                matches!(
                    pair[1],
                    (State::HalfOpen, State::Open) | (State::HalfOpen, State::Closed)
                ),
                "{route}: {transitions:?}"
            );
        }
        assert_eq!(
            pool.breaker(route, "primary").unwrap().state(),
            State::Closed,
            "{route}"
        );
        let (result, _) = timed(call(&pool, route)).await;
        result.unwrap_or_else(|e| panic!("{route}: call after the probes closed it: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_syntax_errors_leave_every_breaker_closed() {
    let pg = events_server().await;
    let changes = Changes::default();
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .breaker(Route::Auth, quick(BreakerConfig::auth()))
        .on_state_change(changes.listener())
        .build()
        .expect("build");

    const CALLS: u64 = 1000;
    for i in 0..CALLS {
        let (result, route) = if i % 2 == 0 {
            let result = pool.read(sqlx::query("SELEC 1")).fetch_optional().await;
            (result.map(drop), Route::Read)
        } else {
            let result = pool
                .write(sqlx::query("INSERT INTO events (note) VALUS ('x')"))
                .execute()
                .await;
            (result.map(drop), Route::Write)
        };
        let error = result.expect_err("a syntax error succeeded");
        assert_eq!(error.class(), Some(ErrorClass::Query), "{error}");
        assert_eq!(error.database_code().as_deref(), Some("42601"), "{error}");
        assert_eq!(error.route(), Some(route));
        assert!(!error.is_outcome_unknown(), "{error}");
    }

    for (route, expected) in [
        (Route::Read, CALLS / 2),
        (Route::Write, CALLS / 2),
        (Route::Auth, 0),
    ] {
        let snapshot = pool.breaker(route, "primary").unwrap().snapshot();
        assert_eq!(snapshot.state, State::Closed, "{route}");
        assert_eq!(snapshot.total_successes, expected, "{route}: {snapshot:?}");
        assert_eq!(snapshot.total_calls, expected, "{route}: {snapshot:?}");
        assert_eq!(snapshot.total_failures, 0, "{route}: {snapshot:?}");
        assert_eq!(snapshot.total_ignored, 0, "{route}: {snapshot:?}");
        assert_eq!(snapshot.consecutive_failures, 0, "{route}");
        assert_eq!(snapshot.opens, 0, "{route}");
    }
    assert!(changes.all().is_empty(), "{:?}", changes.all());
    // A query error does not cost the connection: the one connection served every call.
    let status = pool.status("primary").unwrap();
    assert_eq!((status.size, status.idle, status.waiting), (1, 1, 0));
    let n: i64 = pool
        .read(sqlx::query_scalar("SELECT count(*) FROM events"))
        .fetch_one()
        .await
        .expect("a good query still works");
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_fails_writes_within_the_connect_timeout_then_fast() {
    let pg = events_server().await;
    let changes = Changes::default();
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            connect_timeout: ms(2000),
            ..EndpointOptions::default()
        })
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .on_state_change(changes.listener())
        .connect()
        .await
        .expect("connect");
    call(&pool, Route::Write).await.expect("healthy write");

    pg.stop_fast().await.expect("pg_ctl stop -m fast");

    let threshold = consecutive_threshold(Route::Write);
    let breaker = pool.breaker(Route::Write, "primary").unwrap();
    let mut outcome_unknown = 0;
    for attempt in 1..=threshold {
        let (result, elapsed) = timed(call(&pool, Route::Write)).await;
        let error = result.expect_err("a write to a stopped server succeeded");
        assert!(!error.is_circuit_open(), "attempt {attempt}: {error}");
        assert_eq!(
            error.class(),
            Some(ErrorClass::Connection),
            "attempt {attempt}: {error}"
        );
        // A refused connection is reported at once, well within the 2 s connect timeout.
        assert!(
            elapsed < Duration::from_millis(2500),
            "attempt {attempt}: first error after {elapsed:?}"
        );
        outcome_unknown += u32::from(error.is_outcome_unknown());
        let expected = if attempt < threshold {
            State::Closed
        } else {
            State::Open
        };
        assert_eq!(breaker.state(), expected, "after attempt {attempt}");
    }
    // Only a write sent on the connection the server closed may have run; a refused
    // connection sent nothing.
    assert!(
        outcome_unknown <= 1,
        "{outcome_unknown} writes of unknown outcome"
    );
    assert_eq!(
        changes.of("primary", Route::Write),
        [(State::Closed, State::Open)],
        "{:?}",
        changes.all()
    );

    for _ in 0..10 {
        let (result, elapsed) = timed(call(&pool, Route::Write)).await;
        assert_rejected(result, elapsed, Route::Write);
    }
    // The other routes have their own breakers: a read still reaches for the server.
    let (result, _) = timed(call(&pool, Route::Read)).await;
    let error = result.expect_err("a read from a stopped server succeeded");
    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    assert_eq!(
        pool.breaker(Route::Read, "primary").unwrap().state(),
        State::Closed
    );
}

/// Resumes a paused server when dropped, so a failing assertion does not leave it frozen.
struct ResumeOnDrop<'a>(&'a PgServer);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

const HANG_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// A pool for the hung-server scenarios: a 1 s connect timeout, the quick read breaker and a
/// 500 ms read timeout.
fn hang_pool(pg: &PgServer) -> PoolBuilder<Postgres> {
    ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            connect_timeout: ms(1000),
            ..EndpointOptions::default()
        })
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .timeout(Route::Read, HANG_READ_TIMEOUT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_times_reads_out_opens_the_read_breaker_and_recovers() {
    let pg = events_server().await;
    let changes = Changes::default();
    let read_timeout = HANG_READ_TIMEOUT;
    let pool = hang_pool(&pg)
        // User calls are the trials here; probe-driven recovery has its own test.
        .recovery_probes(false)
        .on_state_change(changes.listener())
        .connect()
        .await
        .expect("connect");
    call(&pool, Route::Read).await.expect("healthy read");

    pg.pause().expect("SIGSTOP");
    let paused = ResumeOnDrop(&pg);

    // The first read hangs on the pooled connection, the next ones on connecting: each ends
    // with a timeout, never later than about the route's timeout.
    let threshold = consecutive_threshold(Route::Read);
    let breaker = pool.breaker(Route::Read, "primary").unwrap();
    for attempt in 1..=threshold {
        let (result, elapsed) = timed(call(&pool, Route::Read)).await;
        let error = result.expect_err("a read from a hung server succeeded");
        assert!(
            matches!(error, Error::Timeout { .. }) || error.class() == Some(ErrorClass::Timeout),
            "attempt {attempt}: not a timeout: {error}"
        );
        assert!(
            elapsed >= read_timeout - ms(5),
            "attempt {attempt}: a hung server answered after {elapsed:?}"
        );
        assert!(
            elapsed < ms(1500),
            "attempt {attempt}: timed out only after {elapsed:?}"
        );
        let expected = if attempt < threshold {
            State::Closed
        } else {
            State::Open
        };
        assert_eq!(breaker.state(), expected, "after attempt {attempt}");
    }
    assert_eq!(
        changes.of("primary", Route::Read),
        [(State::Closed, State::Open)]
    );
    for _ in 0..5 {
        let (result, elapsed) = timed(call(&pool, Route::Read)).await;
        assert_rejected(result, elapsed, Route::Read);
    }

    pg.resume().expect("SIGCONT");
    drop(paused);
    wait_out_open_duration(&pool).await;
    for trial in 1..=breaker.config().success_threshold {
        let (result, _) = timed(call(&pool, Route::Read)).await;
        result.unwrap_or_else(|e| panic!("trial {trial} after resume failed: {e}"));
    }
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(
        changes.of("primary", Route::Read),
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed),
        ]
    );
    let status = pool.status("primary").unwrap();
    assert_eq!(status.waiting, 0, "{status:?}");
    assert_eq!(status.size, status.idle, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_probes_no_caller_is_sent_to_a_hung_server_as_a_trial() {
    let pg = events_server().await;
    let changes = Changes::default();
    let pool = hang_pool(&pg)
        .health_check_interval(ms(100))
        .on_state_change(changes.listener())
        .connect()
        .await
        .expect("connect");
    call(&pool, Route::Read).await.expect("healthy read");

    pg.pause().expect("SIGSTOP");
    let paused = ResumeOnDrop(&pg);
    let breaker = pool.breaker(Route::Read, "primary").unwrap();
    for _ in 0..consecutive_threshold(Route::Read) {
        let (result, _) = timed(call(&pool, Route::Read)).await;
        result.expect_err("a read from a hung server succeeded");
    }
    assert_eq!(breaker.state(), State::Open);

    // Past several open durations the server is still hung: the probe keeps trying (and
    // failing), and every caller meanwhile is refused at once instead of being the trial that
    // waits out the timeout on the stopped server.
    let until = Instant::now() + 3 * OPEN_MAX;
    let mut calls = 0;
    while Instant::now() < until {
        let (result, elapsed) = timed(call(&pool, Route::Read)).await;
        assert_rejected(result, elapsed, Route::Read);
        calls += 1;
        tokio::time::sleep(ms(20)).await;
    }
    assert!(calls > 50, "only {calls} calls");
    let reopened = changes
        .of("primary", Route::Read)
        .iter()
        .filter(|&&transition| transition == (State::HalfOpen, State::Open))
        .count();
    assert!(
        reopened >= 1,
        "the probe made no trial: {:?}",
        changes.of("primary", Route::Read)
    );

    pg.resume().expect("SIGCONT");
    drop(paused);
    let deadline = Instant::now() + HANG_GUARD;
    while breaker.state() != State::Closed {
        assert!(
            Instant::now() < deadline,
            "the probe never closed the breaker"
        );
        tokio::time::sleep(ms(20)).await;
    }
    call(&pool, Route::Read).await.expect("read after recovery");
}
