//! sqlx code through a pool on a SQLite file, unchanged: migrations, `&pool`, the read
//! route's executor, and a transaction held by the caller.

use protected_pool::{ProtectedPool, Route};
use sqlx::SqliteExecutor;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

async fn add_user(db: impl SqliteExecutor<'_>, email: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("INSERT INTO users (email, name) VALUES (?1, 'n') RETURNING id")
        .bind(email)
        .fetch_one(db)
        .await
}

async fn count_users(db: impl SqliteExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(db)
        .await
}

#[tokio::test]
async fn sqlx_code_runs_through_a_pool_on_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let pool = ProtectedPool::sqlite()
        .primary(url)
        .connect()
        .await
        .expect("connect");

    MIGRATOR.run(&pool).await.expect("migrate!().run(&pool)");
    add_user(&pool, "ada@example.com").await.unwrap();
    assert_eq!(count_users(pool.reader()).await.unwrap(), 1);

    let mut tx = pool.begin().await.expect("begin");
    add_user(&mut *tx, "grace@example.com").await.unwrap();
    drop(tx);
    assert_eq!(
        count_users(&pool).await.unwrap(),
        1,
        "a dropped transaction rolls back"
    );

    let mut tx = pool.begin().await.expect("begin");
    add_user(&mut *tx, "grace@example.com").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count_users(&pool).await.unwrap(), 2);

    // A duplicate email: the server's answer, as sqlx gives it; the breaker stays closed.
    let duplicate = add_user(&pool, "ada@example.com").await.unwrap_err();
    assert!(
        duplicate
            .as_database_error()
            .is_some_and(|db| db.is_unique_violation()),
        "{duplicate:?}"
    );
    let write = pool.breaker(Route::Write, "primary").unwrap().snapshot();
    assert_eq!(write.state, protected_pool::breaker::State::Closed);
}
