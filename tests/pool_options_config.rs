//! The pool options in a config file and in code: every form parses into the options the
//! pool uses, and every bad value is a problem listed at its path, all at once.

use std::time::Duration;

use protected_pool::{EndpointOptions, Error, PoolConfig, Postgres, ProtectedPool};

fn problems(config: &PoolConfig) -> Vec<String> {
    config
        .validate()
        .expect_err("the configuration has problems")
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn every_pool_option_reads_from_toml_and_json_the_same() {
    let toml = PoolConfig::from_toml(
        r#"
        [pool]
        max_connections = 8
        min_connections = 2
        idle_timeout = "10m"
        after_connect = ["SET search_path TO app", "SET statement_timeout = '5s'"]

        [primary]
        url = "postgres://app@db-primary/app"
        pool = { transaction_pooler = true, max_connections = 4 }

        [[replicas]]
        url = "postgres://app@db-replica/app"
        "#,
    )
    .expect("TOML");
    let json = PoolConfig::from_json(
        r#"{
            "pool": {
                "max_connections": 8, "min_connections": 2, "idle_timeout": "10m",
                "after_connect": ["SET search_path TO app", "SET statement_timeout = '5s'"]
            },
            "primary": {
                "url": "postgres://app@db-primary/app",
                "pool": {"transaction_pooler": true, "max_connections": 4}
            },
            "replicas": [{"url": "postgres://app@db-replica/app"}]
        }"#,
    )
    .expect("JSON");
    assert_eq!(toml, json);
    assert_eq!(toml.pool.min_connections, 2);
    assert_eq!(toml.pool.idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(toml.pool.after_connect.len(), 2);
    let primary = toml.primary.as_ref().unwrap().pool.as_ref().unwrap();
    assert!(primary.transaction_pooler);
    // The endpoint's own table replaces [pool] as a whole: what it does not set is default.
    assert_eq!(primary.min_connections, 0);
    toml.validate().expect("valid");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let pool: ProtectedPool = ProtectedPool::from_config(&toml).expect("build");
    assert_eq!(pool.status("primary").unwrap().max_size, 4);
    assert_eq!(pool.status("replica-1").unwrap().max_size, 8);
}

#[test]
fn bad_pool_options_are_listed_at_their_paths() {
    let config = PoolConfig::from_toml(
        r#"
        [pool]
        max_connections = 2
        min_connections = 5
        idle_timeout = "0s"
        after_connect = ["SET search_path TO app", "  "]

        [primary]
        url = "postgres://app@db/app"
        pool = { max_connections = 0 }

        [[replicas]]
        url = "postgres://app@replica/app"
        pool = { min_connections = 3, max_connections = 1, idle_timeout = "400days" }
        "#,
    )
    .expect("parses");
    assert_eq!(
        problems(&config),
        [
            "pool.min_connections: 5 is more than max_connections (2)",
            "pool.idle_timeout: 0s must be above zero",
            "pool.after_connect[1]: an empty statement: remove it",
            "primary.pool.max_connections: 0 must be at least 1",
            "replicas[0].pool.min_connections: 3 is more than max_connections (1)",
            "replicas[0].pool.idle_timeout: 34560000s is above the limit of 365 days",
        ]
    );
}

#[test]
fn a_misspelt_pool_option_is_a_problem_at_its_path() {
    let error = PoolConfig::from_toml(
        "[[replicas]]\nurl = \"postgres://db/app\"\npool = { min_conections = 2 }\n",
    )
    .expect_err("unknown field");
    let problem = error.problems[0].to_string();
    assert!(
        problem.starts_with("replicas[0].pool.min_conections (line 3"),
        "{problem}"
    );
}

#[test]
fn options_for_an_endpoint_that_does_not_exist_are_a_problem() {
    let result = ProtectedPool::<Postgres>::builder()
        .primary("postgres://app@db/app")
        .endpoint_options_for("replica-9", EndpointOptions::default())
        .endpoint_options_for(
            "primary",
            EndpointOptions {
                min_connections: 11,
                ..EndpointOptions::default()
            },
        )
        .build();
    let Err(Error::Config(error)) = result else {
        panic!("not a configuration error: {result:?}");
    };
    let problems: Vec<String> = error.problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        problems,
        [
            "endpoint_options_for(\"primary\").min_connections: 11 is more than max_connections (10)",
            "endpoint_options_for(\"replica-9\"): no endpoint has this name",
        ]
    );
}
