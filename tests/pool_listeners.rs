//! Pool listeners on a real SQLite file: every listener hears every change even when another
//! panics, and a listener may register listeners from its callback.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protected_pool::breaker::State;
use protected_pool::{PoolStateChange, ProtectedPool, Route, Sqlite};

const ENDPOINT: &str = "primary";

/// Runs `work` on its own thread and waits a bounded time for it, so that a listener deadlock
/// fails the test instead of hanging the suite.
fn within_deadline<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match finished.recv_timeout(Duration::from_secs(10)) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => panic!("still blocked after 10s: a listener deadlock"),
        Err(RecvTimeoutError::Disconnected) => panic!("the work panicked"),
    }
}

/// A pool on a fresh SQLite file that has answered one query.
async fn sqlite_pool(path: &Path) -> ProtectedPool<Sqlite> {
    let pool = ProtectedPool::sqlite()
        .primary(format!("sqlite://{}?mode=rwc", path.display()))
        .build()
        .expect("valid configuration");
    let one: i64 = pool
        .read(sqlx::query_scalar("SELECT 1"))
        .fetch_one()
        .await
        .expect("the file answers");
    assert_eq!(one, 1);
    pool
}

/// (route, from, to) of every change a listener heard.
type Heard = Arc<Mutex<Vec<(Route, State, State)>>>;

/// A listener that keeps what it hears.
fn recorder() -> (Heard, impl Fn(&PoolStateChange) + Send + Sync + 'static) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let listener = move |event: &PoolStateChange| {
        sink.lock()
            .unwrap()
            .push((event.route, event.change.from, event.change.to));
    };
    (seen, listener)
}

/// Forces the write and then the read breaker open and resets each: four changes.
fn open_and_reset_write_then_read(pool: &ProtectedPool<Sqlite>) {
    for route in [Route::Write, Route::Read] {
        pool.force_open(route, ENDPOINT).unwrap();
        pool.reset(route, ENDPOINT).unwrap();
    }
}

const FOUR_CHANGES: [(Route, State, State); 4] = [
    (Route::Write, State::Closed, State::ForcedOpen),
    (Route::Write, State::ForcedOpen, State::Closed),
    (Route::Read, State::Closed, State::ForcedOpen),
    (Route::Read, State::ForcedOpen, State::Closed),
];

#[tokio::test]
async fn a_panicking_pool_listener_does_not_silence_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir.path().join("panic.db")).await;
    pool.on_state_change(|_| panic!("listener bug"));
    let (seen, listener) = recorder();
    pool.on_state_change(listener);

    open_and_reset_write_then_read(&pool);

    assert_eq!(*seen.lock().unwrap(), FOUR_CHANGES);
    assert_eq!(
        pool.breaker(Route::Write, ENDPOINT).unwrap().state(),
        State::Closed
    );
}

#[tokio::test]
async fn a_pool_listener_may_add_pool_listeners_from_its_callback() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir.path().join("reentry.db")).await;
    let (seen, listener) = recorder();
    // Taken on first use, so the pool does not keep itself alive through its own listener.
    let slot = Mutex::new(Some((pool.clone(), listener)));
    pool.on_state_change(move |_| {
        if let Some((pool, listener)) = slot.lock().unwrap().take() {
            pool.on_state_change(listener);
        }
    });

    let pool = within_deadline(move || {
        open_and_reset_write_then_read(&pool);
        pool
    });

    // Added during the first change: hears the three after it.
    assert_eq!(*seen.lock().unwrap(), FOUR_CHANGES[1..]);
    drop(pool);
}

#[tokio::test]
async fn a_pool_listener_may_add_a_breaker_listener_from_its_callback() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir.path().join("breaker.db")).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let slot = Mutex::new(Some((pool.clone(), seen.clone())));
    pool.on_state_change(move |_| {
        if let Some((pool, seen)) = slot.lock().unwrap().take() {
            let breaker = pool.breaker(Route::Write, ENDPOINT).unwrap();
            breaker.on_state_change(move |change| {
                seen.lock().unwrap().push((change.from, change.to));
            });
        }
    });

    let pool = within_deadline(move || {
        open_and_reset_write_then_read(&pool);
        pool
    });

    // Added during the write breaker's first change: hears its reset, nothing of the read one.
    assert_eq!(*seen.lock().unwrap(), [(State::ForcedOpen, State::Closed)]);
    drop(pool);
}
