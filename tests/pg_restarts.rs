//! Idle connections that died with a restarted PostgreSQL server (kill -9, then started again
//! on the same port): a read that meets one must not fail for it, and the health loop must
//! clear them out of the pool without waiting for callers to stumble on them.
//!
//! Pooled connections idle for less than `idle_check_after` (30 s by default) are handed out
//! without a check, so after a restart every one of them is a dead socket waiting for a caller.
//!
//! Every test starts its own servers, so tests run in parallel. Time bounds are generous
//! sanity bounds that only a defect exceeds, not measurements.

#[path = "support/scenario.rs"]
mod scenario;

use std::time::Duration;

use protected_pool::{Error, Postgres, ProtectedPool, ReadPreference};
use protected_pool_testkit::PgServer;
use scenario::{eventually, guarded, ms};

const PRIMARY: &str = "primary";
const REPLICA: &str = "replica-1";
/// Idle connections each test leaves in an endpoint's pool before the restart.
const WARM: usize = 4;

/// Whether the server that answered is in recovery (a replica).
async fn read_in_recovery(pool: &ProtectedPool) -> Result<bool, Error> {
    guarded(
        "a read",
        pool.read(sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()"))
            .fetch_one(),
    )
    .await
}

/// [`WARM`] reads at once, each holding its connection for 200 ms, so that as many
/// connections are left idle in the pool of the endpoint that serves them.
async fn warm(pool: &ProtectedPool) -> Vec<bool> {
    let reads: Vec<_> = (0..WARM)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.read(sqlx::query_scalar::<_, bool>(
                    "SELECT pg_is_in_recovery() FROM pg_sleep(0.2)",
                ))
                .fetch_one()
                .await
            })
        })
        .collect();
    let mut served_by_replica = Vec::new();
    for read in reads {
        let answer = guarded("a warming read", read)
            .await
            .expect("the read task");
        served_by_replica.push(answer.expect("a healthy read"));
    }
    served_by_replica
}

/// Reads prefer the replica, which holds several idle connections when it is killed and
/// started again; then the primary is killed too, so only the replica can serve. The next
/// read meets a connection that died with the replica's previous process. Nothing reached the
/// server before the connection turned out dead, and a reused connection dying says nothing
/// about the server: the read must be retried on a fresh connection of the same endpoint, and
/// succeed.
///
/// The health loop runs only every 60 s here, so it does not clear the dead connections first.
/// Today the dead connection fails the attempt on the replica as a lost connection; the read
/// moves on to the (dead) primary, and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_retries_a_dead_idle_connection_on_the_same_endpoint() {
    let primary = PgServer::start().await.expect("start the primary");
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("start a streaming replica");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(primary.url())
        .replica(replica.url())
        .read_preference(ReadPreference::PreferReplica)
        .health_check_interval(Duration::from_secs(60))
        .connect()
        .await
        .expect("connect");
    assert_eq!(warm(&pool).await, [true; WARM], "the replica serves them");
    let idle = pool.status(REPLICA).unwrap().idle;
    assert!(idle >= WARM, "{idle} idle connections on the replica");

    replica.kill9().await.expect("kill -9 the replica");
    replica
        .start_again()
        .await
        .expect("start the replica again");
    assert_eq!(
        replica
            .psql("SELECT pg_is_in_recovery()")
            .await
            .expect("psql"),
        "t"
    );
    primary.kill9().await.expect("kill -9 the primary");

    let result = read_in_recovery(&pool).await;
    assert!(
        matches!(result, Ok(true)),
        "a read on a replica that answers new connections failed because it met a connection \
         that died with the replica's previous process (not retried on a fresh connection of \
         the same endpoint): {}",
        match &result {
            Ok(on_replica) => format!("served with pg_is_in_recovery() = {on_replica}"),
            Err(error) => error.to_string(),
        }
    );
}

/// With no traffic at all, the health loop (every 200 ms here) must notice that the pool's
/// idle connections died with the server's previous process and drop them, so the pool's
/// size reflects the connections that work and no caller is the first to find out.
///
/// Today the loop only measures replica lag and probes open breakers: on a primary whose
/// breakers are closed it touches no connection, and the dead ones stay until callers meet
/// them, one failed call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_loop_drops_dead_idle_connections_after_a_restart() {
    let pg = PgServer::start().await.expect("start the server");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .health_check_interval(ms(200))
        .connect()
        .await
        .expect("connect");
    assert_eq!(warm(&pool).await, [false; WARM]);
    assert_eq!(pool.status(PRIMARY).unwrap().size, WARM);

    pg.kill9().await.expect("kill -9");
    pg.start_again().await.expect("start again");
    assert_eq!(pg.psql("SELECT 1").await.expect("psql"), "1");

    let limit = Duration::from_secs(5);
    let dropped = eventually(limit, || pool.status(PRIMARY).unwrap().size <= 1).await;
    assert!(
        dropped,
        "{limit:?} after the restart the pool still holds the connections that died with the \
         server's previous process: {:?}",
        pool.status(PRIMARY).unwrap()
    );
    assert!(
        !read_in_recovery(&pool)
            .await
            .expect("a read after the restart")
    );
}
