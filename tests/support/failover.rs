//! The servers, pool and readers of the failover scenarios (`tests/pg_failover_*.rs`): a
//! primary and a streaming replica holding the row every read asks for, the reads and the
//! write every test makes, a pool with quick breakers on them, and groups of reader tasks.
//!
//! Included, beside the modules it builds on, with
//! `#[path = "support/changes.rs"] mod changes;`,
//! `#[path = "support/scenario.rs"] mod scenario;` and
//! `#[path = "support/failover.rs"] mod failover;`.
#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protected_pool::breaker::BreakerConfig;
use protected_pool::{EndpointOptions, Error, PoolBuilder, Postgres, ProtectedPool, Route};
use protected_pool_testkit::PgServer;

use crate::changes::Changes;
use crate::scenario::{HANG_GUARD, ms, quick};

/// A call the breaker refuses must come back at once; 50 ms is far above the microseconds it
/// takes, so only a call that reached for the network would fail it.
pub const REJECTION_BOUND: Duration = Duration::from_millis(50);
/// How often the probes measure replica lag (and the longest a probe task sleeps).
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(100);
pub const PRIMARY: &str = "primary";
pub const REPLICA: &str = "replica-1";

/// Awaits `call`, failing the test instead of hanging if it takes longer than [`HANG_GUARD`];
/// returns its result and how long it took.
pub async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(HANG_GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("a pool call hung for {HANG_GUARD:?}"));
    (result, started.elapsed())
}

/// A primary holding the row every read asks for, and an empty `events` table for writes.
pub async fn primary_server() -> PgServer {
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
pub async fn replica_of(primary: &PgServer) -> PgServer {
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
pub async fn read_on_replica(pool: &ProtectedPool) -> Result<bool, Error> {
    pool.read(sqlx::query_scalar::<_, bool>(
        "SELECT pg_is_in_recovery() FROM items WHERE id = 1",
    ))
    .fetch_one()
    .await
}

/// The same read as [`read_on_replica`], through `read_with` (sqlx code on the connection).
pub async fn read_on_replica_with(pool: &ProtectedPool) -> Result<bool, Error> {
    pool.read_with(async |conn| {
        sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery() FROM items WHERE id = 1")
            .fetch_one(&mut *conn)
            .await
    })
    .await
}

pub async fn write_event(pool: &ProtectedPool) -> Result<(), Error> {
    pool.write(sqlx::query("INSERT INTO events (n) VALUES (1)"))
        .execute()
        .await
        .map(drop)
}

/// A pool on `primary_url` (and `replica_url`, if any) with quick read and write breakers,
/// 100 ms health checks, a 1 s connect timeout and `changes` listening.
pub fn failover_pool(
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
pub struct ResumeOnDrop<'a>(pub &'a PgServer);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.resume();
    }
}

/// What a group of reader tasks saw.
#[derive(Default)]
pub struct ReadTally {
    pub by_primary: AtomicU64,
    pub by_replica: AtomicU64,
    pub errors: Mutex<Vec<String>>,
    pub slowest: Mutex<Duration>,
}

impl ReadTally {
    pub fn record(&self, result: Result<bool, Error>, elapsed: Duration) {
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

    pub fn counts(&self) -> (u64, u64) {
        (
            self.by_primary.load(Ordering::Relaxed),
            self.by_replica.load(Ordering::Relaxed),
        )
    }
}

/// Starts `readers` tasks that read until `stop` is set (at most `max_reads` each, pausing
/// `pause` between reads); half of them use `read`, half `read_with`.
pub fn spawn_readers(
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
