//! A primary and its streaming standby, and a pool on both that follows roles quickly: shared
//! by the tests of promotions, demotions and switchovers.
//!
//! Included with `#[path = "support/roles.rs"] mod roles;` next to `support/scenario.rs`.
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use protected_pool::breaker::BreakerConfig;
use protected_pool::{EndpointOptions, Error, PoolBuilder, Postgres, ProtectedPool, Route};
use protected_pool_testkit::PgServer;

use crate::scenario::quick;

pub const PRIMARY: &str = "primary";
pub const STANDBY: &str = "replica-1";
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A primary with the table writes go to, and its streaming standby.
pub async fn primary_and_standby() -> (PgServer, PgServer) {
    let primary = PgServer::start().await.expect("start the primary");
    primary
        .psql("CREATE TABLE writes (id bigint PRIMARY KEY); CHECKPOINT")
        .await
        .expect("create the table");
    let standby = PgServer::streaming_replica(&primary)
        .await
        .expect("start a streaming standby");
    assert_eq!(
        standby.psql("SELECT pg_is_in_recovery()").await.unwrap(),
        "t"
    );
    (primary, standby)
}

/// A pool on both, with quick breakers, 2 s timeouts, a 1 s connect timeout and health
/// checks every [`HEALTH_INTERVAL`].
pub fn pool_on(primary_url: String, standby_url: String) -> PoolBuilder<Postgres> {
    ProtectedPool::<Postgres>::builder()
        .primary(primary_url)
        .replica(standby_url)
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .timeout(Route::Write, Duration::from_secs(2))
        .timeout(Route::Read, Duration::from_secs(2))
        .endpoint_options(EndpointOptions {
            connect_timeout: CONNECT_TIMEOUT,
            ..EndpointOptions::default()
        })
        .health_check_interval(HEALTH_INTERVAL)
}

/// One row with this id.
pub async fn write(pool: &ProtectedPool, id: i64) -> Result<(), Error> {
    pool.write(sqlx::query("INSERT INTO writes (id) VALUES ($1)").bind(id))
        .execute()
        .await
        .map(drop)
}

/// Writes ids `after + 1`, `after + 2`, ... every 20 ms until one is accepted, for at most
/// `limit`; the id accepted, or `None`.
pub async fn first_accepted_write(
    pool: &ProtectedPool,
    after: i64,
    limit: Duration,
) -> Option<i64> {
    let started = std::time::Instant::now();
    let mut id = after;
    while started.elapsed() < limit {
        id += 1;
        let written = crate::scenario::guarded("a write", write(pool, id)).await;
        if written.is_ok() {
            return Some(id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}
