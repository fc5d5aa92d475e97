//! Keyed writes and the outbox in the configuration file: the sections map onto the pool,
//! and every bad value is reported with its path.

use protected_pool::{PoolConfig, ProtectedPool, Sqlite};

#[tokio::test]
async fn the_file_sets_the_key_table_and_the_outbox() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let outbox = dir.path().join("queue").join("outbox.sqlite");
    let config = PoolConfig::from_toml(&format!(
        r#"
        [primary]
        url = "sqlite://{}?mode=rwc"

        [idempotency]
        table = "main.applied_keys"
        retention = "30days"

        [outbox]
        path = "{}"
        max_writes = 10
        "#,
        dir.path().join("app.db").display(),
        outbox.display(),
    ))
    .expect("parse");
    let pool = ProtectedPool::<Sqlite>::from_config(&config).expect("build");
    assert!(
        pool.idempotency_migration()[0].contains("main.applied_keys"),
        "{:?}",
        pool.idempotency_migration()
    );
    let handle = pool.outbox().expect("an outbox from the file");
    assert_eq!(handle.path(), outbox);
    // The file and its directory are made on first use.
    assert_eq!(
        handle.dead_letters().await.expect("open the outbox").len(),
        0
    );
    assert!(outbox.exists());
}

#[test]
fn bad_values_are_reported_with_their_paths() {
    let config = PoolConfig::from_toml(
        r#"
        [primary]
        url = "postgres://db/app"

        [idempotency]
        table = "keys; DROP TABLE users"
        retention = "0s"

        [outbox]
        path = "/var/lib/app/outbox.sqlite"
        batch = 0
        max_writes = 0
        "#,
    )
    .expect("parse");
    let error = config.validate().expect_err("four problems");
    let problems: Vec<String> = error.problems.iter().map(ToString::to_string).collect();
    for path in [
        "idempotency.table:",
        "idempotency.retention:",
        "outbox.batch:",
        "outbox.max_writes:",
    ] {
        assert!(
            problems.iter().any(|problem| problem.starts_with(path)),
            "{path} missing from {problems:#?}"
        );
    }
}

#[test]
fn an_outbox_without_a_path_or_with_an_unknown_field_does_not_parse() {
    let missing = PoolConfig::from_toml("[outbox]\nmax_writes = 5\n").expect_err("no path");
    assert!(missing.to_string().contains("outbox"), "{missing}");
    let unknown = PoolConfig::from_toml("[outbox]\npath = \"x\"\nmax_write = 5\n")
        .expect_err("a misspelt field");
    assert!(unknown.to_string().contains("outbox"), "{unknown}");
}
