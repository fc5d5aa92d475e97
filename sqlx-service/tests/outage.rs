//! The service through an outage of its primary, on a `ProtectedPool`: the server is killed
//! (SIGKILL) while the service places orders from two tasks, then started again on the same
//! port. The service's code is the same as on a plain `sqlx::PgPool`; what changes is what its
//! callers notice: once the write breaker opens, calls fail in milliseconds with an error that
//! says the database is unavailable and when to retry, instead of each waiting out a timeout;
//! nothing panics; once the server is back the same pool serves again, and every order the
//! service acknowledged is there, paid exactly once.
//!
//! Time bounds are generous sanity bounds that only a defect exceeds, not measurements.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::{EndpointOptions, PoolStateChange, Postgres, ProtectedPool, Route};
use protected_pool_sqlx_service::{
    MIGRATOR, ServiceError, account, open_account, orders_of, place_order,
};
use protected_pool_testkit::PgServer;

const OPENING_BALANCE: i64 = 10_000_000;
const PRICE: i64 = 100;
/// A refusal by an open breaker touches no network: far under this even on a busy machine.
const REFUSAL_BOUND: Duration = Duration::from_millis(100);
/// The pool's connect timeout here, which bounds any call that does reach for the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server stays down once the breaker has opened.
const DOWN_FOR: Duration = Duration::from_millis(1500);
/// Longest wait for anything the test expects to happen.
const PATIENCE: Duration = Duration::from_secs(20);

/// What one `place_order` call of the service came to, as its caller sees it.
#[derive(Debug)]
enum Outcome {
    /// The order was committed and acknowledged, with this id.
    Placed(i64),
    /// Refused by the pool: the database is known to be unavailable.
    Refused { retry_after: Option<Duration> },
    /// Failed otherwise (the server went away under it, refused the connection, ...).
    Failed(String),
}

#[derive(Debug)]
struct Call {
    started: Instant,
    took: Duration,
    outcome: Outcome,
}

type Log = Arc<Mutex<Vec<Call>>>;

/// The service's order loop, as its request handlers would run it, recording every call.
async fn place_orders(pool: ProtectedPool, account_id: i64, stop: Arc<AtomicBool>, log: Log) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result =
            tokio::time::timeout(PATIENCE, place_order(&pool, account_id, "widget", PRICE))
                .await
                .unwrap_or_else(|_| panic!("place_order hung for {PATIENCE:?}"));
        let outcome = match result {
            Ok(order) => Outcome::Placed(order.id),
            Err(ServiceError::Database(error)) => match protected_pool::Error::from_sqlx(&error) {
                Some(refusal) if refusal.is_circuit_open() => Outcome::Refused {
                    retry_after: refusal.retry_after(),
                },
                _ => Outcome::Failed(error.to_string()),
            },
            Err(other) => panic!("the service refused an order it should take: {other}"),
        };
        log.lock().unwrap().push(Call {
            started,
            took: started.elapsed(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls `condition` every 10 ms until it holds; false if it still does not after [`PATIENCE`].
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_calls_fast_and_the_same_pool_serves_once_it_is_back() {
    // The harness turns synchronous_commit off for speed; on, an acknowledged commit survives
    // kill -9, as in production.
    let pg = PgServer::builder()
        .setting("synchronous_commit", "on")
        .start()
        .await
        .expect("start PostgreSQL");
    let changes: Arc<Mutex<Vec<PoolStateChange>>> = Arc::default();
    let sink = changes.clone();
    // Building this pool is the service's only change. The open duration is cut short so the
    // test does not wait out the write preset's 10 s; the listener records what dashboards
    // and logs would show.
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            connect_timeout: CONNECT_TIMEOUT,
            ..EndpointOptions::default()
        })
        .breaker(
            Route::Write,
            BreakerConfig {
                open: OpenDuration {
                    base: Duration::from_millis(300),
                    multiplier: 2.0,
                    max: Duration::from_secs(1),
                    jitter: 0.0,
                },
                ..BreakerConfig::write()
            },
        )
        .on_state_change(move |change| sink.lock().unwrap().push(change.clone()))
        .connect()
        .await
        .expect("connect");
    MIGRATOR.run(&pool).await.expect("migrate");
    let alice = open_account(&pool, "alice", OPENING_BALANCE)
        .await
        .expect("open an account");

    let stop = Arc::new(AtomicBool::new(false));
    let log = Log::default();
    let handlers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(place_orders(pool.clone(), alice, stop.clone(), log.clone())))
        .collect();
    let write_breaker = || pool.breaker(Route::Write, "primary").unwrap().snapshot();
    assert!(
        eventually(|| write_breaker().total_successes >= 20).await,
        "the service is not placing orders: {:?}",
        write_breaker()
    );

    pg.kill9().await.expect("kill -9 the primary");
    let killed = Instant::now();
    assert!(
        eventually(|| write_breaker().state == State::Open).await,
        "the write breaker did not open within {PATIENCE:?} of the kill: {:?}",
        write_breaker()
    );
    let opened = Instant::now();
    tokio::time::sleep(DOWN_FOR).await;
    pg.start_again().await.expect("start the primary again");
    let restarted = Instant::now();
    // Served again, by the same pool: orders placed by calls made after the restart.
    let placed_since_restart = || {
        log.lock()
            .unwrap()
            .iter()
            .filter(|c| c.started >= restarted && matches!(c.outcome, Outcome::Placed(_)))
            .count()
    };
    let served_again = eventually(|| placed_since_restart() >= 2).await;
    stop.store(true, Ordering::Relaxed);
    for handler in handlers {
        handler.await.expect("a request handler panicked");
    }
    let calls = std::mem::take(&mut *log.lock().unwrap());
    assert!(
        served_again,
        "no order placed within {PATIENCE:?} of the restart; the first calls since: {:#?}",
        calls
            .iter()
            .filter(|c| c.started >= restarted)
            .take(5)
            .collect::<Vec<_>>()
    );

    // While the breaker was open: refused, fast, saying when to retry.
    let refusals: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Refused { .. }))
        .collect();
    assert!(
        refusals.len() >= 10,
        "{} refusals while the server was down for {DOWN_FOR:?}",
        refusals.len()
    );
    for call in &refusals {
        assert!(call.started >= killed, "refused before the kill: {call:?}");
        assert!(call.took < REFUSAL_BOUND, "a refusal took {:?}", call.took);
        assert!(
            matches!(call.outcome, Outcome::Refused { retry_after: Some(after) } if after <= Duration::from_secs(1)),
            "{call:?}"
        );
    }
    // Calls that did reach for the dead server were bounded by the connect timeout.
    let failures: Vec<&Call> = calls
        .iter()
        .filter(|c| matches!(c.outcome, Outcome::Failed(_)))
        .collect();
    for call in &failures {
        if let Outcome::Failed(why) = &call.outcome {
            assert!(
                call.took < CONNECT_TIMEOUT + Duration::from_secs(1),
                "a failing call took {:?}: {why}",
                call.took
            );
        }
    }
    // A connection that died in a caller's hands is checked before it is handed out again:
    // the dead server is met a few times (each pooled connection once, then refused
    // connects until the breaker opens), not hundreds of times over the same dead sockets.
    assert!(
        failures.len() <= 20,
        "{} calls failed on the dead server before the breaker refused them",
        failures.len()
    );
    let during_outage = calls
        .iter()
        .filter(|c| c.started >= opened && c.started < restarted)
        .count();
    assert!(
        refusals.len() * 2 >= during_outage,
        "most calls while the breaker was open should be refusals: {} of {during_outage}",
        refusals.len()
    );

    // The breaker opened and closed again, reported to the listener.
    let transitions: Vec<(State, State)> = changes
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.route == Route::Write)
        .map(|c| (c.change.from, c.change.to))
        .collect();
    assert_eq!(transitions.first(), Some(&(State::Closed, State::Open)));
    assert_eq!(transitions.last(), Some(&(State::HalfOpen, State::Closed)));
    assert_eq!(write_breaker().state, State::Closed);

    // Every acknowledged order is stored; every stored order was paid exactly once; at most
    // the failed calls (whose outcome the caller cannot know) added orders it was not told of.
    let stored: Vec<i64> = orders_of(&pool, alice)
        .await
        .expect("orders")
        .into_iter()
        .map(|o| o.id)
        .collect();
    let acknowledged: Vec<i64> = calls
        .iter()
        .filter_map(|c| match c.outcome {
            Outcome::Placed(id) => Some(id),
            _ => None,
        })
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged order {id} was lost");
    }
    assert!(
        stored.len() <= acknowledged.len() + failures.len(),
        "{} orders stored, {} acknowledged, {} failed",
        stored.len(),
        acknowledged.len(),
        failures.len()
    );
    let balance = account(&pool, alice)
        .await
        .expect("look up")
        .expect("alice")
        .balance_cents;
    assert_eq!(
        balance,
        OPENING_BALANCE - PRICE * stored.len() as i64,
        "the balance pays for exactly the stored orders"
    );
}
