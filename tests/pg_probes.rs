//! Recovery probes against real PostgreSQL servers, in the conditions that stop them: a pool
//! used on another runtime than the one it was built on, a probe round that panics, and a
//! server that answers every probe by rejecting the pool's password.
//!
//! While probes run, calls never take half-open trials: a breaker is closed by the probes or
//! not at all, so a probe task that is gone leaves its endpoint refused for good, and one that
//! does not back off hammers a server that says no.
//!
//! Every test starts its own servers, so tests run in parallel. Time bounds are generous
//! sanity bounds that only a defect exceeds, not measurements.

#[path = "support/changes.rs"]
mod changes;
#[path = "support/scenario.rs"]
mod scenario;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use changes::Changes;
use protected_pool::breaker::{BreakerConfig, State};
use protected_pool::{Error, ErrorClass, PoolBuilder, Postgres, ProtectedPool, Route};
use protected_pool_testkit::{APP_PASSWORD, APP_USER, FaultMode, FaultProxy, PgServer};
use scenario::{OPEN_MAX, eventually, guarded, ms, quick};

const PRIMARY: &str = "primary";
/// How often the probes look (the longest a probe task sleeps).
const HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// How long a recovered server may wait for its read breaker to close: the longest open
/// duration, a probe interval, and a wide margin.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

/// A pool on `url` with a quick read breaker, 100 ms probe rounds, and `changes` listening.
fn probed_pool(url: String, changes: &Changes) -> PoolBuilder<Postgres> {
    ProtectedPool::<Postgres>::builder()
        .primary(url)
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .health_check_interval(HEALTH_INTERVAL)
        .on_state_change(changes.listener())
}

async fn read_one(pool: &ProtectedPool) -> Result<i32, Error> {
    guarded(
        "a read",
        pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
            .fetch_one(),
    )
    .await
}

/// Reads until the primary's read breaker is open; each read must fail with an
/// infrastructure error.
async fn open_read_breaker(pool: &ProtectedPool) {
    let breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    for call in 0.. {
        if breaker.state() == State::Open {
            return;
        }
        assert!(call < 10, "10 failed reads did not open the read breaker");
        let error = read_one(pool)
            .await
            .expect_err("a read on a server that is down succeeded");
        assert!(
            error
                .class()
                .is_some_and(|class| class.counts_as_failure(Route::Read)),
            "{error}"
        );
    }
}

/// A pool is built and connected inside one runtime, which then ends (a setup runtime, a
/// `block_on` in `main`, a test's runtime for a shared pool), and is used on another. Its
/// breakers must still recover: once the server is back, reads succeed again.
///
/// The probe tasks were spawned once, on the first runtime, and died with it; and because
/// calls leave half-open trials to the probes, nobody ever tries the server again: the read
/// breaker stays open and every call is refused, with "retry after 0s", forever.
#[test]
fn a_pool_built_on_one_runtime_recovers_on_another() {
    let runtime = |threads| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    };
    // The servers live on the runtime that outlasts the test.
    let main = runtime(2);
    let pg = main.block_on(PgServer::start()).expect("start the server");

    let changes = Changes::default();
    let setup = runtime(1);
    let pool = setup.block_on(async {
        let pool = probed_pool(pg.url(), &changes)
            .connect()
            .await
            .expect("connect");
        assert_eq!(read_one(&pool).await.expect("a healthy read"), 1);
        pool
    });
    drop(setup);

    main.block_on(async {
        pg.kill9().await.expect("kill -9");
        open_read_breaker(&pool).await;
        pg.start_again().await.expect("start again");
        assert_eq!(pg.psql("SELECT 1").await.expect("psql"), "1");

        let back = Instant::now();
        let mut last = None;
        while back.elapsed() < RECOVERY_LIMIT {
            match read_one(&pool).await {
                Ok(one) => {
                    assert_eq!(one, 1);
                    return;
                }
                Err(error) => last = Some(error.to_string()),
            }
            tokio::time::sleep(ms(100)).await;
        }
        panic!(
            "{RECOVERY_LIMIT:?} after the server came back, reads still fail: the breaker was \
             never tried again. Last error: {}; read breaker: {:?}; transitions: {:#?}",
            last.unwrap_or_default(),
            pool.breaker(Route::Read, PRIMARY).unwrap().snapshot(),
            changes.describe()
        );
    });
}

/// A probe round panics (here a custom classifier panics on the ping's error: any bug or
/// unexpected input in the round would do). Once the cause is gone and the server is back,
/// the breaker must still close, without user traffic.
///
/// The panic ends the endpoint's probe task for good; as calls leave trials to the probes, the
/// breaker is never tried again and the endpoint stays refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_probe_round_does_not_leave_breakers_open() {
    let pg = PgServer::start().await.expect("start the server");
    let panicking = Arc::new(AtomicBool::new(false));
    let panics = Arc::new(AtomicUsize::new(0));
    let changes = Changes::default();
    let pool = probed_pool(pg.url(), &changes)
        .classify({
            let (panicking, panics) = (panicking.clone(), panics.clone());
            move |_error, _route| {
                if panicking.load(Ordering::SeqCst) {
                    panics.fetch_add(1, Ordering::SeqCst);
                    panic!("the classifier fails on purpose");
                }
                None
            }
        })
        .connect()
        .await
        .expect("connect");
    assert_eq!(read_one(&pool).await.expect("a healthy read"), 1);

    pg.kill9().await.expect("kill -9");
    open_read_breaker(&pool).await;
    // No call is made while the classifier panics: only a probe classifies.
    panicking.store(true, Ordering::SeqCst);
    let panicked = eventually(Duration::from_secs(5), || panics.load(Ordering::SeqCst) > 0).await;
    panicking.store(false, Ordering::SeqCst);
    assert!(
        panicked,
        "no probe classified a failed ping within 5 s: {:#?}",
        changes.describe()
    );

    pg.start_again().await.expect("start again");
    let back = Instant::now();
    let breaker = pool.breaker(Route::Read, PRIMARY).unwrap();
    let closed = eventually(RECOVERY_LIMIT, || breaker.state() == State::Closed).await;
    assert!(
        closed,
        "{:?} after the server came back (and the classifier stopped panicking), the read \
         breaker is still {:?}: the probe task died with the panic and nothing tries the \
         server again. Last read: {:?}; transitions: {:#?}",
        back.elapsed(),
        breaker.state(),
        read_one(&pool).await.map_err(|error| error.to_string()),
        changes.describe()
    );
    assert_eq!(read_one(&pool).await.expect("a read after recovery"), 1);
}

/// The server comes back but rejects the pool's password (a rotated secret): every probe's
/// connection is refused with 28P01. That answer will not change in the next 50 ms: probes
/// must back off on the breaker's open-duration schedule rather than open a connection every
/// round, and a call must be told why the endpoint is refused (the authentication failure),
/// not to "retry after 0s".
///
/// The probe's Auth-class answer is recorded as "ignored", which leaves the breaker half-open
/// with its trial slot free, so the next round, 50 ms later, tries again: about 20 new
/// connections a second, each a failed authentication in the server's log, for as long as the
/// password is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_back_off_from_a_server_that_rejects_the_password() {
    const WINDOW: Duration = Duration::from_secs(2);
    /// Open durations of 300 ms doubling to 1 s allow about four trials in two seconds.
    const MOST_CONNECTIONS: u64 = 6;
    let pg = PgServer::builder()
        .password_auth(true)
        .start()
        .await
        .expect("start the server");
    let proxy = FaultProxy::to_server(&pg).await.expect("start a proxy");
    let changes = Changes::default();
    let url = pg.url_for_via(&proxy, APP_USER, Some(APP_PASSWORD), "postgres");
    let pool = probed_pool(url, &changes).connect().await.expect("connect");
    assert_eq!(read_one(&pool).await.expect("a healthy read"), 1);

    proxy.set_mode(FaultMode::Refuse);
    open_read_breaker(&pool).await;
    pg.psql(&format!(
        "ALTER ROLE {APP_USER} PASSWORD 'not-the-pools-password'"
    ))
    .await
    .expect("change the password");
    let before = proxy.accepted();
    proxy.set_mode(FaultMode::Pass);

    // The first probe through (after at most the longest open duration).
    let reached = eventually(OPEN_MAX + Duration::from_secs(3), || {
        proxy.accepted() > before
    })
    .await;
    assert!(
        reached,
        "no probe reached the server: {:#?}",
        changes.describe()
    );
    let from = proxy.accepted();
    tokio::time::sleep(WINDOW).await;
    let connections = proxy.accepted() - from;
    let error = read_one(&pool)
        .await
        .expect_err("a read with the wrong password succeeded");

    assert!(
        connections <= MOST_CONNECTIONS,
        "the probes opened {connections} connections in {WINDOW:?} to a server that rejects \
         the password every time (at most {MOST_CONNECTIONS} expected on the open-duration \
         schedule); read breaker: {:?}",
        pool.breaker(Route::Read, PRIMARY).unwrap().snapshot()
    );
    assert!(
        error.class() == Some(ErrorClass::Auth)
            || error.to_string().contains("password authentication failed"),
        "a read on an endpoint that rejects the password does not say so: {error}"
    );
}
