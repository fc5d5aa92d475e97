//! Error classification against real SQLite files: each test provokes one real failure and
//! checks its class and what the route's breaker made of it.

#[path = "support/pool.rs"]
mod pool_support;

use std::path::Path;
use std::time::{Duration, Instant};

use pool_support::{Counted, ENDPOINT, expect_err, recorded, snapshot};
use protected_pool::breaker::State;
use protected_pool::{ErrorClass, ProtectedPool, Route, Sqlite};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(Duration::from_millis(50))
}

fn pool_with(options: SqliteConnectOptions) -> ProtectedPool<Sqlite> {
    ProtectedPool::sqlite()
        .primary_with(ENDPOINT, options)
        .build()
        .expect("valid configuration")
}

/// A database file with the migrations applied and one user (id 1, ada@example.com).
async fn migrated_file(path: &Path) {
    let mut conn = options(path).connect().await.expect("file opens");
    MIGRATOR.run(&mut conn).await.expect("migrations apply");
    sqlx::query("INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'ada@example.com')")
        .execute(&mut conn)
        .await
        .expect("insert");
    conn.close().await.expect("close");
}

#[tokio::test]
async fn busy_database_is_a_counted_resource_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    migrated_file(&path).await;
    let pool = pool_with(options(&path));

    let mut locker = options(&path).connect().await.expect("file opens");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .expect("lock");

    let started = Instant::now();
    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
            .fetch_one(),
    )
    .await;
    let elapsed = started.elapsed();
    let error = expect_err(result);

    // SQLITE_BUSY (5).
    assert_eq!(error.database_code().as_deref(), Some("5"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Resource), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");

    sqlx::query("ROLLBACK")
        .execute(&mut locker)
        .await
        .expect("unlock");
    let users = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
        .fetch_one()
        .await
        .expect("reads work once the lock is gone");
    assert_eq!(users, 1);
}

#[tokio::test]
async fn missing_file_is_a_counted_connection_failure() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let pool = pool_with(
        SqliteConnectOptions::new()
            .filename(&missing)
            .create_if_missing(false),
    );

    let (result, recorded_as) = recorded(
        &pool,
        Route::Read,
        pool.read(sqlx::query_scalar::<_, i64>("SELECT 1"))
            .fetch_one(),
    )
    .await;
    let error = expect_err(result);

    // SQLITE_CANTOPEN (14).
    assert_eq!(error.database_code().as_deref(), Some("14"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");
    assert!(!error.is_outcome_unknown(), "{error}");
    assert!(!missing.exists());
}

#[tokio::test]
async fn read_only_file_is_a_read_only_failure_counted_on_the_write_route_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.db");
    migrated_file(&path).await;
    let pool = pool_with(options(&path).read_only(true));
    let insert =
        || sqlx::query("INSERT INTO users (id, name, email) VALUES (2, 'Grace', 'g@example.com')");

    let (result, recorded_as) = recorded(&pool, Route::Write, pool.write(insert()).execute()).await;
    let error = expect_err(result);
    // SQLITE_READONLY (8).
    assert_eq!(error.database_code().as_deref(), Some("8"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::ReadOnly), "{error}");
    assert_eq!(recorded_as, Counted::Failure, "{error}");

    let (result, recorded_as) = recorded(&pool, Route::Read, pool.read(insert()).execute()).await;
    let error = expect_err(result);
    assert_eq!(error.class(), Some(ErrorClass::ReadOnly), "{error}");
    assert_eq!(recorded_as, Counted::Ignored, "{error}");

    // Reads are fine.
    let users = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
        .fetch_one()
        .await
        .expect("a read-only file is readable");
    assert_eq!(users, 1);
}

#[tokio::test]
async fn constraint_violation_is_a_query_error_counted_as_success() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("constraint.db");
    migrated_file(&path).await;
    let pool = pool_with(options(&path));

    let (result, recorded_as) = recorded(
        &pool,
        Route::Write,
        pool.write(sqlx::query(
            "INSERT INTO users (id, name, email) VALUES (2, 'Ada again', 'ada@example.com')",
        ))
        .execute(),
    )
    .await;
    let error = expect_err(result);

    // SQLITE_CONSTRAINT_UNIQUE (2067).
    assert_eq!(error.database_code().as_deref(), Some("2067"), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Query), "{error}");
    assert_eq!(recorded_as, Counted::Success, "{error}");
    assert!(!error.is_outcome_unknown(), "{error}");
    assert_eq!(snapshot(&pool, Route::Write).state, State::Closed);
}

#[tokio::test]
async fn syntax_error_is_a_query_error_counted_as_success() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_with(options(&dir.path().join("syntax.db")));

    for _ in 0..5 {
        let (result, recorded_as) = recorded(
            &pool,
            Route::Read,
            pool.read(sqlx::query_scalar::<_, i64>("SELEC 1"))
                .fetch_one(),
        )
        .await;
        let error = expect_err(result);
        // SQLITE_ERROR (1).
        assert_eq!(error.database_code().as_deref(), Some("1"), "{error}");
        assert_eq!(error.class(), Some(ErrorClass::Query), "{error}");
        assert_eq!(recorded_as, Counted::Success, "{error}");
    }
    let breaker = snapshot(&pool, Route::Read);
    assert_eq!(breaker.state, State::Closed);
    assert_eq!(breaker.total_failures, 0);
}
