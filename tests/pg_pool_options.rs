//! The pool options sqlx users rely on, against a real server: what `after_connect` sets is
//! there on every connection, a failing one hands out nothing, `min_connections` are open
//! right after `connect` and kept open, `idle_timeout` closes idle connections down to the
//! minimum, and endpoints may have pools of different sizes.
//!
//! The pool's connections are told apart from the harness's own by their `application_name`,
//! which the tests set with the options under test. Time bounds are generous sanity bounds,
//! not measurements.

#[path = "support/scenario.rs"]
mod scenario;

use protected_pool::{EndpointOptions, PoolBuilder, PoolConfig, Postgres, ProtectedPool};
use protected_pool_testkit::PgServer;
use scenario::{guarded, ms};
use sqlx::Executor;

const PRIMARY: &str = "primary";
const REPLICA: &str = "replica-1";

/// How many sessions named `application` the server has now.
async fn sessions(pg: &PgServer, application: &str) -> usize {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application}'"
    ))
    .await
    .expect("psql")
    .parse()
    .expect("a count")
}

/// Polls until the server has `expected` sessions named `application`; false if it still
/// has not after 10 s.
async fn sessions_become(pg: &PgServer, application: &str, expected: usize) -> bool {
    for _ in 0..200 {
        if sessions(pg, application).await == expected {
            return true;
        }
        tokio::time::sleep(ms(50)).await;
    }
    false
}

/// `n` reads at once, each holding its connection for 200 ms: afterwards `n` connections
/// sit idle in the pool.
async fn hold_connections(pool: &ProtectedPool, n: usize) {
    let reads: Vec<_> = (0..n)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.read(sqlx::query("SELECT pg_sleep(0.2)"))
                    .execute()
                    .await
            })
        })
        .collect();
    for read in reads {
        guarded("a read", read)
            .await
            .expect("the read task")
            .expect("a read");
    }
}

fn options(application: &str) -> EndpointOptions {
    EndpointOptions {
        after_connect: vec![format!("SET application_name = '{application}'")],
        ..EndpointOptions::default()
    }
}

/// Statements of the endpoint and the builder's hook both run on every new connection, in
/// that order, before any caller gets it: a read sees the search path and application name
/// they set, on every connection the pool opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_connect_settings_are_on_every_connection() {
    let pg = PgServer::start().await.expect("start the server");
    pg.psql("CREATE SCHEMA app; CREATE TABLE app.marker AS SELECT 'from app' AS what")
        .await
        .expect("psql");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            after_connect: vec![
                "SET search_path TO app, public".into(),
                "SET application_name = 'from-statements'".into(),
            ],
            ..EndpointOptions::default()
        })
        .after_connect(|conn| {
            Box::pin(async move {
                // Runs after the statements: its name wins.
                conn.execute("SET application_name = 'from-hook'").await?;
                Ok(())
            })
        })
        .connect()
        .await
        .expect("connect");

    hold_connections(&pool, 3).await;
    let size = pool.status(PRIMARY).unwrap().size;
    assert!(size >= 3, "{size} connections");
    for _ in 0..6 {
        let (search_path, application, what): (String, String, String) = guarded(
            "a read",
            pool.read(sqlx::query_as(
                "SELECT current_setting('search_path'), current_setting('application_name'), \
                 what FROM marker",
            ))
            .fetch_one(),
        )
        .await
        .expect("a read finds the table through the search path");
        assert_eq!(search_path, "app, public");
        assert_eq!(application, "from-hook");
        assert_eq!(what, "from app");
    }
    assert_eq!(sessions(&pg, "from-hook").await, size, "every connection");
}

/// A statement that fails fails the connection's creation: the caller gets the server's
/// complaint, and no connection is kept, in the pool or on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_after_connect_statement_hands_out_no_connection() {
    let pg = PgServer::start().await.expect("start the server");
    let mut options = options("doomed");
    options.after_connect.push("SET no_such_setting = 1".into());
    let error = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(options.clone())
        .connect()
        .await
        .expect_err("connecting must fail");
    let message = error.to_string();
    assert!(
        message.contains("unrecognized configuration parameter \"no_such_setting\"")
            && message.contains(PRIMARY),
        "{message}"
    );

    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(options)
        .build()
        .expect("build");
    let read = guarded("a read", pool.read(sqlx::query("SELECT 1")).execute()).await;
    assert!(read.is_err(), "a read got a connection: {read:?}");
    assert_eq!(pool.status(PRIMARY).unwrap().size, 0);
    assert!(
        sessions_become(&pg, "doomed", 0).await,
        "the failed connections are still open on the server"
    );
}

/// The builder's hook failing does the same, with the hook's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_after_connect_hook_hands_out_no_connection() {
    let pg = PgServer::start().await.expect("start the server");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(options("hooked"))
        .after_connect(|_conn| {
            Box::pin(async { Err(sqlx::Error::Configuration("the tenant is not set".into())) })
        })
        .build()
        .expect("build");
    let error = guarded("a read", pool.read(sqlx::query("SELECT 1")).execute())
        .await
        .expect_err("a read must fail");
    assert!(
        error.to_string().contains("the tenant is not set"),
        "{error}"
    );
    assert_eq!(pool.status(PRIMARY).unwrap().size, 0);
    assert!(sessions_become(&pg, "hooked", 0).await);
}

/// `connect` opens every endpoint's minimum at once, and the health loop opens them again
/// when the server ends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_connections_are_open_after_connect_and_kept_open() {
    let primary = PgServer::start().await.expect("start the primary");
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("start a replica");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(primary.url())
        .replica(replica.url())
        .endpoint_options(EndpointOptions {
            min_connections: 3,
            ..options("kept")
        })
        .endpoint_options_for(
            REPLICA,
            EndpointOptions {
                min_connections: 2,
                ..options("kept-replica")
            },
        )
        .health_check_interval(ms(100))
        .connect()
        .await
        .expect("connect");
    let status = pool.status(PRIMARY).unwrap();
    // All three open; one may be out with the health loop's probe (every 100 ms here).
    assert_eq!(status.size, 3, "{status:?}");
    assert!(status.idle >= 2, "{status:?}");
    assert_eq!(pool.status(REPLICA).unwrap().size, 2);
    assert_eq!(sessions(&primary, "kept").await, 3);
    assert_eq!(sessions(&replica, "kept-replica").await, 2);

    primary
        .psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'kept'",
        )
        .await
        .expect("psql");
    assert!(
        sessions_become(&primary, "kept", 3).await,
        "the health loop did not open the minimum again: {} open",
        sessions(&primary, "kept").await
    );
    assert_eq!(pool.status(PRIMARY).unwrap().size, 3);
}

/// Connections idle past `idle_timeout` are closed by the health loop, on the server too,
/// down to `min_connections` and no further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_connections_down_to_the_minimum() {
    let pg = PgServer::start().await.expect("start the server");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .endpoint_options(EndpointOptions {
            min_connections: 1,
            idle_timeout: Some(ms(500)),
            ..options("idle")
        })
        .health_check_interval(ms(100))
        .connect()
        .await
        .expect("connect");
    hold_connections(&pool, 4).await;
    // The health loop may have borrowed one meanwhile, making a read open one more.
    assert!(pool.status(PRIMARY).unwrap().size >= 4);

    assert!(
        sessions_become(&pg, "idle", 1).await,
        "idle connections were not closed: {} open",
        sessions(&pg, "idle").await
    );
    assert_eq!(pool.status(PRIMARY).unwrap().size, 1);
    // Stays at the minimum.
    tokio::time::sleep(ms(1200)).await;
    assert_eq!(sessions(&pg, "idle").await, 1);
}

/// Endpoints may keep pools of different sizes, from code and from a config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_have_their_own_pool_sizes() {
    let primary = PgServer::start().await.expect("start the primary");
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("start a replica");
    let config = PoolConfig::from_toml(&format!(
        r#"
        [pool]
        max_connections = 2

        [primary]
        url = "{}"

        [[replicas]]
        url = "{}"
        pool = {{ max_connections = 6, min_connections = 4, after_connect = ["SET application_name = 'big-replica'"] }}
        "#,
        primary.url(),
        replica.url()
    ))
    .expect("parse");
    let pool: ProtectedPool = PoolBuilder::from_config(&config)
        .connect()
        .await
        .expect("connect");
    assert_eq!(pool.status(PRIMARY).unwrap().max_size, 2);
    let status = pool.status(REPLICA).unwrap();
    assert_eq!((status.max_size, status.size), (6, 4), "{status:?}");
    assert_eq!(sessions(&replica, "big-replica").await, 4);
}
