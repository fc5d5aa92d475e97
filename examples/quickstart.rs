//! The pool on an embedded SQLite file: reads and writes, a bad query that trips nothing, then
//! a real outage (another process holds an exclusive lock on the file), the breakers tripping,
//! calls rejected fast, a cached read served while the database cannot answer, and recovery
//! once the lock is gone.
//!
//! `cargo run --example quickstart` — no server needed.

use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration};
use protected_pool::{ErrorClass, ProtectedPool, Route, Served, Sqlite};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
#[allow(dead_code)]
struct User {
    id: i64,
    name: String,
    email: String,
}

/// A user read that is cached for a minute: while the database cannot answer, the last value
/// read is served, marked stale.
async fn read_user(pool: &ProtectedPool<Sqlite>, id: i64) -> protected_pool::Result<Served<User>> {
    pool.read(sqlx::query_as("SELECT id, name, email FROM users WHERE id = ?").bind(id))
        .cached(format!("user:{id}"), Duration::from_secs(60))
        .fetch_one()
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("quickstart.db");
    // SQLite waits this long for a lock before answering SQLITE_BUSY.
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .busy_timeout(Duration::from_millis(100));

    // Short open durations so the demo recovers in a second.
    let quick = |config: BreakerConfig| BreakerConfig {
        open: OpenDuration {
            base: Duration::from_millis(500),
            max: Duration::from_secs(2),
            ..config.open
        },
        ..config
    };
    let pool = ProtectedPool::sqlite()
        .primary_with("app-db", options.clone())
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .on_state_change(|change| println!("  [breaker] {change}"))
        .connect()
        .await?;
    pool.with_connection(Route::Write, async |conn| {
        MIGRATOR.run(conn).await.map_err(Into::into)
    })
    .await?;

    println!("1. writes and reads through the pool");
    for (id, name) in [(1_i64, "Ada"), (2, "Grace"), (3, "Edsger")] {
        pool.write(
            sqlx::query("INSERT INTO users (id, name, email) VALUES (?, ?, ?)")
                .bind(id)
                .bind(name)
                .bind(format!("{}@example.com", name.to_lowercase())),
        )
        .execute()
        .await?;
    }
    let user = read_user(&pool, 2).await?;
    println!(
        "   read {:?} from {}",
        *user,
        user.endpoint().unwrap_or("?")
    );

    println!("2. bad queries are the caller's problem, not an outage");
    for _ in 0..20 {
        let error = pool
            .read(sqlx::query("SELEC nonsense"))
            .fetch_all()
            .await
            .unwrap_err();
        assert_eq!(error.class(), Some(ErrorClass::Query));
    }
    let duplicate = pool
        .write(sqlx::query(
            "INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'x')",
        ))
        .execute()
        .await
        .unwrap_err();
    println!("   {duplicate}");
    println!(
        "   read breaker after 20 syntax errors: {}",
        pool.breaker(Route::Read, "app-db")?.state()
    );

    println!("3. outage: another connection takes an exclusive lock on the file");
    let mut locker = options.connect().await?;
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut locker).await?;
    for attempt in 1..=6 {
        let started = Instant::now();
        let result = pool
            .read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM users"))
            .fetch_one()
            .await;
        match result {
            Ok(n) => println!("   read {attempt}: {n} users"),
            Err(error) => println!(
                "   read {attempt}: failed in {:>9.3?}: {error}",
                started.elapsed()
            ),
        }
    }

    let user = read_user(&pool, 2).await?;
    println!(
        "   cached read: {:?}, stale: {}, stored {:.1?} ago",
        user.name,
        user.is_stale(),
        user.age().unwrap_or_default()
    );

    println!("4. the lock is released; after the open duration a trial call closes the breaker");
    sqlx::query("ROLLBACK").execute(&mut locker).await?;
    locker.close().await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for attempt in 1..=3 {
        let n: i64 = pool
            .read(sqlx::query_scalar("SELECT count(*) FROM users"))
            .fetch_one()
            .await?;
        println!("   read {attempt}: {n} users");
    }
    println!(
        "   read breaker: {}; pool: {:?}",
        pool.breaker(Route::Read, "app-db")?.state(),
        pool.status("app-db")?
    );
    Ok(())
}
