//! Recovery probes on a SQLite file: a write breaker opened because another connection holds
//! the file's write lock must stay open while the lock is held, and close once it is released.
//!
//! A probe's trial stands for a call of its route: on the write route, it must find out
//! whether a write could get the file's lock, which a ping (answered by the driver's worker
//! thread without touching the file) does not.

#[path = "support/changes.rs"]
mod changes;
#[path = "support/scenario.rs"]
mod scenario;

use std::path::Path;
use std::time::Duration;

use changes::Changes;
use protected_pool::breaker::{BreakerConfig, State};
use protected_pool::{ErrorClass, ProtectedPool, Route, Sqlite};
use scenario::{OPEN_MAX, eventually, guarded, ms, quick};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

const ENDPOINT: &str = "primary";

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(ms(50))
}

async fn write(pool: &ProtectedPool<Sqlite>) -> protected_pool::Result<()> {
    guarded(
        "a write",
        pool.write(sqlx::query("INSERT INTO events (n) VALUES (1)"))
            .execute(),
    )
    .await
    .map(drop)
}

/// Another connection holds `BEGIN EXCLUSIVE` on the file, so writes fail with SQLITE_BUSY
/// until the write breaker opens. For the 3 s the lock is then kept, every write would still
/// fail: the write breaker must not close. Once the lock is released, it closes by probe.
///
/// Today the probe's trial is `ping`, which never touches the file: it succeeds, the breaker
/// closes on a database that cannot take a write, the next writes fail and open it again, and
/// the listener reports the breaker flapping for as long as the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_probe_does_not_close_on_a_locked_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("locked.db");
    {
        let mut conn = options(&path).connect().await.expect("the file opens");
        sqlx::query("CREATE TABLE events (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .expect("create the table");
        conn.close().await.expect("close");
    }
    let changes = Changes::default();
    let pool = ProtectedPool::sqlite()
        .primary_with(ENDPOINT, options(&path))
        .breaker(
            Route::Write,
            BreakerConfig {
                consecutive_failures: Some(3),
                ..quick(BreakerConfig::write())
            },
        )
        .health_check_interval(ms(100))
        .on_state_change(changes.listener())
        .build()
        .expect("valid configuration");
    write(&pool).await.expect("a write on an unlocked file");

    let mut locker = options(&path).connect().await.expect("the file opens");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .expect("lock the file");
    let breaker = pool.breaker(Route::Write, ENDPOINT).unwrap();
    for call in 0.. {
        if breaker.state() == State::Open {
            break;
        }
        assert!(
            call < 10,
            "10 writes on a locked file did not open the breaker"
        );
        let error = write(&pool)
            .await
            .expect_err("a write on a locked file succeeded");
        assert_eq!(error.class(), Some(ErrorClass::Resource), "{error}");
    }

    // Long enough for several probe rounds, at open durations of 300 ms doubling to 1 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_locked = changes.of(ENDPOINT, Route::Write);
    let still_locked = write(&pool)
        .await
        .expect_err("a write succeeded while the file is locked");
    assert!(
        !while_locked.iter().any(|&(_, to)| to == State::Closed),
        "the write breaker closed while another connection held the file's lock (every write \
         still fails: {still_locked}); the probe's trial never tried to write. Transitions: \
         {:#?}",
        changes.describe()
    );

    sqlx::query("ROLLBACK")
        .execute(&mut locker)
        .await
        .expect("unlock the file");
    let limit = OPEN_MAX + Duration::from_secs(3);
    assert!(
        eventually(limit, || breaker.state() == State::Closed).await,
        "the write breaker did not close within {limit:?} of the lock's release: {:#?}",
        changes.describe()
    );
    write(&pool)
        .await
        .expect("a write once the file is unlocked");
    locker.close().await.expect("close");
}
