//! sqlx code run through the pool unchanged: the pool as an `Executor` (`&pool`, and one per
//! route), as an `Acquire` (`sqlx::migrate!().run(&pool)`), transactions held by the caller,
//! streams of rows, sqlx's `Map` (what `query!` builds), and transactions retried when the
//! server rolls them back. Against real PostgreSQL servers; every test starts its own.

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use protected_pool::{
    EndpointOptions, Error, Postgres, ProtectedPool, ReadPreference, Route, TransactionRetry,
};
use sqlx::{PgExecutor, Row};

use changes::Changes;
use failover::{PRIMARY, REPLICA, failover_pool, primary_server, replica_of};
use scenario::{active_statements, eventually, guarded, ms};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

// Ordinary sqlx functions, as a service has them: they take any executor.

async fn add_note(db: impl PgExecutor<'_>, id: i32, note: &str) -> sqlx::Result<u64> {
    let done = sqlx::query("INSERT INTO items (id, note) VALUES ($1, $2)")
        .bind(id)
        .bind(note)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

async fn note_of(db: impl PgExecutor<'_>, id: i32) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT note FROM items WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

async fn in_recovery(db: impl PgExecutor<'_>) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(db)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_functions_and_migrations_take_the_pool_unchanged() {
    let pg = primary_server().await;
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("connect");

    guarded("the migrations", MIGRATOR.run(&pool))
        .await
        .expect("migrate!().run(&pool) applies the migrations");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .expect("the migrated table is there");
    assert_eq!(users, 0);

    assert_eq!(
        add_note(&pool, 2, "written through &pool").await.unwrap(),
        1
    );
    assert_eq!(
        note_of(pool.reader(), 2).await.unwrap().as_deref(),
        Some("written through &pool")
    );
    assert_eq!(note_of(pool.authenticator(), 99).await.unwrap(), None);
    let all = sqlx::query("SELECT id FROM items ORDER BY id")
        .fetch_all(pool.reader())
        .await
        .unwrap();
    let ids: Vec<i32> = all.iter().map(|row| row.get(0)).collect();
    assert_eq!(ids, [1, 2]);

    // An error the server answered with reaches sqlx code as sqlx gives it.
    let duplicate = add_note(&pool, 2, "again").await.unwrap_err();
    let database = duplicate
        .as_database_error()
        .expect("the server's own error, not wrapped");
    assert!(database.is_unique_violation(), "{duplicate}");
    assert!(Error::from_sqlx(&duplicate).is_none());
    // ... and it opened nothing: the server answered.
    let write = pool.breaker(Route::Write, PRIMARY).unwrap().snapshot();
    assert_eq!(write.state, protected_pool::breaker::State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reaches_sqlx_code_as_an_error_that_gives_the_pool_error_back() {
    let pg = primary_server().await;
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("connect");
    pool.force_open(Route::Write, PRIMARY).unwrap();

    let started = Instant::now();
    let refused = add_note(&pool, 3, "never").await.unwrap_err();
    assert!(
        started.elapsed() < ms(50),
        "refused in {:?}",
        started.elapsed()
    );
    assert!(matches!(refused, sqlx::Error::Io(_)), "{refused:?}");
    let pool_error = Error::from_sqlx(&refused).expect("the pool's error inside");
    assert!(pool_error.is_circuit_open(), "{pool_error}");
    assert!(pool_error.is_unavailable());
    assert!(
        refused.to_string().contains("refused by endpoint primary"),
        "{refused}"
    );

    // The read route is another breaker: it still serves.
    assert_eq!(
        note_of(pool.reader(), 1).await.unwrap().as_deref(),
        Some("on both servers")
    );
    pool.reset(Route::Write, PRIMARY).unwrap();
    assert_eq!(add_note(&pool, 3, "after the reset").await.unwrap(), 1);
    assert_eq!(
        pg.psql("SELECT note FROM items WHERE id = 3")
            .await
            .unwrap(),
        "after the reset"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_the_map_and_the_stream_move_to_the_next_endpoint_when_one_is_down() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let changes = Changes::default();
    let pool = failover_pool(primary.url(), Some(replica.url()), &changes)
        .read_preference(ReadPreference::PreferReplica)
        .connect()
        .await
        .expect("connect");
    assert!(
        in_recovery(pool.reader()).await.unwrap(),
        "the replica serves reads"
    );
    assert!(
        !in_recovery(&pool).await.unwrap(),
        "&pool runs on the primary"
    );

    replica.kill9().await.expect("kill the replica");

    // Executor: the read moves on to the primary.
    let served_by_replica = guarded("a read", in_recovery(pool.reader()))
        .await
        .expect("the primary serves the read");
    assert!(!served_by_replica);

    // sqlx's Map, as query! builds it.
    let note: String = guarded(
        "a mapped read",
        pool.read(
            sqlx::query("SELECT note FROM items WHERE id = $1")
                .bind(1_i32)
                .try_map(|row: sqlx::postgres::PgRow| row.try_get::<String, _>(0)),
        )
        .fetch_one(),
    )
    .await
    .expect("a Map moves on too");
    assert_eq!(note, "on both servers");

    // A stream, before its first row.
    let rows: Vec<(bool, i32)> = guarded(
        "a stream",
        pool.read(sqlx::query_as::<_, (bool, i32)>(
            "SELECT pg_is_in_recovery(), g FROM generate_series(1, 5) g",
        ))
        .fetch()
        .try_collect::<Vec<_>>(),
    )
    .await
    .expect("the stream is served by the primary");
    assert_eq!(rows, (1..=5).map(|g| (false, g)).collect::<Vec<_>>());
    let mapped: Vec<i32> = guarded(
        "a mapped stream",
        pool.read(
            sqlx::query("SELECT g FROM generate_series(1, 3) g")
                .try_map(|row: sqlx::postgres::PgRow| row.try_get::<i32, _>(0)),
        )
        .fetch()
        .try_collect::<Vec<_>>(),
    )
    .await
    .expect("a Map's stream moves on too");
    assert_eq!(mapped, [1, 2, 3]);
    let _ = REPLICA;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_goes_at_the_callers_pace_and_is_not_replayed_after_its_first_row() {
    let pg = primary_server().await;
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .timeout(Route::Read, Duration::from_secs(1))
        .connect()
        .await
        .expect("connect");

    // Slower than the read timeout in all, and whole: after its first row the stream is the
    // caller's.
    let mut slow = pool
        .read(sqlx::query_scalar::<_, i32>(
            "SELECT g FROM generate_series(1, 4) g",
        ))
        .fetch();
    let mut seen = Vec::new();
    while let Some(g) = guarded("a slow stream", slow.try_next()).await.unwrap() {
        seen.push(g);
        tokio::time::sleep(ms(450)).await;
    }
    assert_eq!(seen, [1, 2, 3, 4]);

    // Cut mid-way: the caller gets the error, and the statement is not run again elsewhere or
    // from the start.
    let mut long = pool
        .read(sqlx::query_scalar::<_, i32>(
            "SELECT g FROM generate_series(1, 5000000) g",
        ))
        .fetch();
    let mut last = 0;
    for _ in 0..10 {
        let g = long.try_next().await.unwrap().expect("a row");
        assert_eq!(g, last + 1);
        last = g;
    }
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE query LIKE '%generate_series(1, 5000000)%' AND pid <> pg_backend_pid()",
    )
    .await
    .expect("terminate the streaming session");
    let error = loop {
        match guarded("the cut stream", long.next()).await {
            Some(Ok(g)) => {
                assert_eq!(g, last + 1, "rows in order, never from the start again");
                last = g;
            }
            Some(Err(error)) => break error,
            None => panic!("the stream ended cleanly after {last} rows although it was cut"),
        }
    };
    assert!(last < 5_000_000, "{last}");
    assert!(
        error.is_outcome_unknown() || error.class().is_some(),
        "{error}"
    );
    assert!(
        guarded("the end", long.next()).await.is_none(),
        "nothing after the error"
    );
    // The pool goes on.
    let one: i32 = pool
        .read(sqlx::query_scalar("SELECT 1"))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_stops_its_statement_on_the_server() {
    let pg = primary_server().await;
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("connect");
    let mut stream = pool
        .read(sqlx::query_scalar::<_, i32>(
            // In the select list, so that rows are made as they are read.
            "SELECT generate_series(1, 100000000)",
        ))
        .fetch();
    assert_eq!(stream.try_next().await.unwrap(), Some(1));
    assert_eq!(
        active_statements(&pg, "generate_series(1, 100000000)").await,
        1
    );
    drop(stream);
    let mut stopped = false;
    for _ in 0..100 {
        if active_statements(&pg, "generate_series(1, 100000000)").await == 0 {
            stopped = true;
            break;
        }
        tokio::time::sleep(ms(50)).await;
    }
    assert!(
        stopped,
        "the statement still runs 5 s after its stream was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_held_by_the_caller_commits_or_rolls_back_when_dropped() {
    let pg = primary_server().await;
    // One connection: the one a dropped transaction leaves behind is the next call's.
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            max_connections: 1,
            ..EndpointOptions::default()
        })
        .connect()
        .await
        .expect("connect");

    let mut tx = pool.begin().await.expect("begin");
    add_note(&mut *tx, 10, "committed").await.unwrap();
    tx.commit().await.expect("commit");

    let mut tx = pool.begin().await.expect("begin");
    add_note(&mut *tx, 11, "dropped").await.unwrap();
    assert_eq!(
        note_of(&mut *tx, 11).await.unwrap().as_deref(),
        Some("dropped")
    );
    drop(tx);

    let mut tx = pool.begin().await.expect("begin");
    add_note(&mut *tx, 12, "rolled back").await.unwrap();
    tx.rollback().await.expect("rollback");

    assert_eq!(
        note_of(&pool, 10).await.unwrap().as_deref(),
        Some("committed")
    );
    assert_eq!(
        note_of(&pool, 11).await.unwrap(),
        None,
        "a dropped transaction rolls back"
    );
    assert_eq!(note_of(&pool, 12).await.unwrap(), None);
    // The connection came back outside any transaction: this write stays.
    add_note(&pool, 13, "after").await.unwrap();
    assert_eq!(
        pg.psql("SELECT count(*) FROM items WHERE id >= 10")
            .await
            .unwrap(),
        "2"
    );

    // A held connection, as `Acquire` gives it to sqlx code.
    let mut conn = pool.acquire(Route::Read).await.expect("acquire");
    assert_eq!(conn.endpoint(), PRIMARY);
    assert_eq!(
        note_of(&mut *conn, 13).await.unwrap().as_deref(),
        Some("after")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_server_rolls_back_for_a_conflict_is_run_again() {
    let pg = primary_server().await;
    pg.psql("CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL); INSERT INTO counters VALUES (1, 0)")
        .await
        .unwrap();
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("connect");

    // Two serializable transactions read the counter, then both write it: the second writer
    // fails with 40001 once the first commits.
    let both_read = Arc::new(tokio::sync::Barrier::new(2));
    let runs = Arc::new(AtomicUsize::new(0));
    let increment = |retry: Option<TransactionRetry>| {
        let (pool, both_read, runs) = (pool.clone(), both_read.clone(), runs.clone());
        async move {
            let first_run = AtomicUsize::new(0);
            let operation = async |tx: &mut sqlx::Transaction<'_, Postgres>| {
                runs.fetch_add(1, Ordering::SeqCst);
                sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                    .execute(&mut **tx)
                    .await?;
                let n: i32 = sqlx::query_scalar("SELECT n FROM counters WHERE id = 1")
                    .fetch_one(&mut **tx)
                    .await?;
                if first_run.fetch_add(1, Ordering::SeqCst) == 0 {
                    both_read.wait().await;
                }
                sqlx::query("UPDATE counters SET n = $1 WHERE id = 1")
                    .bind(n + 1)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            };
            match retry {
                Some(retry) => pool.transaction_with_retry(retry, operation).await,
                None => pool.transaction(operation).await,
            }
        }
    };

    // Without retries, one of them fails with the server's serialization failure.
    let (a, b) = guarded("two transactions", async {
        tokio::join!(increment(None), increment(None))
    })
    .await;
    let failed: Vec<Error> = [a, b].into_iter().filter_map(Result::err).collect();
    assert_eq!(failed.len(), 1, "one conflict");
    assert_eq!(
        failed[0].database_code().as_deref(),
        Some("40001"),
        "{}",
        failed[0]
    );
    assert_eq!(pg.psql("SELECT n FROM counters").await.unwrap(), "1");

    // With them, both go through: the loser runs again on a fresh snapshot.
    runs.store(0, Ordering::SeqCst);
    let retry = Some(TransactionRetry::default());
    let (a, b) = guarded("two transactions", async {
        tokio::join!(increment(retry), increment(retry))
    })
    .await;
    a.expect("retried until it commits");
    b.expect("retried until it commits");
    assert_eq!(pg.psql("SELECT n FROM counters").await.unwrap(), "3");
    assert_eq!(runs.load(Ordering::SeqCst), 3, "two runs and one retry");

    // A query error is never retried.
    runs.store(0, Ordering::SeqCst);
    let bad = pool
        .transaction_with_retry(TransactionRetry::attempts(5), async |tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            sqlx::query("SELECT * FROM no_such_table")
                .execute(&mut **tx)
                .await?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert_eq!(bad.database_code().as_deref(), Some("42P01"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_begun_on_a_stopped_primary_opens_the_breaker_and_is_refused() {
    let pg = primary_server().await;
    let changes = Changes::default();
    let pool = failover_pool(pg.url(), None, &changes)
        .connect()
        .await
        .expect("connect");
    pg.kill9().await.expect("kill the primary");
    let mut refused = None;
    for _ in 0..10 {
        match guarded("begin", pool.begin()).await {
            Ok(_) => panic!("a transaction began on a killed server"),
            Err(error) if error.is_circuit_open() => {
                refused = Some(error);
                break;
            }
            Err(error) => assert!(error.is_unavailable(), "{error}"),
        }
    }
    let refused = refused.expect("the write breaker opens after failed BEGINs");
    assert!(refused.retry_after().is_some());
    pg.start_again().await.expect("start the primary again");
    assert!(
        eventually(Duration::from_secs(10), || {
            pool.breaker(Route::Write, PRIMARY)
                .unwrap()
                .snapshot()
                .state
                == protected_pool::breaker::State::Closed
        })
        .await,
        "the write breaker closes again once the server is back"
    );
    let mut tx = pool.begin().await.expect("begin after recovery");
    add_note(&mut *tx, 20, "after recovery").await.unwrap();
    tx.commit().await.unwrap();
}
