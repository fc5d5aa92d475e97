//! PreferReplica reads and an unhealthy replica, against a real primary and streaming
//! replica: a stopped replica is skipped (its breaker opens) until it is started again; a
//! replica whose WAL replay is paused is skipped once its measured lag is above
//! `max_replica_lag`, and used again once it caught up, also when it has not replayed a
//! transaction since it started.
//!
//! Every test starts its own servers, so tests run in parallel. Timing assertions are generous
//! sanity bounds, not measurements; every loop is bounded in count and time.

use std::time::{Duration, Instant};

use protected_pool::breaker::State;
use protected_pool::{Error, Postgres, ProtectedPool, ReadPreference, Route};

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use changes::Changes;
use failover::{
    HEALTH_INTERVAL, PRIMARY, REPLICA, failover_pool, primary_server, read_on_replica, replica_of,
    timed,
};
use scenario::{OPEN_MAX, eventually, ms};

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
