//! Cache keys against a real SQLite file: two calls that share a key but not a route or a
//! result type never serve each other's data when the database is away.

use std::time::Duration;

use protected_pool::{ProtectedPool, Route, Source, Sqlite};
use sqlx::sqlite::SqliteConnectOptions;

const TTL: Duration = Duration::from_secs(600);
const KEY: &str = "users";

async fn pool_on_a_file(dir: &tempfile::TempDir) -> ProtectedPool<Sqlite> {
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("cache-keys.db"))
        .create_if_missing(true);
    let pool = ProtectedPool::sqlite()
        .primary_with("primary", options)
        .build()
        .expect("valid configuration");
    pool.write(sqlx::query(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    ))
    .execute()
    .await
    .expect("create");
    pool.write(sqlx::query(
        "INSERT INTO users (id, name) VALUES (1, 'Ada'), (2, 'Grace')",
    ))
    .execute()
    .await
    .expect("insert");
    pool
}

/// Every route's breaker forced open: nothing reaches the file, the cache must answer.
fn isolate(pool: &ProtectedPool<Sqlite>) {
    for route in Route::ALL {
        pool.force_open(route, "primary")
            .expect("the endpoint exists");
    }
}

#[tokio::test]
async fn one_key_on_two_routes_keeps_two_values() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_on_a_file(&dir).await;
    let read_query = || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users");
    let auth_query = || sqlx::query_scalar::<_, i64>("SELECT max(id) * 10 FROM users");
    let read = pool.read(read_query()).cached(KEY, TTL).fetch_one().await;
    assert_eq!(*read.expect("read"), 2);
    let auth = pool.auth(auth_query()).cached(KEY, TTL).fetch_one().await;
    assert_eq!(*auth.expect("auth"), 20);

    isolate(&pool);
    let read = pool.read(read_query()).cached(KEY, TTL).fetch_one().await;
    let read = read.expect("the read route's cached value");
    assert!(matches!(read.source(), Source::Cache { .. }), "{read:?}");
    assert_eq!(*read, 2, "the read was served the auth call's value");
    let auth = pool.auth(auth_query()).cached(KEY, TTL).fetch_one().await;
    assert_eq!(*auth.expect("the auth route's cached value"), 20);
}

#[tokio::test]
async fn one_key_for_two_result_types_keeps_both() {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool_on_a_file(&dir).await;
    let count = || sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users");
    let names = || sqlx::query_scalar::<_, String>("SELECT name FROM users ORDER BY id");
    assert_eq!(
        *pool
            .read(count())
            .cached(KEY, TTL)
            .fetch_one()
            .await
            .unwrap(),
        2
    );
    let stored = pool
        .read(names())
        .cached(KEY, TTL)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(*stored, ["Ada", "Grace"]);

    isolate(&pool);
    let count = pool.read(count()).cached(KEY, TTL).fetch_one().await;
    assert_eq!(
        *count.expect("the count, cached under the shared key"),
        2,
        "the list stored under the same key replaced the count"
    );
    let names = pool.read(names()).cached(KEY, TTL).fetch_all().await;
    assert_eq!(
        *names.expect("the names, cached under the shared key"),
        ["Ada", "Grace"]
    );
}
