//! The example configuration file drives a real primary and streaming replica; a broken
//! configuration lists every problem with its path; thresholds change at runtime without
//! losing a breaker's state.

use std::path::Path;
use std::time::Duration;

use protected_pool::breaker::{BreakerConfig, State};
use protected_pool::{Error, PoolBuilder, PoolConfig, Postgres, ProtectedPool, Route};
use protected_pool_testkit::PgServer;

fn example_config() -> PoolConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/protected-pool.toml");
    PoolConfig::load(&path).expect("the example file parses")
}

#[test]
fn the_example_file_describes_a_working_pool() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (primary, replica) = runtime.block_on(async {
        let primary = PgServer::start().await.expect("primary");
        let replica = PgServer::streaming_replica(&primary)
            .await
            .expect("replica");
        (primary, replica)
    });
    // SAFETY: set before anything else in this test binary reads the environment; this is
    // its only test.
    unsafe {
        std::env::set_var("DATABASE_URL", primary.url());
        std::env::set_var("REPLICA_URL", replica.url());
    }
    let config = example_config();
    config.validate().expect("valid with both variables set");

    runtime.block_on(async {
        let pool: ProtectedPool<Postgres> = ProtectedPool::from_config(&config).expect("pool");
        assert_eq!(
            pool.endpoints()
                .iter()
                .map(|(name, _)| name.to_string())
                .collect::<Vec<_>>(),
            ["primary", "replica-1"]
        );
        // read_preference = "prefer_replica"
        let served = pool
            .read(sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()"))
            .cached("recovery", Duration::from_secs(1))
            .fetch_one()
            .await
            .expect("read");
        assert_eq!(served.endpoint(), Some("replica-1"));
        assert!(*served, "served by the standby");
        pool.write(sqlx::query("CREATE TABLE t (id int)"))
            .execute()
            .await
            .expect("write on the primary");

        // The file's overrides, on top of the presets.
        let write = pool.breaker(Route::Write, "primary").unwrap().config();
        assert_eq!(write.failure_rate, Some(0.5));
        assert_eq!(write.minimum_calls, 20);
        assert_eq!(write.open.base, Duration::from_secs(5));
        assert_eq!(
            write.consecutive_failures,
            BreakerConfig::write().consecutive_failures
        );
        let auth = pool.breaker(Route::Auth, "replica-1").unwrap().config();
        assert_eq!(auth.slow_call_rate, None);
        let read = pool.breaker(Route::Read, "replica-1").unwrap().config();
        assert_eq!(
            (read.open.base, read.open.max),
            (Duration::from_secs(2), Duration::from_secs(15))
        );
        assert_eq!(config.route(Route::Read).timeout, Duration::from_secs(2));
        assert_eq!(pool.status("primary").unwrap().max_size, 16);

        // Runtime update: kill the primary so the write breaker opens, then loosen it.
        primary.kill9().await.expect("kill -9");
        let tight = BreakerConfig {
            consecutive_failures: Some(1),
            ..write.clone()
        };
        pool.update_breaker(Route::Write, tight)
            .expect("valid update");
        pool.write(sqlx::query("INSERT INTO t VALUES (1)"))
            .execute()
            .await
            .expect_err("the primary is down");
        let breaker = pool.breaker(Route::Write, "primary").unwrap();
        assert_eq!(breaker.state(), State::Open, "one failure is enough now");
        let before = breaker.snapshot();
        pool.update_breaker(
            Route::Write,
            BreakerConfig {
                consecutive_failures: Some(50),
                ..write.clone()
            },
        )
        .expect("valid update");
        let after = breaker.snapshot();
        assert_eq!(
            after.state,
            State::Open,
            "an update does not close the breaker"
        );
        assert_eq!(after.opens, before.opens);
        assert_eq!(after.total_failures, before.total_failures);
        assert_eq!(breaker.config().consecutive_failures, Some(50));
        // Every endpoint's breaker of the route got it.
        let replica_write = pool.breaker(Route::Write, "replica-1").unwrap().config();
        assert_eq!(replica_write.consecutive_failures, Some(50));

        let error = pool
            .update_breaker(
                Route::Write,
                BreakerConfig {
                    failure_rate: Some(1.5),
                    ..write.clone()
                },
            )
            .expect_err("out of range");
        assert!(
            error
                .to_string()
                .contains("breakers.write.failure_rate: 1.5 is outside 0..=1"),
            "{error}"
        );
        assert_eq!(breaker.config().failure_rate, Some(0.5), "nothing changed");
    });
}

#[test]
fn a_broken_configuration_lists_every_problem_with_its_path() {
    let config = PoolConfig::from_toml(
        r#"
        [primary]
        url_env = "PROTECTED_POOL_TEST_UNSET_VARIABLE"

        [[replicas]]
        url = "mysql://not-postgres"

        [[replicas]]

        [pool]
        max_connections = 0

        [timeouts]
        read = "0s"

        [breakers.write]
        failure_rate = 1.5
        open = { base = "10s", max = "1s" }

        [cache]
        max_entries = 0
        "#,
    )
    .expect("well-formed");
    let problems = match ProtectedPool::<Postgres>::from_config(&config) {
        Err(Error::Config(error)) => error.problems,
        other => panic!("expected a config error, got {other:?}"),
    };
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "primary.url_env",
        "replicas[0].url",
        "replicas[1]",
        "pool.max_connections",
        "timeouts.read",
        "breakers.write.failure_rate",
        "breakers.write.open.max",
        "cache.max_entries",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
    let unset = &problems[paths.iter().position(|p| *p == "primary.url_env").unwrap()];
    assert!(
        unset.message.contains("PROTECTED_POOL_TEST_UNSET_VARIABLE"),
        "{unset}"
    );
    // The same problems from validate(), without building anything.
    assert_eq!(config.validate().unwrap_err().problems, problems);
    // A builder from the file reports them too, with what code adds.
    let from_builder = PoolBuilder::<Postgres>::from_config(&config)
        .timeout(Route::Write, Duration::ZERO)
        .build()
        .unwrap_err()
        .to_string();
    assert!(from_builder.contains("timeouts.write"), "{from_builder}");
    assert!(from_builder.contains("primary.url_env"), "{from_builder}");
}

#[tokio::test]
async fn a_primary_url_with_a_host_list_is_a_cluster() {
    let config = protected_pool::PoolConfig::from_toml(
        r#"
        [primary]
        url = "postgres://app:pw@db-a:5432,db-b:5433/app?target_session_attrs=prefer-standby"
        "#,
    )
    .expect("well-formed");
    let pool = protected_pool::ProtectedPool::<sqlx::Postgres>::from_config(&config)
        .expect("a cluster of two");
    let endpoints = pool.endpoints();
    assert_eq!(
        endpoints,
        [
            ("db-a:5432".into(), protected_pool::Role::Primary),
            ("db-b:5433".into(), protected_pool::Role::Replica),
        ]
    );
    let bad = protected_pool::PoolConfig::from_toml(
        "[primary]\nurl = \"postgres://app:s3cr3t@db-a,:x/app\"\n",
    )
    .expect("well-formed")
    .validate()
    .expect_err("a malformed host list");
    assert!(!bad.to_string().contains("s3cr3t"), "{bad}");
    assert_eq!(bad.problems[0].path, "primary.url");
}
