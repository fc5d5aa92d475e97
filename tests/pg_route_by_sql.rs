//! `pool.query(q)` (feature `route-by-sql`) against a real primary and streaming replica,
//! replicas preferred for reads: a provably read-only statement is answered by the replica
//! (it is in recovery); writes, and reads that lock rows, land on the primary.

use protected_pool::{ReadPreference, Route};

#[path = "support/changes.rs"]
mod changes;
#[path = "support/failover.rs"]
mod failover;
#[path = "support/scenario.rs"]
mod scenario;

use changes::Changes;
use failover::{PRIMARY, REPLICA, failover_pool, primary_server, replica_of};
use scenario::guarded;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_sends_reads_to_the_replica_and_writes_and_locks_to_the_primary() {
    let primary = primary_server().await;
    let replica = replica_of(&primary).await;
    let changes = Changes::default();
    let pool = failover_pool(primary.url(), Some(replica.url()), &changes)
        .read_preference(ReadPreference::PreferReplica)
        .connect()
        .await
        .expect("connect");

    // A read: the replica answers, and says it is in recovery.
    for _ in 0..3 {
        let (in_recovery, note): (bool, String) = guarded(
            "a read",
            pool.query(
                sqlx::query_as("SELECT pg_is_in_recovery(), note FROM items WHERE id = $1")
                    .bind(1_i32),
            )
            .fetch_one(),
        )
        .await
        .expect("a read");
        assert!(
            in_recovery,
            "a read-only statement was not served by the replica"
        );
        assert_eq!(note, "on both servers");
    }
    // The endpoint that served it, by name.
    let served = guarded(
        "a read with a fallback",
        pool.query(sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()"))
            .or_fallback(|_| None)
            .fetch_one(),
    )
    .await
    .expect("a read");
    assert_eq!(served.endpoint(), Some(REPLICA));
    assert!(*served);

    // A write: the primary takes it (a replica would refuse it: read-only transaction).
    let id: i64 = guarded(
        "a write",
        pool.query(
            sqlx::query_scalar("INSERT INTO events (n) VALUES ($1) RETURNING id").bind(7_i32),
        )
        .fetch_one(),
    )
    .await
    .expect("an insert lands on the primary");
    assert_eq!(
        primary
            .psql(&format!("SELECT n FROM events WHERE id = {id}"))
            .await
            .unwrap(),
        "7"
    );
    let done = guarded(
        "an execute",
        pool.query(sqlx::query("UPDATE items SET note = note WHERE id = $1").bind(1_i32))
            .or_fallback(|_| None)
            .execute(),
    )
    .await
    .expect("an update lands on the primary");
    assert_eq!(done.endpoint(), Some(PRIMARY));
    assert_eq!(done.rows_affected(), 1);

    // A read that locks rows: FOR UPDATE needs the primary.
    let locked = guarded(
        "a locking read",
        pool.query(sqlx::query_scalar::<_, bool>(
            "SELECT pg_is_in_recovery() FROM items WHERE id = 1 FOR UPDATE",
        ))
        .or_fallback(|_| None)
        .fetch_one(),
    )
    .await
    .expect("a FOR UPDATE read");
    assert!(!*locked, "a locking read was served by the replica");
    assert_eq!(locked.endpoint(), Some(PRIMARY));
    let shared: bool = guarded(
        "a locking subquery",
        pool.query(sqlx::query_scalar(
            "SELECT pg_is_in_recovery() FROM (SELECT * FROM items FOR SHARE) i",
        ))
        .fetch_one(),
    )
    .await
    .expect("a FOR SHARE read");
    assert!(
        !shared,
        "a read locking rows in a subquery was served by the replica"
    );

    // A data-modifying WITH, and a sequence, in a SELECT: on the primary too.
    let (in_recovery, n): (bool, i64) = guarded(
        "a data-modifying WITH",
        pool.query(sqlx::query_as(
            "WITH added AS (INSERT INTO events (n) VALUES (8) RETURNING n) \
             SELECT pg_is_in_recovery(), count(*) FROM added",
        ))
        .fetch_one(),
    )
    .await
    .expect("a data-modifying WITH lands on the primary");
    assert!(!in_recovery);
    assert_eq!(n, 1);
    let next: i64 = guarded(
        "nextval",
        pool.query(sqlx::query_scalar("SELECT nextval('events_id_seq')"))
            .fetch_one(),
    )
    .await
    .expect("nextval runs on the primary");
    assert!(next > id);

    // The route each took, as the breakers counted them.
    let replica_reads = pool.breaker(Route::Read, REPLICA).unwrap().snapshot();
    let primary_writes = pool.breaker(Route::Write, PRIMARY).unwrap().snapshot();
    assert_eq!(replica_reads.total_failures, 0, "{replica_reads:?}");
    assert_eq!(primary_writes.total_failures, 0, "{primary_writes:?}");
}
