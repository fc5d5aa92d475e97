//! Endpoints behind PgBouncer in transaction mode (the real Debian `pgbouncer`, 1.18: no
//! prepared statement support), declared with `EndpointOptions::transaction_pooler`.
//!
//! Each client connection to PgBouncer runs each transaction on whichever server connection
//! is free. Two things the pool does on a direct connection are then wrong: named prepared
//! statements (they live on one server connection, where other clients meet them) and
//! stopping a statement given up on with `pg_cancel_backend(pid)` (the pid seen at connect
//! time is a server connection other clients use). Each is shown failing without the setting,
//! then working with it. Few server connections (`default_pool_size` 1 or 2) make clients
//! share them on every statement rather than now and then.
//!
//! Time bounds are generous sanity bounds that only a defect exceeds, not measurements.

#[path = "support/scenario.rs"]
mod scenario;

use std::sync::Arc;
use std::time::Duration;

use protected_pool::breaker::{BreakerConfig, State};
use protected_pool::{EndpointOptions, Postgres, ProtectedPool, Route};
use protected_pool_testkit::{PgBouncer, PgServer};
use scenario::{eventually, guarded, ms, quick};
use sqlx::ConnectOptions;

const PRIMARY: &str = "primary";

fn pooler(transaction_pooler: bool, max_connections: usize) -> EndpointOptions {
    EndpointOptions {
        max_connections,
        transaction_pooler,
        ..EndpointOptions::default()
    }
}

/// A server, PgBouncer in front of it with one server connection, and a pool of 4
/// connections on PgBouncer, declared behind a transaction pooler or not.
async fn behind_pgbouncer(transaction_pooler: bool) -> (PgServer, PgBouncer, ProtectedPool) {
    let pg = PgServer::start().await.expect("start the server");
    let bouncer = PgBouncer::builder()
        .default_pool_size(1)
        .start(&pg)
        .await
        .expect("start pgbouncer");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(bouncer.url())
        .endpoint_options(pooler(transaction_pooler, 4))
        .connect()
        .await
        .expect("connect");
    (pg, bouncer, pool)
}

/// `clients` reads at once, each with a parameter, each holding its connection for a moment
/// so that the pool opens `clients` connections; the errors, as text.
async fn concurrent_reads(pool: &ProtectedPool, clients: i32) -> Vec<String> {
    let reads: Vec<_> = (0..clients)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let answer: Result<i32, _> = pool
                    .read(sqlx::query_scalar("SELECT $1::int FROM pg_sleep(0.05)").bind(n))
                    .fetch_one()
                    .await;
                match answer {
                    Ok(got) if got == n => Ok(()),
                    Ok(got) => Err(format!("asked for {n}, got {got}")),
                    Err(error) => Err(error.to_string()),
                }
            })
        })
        .collect();
    let mut errors = Vec::new();
    for read in reads {
        if let Err(error) = guarded("a read", read).await.expect("the read task") {
            errors.push(error);
        }
    }
    errors
}

/// Without the setting, two client connections sharing one server connection both prepare
/// `sqlx_s_1` there: the second fails with "already exists". This is what the setting is
/// for; if it stops failing, PgBouncer or sqlx changed and the setting may be moot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_statements_collide_through_pgbouncer_without_the_setting() {
    let (_pg, _bouncer, pool) = behind_pgbouncer(false).await;
    let mut errors = Vec::new();
    for _ in 0..3 {
        errors.extend(concurrent_reads(&pool, 4).await);
    }
    assert!(
        errors
            .iter()
            .any(|error| error.contains("prepared statement \"sqlx_s_")),
        "no read failed for a named statement: {errors:?}"
    );
}

/// With the setting, the same reads all succeed, each with its own answer; so do writes and
/// a transaction whose code runs unnamed statements itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_and_transactions_work_through_pgbouncer_with_the_setting() {
    let (pg, _bouncer, pool) = behind_pgbouncer(true).await;
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        .await
        .expect("psql");
    for _ in 0..3 {
        let errors = concurrent_reads(&pool, 4).await;
        assert!(errors.is_empty(), "{errors:?}");
    }
    assert!(pool.status(PRIMARY).unwrap().size >= 2);

    let writes: Vec<_> = (0..8)
        .map(|id| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.write(
                    sqlx::query("INSERT INTO items (id, name) VALUES ($1, $2)")
                        .bind(id)
                        .bind(format!("item {id}")),
                )
                .execute()
                .await
            })
        })
        .collect();
    for write in writes {
        guarded("a write", write)
            .await
            .expect("the write task")
            .expect("a write");
    }
    let moved = guarded(
        "a transaction",
        pool.transaction(async |tx| {
            sqlx::query("UPDATE items SET name = $1 WHERE id = $2")
                .bind("renamed")
                .bind(3)
                .persistent(false)
                .execute(&mut **tx)
                .await?;
            sqlx::query("DELETE FROM items WHERE id = $1")
                .bind(7)
                .persistent(false)
                .execute(&mut **tx)
                .await
                .map(|done| done.rows_affected())
        }),
    )
    .await
    .expect("a transaction");
    assert_eq!(moved, 1);
    let names: Vec<String> = guarded(
        "a read",
        pool.read(
            sqlx::query_scalar("SELECT name FROM items WHERE id = ANY($1) ORDER BY id")
                .bind(vec![3, 7]),
        )
        .fetch_all(),
    )
    .await
    .expect("a read");
    assert_eq!(names, ["renamed"]);
    assert_eq!(
        pg.psql("SELECT count(*) FROM items").await.expect("psql"),
        "7"
    );
}

/// PgBouncer has one server connection, S1, and one more in reserve for a client that waited
/// 0.1 s. The pool's connection saw S1's pid when it was opened; then another client's
/// statement runs on S1, and the pool's read, on the reserve connection, times out. Stopping
/// that read with `pg_cancel_backend(pid)` stops the other client's statement instead. (With
/// one server connection at first, which client runs where leaves nothing to chance.)
async fn victim_of_a_timed_out_read(transaction_pooler: bool) -> Result<(), sqlx::Error> {
    let pg = PgServer::start().await.expect("start the server");
    let bouncer = PgBouncer::builder()
        .default_pool_size(1)
        .setting("reserve_pool_size", "1")
        .setting("reserve_pool_timeout", "0.1")
        .start(&pg)
        .await
        .expect("start pgbouncer");
    // One connection, opened now: PgBouncer's only server connection, S1, runs its
    // connect-time statements.
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(bouncer.url())
        .endpoint_options(pooler(transaction_pooler, 1))
        .timeout(Route::Read, ms(300))
        .health_check_interval(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect");

    // The other client gets S1, the only server connection.
    let mut victim = bouncer
        .url()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .application_name("victim")
        .connect()
        .await
        .expect("the other client connects");
    let statement = tokio::spawn(async move {
        sqlx::query("SELECT pg_sleep(2)")
            .persistent(false)
            .execute(&mut victim)
            .await
            .map(drop)
    });
    let pg = Arc::new(pg);
    let running = {
        let pg = pg.clone();
        async move {
            for _ in 0..200 {
                if scenario::active_statements(&pg, "SELECT pg_sleep(2)").await == 1 {
                    return true;
                }
                tokio::time::sleep(ms(10)).await;
            }
            false
        }
    };
    assert!(running.await, "the other client's statement did not start");

    // The pool's read gets the reserve connection, and times out.
    let read = guarded(
        "a read",
        pool.read(sqlx::query("SELECT pg_sleep(1)")).execute(),
    )
    .await;
    assert!(read.is_err(), "the read did not time out: {read:?}");
    guarded("the other client's statement", statement)
        .await
        .expect("the other client's task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_a_timed_out_read_cancels_another_clients_statement() {
    let error = victim_of_a_timed_out_read(false)
        .await
        .expect_err("the other client's statement was not cancelled");
    assert!(
        error
            .to_string()
            .contains("canceling statement due to user request"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_setting_a_timed_out_read_leaves_other_clients_alone() {
    victim_of_a_timed_out_read(true)
        .await
        .expect("the other client's statement must finish");
}

/// The primary behind PgBouncer, a streaming replica reached directly. PgBouncer's server is
/// killed: PgBouncer still takes connections but cannot serve them, reads move to the
/// replica and the primary's read breaker opens; started again, reads come back to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_fail_over_from_a_pgbouncer_whose_server_died_and_come_back() {
    let primary = PgServer::start().await.expect("start the primary");
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("start a replica");
    let bouncer = PgBouncer::in_front_of(&primary)
        .await
        .expect("start pgbouncer");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(bouncer.url())
        .replica(replica.url())
        .endpoint_options_for(PRIMARY, pooler(true, 4))
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .health_check_interval(ms(200))
        .connect()
        .await
        .expect("connect");
    let in_recovery = || async {
        guarded(
            "a read",
            pool.read(sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()"))
                .fetch_one(),
        )
        .await
    };
    assert!(
        !in_recovery().await.expect("a read"),
        "the primary serves reads"
    );

    primary.kill9().await.expect("kill -9 the primary");
    for _ in 0..5 {
        assert!(
            in_recovery().await.expect("a read served by the replica"),
            "a read answered by the dead primary"
        );
    }
    let read_breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || read_breaker.state()
            == State::Open
            || read_breaker.state() == State::HalfOpen)
        .await,
        "the primary's read breaker is {:?}",
        read_breaker.state()
    );

    primary
        .start_again()
        .await
        .expect("start the primary again");
    let mut back = false;
    for _ in 0..100 {
        if matches!(in_recovery().await, Ok(false)) {
            back = true;
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    assert!(
        back,
        "reads did not come back to the primary behind pgbouncer"
    );
    assert!(
        eventually(Duration::from_secs(5), || read_breaker.state()
            == State::Closed)
        .await,
        "the primary's read breaker is {:?}",
        read_breaker.state()
    );
}

/// Streams and sqlx code through the pool's executors, with the setting: each stream is one
/// transaction, so its round trips reach one server connection while other clients share it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_executors_work_through_pgbouncer_with_the_setting() {
    use futures_util::TryStreamExt;

    let (_pg, _bouncer, pool) = behind_pgbouncer(true).await;
    let streams: Vec<_> = (0..4)
        .map(|n| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let rows: Vec<i32> = pool
                    .read(
                        sqlx::query_scalar::<_, i32>(
                            "SELECT $1::int + g FROM generate_series(1, 50) g",
                        )
                        .bind(n * 1000),
                    )
                    .fetch()
                    .try_collect()
                    .await?;
                let through_executor: i64 = sqlx::query_scalar("SELECT $1::int8 * 2")
                    .bind(i64::from(n))
                    .fetch_one(pool.reader())
                    .await
                    .expect("the executor's statement");
                assert_eq!(through_executor, i64::from(n) * 2);
                Ok::<_, protected_pool::Error>((n, rows))
            })
        })
        .collect();
    for stream in streams {
        let (n, rows) = guarded("a stream", stream)
            .await
            .expect("the stream task")
            .expect("a stream through pgbouncer");
        assert_eq!(rows, (1..=50).map(|g| n * 1000 + g).collect::<Vec<_>>());
    }
}
