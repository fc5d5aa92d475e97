//! Cancellation safety against a real PostgreSQL server: calls dropped in flight (aborted
//! tasks, `tokio::time::timeout`) leak no connection, no pool waiter and no half-open trial
//! slot, and record nothing in the breaker.
//!
//! The servers run with `client_connection_check_interval`, so a backend whose client went
//! away ends within ~100 ms instead of finishing its `pg_sleep`: a `pg_sleep` backend that
//! stays means the pool still holds its connection open.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::{
    EndpointOptions, PoolStateChange, PoolStatus, Postgres, ProtectedPool, Route,
};
use protected_pool_testkit::PgServer;

const SLEEP_SQL: &str = "SELECT pg_sleep(5)";
/// How long the server side may take to notice that a client went away.
const SERVER_SETTLE: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn server() -> PgServer {
    PgServer::builder()
        .setting("client_connection_check_interval", "100ms")
        .start()
        .await
        .expect("start PostgreSQL")
}

/// Every state change of every breaker of a pool, in order.
#[derive(Clone, Default)]
struct Changes(Arc<Mutex<Vec<PoolStateChange>>>);

impl Changes {
    fn listener(&self) -> impl Fn(&PoolStateChange) + Send + Sync + 'static {
        let sink = self.0.clone();
        move |change| sink.lock().unwrap().push(change.clone())
    }

    fn all(&self) -> Vec<PoolStateChange> {
        self.0.lock().unwrap().clone()
    }

    fn of(&self, route: Route) -> Vec<(State, State)> {
        self.all()
            .into_iter()
            .filter(|c| c.route == route)
            .map(|c| {
                assert_eq!(&*c.endpoint, "primary", "{c}");
                (c.change.from, c.change.to)
            })
            .collect()
    }
}

/// What the server sees of our pool's connections (TCP clients; the harness's psql comes over
/// the unix socket): how many run (or last ran) `pg_sleep`, how many are running it now, and
/// how many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backends {
    sleeping: usize,
    active_sleeping: usize,
    total: usize,
}

async fn backends(pg: &PgServer) -> Backends {
    let out = pg
        .psql(
            "SELECT count(*) FILTER (WHERE query LIKE '%pg_sleep%'), \
                    count(*) FILTER (WHERE query LIKE '%pg_sleep%' AND state = 'active'), \
                    count(*) \
             FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND client_addr IS NOT NULL",
        )
        .await
        .expect("psql");
    let fields: Vec<usize> = out
        .split('|')
        .map(|f| f.parse().unwrap_or_else(|_| panic!("psql said {out:?}")))
        .collect();
    Backends {
        sleeping: fields[0],
        active_sleeping: fields[1],
        total: fields[2],
    }
}

/// Polls the server until `done` holds, failing after `limit`.
async fn wait_for_backends(
    pg: &PgServer,
    limit: Duration,
    what: &str,
    done: impl Fn(Backends) -> bool,
) -> Backends {
    let deadline = Instant::now() + limit;
    loop {
        let seen = backends(pg).await;
        if done(seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "after {limit:?}, still not {what}: {seen:?}"
        );
    }
}

/// The server ends up holding exactly the connections our pool has open, none of them left
/// from a cancelled `pg_sleep`.
async fn assert_server_matches_pool(pg: &PgServer, pool: &ProtectedPool) {
    let size = pool.status("primary").unwrap().size;
    wait_for_backends(
        pg,
        SERVER_SETTLE,
        "free of cancelled statements and matching the pool",
        |b| b.sleeping == 0 && b.total == size,
    )
    .await;
}

/// Nobody waits for a connection and no connection is checked out.
fn assert_pool_at_rest(status: PoolStatus, max: usize) {
    assert_eq!(status.waiting, 0, "callers still waiting: {status:?}");
    assert_eq!(
        status.size, status.idle,
        "connections still checked out: {status:?}"
    );
    assert!(status.size <= max, "{status:?}");
    assert_eq!(status.max_size, max, "{status:?}");
}

async fn select_one(pool: &ProtectedPool) -> i32 {
    pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
        .fetch_one()
        .await
        .expect("SELECT 1")
}

/// Eight `pg_sleep` reads on a pool of four connections: four running on the server, four
/// waiting for a connection; all aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_tasks_leak_no_connection_and_no_waiter() {
    const MAX: usize = 4;
    const TASKS: usize = 8;
    let pg = server().await;
    let changes = Changes::default();
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            max_connections: MAX,
            ..EndpointOptions::default()
        })
        .timeout(Route::Read, Duration::from_secs(30))
        .on_state_change(changes.listener())
        .connect()
        .await
        .expect("connect");
    let read = pool.breaker(Route::Read, "primary").unwrap();
    let before = read.snapshot();

    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.read(sqlx::query(SLEEP_SQL)).fetch_one().await })
        })
        .collect();

    // In flight: MAX statements running on the server, the other callers waiting.
    wait_for_backends(&pg, Duration::from_secs(5), "running every pg_sleep", |b| {
        b.active_sleeping == MAX
    })
    .await;
    let status = pool.status("primary").unwrap();
    assert_eq!(
        (status.size, status.idle, status.waiting),
        (MAX, 0, TASKS - MAX),
        "{status:?}"
    );

    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let joined = task.await;
        assert!(
            joined.as_ref().is_err_and(|e| e.is_cancelled()),
            "a task was not cancelled: {joined:?}"
        );
    }

    let status = pool.status("primary").unwrap();
    assert_pool_at_rest(status, MAX);
    // The cancelled connections were closed, not parked in the pool with a statement running.
    assert_eq!(status.size, 0, "{status:?}");
    assert_server_matches_pool(&pg, &pool).await;

    // A cancelled call records nothing.
    let after = read.snapshot();
    assert_eq!(after.total_calls, before.total_calls, "{after:?}");
    assert_eq!(after.total_failures, 0, "{after:?}");
    assert_eq!(after.state, State::Closed);
    assert!(changes.all().is_empty(), "{:?}", changes.all());

    // The pool serves full concurrency again.
    let again: Vec<_> = (0..TASKS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { select_one(&pool).await })
        })
        .collect();
    for task in again {
        assert_eq!(task.await.unwrap(), 1);
    }
    assert_pool_at_rest(pool.status("primary").unwrap(), MAX);
    assert_server_matches_pool(&pg, &pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_around_calls_leak_nothing_and_trip_nothing() {
    const MAX: usize = 4;
    const ROUNDS: usize = 25;
    let pg = server().await;
    let changes = Changes::default();
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            max_connections: MAX,
            ..EndpointOptions::default()
        })
        .on_state_change(changes.listener())
        .connect()
        .await
        .expect("connect");
    assert_eq!(select_one(&pool).await, 1);
    let read = pool.breaker(Route::Read, "primary").unwrap();
    let before = read.snapshot();
    let baseline = pool.status("primary").unwrap();
    assert_pool_at_rest(baseline, MAX);

    for round in 0..ROUNDS {
        let started = Instant::now();
        let result =
            tokio::time::timeout(ms(100), pool.read(sqlx::query(SLEEP_SQL)).fetch_one()).await;
        assert!(
            result.is_err(),
            "round {round}: pg_sleep(5) finished: {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "round {round}: cancelling took {:?}",
            started.elapsed()
        );
        let status = pool.status("primary").unwrap();
        assert_pool_at_rest(status, MAX);
    }

    // Back to the baseline: nothing waits, nothing is checked out, and the breaker, which
    // opens after 3 failures in a row, heard of none of the 25 cancellations.
    let status = pool.status("primary").unwrap();
    assert_pool_at_rest(status, MAX);
    assert!(status.size <= baseline.size, "{status:?} vs {baseline:?}");
    let after = read.snapshot();
    assert_eq!(after.state, State::Closed, "{after:?}");
    assert_eq!(after.total_failures, before.total_failures, "{after:?}");
    assert_eq!(after.total_calls, before.total_calls, "{after:?}");
    assert_eq!(after.consecutive_failures, 0, "{after:?}");
    assert!(changes.all().is_empty(), "{:?}", changes.all());
    assert_server_matches_pool(&pg, &pool).await;

    assert_eq!(select_one(&pool).await, 1);
    assert_pool_at_rest(pool.status("primary").unwrap(), MAX);
}

/// The read breaker tripped by a killed server, which is then restarted: two trial reads are
/// cancelled in flight (a timeout around the call, an aborted task), then a third closes the
/// breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_half_open_trial_frees_its_slot() {
    let pg = server().await;
    let changes = Changes::default();
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .breaker(
            Route::Read,
            BreakerConfig {
                consecutive_failures: Some(3),
                open: OpenDuration {
                    base: ms(300),
                    multiplier: 2.0,
                    max: Duration::from_secs(1),
                    jitter: 0.0,
                },
                // One trial at a time, one success closes: a leaked slot blocks every read
                // until max_wait_in_half_open (30 s).
                half_open_max_calls: 1,
                success_threshold: 1,
                ..BreakerConfig::read()
            },
        )
        .timeout(Route::Read, Duration::from_secs(30))
        // The trials under test are user calls: no background probe may take the slot.
        .recovery_probes(false)
        .on_state_change(changes.listener())
        .connect()
        .await
        .expect("connect");
    assert_eq!(select_one(&pool).await, 1);
    let read = pool.breaker(Route::Read, "primary").unwrap();

    // Trip the read breaker with a real outage.
    pg.kill9().await.expect("kill -9");
    for _ in 0..3 {
        let error = pool
            .read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one()
            .await
            .expect_err("a read from a killed server succeeded");
        assert!(!error.is_circuit_open(), "{error}");
    }
    assert_eq!(read.state(), State::Open);
    pg.start_again().await.expect("start again");
    tokio::time::sleep(read.snapshot().retry_after.unwrap() + ms(50)).await;
    let failures = read.snapshot().total_failures;
    assert_eq!(failures, 3);

    // 1. A trial cancelled by a timeout around the call.
    let trial = {
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::timeout(
                Duration::from_secs(2),
                pool.read(sqlx::query(SLEEP_SQL)).fetch_one(),
            )
            .await
        })
    };
    assert_trial_in_flight(&pg, &pool).await;
    let outcome = trial.await.unwrap();
    assert!(outcome.is_err(), "the trial was not cancelled: {outcome:?}");
    assert_trial_slot_free(&pool, failures);

    // 2. A trial whose task is aborted.
    let trial = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.read(sqlx::query(SLEEP_SQL)).fetch_one().await })
    };
    assert_trial_in_flight(&pg, &pool).await;
    trial.abort();
    let joined = trial.await;
    assert!(
        joined.as_ref().is_err_and(|e| e.is_cancelled()),
        "{joined:?}"
    );
    assert_trial_slot_free(&pool, failures);

    // The next read is admitted as a trial and closes the breaker.
    assert_eq!(select_one(&pool).await, 1);
    assert_eq!(read.state(), State::Closed);
    assert_eq!(
        changes.of(Route::Read),
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed),
        ]
    );
    let status = pool.status("primary").unwrap();
    assert_eq!(status.waiting, 0, "{status:?}");
    assert_eq!(status.size, status.idle, "{status:?}");
    assert_server_matches_pool(&pg, &pool).await;
}

/// The one trial slot is taken by a statement running on the server, and a second read is
/// refused meanwhile.
async fn assert_trial_in_flight(pg: &PgServer, pool: &ProtectedPool) {
    wait_for_backends(pg, Duration::from_secs(2), "running the trial", |b| {
        b.active_sleeping == 1
    })
    .await;
    let read = pool.breaker(Route::Read, "primary").unwrap();
    let snapshot = read.snapshot();
    assert_eq!(snapshot.state, State::HalfOpen, "{snapshot:?}");
    assert_eq!(snapshot.half_open_trials, 1, "{snapshot:?}");
    let refused = pool
        .read(sqlx::query_scalar::<_, i32>("SELECT 1"))
        .fetch_one()
        .await
        .expect_err("a second trial was admitted");
    assert!(refused.is_circuit_open(), "{refused}");
    assert!(refused.retry_after().is_some(), "{refused}");
}

/// After a cancelled trial: still half-open, no trial in flight, nothing recorded.
fn assert_trial_slot_free(pool: &ProtectedPool, failures: u64) {
    let snapshot = pool.breaker(Route::Read, "primary").unwrap().snapshot();
    assert_eq!(snapshot.state, State::HalfOpen, "{snapshot:?}");
    assert_eq!(
        snapshot.half_open_trials, 0,
        "trial slot leaked: {snapshot:?}"
    );
    assert_eq!(snapshot.total_failures, failures, "{snapshot:?}");
    let status = pool.status("primary").unwrap();
    assert_eq!(status.waiting, 0, "{status:?}");
    assert_eq!(status.size, status.idle, "{status:?}");
}
