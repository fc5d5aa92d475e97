//! Error classification against real PostgreSQL servers: each test provokes one real failure
//! and checks its class and what the route's breaker made of it.
//!
//! Every test starts its own server(s) through the testkit, so tests run in parallel.

#[path = "support/pool.rs"]
mod pool_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_support::{Counted, ENDPOINT, counted, expect_err, recorded, snapshot};
use protected_pool::breaker::State;
use protected_pool::{EndpointOptions, Error, ErrorClass, Postgres, ProtectedPool, Route};
use protected_pool_testkit::{APP_USER, PgServer};
use sqlx::Connection;
use tokio::sync::Barrier;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn pool_for(url: &str) -> ProtectedPool<Postgres> {
    ProtectedPool::<Postgres>::builder()
        .primary(url)
        .build()
        .expect("valid configuration")
}

async fn migrate(pool: &ProtectedPool<Postgres>) {
    pool.with_connection(Route::Write, async |conn| {
        MIGRATOR.run(conn).await.map_err(Into::into)
    })
    .await
    .expect("migrations apply");
}

/// Polls `psql` until `sql` returns a non-empty answer.
async fn psql_until(pg: &PgServer, sql: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let out = pg.psql(sql).await.expect("psql");
        if !out.is_empty() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "no answer to {sql:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_a_fast_counted_connection_failure() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            connect_timeout: Duration::from_secs(5),
            ..EndpointOptions::default()
        })
        .build()
        .expect("valid configuration");
    pg.stop_fast().await.expect("server stops");

    let started = Instant::now();
    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one(),
    )
    .await;
    let elapsed = started.elapsed();
    let error = expect_err(result);

    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert!(
        elapsed < Duration::from_secs(2),
        "a refused connection took {elapsed:?} (connect timeout 5 s): {error}"
    );
    assert_eq!(error.route(), Some(Route::Read));
    assert_eq!(error.endpoint(), Some(ENDPOINT));
    // Nothing was sent: no connection was ever made.
    assert!(!error.is_outcome_unknown(), "{error}");
    assert!(
        matches!(error.as_sqlx(), Some(sqlx::Error::Io(_))),
        "expected an I/O error, got {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_is_a_counted_connection_failure_with_unknown_outcome() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("pool connects");
    assert_eq!(pool.status(ENDPOINT).unwrap().size, 1);

    let before = snapshot(&pool, Route::Write);
    let sleeper = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.write(sqlx::query("SELECT pg_sleep(30)"))
                .execute()
                .await
        }
    });
    let pid = psql_until(
        &pg,
        "SELECT pid FROM pg_stat_activity \
         WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'",
        Duration::from_secs(5),
    )
    .await;
    let terminated = pg
        .psql(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .expect("psql");
    assert_eq!(terminated, "t");

    let error = expect_err(
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the terminated call returns promptly")
            .expect("the task does not panic"),
    );
    let after = snapshot(&pool, Route::Write);

    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    match error.database_code().as_deref() {
        Some("57P01") => {}
        None => assert!(
            matches!(error.as_sqlx(), Some(sqlx::Error::Io(_))),
            "expected 57P01 or an I/O error, got {error:?}"
        ),
        Some(other) => panic!("expected 57P01 or an I/O error, got SQLSTATE {other}: {error}"),
    }
    assert_eq!(counted(&before, &after), Counted::Failure, "{error}");
    assert!(error.is_outcome_unknown(), "{error}");
    assert_eq!(error.route(), Some(Route::Write));
    // The dead connection was closed, not put back.
    assert_eq!(pool.status(ENDPOINT).unwrap().size, 0);

    let (result, recorded_as) = recorded(
        &pool,
        Route::Write,
        pool.write(sqlx::query("SELECT 1")).execute(),
    )
    .await;
    result.expect("the next call gets a fresh connection");
    assert_eq!(recorded_as, Counted::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_is_a_counted_resource_failure() {
    // No slot reserved for superusers, so three connections as `postgres` fill the server.
    let pg = PgServer::builder()
        .max_connections(3)
        .setting("superuser_reserved_connections", "0")
        .start()
        .await
        .expect("server starts");
    assert_eq!(pg.psql("SHOW max_connections").await.unwrap(), "3");
    let mut holders = Vec::new();
    for _ in 0..3 {
        holders.push(
            sqlx::PgConnection::connect(&pg.url())
                .await
                .expect("a slot is free"),
        );
    }
    let pool = pool_for(&pg.url());

    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one(),
    )
    .await;
    let error = expect_err(result);

    assert_eq!(error.database_code().as_deref(), Some("53300"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Resource), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert!(!error.is_outcome_unknown(), "{error}");

    for holder in holders {
        holder.close().await.expect("holder closes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_uncounted_auth_failure() {
    let pg = PgServer::builder()
        .password_auth(true)
        .start()
        .await
        .expect("server starts");
    let pool = pool_for(&pg.url_for(APP_USER, Some("not-the-password"), "postgres"));

    let started = Instant::now();
    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one(),
    )
    .await;
    let elapsed = started.elapsed();
    let error = expect_err(result);

    assert_eq!(error.database_code().as_deref(), Some("28P01"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Auth), "{error}");
    assert_eq!(recorded_as, Counted::Ignored, "{error}");
    assert!(
        elapsed < Duration::from_secs(2),
        "took {elapsed:?}: {error}"
    );
    assert_eq!(snapshot(&pool, Route::Read).state, State::Closed);

    let good = pool_for(&pg.app_url());
    let one = good
        .read(sqlx::query_scalar::<_, i32>("SELECT 1"))
        .fetch_one()
        .await
        .expect("the right password works");
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_a_counted_timeout() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = pool_for(&pg.url());

    let started = Instant::now();
    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.with_connection(Route::Read, async |conn| {
            sqlx::query("SET statement_timeout = '100ms'")
                .execute(&mut *conn)
                .await?;
            sqlx::query("SELECT pg_sleep(2)")
                .execute(&mut *conn)
                .await?;
            Ok(())
        }),
    )
    .await;
    let elapsed = started.elapsed();
    let error = expect_err(result);

    assert_eq!(error.database_code().as_deref(), Some("57014"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Timeout), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    // The server cancelled the statement: it did not run.
    assert!(!error.is_outcome_unknown(), "{error}");
    assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_error_is_a_query_error_counted_as_success() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = pool_for(&pg.url());

    // More than the read preset's 3 consecutive failures: none of them may trip it.
    for _ in 0..5 {
        let (result, recorded_as) = recorded(
            &pool,
            Route::Read,
            pool.read(sqlx::query("SELEC 1")).fetch_all(),
        )
        .await;
        let error = expect_err(result.map(|rows| rows.len()));
        assert_eq!(error.database_code().as_deref(), Some("42601"), "{error}");
        assert_eq!(error.class(), Some(ErrorClass::Query), "{error}");
        assert_eq!(recorded_as, Counted::Success, "{error}");
        assert!(!error.is_outcome_unknown(), "{error}");
    }
    let breaker = snapshot(&pool, Route::Read);
    assert_eq!(breaker.state, State::Closed);
    assert_eq!(breaker.consecutive_failures, 0);
    assert_eq!(breaker.total_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_violation_is_a_query_error_counted_as_success() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = pool_for(&pg.url());
    migrate(&pool).await;
    let insert = || {
        sqlx::query("INSERT INTO users (id, name, email) VALUES ($1, $2, $3)")
            .bind(1_i64)
            .bind("Ada")
            .bind("ada@example.com")
    };
    pool.write(insert()).execute().await.expect("first insert");

    let (result, recorded_as) = recorded(&pool, Route::Write, pool.write(insert()).execute()).await;
    let error = expect_err(result);

    assert_eq!(error.database_code().as_deref(), Some("23505"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Query), "{error}");
    assert_eq!(recorded_as, Counted::Success, "{error}");
    assert!(!error.is_outcome_unknown(), "{error}");
    assert_eq!(snapshot(&pool, Route::Write).state, State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialization_failure_is_an_ignored_transient_error() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = pool_for(&pg.url());
    migrate(&pool).await;

    // Write skew: both read the table, then both insert what the other would have seen.
    let barrier = Arc::new(Barrier::new(2));
    let before = snapshot(&pool, Route::Write);
    let transaction = |id: i64| {
        let (pool, barrier) = (pool.clone(), barrier.clone());
        tokio::spawn(async move {
            pool.transaction(async move |tx| {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                    .execute(&mut **tx)
                    .await?;
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
                    .fetch_one(&mut **tx)
                    .await?;
                barrier.wait().await;
                sqlx::query("INSERT INTO users (id, name, email) VALUES ($1, 'u', $2)")
                    .bind(id)
                    .bind(format!("u{id}-{count}@example.com"))
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
            .await
        })
    };
    let (a, b) = (transaction(1), transaction(2));
    let results = [a.await.unwrap(), b.await.unwrap()];
    let after = snapshot(&pool, Route::Write);

    let errors: Vec<&Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one transaction must fail: {results:?}"
    );
    let error = errors[0];
    assert_eq!(error.database_code().as_deref(), Some("40001"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Transient), "{error}");
    assert_eq!(after.total_ignored - before.total_ignored, 1);
    assert_eq!(after.total_successes - before.total_successes, 1);
    assert_eq!(after.total_failures, before.total_failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_error_counts_on_the_write_route_only() {
    let pg = PgServer::start().await.expect("server starts");
    // As on a demoted primary: every new session is read-only.
    pg.psql(
        "CREATE TABLE items (id int); \
         ALTER DATABASE postgres SET default_transaction_read_only = on",
    )
    .await
    .expect("psql");
    let pool = pool_for(&pg.url());
    let insert = || sqlx::query("INSERT INTO items (id) VALUES (1)");

    let (result, recorded_as) = recorded(&pool, Route::Write, pool.write(insert()).execute()).await;
    let error = expect_err(result);
    assert_eq!(error.database_code().as_deref(), Some("25006"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::ReadOnly), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert!(!error.is_outcome_unknown(), "{error}");

    let (result, recorded_as) = recorded(&pool, Route::Read, pool.read(insert()).execute()).await;
    let error = expect_err(result);
    assert_eq!(error.database_code().as_deref(), Some("25006"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::ReadOnly), "{error}");
    assert_eq!(recorded_as, Counted::Ignored, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_timeout_is_a_counted_timeout() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .timeout(Route::Read, Duration::from_millis(200))
        .connect()
        .await
        .expect("pool connects");

    let started = Instant::now();
    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query("SELECT pg_sleep(5)")).execute(),
    )
    .await;
    let elapsed = started.elapsed();
    let error = expect_err(result);

    assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    assert_eq!(error.class(), Some(ErrorClass::Timeout), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert!(error.is_outcome_unknown(), "{error}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(pool.status(ENDPOINT).unwrap().size, 0);

    // The connection caught mid-statement is not handed out again.
    let one = pool
        .read(sqlx::query_scalar::<_, i32>("SELECT 1"))
        .fetch_one()
        .await
        .expect("the next call works");
    assert_eq!(one, 1);
}

/// The server ends a session whose transaction sat idle too long (FATAL 25P03): the connection
/// is gone, so this is a connection failure and the dead connection must not be reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_timeout_is_a_counted_connection_failure() {
    let pg = PgServer::start().await.expect("server starts");
    let pool = pool_for(&pg.url());

    let (result, recorded_as) = recorded(
        &pool,
        Route::Write,
        pool.transaction(async |tx| {
            sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '100ms'")
                .execute(&mut **tx)
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            sqlx::query("SELECT 1").execute(&mut **tx).await?;
            Ok(())
        }),
    )
    .await;
    let error = expect_err(result);

    assert_eq!(error.database_code().as_deref(), Some("25P03"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert_eq!(
        pool.status(ENDPOINT).unwrap().size,
        0,
        "the dead connection was kept"
    );
    pool.write(sqlx::query("SELECT 1"))
        .execute()
        .await
        .expect("the next call gets a fresh connection");
}

/// The server ends a session that sat idle too long (FATAL 57P05, PostgreSQL 14+): a
/// connection failure, and the dead connection must not be reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_timeout_is_a_counted_connection_failure() {
    let pg = PgServer::start().await.expect("server starts");
    // No health loop: it would close the connection the server ended before a call meets it.
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .recovery_probes(false)
        .build()
        .expect("valid configuration");
    let end_sessions_after_100ms = async |pool: &ProtectedPool| {
        pool.with_connection(Route::Write, async |conn| {
            sqlx::query("SET idle_session_timeout = '100ms'")
                .execute(&mut *conn)
                .await
                .map(drop)
        })
        .await
        .expect("set");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // A write runs at most once: it meets the ended session and reports it.
    end_sessions_after_100ms(&pool).await;
    let (result, recorded_as) = recorded(
        &pool,
        Route::Write,
        pool.write(sqlx::query("SELECT 1")).execute(),
    )
    .await;
    let error = expect_err(result);
    assert_eq!(error.database_code().as_deref(), Some("57P05"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert_eq!(
        pool.status(ENDPOINT).unwrap().size,
        0,
        "the dead connection was kept"
    );

    // A read that meets a session which ended while idle runs again on a fresh connection of
    // the same endpoint: the server is fine, only the connection was not.
    end_sessions_after_100ms(&pool).await;
    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one(),
    )
    .await;
    assert_eq!(result.expect("read on a fresh connection"), 1);
    assert_eq!(recorded_as, Counted::Success);
}
