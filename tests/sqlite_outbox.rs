//! Keyed writes and the outbox on a pool whose primary is a SQLite file: a key applied once,
//! writes queued behind a forced-open write breaker and applied in order when it is reset,
//! every kind of value through the outbox, and the mistakes refused before anything runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use protected_pool::outbox::OutboxConfig;
use protected_pool::{
    DurableWrite, Error, IdempotencyConfig, ProtectedPool, Route, Source, WriteOutcome,
};
use sqlx::{Connection, Sqlite, SqliteConnection};
use tempfile::TempDir;

const ENTRIES: &str = "CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, label TEXT NOT NULL)";

/// A temporary directory with an application database in it.
struct Files {
    dir: TempDir,
}

impl Files {
    async fn new(schema: &str) -> Self {
        let files = Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        let mut connection = files.connect().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema.to_owned()))
            .execute(&mut connection)
            .await
            .expect("create the schema");
        files
    }

    fn url(&self) -> String {
        format!(
            "sqlite://{}?mode=rwc",
            self.dir.path().join("app.db").display()
        )
    }

    fn outbox(&self) -> PathBuf {
        self.dir.path().join("outbox.sqlite")
    }

    /// A connection of its own to the application database, past the pool.
    async fn connect(&self) -> SqliteConnection {
        SqliteConnection::connect(&self.url())
            .await
            .expect("open the database")
    }

    async fn scalar(&self, sql: &str) -> i64 {
        let mut connection = self.connect().await;
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
    }

    async fn tables(&self) -> Vec<String> {
        let mut connection = self.connect().await;
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut connection)
            .await
            .expect("list the tables")
    }

    async fn pool(&self) -> ProtectedPool<Sqlite> {
        ProtectedPool::sqlite()
            .primary(self.url())
            .outbox(OutboxConfig::new(self.outbox()))
            .connect()
            .await
            .expect("connect")
    }
}

fn entry(n: i32) -> DurableWrite {
    DurableWrite::new("INSERT INTO entries (n, label) VALUES ($1, $2)")
        .bind(n)
        .bind(format!("entry {n}"))
}

/// The name the pool gives a primary declared without one.
fn primary_name(pool: &ProtectedPool<Sqlite>) -> String {
    let endpoints = pool.endpoints();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    endpoints[0].0.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_twice_applies_once() {
    let files = Files::new(ENTRIES).await;
    let pool = files.pool().await;
    let write = || pool.write(entry(1)).idempotent("entry:1").execute();
    assert_eq!(
        write().await.expect("first"),
        WriteOutcome::Applied { rows_affected: 1 }
    );
    assert_eq!(write().await.expect("second"), WriteOutcome::AlreadyApplied);
    // A sqlx query under the same key is taken for the same write.
    assert_eq!(
        pool.write(sqlx::query(
            "INSERT INTO entries (n, label) VALUES (2, 'other')"
        ))
        .idempotent("entry:1")
        .execute()
        .await
        .expect("third"),
        WriteOutcome::AlreadyApplied
    );
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 1);
    assert!(
        files
            .tables()
            .await
            .contains(&"protected_pool_idempotency_keys".to_owned()),
        "{:?}",
        files.tables().await
    );
    assert_eq!(
        files
            .scalar("SELECT count(*) FROM protected_pool_idempotency_keys WHERE key = 'entry:1'")
            .await,
        1
    );
    // The same key through or_enqueue, the write route serving: found applied, not queued.
    let receipt = pool
        .write(entry(1))
        .idempotent("entry:1")
        .or_enqueue()
        .execute()
        .await
        .expect("or_enqueue");
    assert!(
        matches!(receipt.source(), Source::Database { .. }),
        "{:?}",
        receipt.source()
    );
    assert_eq!(*receipt, WriteOutcome::AlreadyApplied);
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 1);
    assert_eq!(pool.outbox().expect("an outbox").depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_key_table_is_used() {
    let files = Files::new(ENTRIES).await;
    let pool = ProtectedPool::sqlite()
        .primary(files.url())
        .idempotency(IdempotencyConfig::default().table("main.my_keys"))
        .connect()
        .await
        .expect("connect");
    for _ in 0..2 {
        pool.write(entry(5))
            .idempotent("custom")
            .execute()
            .await
            .expect("keyed write");
    }
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 1);
    let tables = files.tables().await;
    assert!(tables.contains(&"my_keys".to_owned()), "{tables:?}");
    assert!(
        !tables.contains(&"protected_pool_idempotency_keys".to_owned()),
        "{tables:?}"
    );
    assert_eq!(
        files
            .scalar("SELECT count(*) FROM main.my_keys WHERE key = 'custom'")
            .await,
        1
    );
    assert_eq!(
        pool.idempotency_migration()[0],
        "CREATE TABLE IF NOT EXISTS main.my_keys (key TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_behind_an_open_breaker_are_applied_in_order_once_it_closes() {
    let files = Files::new(ENTRIES).await;
    let pool = files.pool().await;
    let primary = primary_name(&pool);
    assert_eq!(primary, "primary");
    pool.force_open(Route::Write, &primary).expect("force open");
    const WRITES: i32 = 12;
    for n in 0..WRITES {
        let receipt = pool
            .write(entry(n))
            .idempotent(format!("entry:{n}"))
            .or_enqueue()
            .execute()
            .await
            .unwrap_or_else(|error| panic!("write {n}: {error}"));
        let expected = u64::try_from(n).unwrap() + 1;
        assert_eq!(*receipt, WriteOutcome::Queued { position: expected });
        match receipt.source() {
            Source::Queued {
                key,
                position,
                cause,
            } => {
                assert_eq!(key, &format!("entry:{n}"));
                assert_eq!(*position, expected);
                if n == 0 {
                    let cause = cause.as_ref().expect("the first says why it was queued");
                    assert!(cause.is_circuit_open(), "{cause}");
                } else {
                    assert!(cause.is_none(), "later ones wait behind it: {cause:?}");
                }
            }
            other => panic!("write {n} was not queued: {other:?}"),
        }
        assert!(receipt.is_stale());
    }
    // A key already queued is not queued twice.
    let again = pool
        .write(entry(3))
        .idempotent("entry:3")
        .or_enqueue()
        .execute()
        .await
        .expect("the same key again");
    assert_eq!(*again, WriteOutcome::Queued { position: 4 });
    let outbox = pool
        .health()
        .outbox
        .expect("an outbox in the health report");
    assert_eq!(outbox.depth, u64::try_from(WRITES).unwrap());
    assert!(outbox.bytes > 0);
    assert!(outbox.oldest_age.is_some());
    assert_eq!(outbox.replayed, 0);
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 0);
    // Still queued a while later: the replayer does not get past the open breaker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pool.outbox().unwrap().depth(),
        u64::try_from(WRITES).unwrap()
    );
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 0);

    pool.reset(Route::Write, &primary).expect("reset");
    assert!(
        pool.outbox()
            .unwrap()
            .wait_until_empty(Duration::from_secs(30))
            .await,
        "the outbox still holds {} writes",
        pool.outbox().unwrap().depth()
    );
    let mut connection = files.connect().await;
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT n, label FROM entries ORDER BY id")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    let expected: Vec<(i64, String)> = (0..WRITES)
        .map(|n| (i64::from(n), format!("entry {n}")))
        .collect();
    assert_eq!(rows, expected, "every write once, in the order queued");
    let outbox = pool.health().outbox.unwrap();
    assert_eq!(outbox.depth, 0);
    assert_eq!(outbox.replayed, u64::try_from(WRITES).unwrap());
    assert_eq!(outbox.oldest_age, None);
    // Applied and keyed: sent again, nothing runs.
    assert_eq!(
        pool.write(entry(0))
            .idempotent("entry:0")
            .execute()
            .await
            .unwrap(),
        WriteOutcome::AlreadyApplied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn or_enqueue_without_an_outbox_is_a_config_error() {
    let files = Files::new(ENTRIES).await;
    let pool = ProtectedPool::sqlite()
        .primary(files.url())
        .connect()
        .await
        .expect("connect");
    let error = pool
        .write(entry(1))
        .idempotent("no-outbox")
        .or_enqueue()
        .execute()
        .await
        .expect_err("no outbox to queue in");
    let Error::Config(config) = &error else {
        panic!("not a config error: {error:?}");
    };
    assert_eq!(config.problems.len(), 1, "{config}");
    assert_eq!(config.problems[0].path, "outbox");
    assert!(error.to_string().contains("outbox"), "{error}");
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 0);
    assert!(pool.outbox().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_overlong_keys_are_refused_before_anything_runs() {
    let files = Files::new(ENTRIES).await;
    let pool = files.pool().await;
    let longest = "k".repeat(200);
    let overlong = "k".repeat(201);
    for (key, why) in [
        ("", "must not be empty"),
        (overlong.as_str(), "at most 200 bytes"),
    ] {
        let error = pool
            .write(entry(1))
            .idempotent(key)
            .execute()
            .await
            .expect_err("refused");
        assert!(
            matches!(
                error,
                Error::InvalidQuery {
                    route: Route::Write,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains(why), "{error}");
        let error = pool
            .write(entry(1))
            .idempotent(key)
            .or_enqueue()
            .execute()
            .await
            .expect_err("refused by or_enqueue too");
        assert!(error.to_string().contains(why), "{error}");
        assert_eq!(pool.outbox().unwrap().depth(), 0, "nothing queued");
    }
    assert_eq!(files.scalar("SELECT count(*) FROM entries").await, 0);
    assert!(
        !files
            .tables()
            .await
            .contains(&"protected_pool_idempotency_keys".to_owned()),
        "nothing ran, not even the key table's creation"
    );
    // 200 bytes is fine.
    assert_eq!(
        pool.write(entry(1))
            .idempotent(longest)
            .execute()
            .await
            .unwrap(),
        WriteOutcome::Applied { rows_affected: 1 }
    );
}

#[test]
fn bad_idempotency_and_outbox_configs_fail_the_build() {
    let problems = |builder: protected_pool::PoolBuilder<Sqlite>| -> Vec<(String, String)> {
        match builder.build() {
            Err(Error::Config(config)) => config
                .problems
                .into_iter()
                .map(|problem| (problem.path, problem.message))
                .collect(),
            Err(other) => panic!("not a config error: {other:?}"),
            Ok(_) => panic!("built"),
        }
    };
    let base = || ProtectedPool::sqlite().primary("sqlite::memory:");

    let found =
        problems(base().idempotency(IdempotencyConfig::default().table("drop table x; --")));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "idempotency.table");
    assert!(found[0].1.contains("drop table x; --"), "{found:?}");
    for bad in ["", "a.b.c", "1keys", "keys-table", "my keys"] {
        let found = problems(base().idempotency(IdempotencyConfig::default().table(bad)));
        assert_eq!(
            found
                .iter()
                .map(|(path, _)| path.as_str())
                .collect::<Vec<_>>(),
            ["idempotency.table"],
            "{bad:?}"
        );
    }
    let found = problems(base().outbox(OutboxConfig::new("outbox.sqlite").batch(0)));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "outbox.batch");
    let found = problems(
        base().outbox(
            OutboxConfig::new("")
                .batch(10_001)
                .max_writes(0)
                .max_bytes(0),
        ),
    );
    assert_eq!(
        found
            .iter()
            .map(|(path, _)| path.as_str())
            .collect::<Vec<_>>(),
        [
            "outbox.path",
            "outbox.max_writes",
            "outbox.max_bytes",
            "outbox.batch"
        ],
        "{found:?}"
    );
    // The good ones build.
    base()
        .idempotency(IdempotencyConfig::default().table("main.my_keys"))
        .outbox(OutboxConfig::new("outbox.sqlite").batch(10_000))
        .build()
        .expect("valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_that_cannot_be_created_fails_connect() {
    let files = Files::new(ENTRIES).await;
    let file = files.dir.path().join("file.txt");
    std::fs::write(&file, "not a directory").unwrap();
    let outbox = file.join("outbox.sqlite");
    let error = ProtectedPool::sqlite()
        .primary(files.url())
        .outbox(OutboxConfig::new(&outbox))
        .connect()
        .await
        .expect_err("the outbox's directory is a file");
    let Error::Outbox {
        path, operation, ..
    } = &error
    else {
        panic!("not an outbox error: {error:?}");
    };
    assert_eq!(path, &outbox);
    assert_eq!(*operation, "open");
    let message = error.to_string();
    assert!(
        message.contains(&outbox.display().to_string()) && message.contains("could not open"),
        "{message}"
    );
    // Built without connecting, the first queued write reports the same.
    let pool = ProtectedPool::sqlite()
        .primary(files.url())
        .outbox(OutboxConfig::new(&outbox))
        .build()
        .expect("build");
    let error = pool
        .write(entry(1))
        .idempotent("k")
        .or_enqueue()
        .execute()
        .await
        .expect_err("no outbox file");
    assert!(
        matches!(&error, Error::Outbox { operation: "open", path, .. } if path == &outbox),
        "{error:?}"
    );
    assert!(!Path::new(&outbox).exists());
}

type Row = (
    bool,
    i32,
    i64,
    f64,
    String,
    Vec<u8>,
    Option<bool>,
    Option<i32>,
    Option<i64>,
    Option<f64>,
    Option<String>,
    Option<Vec<u8>>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_value_survives_the_outbox() {
    let files = Files::new(
        "CREATE TABLE vals (id INTEGER PRIMARY KEY AUTOINCREMENT, \
         b BOOLEAN, i INTEGER, l BIGINT, f REAL, t TEXT, y BLOB, \
         nb BOOLEAN, ni INTEGER, nl BIGINT, nf REAL, nt TEXT, ny BLOB)",
    )
    .await;
    let pool = files.pool().await;
    let primary = primary_name(&pool);
    pool.force_open(Route::Write, &primary).unwrap();
    let rows: Vec<Row> = vec![
        (
            true,
            i32::MAX,
            i64::MAX,
            0.1 + 0.2,
            "naïve 'quoted' \"text\" \u{1F600}".to_owned(),
            vec![0, 1, 0x7f, 0x80, 0xff, 0],
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        (
            false,
            i32::MIN,
            i64::MIN,
            f64::NEG_INFINITY,
            String::new(),
            Vec::new(),
            Some(true),
            Some(-1),
            Some(1 << 40),
            Some(-2.5e-300),
            Some("x".to_owned()),
            Some(vec![9]),
        ),
    ];
    for (index, row) in rows.iter().enumerate() {
        let write = DurableWrite::new(
            "INSERT INTO vals (b, i, l, f, t, y, nb, ni, nl, nf, nt, ny) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(row.0)
        .bind(row.1)
        .bind(row.2)
        .bind(row.3)
        .bind(row.4.clone())
        .bind(row.5.clone())
        .bind(row.6)
        .bind(row.7)
        .bind(row.8)
        .bind(row.9)
        .bind(row.10.clone())
        .bind(row.11.clone());
        let receipt = pool
            .write(write)
            .idempotent(format!("vals:{index}"))
            .or_enqueue()
            .execute()
            .await
            .expect("queued");
        assert!(matches!(receipt.source(), Source::Queued { .. }));
    }
    // The typed NULLs as a caller writes them.
    let nulls = DurableWrite::new(
        "INSERT INTO vals (b, i, l, f, t, y, nb, ni, nl, nf, nt, ny) \
         VALUES (true, 0, 0, 0, '', x'', $1, $2, $3, $4, $5, $6)",
    )
    .bind(Option::<bool>::None)
    .bind(Option::<i32>::None)
    .bind(Option::<i64>::None)
    .bind(Option::<f64>::None)
    .bind(Option::<String>::None)
    .bind(Option::<Vec<u8>>::None);
    pool.write(nulls)
        .idempotent("vals:nulls")
        .or_enqueue()
        .execute()
        .await
        .expect("queued");
    assert_eq!(pool.outbox().unwrap().depth(), 3);
    assert_eq!(files.scalar("SELECT count(*) FROM vals").await, 0);

    pool.reset(Route::Write, &primary).unwrap();
    assert!(
        pool.outbox()
            .unwrap()
            .wait_until_empty(Duration::from_secs(30))
            .await
    );
    assert!(
        pool.outbox()
            .unwrap()
            .dead_letters()
            .await
            .unwrap()
            .is_empty()
    );
    let mut connection = files.connect().await;
    let back: Vec<Row> =
        sqlx::query_as("SELECT b, i, l, f, t, y, nb, ni, nl, nf, nt, ny FROM vals ORDER BY id")
            .fetch_all(&mut connection)
            .await
            .expect("read the values back");
    assert_eq!(back.len(), 3);
    assert_eq!(back[..2], rows[..]);
    assert_eq!(back[0].3.to_bits(), (0.1_f64 + 0.2).to_bits(), "every bit");
    let (_, _, _, _, _, _, nb, ni, nl, nf, nt, ny) = back[2].clone();
    assert_eq!(
        (nb, ni, nl, nf, nt, ny),
        (None, None, None, None, None, None)
    );
    // Stored as SQLite types, not as text.
    let types: (String, String, String, String) = sqlx::query_as(
        "SELECT typeof(l), typeof(f), typeof(t), typeof(y) FROM vals ORDER BY id LIMIT 1",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        types,
        (
            "integer".to_owned(),
            "real".to_owned(),
            "text".to_owned(),
            "blob".to_owned()
        )
    );
}
