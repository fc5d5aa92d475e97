//! Following the primary, against a real primary and streaming standby: a standby promoted
//! after the primary is killed takes the writes without a restart of the pool and no write
//! runs twice; a standby promoted while the primary still runs (split brain) gets no write,
//! and neither does the old primary, until one of them steps down.

#[path = "support/roles.rs"]
mod roles;
#[path = "support/scenario.rs"]
mod scenario;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protected_pool::{ClusterEvent, Error, Role};
use protected_pool_testkit::PgServer;
use roles::{
    CONNECT_TIMEOUT, HEALTH_INTERVAL, PRIMARY, STANDBY, first_accepted_write, pool_on,
    primary_and_standby, write,
};
use scenario::{eventually, guarded};

/// Every cluster event the pool reports.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<ClusterEvent>>>);

impl Events {
    fn listener(&self) -> impl Fn(&ClusterEvent) + Send + Sync + 'static {
        let seen = self.0.clone();
        move |event| seen.lock().unwrap().push(event.clone())
    }

    fn all(&self) -> Vec<ClusterEvent> {
        self.0.lock().unwrap().clone()
    }
}

async fn count(server: &PgServer, since: i64) -> i64 {
    server
        .psql(&format!("SELECT count(*) FROM writes WHERE id >= {since}"))
        .await
        .expect("count the writes")
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_standby_without_a_restart() {
    let (primary, standby) = primary_and_standby().await;
    let events = Events::default();
    let pool = pool_on(primary.url(), standby.url())
        .on_cluster_event(events.listener())
        .connect()
        .await
        .expect("connect");
    write(&pool, 1).await.expect("a write on the primary");
    assert_eq!(pool.role(PRIMARY).unwrap(), Some(Role::Primary));

    primary.kill9().await.expect("kill -9 the primary");
    // Writes fail while there is no primary: nothing to promote yet.
    let refused = guarded("a write with no primary", write(&pool, 2)).await;
    assert!(
        refused.is_err(),
        "a write succeeded with the primary killed"
    );

    let promoted = Instant::now();
    standby
        .psql("SELECT pg_promote(true, 60)")
        .await
        .expect("promote the standby");
    // Writes keep coming, one id each; the first to succeed after the promotion is timed.
    let id = first_accepted_write(&pool, 100, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no write succeeded 10 s after the promotion; events: {:#?}; health: {:#?}",
                events.all(),
                pool.health()
            )
        });
    let first_success = promoted.elapsed();
    // The health loop asks every interval; one connect to the new primary, and some slack for
    // the promotion's own end (pg_promote waits for it).
    let bound = HEALTH_INTERVAL + CONNECT_TIMEOUT + Duration::from_secs(1);
    assert!(
        first_success <= bound,
        "the first write after the promotion succeeded {first_success:?} after it (bound \
         {bound:?})"
    );
    // The pool was not rebuilt: the same handle writes on, to the new primary, each write once.
    for next in id + 1..=id + 20 {
        write(&pool, next).await.expect("writes on the new primary");
    }
    assert_eq!(count(&standby, id).await, 21, "each write ran exactly once");
    assert_eq!(pool.role(STANDBY).unwrap(), Some(Role::Primary));
    assert!(
        events.all().iter().any(|event| matches!(
            event,
            ClusterEvent::RoleChanged(change)
                if &*change.endpoint == STANDBY && change.to == Some(Role::Primary)
        )),
        "{:#?}",
        events.all()
    );
    let health = pool.health();
    let standby_health = health
        .endpoints
        .iter()
        .find(|endpoint| &*endpoint.name == STANDBY)
        .unwrap();
    assert_eq!(standby_health.roles.discovered, Some(Role::Primary));
    assert_eq!(standby_health.roles.declared, Role::Replica);
    assert!(standby_health.roles.changed_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_primaries_get_no_write_until_one_steps_down() {
    let (primary, standby) = primary_and_standby().await;
    let events = Events::default();
    let pool = pool_on(primary.url(), standby.url())
        .on_cluster_event(events.listener())
        .connect()
        .await
        .expect("connect");
    write(&pool, 1).await.expect("a write on the primary");

    // The standby is promoted while the primary still runs: two primaries.
    standby
        .psql("SELECT pg_promote(true, 60)")
        .await
        .expect("promote the standby");
    let seen = eventually(Duration::from_secs(5), || {
        events
            .all()
            .iter()
            .any(|event| matches!(event, ClusterEvent::SplitBrain { .. }))
    })
    .await;
    assert!(seen, "no split brain reported: {:#?}", events.all());
    let health = pool.health();
    assert_eq!(health.split_brain.len(), 2, "{health:#?}");
    assert_eq!(health.status, protected_pool::HealthStatus::Unhealthy);

    // No write reaches either primary while both say they are.
    for id in 10..20 {
        let error = write(&pool, id)
            .await
            .expect_err("a write during split brain");
        assert!(
            matches!(error, Error::SplitBrain { .. }),
            "not refused as a split brain: {error}"
        );
    }
    assert_eq!(count(&primary, 10).await, 0);
    assert_eq!(count(&standby, 10).await, 0);

    // The old primary steps down (stopped): the new one takes the writes.
    primary.stop_fast().await.expect("stop the old primary");
    let resumed = first_accepted_write(&pool, 100, Duration::from_secs(10))
        .await
        .is_some();
    assert!(resumed, "writes did not resume: {:#?}", events.all());
    assert!(
        events
            .all()
            .iter()
            .any(|event| matches!(event, ClusterEvent::SplitBrainOver { .. })),
        "{:#?}",
        events.all()
    );
    assert_eq!(count(&standby, 100).await, 1);
    assert!(pool.health().split_brain.is_empty());
}
