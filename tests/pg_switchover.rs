//! Roles that swap behind addresses the pool keeps: an old primary rejoined as a standby
//! behind the same address (after a failover) gets no writes and its write breaker does not
//! flap; a switchover under load fails no read, and writes pause only while no server is the
//! primary.

#[path = "support/roles.rs"]
mod roles;
#[path = "support/scenario.rs"]
mod scenario;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use protected_pool::breaker::State;
use protected_pool::{PoolStateChange, Role, Route};
use protected_pool_testkit::{FaultProxy, PgServer};
use roles::{
    CONNECT_TIMEOUT, HEALTH_INTERVAL, PRIMARY, STANDBY, pool_on, primary_and_standby, write,
};
use scenario::{eventually, guarded, ms};

/// Every breaker transition, for counting.
#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Vec<PoolStateChange>>>);

impl Transitions {
    fn listener(&self) -> impl Fn(&PoolStateChange) + Send + Sync + 'static {
        let seen = self.0.clone();
        move |change| seen.lock().unwrap().push(change.clone())
    }

    /// Transitions of `endpoint`'s `route` breaker into `to` so far.
    fn entering(&self, endpoint: &str, route: Route, to: State) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| &*c.endpoint == endpoint && c.route == route && c.change.to == to)
            .count()
    }
}

async fn rows(server: &PgServer, ids: &[i64]) -> usize {
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    server
        .psql(&format!("SELECT count(*) FROM writes WHERE id IN ({list})"))
        .await
        .expect("count")
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_behind_the_same_address_gets_no_writes_and_does_not_flap() {
    let (primary, standby) = primary_and_standby().await;
    // The pool reaches the primary through an address of its own (what a VIP or a DNS name
    // is); the address stays, the server behind it changes role.
    let address = FaultProxy::to_server(&primary).await.expect("a proxy");
    let transitions = Transitions::default();
    let pool = pool_on(primary.url_via(&address), standby.url())
        .on_state_change(transitions.listener())
        .connect()
        .await
        .expect("connect");
    write(&pool, 1).await.expect("a write on the primary");

    // A failover: the primary dies, the standby is promoted, and the old primary comes back as
    // a standby of the new one, behind the same address.
    primary.kill9().await.expect("kill -9 the primary");
    standby.promote().await.expect("promote the standby");
    primary
        .rejoin_as_standby_of(&standby)
        .await
        .expect("rejoin the old primary as a standby");
    let found = eventually(Duration::from_secs(5), || {
        pool.role(PRIMARY).unwrap() == Some(Role::Replica)
            && pool.role(STANDBY).unwrap() == Some(Role::Primary)
    })
    .await;
    assert!(found, "roles not followed: {:#?}", pool.health());

    // Three seconds of writes: every one lands on the new primary, none on the old one, and
    // the old primary's write breaker never closes on a standby.
    let closed_before = transitions.entering(PRIMARY, Route::Write, State::Closed);
    let started = Instant::now();
    let mut written = Vec::new();
    let mut id = 100;
    while started.elapsed() < Duration::from_secs(3) {
        id += 1;
        guarded("a write", write(&pool, id))
            .await
            .unwrap_or_else(|error| panic!("a write failed after the failover: {error}"));
        written.push(id);
        tokio::time::sleep(ms(10)).await;
    }
    assert_eq!(rows(&standby, &written).await, written.len());
    assert_eq!(
        transitions.entering(PRIMARY, Route::Write, State::Closed),
        closed_before,
        "the write breaker of a standby closed (flapping)"
    );
    // The old primary, a standby now, has them too, by replication, never by a write of ours.
    assert_eq!(
        primary.psql("SELECT pg_is_in_recovery()").await.unwrap(),
        "t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_load_fails_no_read_and_pauses_writes_only_without_a_primary() {
    let (primary, standby) = primary_and_standby().await;
    let pool = pool_on(primary.url(), standby.url())
        .connect()
        .await
        .expect("connect");

    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicI64::new(1));
    let failed_reads = Arc::new(Mutex::new(Vec::<String>::new()));
    // (id, time, outcome) of every write.
    let writes = Arc::new(Mutex::new(Vec::<(i64, Instant, bool)>::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (pool, stop, failed_reads) = (pool.clone(), stop.clone(), failed_reads.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let read = pool.read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM writes"));
                if let Err(error) = read.fetch_one().await {
                    failed_reads.lock().unwrap().push(error.to_string());
                }
                tokio::time::sleep(ms(5)).await;
            }
        }));
    }
    for _ in 0..2 {
        let (pool, stop, next_id, writes) =
            (pool.clone(), stop.clone(), next_id.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let ok = write(&pool, id).await.is_ok();
                writes.lock().unwrap().push((id, Instant::now(), ok));
                tokio::time::sleep(ms(5)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let switch_started = Instant::now();
    primary
        .switchover_to(&standby)
        .await
        .expect("switch over to the standby");
    let switched = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task");
    }

    let failed_reads = failed_reads.lock().unwrap().clone();
    assert!(
        failed_reads.is_empty(),
        "{} reads failed during the switchover, first: {:?}",
        failed_reads.len(),
        failed_reads.first()
    );
    let writes = writes.lock().unwrap().clone();
    // Writes may fail only from the moment the old primary stopped until the new one was
    // found: the switchover itself, then a health interval and a connect.
    let resume_by = switched + HEALTH_INTERVAL + CONNECT_TIMEOUT + Duration::from_secs(1);
    let misplaced: Vec<_> = writes
        .iter()
        .filter(|(_, at, ok)| !ok && (*at < switch_started || *at > resume_by))
        .collect();
    assert!(
        misplaced.is_empty(),
        "writes failed outside the switchover: {misplaced:?}"
    );
    let acknowledged: Vec<i64> = writes.iter().filter(|w| w.2).map(|w| w.0).collect();
    assert!(
        writes.iter().any(|(_, at, ok)| *ok && *at > switched),
        "no write succeeded after the switchover"
    );
    // A clean switchover loses nothing: every acknowledged write is on the new primary, once.
    assert_eq!(rows(&standby, &acknowledged).await, acknowledged.len());
    assert_eq!(pool.role(STANDBY).unwrap(), Some(Role::Primary));
    assert_eq!(pool.role(PRIMARY).unwrap(), Some(Role::Replica));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_moved_to_the_new_primary_is_one_primary_not_a_split_brain() {
    let (primary, standby) = primary_and_standby().await;
    // The primary's address, as a VIP or a DNS name: after the failover it is moved to the
    // new primary, which the pool also reaches by its own address.
    let address = FaultProxy::to_server(&primary).await.expect("a proxy");
    let pool = pool_on(primary.url_via(&address), standby.url())
        .connect()
        .await
        .expect("connect");
    write(&pool, 1).await.expect("a write on the primary");

    primary.kill9().await.expect("kill -9 the primary");
    standby.promote().await.expect("promote the standby");
    address.point_to(&standby);
    let both = eventually(Duration::from_secs(5), || {
        pool.role(PRIMARY).unwrap() == Some(Role::Primary)
            && pool.role(STANDBY).unwrap() == Some(Role::Primary)
    })
    .await;
    assert!(
        both,
        "both endpoints should reach the new primary: {:#?}",
        pool.health()
    );

    let mut written = Vec::new();
    for id in 100..120 {
        guarded("a write", write(&pool, id))
            .await
            .unwrap_or_else(|error| panic!("one server behind two addresses refused: {error}"));
        written.push(id);
    }
    assert_eq!(rows(&standby, &written).await, written.len());
    assert!(pool.health().split_brain.is_empty(), "{:#?}", pool.health());
}
