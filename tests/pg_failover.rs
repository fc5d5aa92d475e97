//! Read failover, write safety, replica lag and recovery probes against real PostgreSQL servers
//! (a primary and a streaming replica) with real faults: SIGKILL, SIGSTOP, a stopped server,
//! paused WAL replay, and network faults injected by a TCP proxy (blackhole, latency, reset).
//!
//! Every test starts its own servers, so tests run in parallel. Timing assertions are generous
//! sanity bounds, not measurements; every loop is bounded in count and time.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protected_pool::breaker::{
    BreakerConfig, OpenDuration, SlidingWindow, State, TransitionReason,
};
use protected_pool::{
    EndpointOptions, Error, ErrorClass, PoolBuilder, Postgres, ProtectedPool, ReadPreference, Route,
};
use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};

#[path = "support/changes.rs"]
mod changes;
use changes::Changes;

/// A call the breaker refuses must come back at once; 50 ms is far above the microseconds it
/// takes, so only a call that reached for the network would fail it.
const REJECTION_BOUND: Duration = Duration::from_millis(50);
/// Longest any single pool call may take in these tests before we call it a hang.
const HANG_GUARD: Duration = Duration::from_secs(15);
/// Breaker open durations in these tests: 300 ms doubling to 1 s, no jitter.
const OPEN_BASE: Duration = Duration::from_millis(300);
const OPEN_MAX: Duration = Duration::from_secs(1);
/// How often the probes measure replica lag (and the longest a probe task sleeps).
const HEALTH_INTERVAL: Duration = Duration::from_millis(100);
const PRIMARY: &str = "primary";
const REPLICA: &str = "replica-1";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `preset` with a short, exact open duration.
fn quick(preset: BreakerConfig) -> BreakerConfig {
    BreakerConfig {
        open: OpenDuration {
            base: OPEN_BASE,
            multiplier: 2.0,
            max: OPEN_MAX,
            jitter: 0.0,
        },
        ..preset
    }
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

/// Polls `condition` every 10 ms until it holds; false if it still does not after `limit`.
async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ms(10)).await;
    }
}

/// A primary holding the row every read asks for, and an empty `events` table for writes.
async fn primary_server() -> PgServer {
    let pg = PgServer::start().await.expect("start the primary");
    // The harness runs with synchronous_commit off: checkpoint so the tables survive a kill -9.
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
         INSERT INTO items VALUES (1, 'on both servers');
         CREATE TABLE events (id bigserial PRIMARY KEY, n int NOT NULL);
         CHECKPOINT",
    )
    .await
    .expect("create the tables");
    pg
}

/// A streaming replica of `primary`, checked to hold the row every read asks for.
async fn replica_of(primary: &PgServer) -> PgServer {
    let replica = PgServer::streaming_replica(primary)
        .await
        .expect("start a streaming replica");
    assert_eq!(
        replica
            .psql("SELECT pg_is_in_recovery(), note FROM items WHERE id = 1")
            .await
            .expect("psql on the replica"),
        "t|on both servers"
    );
    replica
}

/// The read every test makes: the row that exists on both servers, answering whether the
/// server that served it is a replica (in recovery).
async fn read_on_replica(pool: &ProtectedPool) -> Result<bool, Error> {
    pool.read(sqlx::query_scalar::<_, bool>(
        "SELECT pg_is_in_recovery() FROM items WHERE id = 1",
    ))
    .fetch_one()
    .await
}

/// The same read as [`read_on_replica`], through `read_with` (sqlx code on the connection).
async fn read_on_replica_with(pool: &ProtectedPool) -> Result<bool, Error> {
    pool.read_with(async |conn| {
        sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery() FROM items WHERE id = 1")
            .fetch_one(&mut *conn)
            .await
    })
    .await
}

async fn write_event(pool: &ProtectedPool) -> Result<(), Error> {
    pool.write(sqlx::query("INSERT INTO events (n) VALUES (1)"))
        .execute()
        .await
        .map(drop)
}

/// A pool on `primary_url` (and `replica_url`, if any) with quick read and write breakers,
/// 100 ms health checks, a 1 s connect timeout and `changes` listening.
fn failover_pool(
    primary_url: String,
    replica_url: Option<String>,
    changes: &Changes,
) -> PoolBuilder<Postgres> {
    let mut builder = ProtectedPool::<Postgres>::builder()
        .primary(primary_url)
        .endpoint_options(EndpointOptions {
            connect_timeout: ms(1000),
            ..EndpointOptions::default()
        })
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(
            Route::Write,
            BreakerConfig {
                consecutive_failures: Some(3),
                ..quick(BreakerConfig::write())
            },
        )
        .timeout(Route::Read, Duration::from_secs(4))
        .timeout(Route::Write, Duration::from_secs(4))
        .health_check_interval(HEALTH_INTERVAL)
        .on_state_change(changes.listener());
    if let Some(url) = replica_url {
        builder = builder.replica(url);
    }
    builder
}

/// Resumes a paused server when dropped, so a failing assertion does not leave it frozen.
struct ResumeOnDrop<'a>(&'a PgServer);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

/// What a group of reader tasks saw.
#[derive(Default)]
struct ReadTally {
    by_primary: AtomicU64,
    by_replica: AtomicU64,
    errors: Mutex<Vec<String>>,
    slowest: Mutex<Duration>,
}

impl ReadTally {
    fn record(&self, result: Result<bool, Error>, elapsed: Duration) {
        match result {
            Ok(true) => self.by_replica.fetch_add(1, Ordering::Relaxed),
            Ok(false) => self.by_primary.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                self.errors.lock().unwrap().push(error.to_string());
                0
            }
        };
        let mut slowest = self.slowest.lock().unwrap();
        *slowest = (*slowest).max(elapsed);
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.by_primary.load(Ordering::Relaxed),
            self.by_replica.load(Ordering::Relaxed),
        )
    }
}

/// Starts `readers` tasks that read until `stop` is set (at most `max_reads` each, pausing
/// `pause` between reads); half of them use `read`, half `read_with`.
fn spawn_readers(
    pool: &ProtectedPool,
    readers: usize,
    max_reads: usize,
    pause: Duration,
    stop: &Arc<AtomicBool>,
    tally: &Arc<ReadTally>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..readers)
        .map(|reader| {
            let (pool, stop, tally) = (pool.clone(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                for _ in 0..max_reads {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (result, elapsed) = if reader % 2 == 0 {
                        timed(read_on_replica(&pool)).await
                    } else {
                        timed(read_on_replica_with(&pool)).await
                    };
                    tally.record(result, elapsed);
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect()
}

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

/// Scenario 5a: PreferReplica with its only replica stopped: reads are served by the primary, and
/// the replica's read breaker counts the failures and opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_replica_reads_skip_a_stopped_replica() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let changes = Changes::default();
    let pool = failover_pool(primary.url(), Some(replica.url()), &changes)
        .read_preference(ReadPreference::PreferReplica)
        .connect()
        .await
        .expect("connect");
    for _ in 0..5 {
        assert!(
            read_on_replica(&pool).await.expect("healthy read"),
            "not on the replica"
        );
    }

    replica.stop_fast().await.expect("stop the replica");
    for read in 0..20 {
        let (result, elapsed) = timed(read_on_replica(&pool)).await;
        let on_replica = result.unwrap_or_else(|e| panic!("read {read} failed: {e}"));
        assert!(!on_replica, "read {read}: a stopped replica answered");
        assert!(
            elapsed < Duration::from_secs(2),
            "read {read} took {elapsed:?}"
        );
    }
    let snapshot = pool.breaker(Route::Read, REPLICA).unwrap().snapshot();
    assert!(snapshot.total_failures >= 3, "{snapshot:?}");
    assert!(snapshot.opens >= 1, "{snapshot:?}");
    assert!(snapshot.total_rejected >= 1, "{snapshot:?}");
    assert_eq!(
        changes.of(REPLICA, Route::Read).first(),
        Some(&(State::Closed, State::Open)),
        "{:#?}",
        changes.describe()
    );
    let primary_read = pool.breaker(Route::Read, PRIMARY).unwrap().snapshot();
    assert_eq!(primary_read.total_failures, 0, "{primary_read:?}");
    assert!(
        changes.of(PRIMARY, Route::Read).is_empty(),
        "{:#?}",
        changes.describe()
    );

    // Started again, the replica is found by the probes and serves reads again.
    replica
        .start_again()
        .await
        .expect("start the replica again");
    let limit = OPEN_MAX + HEALTH_INTERVAL + Duration::from_secs(3);
    changes
        .wait_until(limit, "the replica's read breaker closed", |c| {
            c.of(REPLICA, Route::Read).last() == Some(&(State::HalfOpen, State::Closed))
        })
        .await;
    assert!(
        read_on_replica(&pool).await.expect("read"),
        "not back on the replica"
    );
}

/// Scenario 5b: PreferReplica with the replica's WAL replay paused while the primary takes writes:
/// once the measured lag is above `max_replica_lag`, reads go to the primary (and see the writes);
/// once replay resumes, they go back to the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_replica_reads_skip_a_lagging_replica_until_it_catches_up() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let max_lag = ms(200);
    let changes = Changes::default();
    let pool = failover_pool(primary.url(), Some(replica.url()), &changes)
        .read_preference(ReadPreference::PreferReplica)
        .max_replica_lag(Some(max_lag))
        .connect()
        .await
        .expect("connect");
    let count_items = async || -> Result<(bool, i64), Error> {
        pool.read(sqlx::query_as::<_, (bool, i64)>(
            "SELECT pg_is_in_recovery(), count(*) FROM items",
        ))
        .fetch_one()
        .await
    };

    // A transaction replayed on the replica, so its lag has a reference point.
    pool.write(sqlx::query("INSERT INTO events (n) VALUES (0)"))
        .execute()
        .await
        .expect("write");
    let replayed = async {
        for _ in 0..500 {
            if replica
                .psql("SELECT count(*) FROM events")
                .await
                .expect("psql")
                == "1"
            {
                return true;
            }
            tokio::time::sleep(ms(10)).await;
        }
        false
    };
    assert!(replayed.await, "the replica never replayed the write");
    assert!(
        eventually(Duration::from_secs(3), || pool
            .replica_lag(REPLICA)
            .unwrap()
            .is_some_and(|lag| lag <= max_lag))
        .await,
        "lag of a caught-up replica: {:?}",
        pool.replica_lag(REPLICA)
    );
    assert_eq!(count_items().await.expect("read"), (true, 1));

    replica
        .psql("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    pool.write(sqlx::query("INSERT INTO items VALUES (2, 'primary only')"))
        .execute()
        .await
        .expect("write");
    let lagging = eventually(Duration::from_secs(5), || {
        pool.replica_lag(REPLICA)
            .unwrap()
            .is_some_and(|lag| lag > max_lag)
    })
    .await;
    assert!(
        lagging,
        "measured lag never went above {max_lag:?}: {:?}",
        pool.replica_lag(REPLICA)
    );
    for read in 0..10 {
        let (result, _) = timed(count_items()).await;
        let answer = result.unwrap_or_else(|e| panic!("read {read} failed: {e}"));
        assert_eq!(
            answer,
            (false, 2),
            "read {read} was not served by the primary"
        );
    }
    assert_eq!(
        replica
            .psql("SELECT count(*) FROM items")
            .await
            .expect("psql"),
        "1",
        "replay was not paused"
    );
    // Skipping a lagging replica is not a failure of it.
    let snapshot = pool.breaker(Route::Read, REPLICA).unwrap().snapshot();
    assert_eq!(snapshot.total_failures, 0, "{snapshot:?}");
    assert!(changes.all().is_empty(), "{:#?}", changes.describe());

    replica
        .psql("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (result, _) = timed(count_items()).await;
        match result.expect("read") {
            (true, count) => {
                assert_eq!(count, 2, "the replica serves reads before catching up");
                break;
            }
            (false, _) => assert!(
                Instant::now() < deadline,
                "reads never went back to the replica; lag {:?}",
                pool.replica_lag(REPLICA)
            ),
        }
        tokio::time::sleep(ms(20)).await;
    }
}

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

/// BUG (library): the lag query (`Backend::replication_lag` for PostgreSQL, `src/backend.rs`)
/// computes `now() - pg_last_xact_replay_timestamp()` for a replica that has not replayed all
/// it received, and turns a NULL into 0 (`COALESCE(.., 0)`). That timestamp is NULL until the
/// replica has replayed a transaction since it started, so a freshly started (or restarted)
/// replica whose replay is stuck reports a lag of exactly zero however far behind it falls,
/// `max_replica_lag` never skips it, and PreferReplica reads return stale data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stuck_since_it_started_is_not_reported_as_caught_up() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    assert_eq!(
        replica
            .psql("SELECT pg_last_xact_replay_timestamp() IS NULL")
            .await
            .expect("psql"),
        "t",
        "the replica has replayed a transaction since it started"
    );
    let max_lag = ms(200);
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(primary.url())
        .replica(replica.url())
        .read_preference(ReadPreference::PreferReplica)
        .max_replica_lag(Some(max_lag))
        .health_check_interval(HEALTH_INTERVAL)
        .build()
        .expect("build");

    replica
        .psql("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    primary
        .psql("INSERT INTO items VALUES (2, 'primary only')")
        .await
        .expect("insert on the primary");
    // The replica receives the insert but does not replay it.
    let behind = async {
        for _ in 0..500 {
            let state = replica
                .psql(
                    "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() \
                     FROM pg_stat_wal_receiver",
                )
                .await
                .expect("psql");
            if state == "t" {
                return true;
            }
            tokio::time::sleep(ms(10)).await;
        }
        false
    };
    assert!(behind.await, "the replica never received the insert");
    tokio::time::sleep(ms(500)).await;
    assert!(
        eventually(Duration::from_secs(2), || pool
            .replica_lag(REPLICA)
            .unwrap()
            .is_some())
        .await,
        "the lag was never measured"
    );

    let lag = pool.replica_lag(REPLICA).unwrap();
    let items: i64 = pool
        .read(sqlx::query_scalar("SELECT count(*) FROM items"))
        .fetch_one()
        .await
        .expect("read");
    assert!(
        lag.is_none_or(|lag| lag > max_lag),
        "a replica that has not replayed a write received 500 ms ago reports a lag of {lag:?}; \
         a PreferReplica read saw {items} of 2 rows"
    );
    assert_eq!(
        items, 2,
        "a PreferReplica read returned stale data (lag {lag:?})"
    );
}
