//! `pool.health()` against a real primary and streaming replica: healthy, degraded while the
//! primary is down and the replica serves reads, unhealthy when nothing can serve reads.

use std::time::Duration;

use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::{HealthStatus, Postgres, ProtectedPool, Role, Route};
use protected_pool_testkit::PgServer;

fn quick(config: BreakerConfig) -> BreakerConfig {
    BreakerConfig {
        open: OpenDuration {
            base: Duration::from_secs(30),
            max: Duration::from_secs(30),
            multiplier: 1.0,
            jitter: 0.0,
        },
        ..config
    }
}

async fn read(pool: &ProtectedPool<Postgres>) -> protected_pool::Result<i32> {
    pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
        .fetch_one()
        .await
}

fn state(pool: &ProtectedPool<Postgres>, endpoint: &str, route: Route) -> State {
    let report = pool.health();
    let endpoint = report
        .endpoints
        .iter()
        .find(|e| &*e.name == endpoint)
        .expect("endpoint in the report");
    endpoint
        .breakers
        .iter()
        .find(|b| b.route == route)
        .expect("route in the report")
        .breaker
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_endpoints_through_an_outage() {
    let primary = PgServer::start().await.expect("primary");
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("replica");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(primary.url())
        .replica(replica.url())
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .recovery_probes(false)
        .connect()
        .await
        .expect("connect");
    read(&pool).await.expect("healthy read");

    let report = pool.health();
    assert_eq!(report.status, HealthStatus::Healthy);
    let roles: Vec<(&str, Role)> = report
        .endpoints
        .iter()
        .map(|e| (&*e.name, e.role))
        .collect();
    assert_eq!(
        roles,
        [("primary", Role::Primary), ("replica-1", Role::Replica)]
    );
    assert_eq!(report.endpoints[0].breakers.len(), 3);
    assert!(report.endpoints[0].pool.size >= 1);
    let json = serde_json::to_value(&report).expect("serializable");
    assert_eq!(json["status"], "healthy");
    assert_eq!(json["endpoints"][0]["breakers"][0]["route"], "read");
    assert_eq!(json["endpoints"][0]["breakers"][0]["state"], "closed");
    assert_eq!(json["endpoints"][1]["role"], "replica");
    assert_eq!(json["cache"], "memory");
    assert!(report.uptime > Duration::ZERO);
    assert!(json["uptime"].is_string(), "{}", json["uptime"]);
    assert!(
        !json.to_string().contains(&primary.url()),
        "no URL in the report"
    );

    // Primary down: its read breaker opens, the replica keeps serving reads: degraded.
    primary.kill9().await.expect("kill");
    for _ in 0..10 {
        read(&pool).await.expect("served by the replica");
        if state(&pool, "primary", Route::Read) == State::Open {
            break;
        }
    }
    assert_eq!(state(&pool, "primary", Route::Read), State::Open);
    let report = pool.health();
    assert_eq!(report.status, HealthStatus::Degraded);
    let primary_read = &report.endpoints[0].breakers[0].breaker;
    assert!(primary_read.consecutive_failures >= 1 || primary_read.opens == 1);
    assert!(primary_read.opened_at.is_some());

    // The replica goes too: once its read breaker opens nothing can serve reads: unhealthy.
    replica.kill9().await.expect("kill replica");
    for _ in 0..10 {
        let _ = read(&pool).await;
        if state(&pool, "replica-1", Route::Read) == State::Open {
            break;
        }
    }
    assert_eq!(state(&pool, "replica-1", Route::Read), State::Open);
    let report = pool.health();
    assert_eq!(report.status, HealthStatus::Unhealthy);
    assert_eq!(
        serde_json::to_value(&report).unwrap()["status"],
        "unhealthy"
    );
}
