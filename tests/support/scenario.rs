//! Bounds and polling for the scenario tests against real servers: a guard that turns a hung
//! call into a failure, polling with a limit, quick breaker open durations, and counting a
//! server's active statements.
//!
//! Included with `#[path = "support/scenario.rs"] mod scenario;`.
#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration};
use protected_pool_testkit::PgServer;

/// Longest any single pool call may take in these tests before we call it a hang.
pub const HANG_GUARD: Duration = Duration::from_secs(15);
/// Breaker open durations of [`quick`]: 300 ms doubling to 1 s, no jitter.
pub const OPEN_BASE: Duration = Duration::from_millis(300);
pub const OPEN_MAX: Duration = Duration::from_secs(1);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `preset` with a short, exact open duration (see [`OPEN_BASE`], [`OPEN_MAX`]).
pub fn quick(preset: BreakerConfig) -> BreakerConfig {
    BreakerConfig {
        open: OpenDuration {
            base: OPEN_BASE,
            multiplier: 2.0,
            max: OPEN_MAX,
            jitter: 0.0,
        },
        ..preset
    }
}

/// Awaits `call`, failing the test instead of hanging if it takes longer than [`HANG_GUARD`].
pub async fn guarded<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for {HANG_GUARD:?}"))
}

/// Polls `condition` every 10 ms until it holds; false if it still does not after `limit`.
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(ms(10)).await;
    }
}

/// How many statements whose text contains `fragment` are running on `pg` now, not counting
/// the session that asks.
pub async fn active_statements(pg: &PgServer, fragment: &str) -> u64 {
    let fragment = fragment.replace('\'', "''");
    pg.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE query LIKE '%{fragment}%' AND state = 'active' AND pid <> pg_backend_pid()"
    ))
    .await
    .expect("psql")
    .parse()
    .expect("a count")
}
