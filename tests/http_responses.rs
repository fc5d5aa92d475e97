//! `protected_pool::Error` as an HTTP response (feature `axum`), from real failures: a SQLite
//! file another connection holds locked (unavailable, refused by the breaker, timed out), a
//! saturated pool, a closed pool, bad SQL, bad configuration and a timeout an async fallback
//! failed to stand in for; on a real PostgreSQL server, a row lock not available (`NOWAIT`)
//! and a wrong password. Each response is checked for its status, its `Retry-After`, its
//! body, and that the body leaks neither SQL nor secrets.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use protected_pool::breaker::{BreakerConfig, OpenDuration};
use protected_pool::{EndpointOptions, Error, ErrorClass, ProtectedPool, Route};
use protected_pool_testkit::{APP_USER, PgServer};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

/// What a client receives.
#[derive(Debug)]
struct Received {
    status: StatusCode,
    retry_after: Option<String>,
    content_type: Option<String>,
    text: String,
    json: Value,
}

async fn respond(error: Error) -> Received {
    let response = error.into_response();
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|value: &axum::http::HeaderValue| value.to_str().unwrap().to_owned())
    };
    let (status, retry_after, content_type) = (
        response.status(),
        header("retry-after"),
        header("content-type"),
    );
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .expect("the body");
    let text = String::from_utf8(bytes.to_vec()).expect("UTF-8");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    Received {
        status,
        retry_after,
        content_type,
        text,
        json,
    }
}

/// Asserts status, `error` code and that none of `secrets` is in the body.
fn assert_answer(received: &Received, status: StatusCode, code: &str, secrets: &[&str]) {
    assert_eq!(received.status, status, "{received:?}");
    assert_eq!(received.json["error"], code, "{received:?}");
    assert_eq!(
        received.content_type.as_deref(),
        Some("application/json"),
        "{received:?}"
    );
    for secret in secrets {
        assert!(
            !received.text.contains(secret),
            "the body shows {secret:?}: {}",
            received.text
        );
    }
}

fn sqlite_options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(busy_timeout)
}

/// A file with a `users` table, and a connection that holds it locked (`BEGIN EXCLUSIVE`).
async fn locked_file(path: &Path) -> SqliteConnection {
    let mut locker = sqlite_options(path, Duration::from_millis(50))
        .connect()
        .await
        .expect("the file opens");
    sqlx::query("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE NOT NULL)")
        .execute(&mut locker)
        .await
        .expect("create the table");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .expect("lock the file");
    locker
}

const ENDPOINT: &str = "app-db";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_database_is_503_then_refused_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    let _locker = locked_file(&path).await;
    let open = Duration::from_millis(1500);
    let pool = ProtectedPool::sqlite()
        .primary_with(ENDPOINT, sqlite_options(&path, Duration::from_millis(20)))
        .breaker(
            Route::Write,
            BreakerConfig {
                consecutive_failures: Some(2),
                open: OpenDuration {
                    base: open,
                    max: open,
                    multiplier: 1.0,
                    jitter: 0.0,
                },
                ..BreakerConfig::write()
            },
        )
        .build()
        .expect("valid configuration");
    let insert = "INSERT INTO users (id, email) VALUES (1, 'ada@example.com')";
    let secrets = [insert, "ada@example.com", "locked.db", ENDPOINT];

    // SQLITE_BUSY: the database cannot serve the write; no breaker refused, so no Retry-After.
    let busy = pool.write(sqlx::query(insert)).execute().await.unwrap_err();
    assert_eq!(busy.class(), Some(ErrorClass::Resource), "{busy}");
    let busy = respond(busy).await;
    assert_answer(
        &busy,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &secrets,
    );
    assert_eq!(busy.retry_after, None, "{busy:?}");

    // The second failure opens the write breaker; the next write is refused without trying.
    let _ = pool.write(sqlx::query(insert)).execute().await.unwrap_err();
    let refused = pool.write(sqlx::query(insert)).execute().await.unwrap_err();
    assert!(refused.is_circuit_open(), "{refused}");
    let refused = respond(refused).await;
    assert_answer(
        &refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "circuit_open",
        &secrets,
    );
    // 1.5 s open, a few milliseconds spent: rounded up to 2 s.
    assert_eq!(refused.retry_after.as_deref(), Some("2"), "{refused:?}");
    assert_eq!(refused.json["retry_after_secs"], 2, "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_answer_in_time_is_504() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.db");
    let _locker = locked_file(&path).await;
    // SQLite would wait 10 s for the lock; the write route gives up after 200 ms.
    let pool = ProtectedPool::sqlite()
        .primary_with(ENDPOINT, sqlite_options(&path, Duration::from_secs(10)))
        .timeout(Route::Write, Duration::from_millis(200))
        .build()
        .expect("valid configuration");

    let error = pool
        .write(sqlx::query(
            "INSERT INTO users (id, email) VALUES (2, 'x@y')",
        ))
        .execute()
        .await
        .unwrap_err();
    assert_eq!(error.class(), Some(ErrorClass::Timeout), "{error}");
    let outcome_unknown = error.is_outcome_unknown();
    let received = respond(error).await;
    assert_answer(
        &received,
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        &["INSERT", "slow.db"],
    );
    assert_eq!(received.retry_after, None, "{received:?}");
    // A write that may have reached the database says so.
    assert_eq!(
        received.json["outcome_unknown"].as_bool().unwrap_or(false),
        outcome_unknown,
        "{received:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_async_fallback_changes_nothing_in_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.db");
    let _locker = locked_file(&path).await;
    let pool = ProtectedPool::sqlite()
        .primary_with(ENDPOINT, sqlite_options(&path, Duration::from_secs(10)))
        .timeout(Route::Write, Duration::from_millis(200))
        .build()
        .expect("valid configuration");

    // The call timed out: no time is left, yet a fallback that fails at once is still run.
    let error = pool
        .write(sqlx::query(
            "INSERT INTO users (id, email) VALUES (2, 'x@y')",
        ))
        .or_fallback_async(|_| async {
            Err::<Option<sqlx::sqlite::SqliteQueryResult>, _>(std::io::Error::other(
                "backup-host.internal refused",
            ))
        })
        .execute()
        .await
        .unwrap_err();
    assert!(error.fallback_error().is_some(), "{error}");
    assert_eq!(error.class(), Some(ErrorClass::Timeout), "{error}");
    let received = respond(error).await;
    // Answered by the call's own error, the fallback's not shown.
    assert_answer(
        &received,
        StatusCode::GATEWAY_TIMEOUT,
        "timeout",
        &["INSERT", "slow.db", "backup-host", "fallback"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_is_503_without_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let pool = ProtectedPool::sqlite()
        .primary_with(ENDPOINT, sqlite_options(&path, Duration::from_secs(1)))
        .endpoint_options(EndpointOptions {
            max_connections: 1,
            wait_timeout: Duration::from_millis(100),
            ..EndpointOptions::default()
        })
        .build()
        .expect("valid configuration");
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (taken, was_taken) = tokio::sync::oneshot::channel::<()>();
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            pool.with_connection(Route::Read, async move |_conn| {
                let _ = taken.send(());
                let _ = released.await;
                Ok(())
            })
            .await
        }
    });
    was_taken.await.expect("the only connection is taken");

    let error = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT 1"))
        .fetch_one()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Saturated { .. }), "{error}");
    let received = respond(error).await;
    assert_answer(
        &received,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &[ENDPOINT],
    );
    assert_eq!(received.retry_after, None, "{received:?}");
    drop(release);
    holder.await.unwrap().expect("the holder's call");
}

#[tokio::test]
async fn a_closed_pool_is_503_shutting_down() {
    let pool = ProtectedPool::sqlite()
        .primary("sqlite::memory:")
        .build()
        .expect("valid configuration");
    pool.close();
    let error = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT 1"))
        .fetch_one()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed), "{error}");
    let received = respond(error).await;
    assert_answer(
        &received,
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        &[],
    );
    assert_eq!(received.retry_after, None, "{received:?}");
}

#[tokio::test]
async fn a_rejected_query_is_500_without_its_sql_or_data() {
    let pool = ProtectedPool::sqlite()
        .primary("sqlite::memory:")
        .build()
        .expect("valid configuration");
    let syntax = pool
        .read(sqlx::query("SELEC secret_column FROM secret_table"))
        .fetch_all()
        .await
        .unwrap_err();
    assert_eq!(syntax.class(), Some(ErrorClass::Query), "{syntax}");
    let received = respond(syntax).await;
    assert_answer(
        &received,
        StatusCode::INTERNAL_SERVER_ERROR,
        "query",
        &["SELEC", "secret", "syntax"],
    );
    assert_eq!(received.retry_after, None, "{received:?}");

    let constraint = pool
        .with_connection(Route::Write, async |conn| {
            sqlx::raw_sql(
                "CREATE TABLE t (v TEXT UNIQUE); INSERT INTO t VALUES ('hunter2'); \
                 INSERT INTO t VALUES ('hunter2');",
            )
            .execute(&mut *conn)
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(constraint.class(), Some(ErrorClass::Query), "{constraint}");
    let received = respond(constraint).await;
    assert_answer(
        &received,
        StatusCode::INTERNAL_SERVER_ERROR,
        "query",
        &["hunter2", "UNIQUE", "t.v"],
    );
}

#[tokio::test]
async fn bad_configuration_is_500() {
    let error = ProtectedPool::sqlite()
        .primary("sqlite:///no/such/dir/app.db?password=s3cr3t")
        .timeout(Route::Read, Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(matches!(error, Error::Config(_)), "{error}");
    let received = respond(error).await;
    assert_answer(
        &received,
        StatusCode::INTERNAL_SERVER_ERROR,
        "configuration",
        &["s3cr3t", "/no/such/dir"],
    );
}

/// PostgreSQL: a lock not available is a conflict the request may retry (409); the server
/// rejecting the service's password is its configuration (500), and the password stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lock_conflicts_are_409_and_a_wrong_password_is_500() {
    let pg = PgServer::builder()
        .password_auth(true)
        .start()
        .await
        .expect("start PostgreSQL");
    pg.psql("CREATE TABLE accounts (id int PRIMARY KEY); INSERT INTO accounts VALUES (1)")
        .await
        .expect("create the table");
    let pool: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url())
        .build()
        .expect("valid configuration");

    let mut holder = sqlx::PgConnection::connect(&pg.url())
        .await
        .expect("connect");
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT id FROM accounts WHERE id = 1 FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let conflict = pool
        .write(sqlx::query(
            "SELECT id FROM accounts WHERE id = 1 FOR UPDATE NOWAIT",
        ))
        .execute()
        .await
        .unwrap_err();
    assert_eq!(
        conflict.database_code().as_deref(),
        Some("55P03"),
        "{conflict}"
    );
    let received = respond(conflict).await;
    assert_answer(
        &received,
        StatusCode::CONFLICT,
        "transient",
        &["accounts", "NOWAIT", "lock"],
    );
    assert_eq!(received.retry_after, None, "{received:?}");
    holder.close().await.unwrap();

    let password = "not-the-password-s3cr3t";
    let wrong: ProtectedPool = ProtectedPool::builder()
        .primary(pg.url_for(APP_USER, Some(password), "postgres"))
        .build()
        .expect("valid configuration");
    let rejected = wrong
        .read(sqlx::query_scalar::<_, i32>("SELECT 1"))
        .fetch_one()
        .await
        .unwrap_err();
    assert_eq!(rejected.class(), Some(ErrorClass::Auth), "{rejected}");
    let received = respond(rejected).await;
    assert_answer(
        &received,
        StatusCode::INTERNAL_SERVER_ERROR,
        "configuration",
        &[password, APP_USER, "password authentication"],
    );
}
