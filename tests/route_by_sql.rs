//! Routing by SQL (feature `route-by-sql`): the classifier's rule case by case, in both
//! dialects, and `pool.query(q)` on a real SQLite file, where a breaker forced open on one
//! route shows which route each call took.

use protected_pool::route_by_sql::{SqlDialect, route_of_sql};
use protected_pool::{ProtectedPool, Route, Sqlite};

const PG: SqlDialect = SqlDialect::Postgres;
const LITE: SqlDialect = SqlDialect::Sqlite;
const READ: Route = Route::Read;
const WRITE: Route = Route::Write;

/// (SQL, dialect, the route it must take).
const CASES: &[(&str, SqlDialect, Route)] = &[
    // Plain reads.
    ("SELECT 1", PG, READ),
    ("SELECT 1", LITE, READ),
    ("SELECT 1;", PG, READ),
    ("select id, name from users where id = $1", PG, READ),
    ("SeLeCt * FrOm users WHERE id = ?1", LITE, READ),
    (
        "SELECT * FROM users WHERE name = :name OR id = ?",
        LITE,
        READ,
    ),
    (
        "SELECT u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id LEFT JOIN items i USING (id)",
        PG,
        READ,
    ),
    (
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE total > 10)",
        PG,
        READ,
    ),
    (
        "SELECT (SELECT max(total) FROM orders o WHERE o.user_id = u.id) FROM users u",
        PG,
        READ,
    ),
    (
        "SELECT * FROM (SELECT id FROM users) AS s WHERE EXISTS (SELECT 1 FROM orders)",
        PG,
        READ,
    ),
    (
        "SELECT id FROM a UNION SELECT id FROM b EXCEPT SELECT id FROM c",
        PG,
        READ,
    ),
    ("SELECT id FROM a UNION ALL SELECT id FROM b", LITE, READ),
    (
        "WITH recent AS (SELECT * FROM orders WHERE created > now() - interval '1 day') SELECT count(*) FROM recent",
        PG,
        READ,
    ),
    (
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 10) SELECT sum(x) FROM n",
        PG,
        READ,
    ),
    ("VALUES (1, 'a'), (2, 'b')", PG, READ),
    ("VALUES (1, 'a')", LITE, READ),
    (
        "-- the users\nSELECT /* all of them */ * FROM users",
        PG,
        READ,
    ),
    (
        "SELECT count(*), sum(total), avg(total), min(total), max(total) FROM orders GROUP BY user_id HAVING count(*) > 1",
        PG,
        READ,
    ),
    (
        "SELECT coalesce(nickname, lower(name)), upper(name), length(name), abs(-1), round(2.5), concat('a', 'b'), substr(name, 1, 2), nullif(a, b), greatest(1, 2), least(1, 2) FROM users",
        PG,
        READ,
    ),
    (
        "SELECT date_trunc('day', created), to_char(created, 'YYYY'), extract(year FROM created), CURRENT_TIMESTAMP FROM orders",
        PG,
        READ,
    ),
    (
        "SELECT data->>'name', data #> '{a,b}', jsonb_build_object('k', 1), jsonb_array_length(data->'xs') FROM docs WHERE data @> '{\"a\": 1}'",
        PG,
        READ,
    ),
    (
        "SELECT row_number() OVER (PARTITION BY user_id ORDER BY total DESC) FROM orders",
        PG,
        READ,
    ),
    ("SELECT g FROM generate_series(1, 10) AS g", PG, READ),
    ("SELECT * FROM unnest(ARRAY[1, 2, 3])", PG, READ),
    ("SELECT pg_catalog.count(*) FROM users", PG, READ),
    ("SELECT pg_is_in_recovery()", PG, READ),
    (
        "SELECT ifnull(name, ''), datetime('now'), json_extract(data, '$.a'), group_concat(name) FROM users",
        LITE,
        READ,
    ),
    ("SELECT value FROM json_each('[1, 2]')", LITE, READ),
    (
        "SELECT CAST(id AS TEXT), CASE WHEN id > 1 THEN 'x' ELSE 'y' END FROM users",
        LITE,
        READ,
    ),
    ("EXPLAIN SELECT * FROM users", PG, READ),
    (
        "EXPLAIN (COSTS false, FORMAT json) SELECT * FROM users",
        PG,
        READ,
    ),
    ("EXPLAIN QUERY PLAN SELECT * FROM users", LITE, READ),
    // Locking clauses, in the query or in a subquery.
    ("SELECT * FROM jobs FOR UPDATE", PG, WRITE),
    (
        "SELECT * FROM jobs LIMIT 1 FOR UPDATE SKIP LOCKED",
        PG,
        WRITE,
    ),
    ("SELECT * FROM jobs FOR SHARE", PG, WRITE),
    ("SELECT * FROM jobs FOR NO KEY UPDATE", PG, WRITE),
    ("SELECT * FROM jobs FOR KEY SHARE", PG, WRITE),
    ("select * from jobs for update of jobs nowait", PG, WRITE),
    (
        "SELECT * FROM users WHERE id IN (SELECT user_id FROM jobs FOR UPDATE)",
        PG,
        WRITE,
    ),
    ("SELECT * FROM (SELECT * FROM jobs FOR SHARE) j", PG, WRITE),
    (
        "WITH j AS (SELECT * FROM jobs FOR UPDATE) SELECT * FROM j",
        PG,
        WRITE,
    ),
    // Data-modifying WITH.
    (
        "WITH gone AS (DELETE FROM sessions WHERE expired RETURNING *) SELECT count(*) FROM gone",
        PG,
        WRITE,
    ),
    (
        "WITH added AS (INSERT INTO log (n) VALUES (1) RETURNING id) SELECT id FROM added",
        PG,
        WRITE,
    ),
    (
        "WITH moved AS (UPDATE jobs SET state = 'taken' RETURNING id) SELECT * FROM moved",
        PG,
        WRITE,
    ),
    (
        "WITH a AS (SELECT 1), b AS (DELETE FROM t RETURNING *) SELECT * FROM a",
        PG,
        WRITE,
    ),
    // SELECT INTO creates a table.
    ("SELECT * INTO archive FROM orders", PG, WRITE),
    ("SELECT * INTO TEMP scratch FROM orders", PG, WRITE),
    // Functions off the list.
    ("SELECT nextval('ids')", PG, WRITE),
    ("SELECT setval('ids', 10)", PG, WRITE),
    ("SELECT pg_advisory_lock(1)", PG, WRITE),
    ("SELECT set_config('search_path', 'x', false)", PG, WRITE),
    ("SELECT pg_sleep(1)", PG, WRITE),
    ("SELECT lo_unlink(42)", PG, WRITE),
    (
        "SELECT * FROM dblink('dbname=x', 'DELETE FROM t') AS r(x int)",
        PG,
        WRITE,
    ),
    ("SELECT my_func()", PG, WRITE),
    ("SELECT id FROM users WHERE archive_user(id)", PG, WRITE),
    ("SELECT * FROM my_set_returning_func(1)", PG, WRITE),
    (
        "SELECT count(*) FROM users WHERE id IN (SELECT bump(id) FROM orders)",
        PG,
        WRITE,
    ),
    ("SELECT public.lower(name) FROM users", PG, WRITE),
    ("SELECT \"Lower\"(name) FROM users", PG, WRITE),
    ("SELECT txid_current()", PG, WRITE),
    ("SELECT 1 OPERATOR(public.===) 2", PG, WRITE),
    ("SELECT last_insert_rowid()", LITE, WRITE),
    ("SELECT load_extension('x')", LITE, WRITE),
    ("SELECT changes()", LITE, WRITE),
    // More than one statement.
    ("SELECT 1; DELETE FROM t", PG, WRITE),
    ("SELECT 1; SELECT 2", PG, WRITE),
    ("SELECT 1; DELETE FROM t", LITE, WRITE),
    // Statements other than queries.
    ("INSERT INTO users (name) VALUES ('ada')", PG, WRITE),
    (
        "insert into users (name) values ($1) returning id",
        PG,
        WRITE,
    ),
    ("UPDATE users SET name = 'x' WHERE id = 1", PG, WRITE),
    ("DELETE FROM users WHERE id = 1", PG, WRITE),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.v",
        PG,
        WRITE,
    ),
    ("CREATE TABLE t (id int)", PG, WRITE),
    ("ALTER TABLE t ADD COLUMN v text", PG, WRITE),
    ("DROP TABLE t", PG, WRITE),
    ("TRUNCATE t", PG, WRITE),
    ("COPY t FROM STDIN", PG, WRITE),
    ("COPY t TO STDOUT", PG, WRITE),
    ("CALL do_things(1)", PG, WRITE),
    ("DO $$ BEGIN DELETE FROM t; END $$", PG, WRITE),
    ("SET search_path TO app", PG, WRITE),
    ("SHOW search_path", PG, WRITE),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", PG, WRITE),
    ("VACUUM t", PG, WRITE),
    ("BEGIN", PG, WRITE),
    ("EXPLAIN ANALYZE SELECT * FROM users", PG, WRITE),
    ("EXPLAIN ANALYSE SELECT * FROM users", PG, WRITE),
    ("EXPLAIN (ANALYZE) SELECT * FROM users", PG, WRITE),
    ("EXPLAIN (ANALYZE false) SELECT * FROM users", PG, WRITE),
    ("EXPLAIN DELETE FROM users", PG, WRITE),
    ("EXPLAIN SELECT * FROM jobs FOR UPDATE", PG, WRITE),
    (
        "INSERT OR REPLACE INTO users (id, name) VALUES (1, 'a')",
        LITE,
        WRITE,
    ),
    ("REPLACE INTO users (id, name) VALUES (1, 'a')", LITE, WRITE),
    ("PRAGMA journal_mode = WAL", LITE, WRITE),
    ("PRAGMA table_info(users)", LITE, WRITE),
    ("ATTACH DATABASE 'other.db' AS other", LITE, WRITE),
    ("VACUUM", LITE, WRITE),
    ("CREATE INDEX i ON t (v)", LITE, WRITE),
    // Nothing, or nothing that parses (the parser does not take PostgreSQL's `TABLE t`).
    ("TABLE users", PG, WRITE),
    ("", PG, WRITE),
    ("   ", LITE, WRITE),
    ("-- only a comment", PG, WRITE),
    ("SELEC 1", PG, WRITE),
    ("SELECT FROM WHERE", LITE, WRITE),
    ("this is not sql", PG, WRITE),
    ("SELECT 'unterminated", PG, WRITE),
];

#[test]
fn every_statement_takes_the_route_of_the_rule() {
    let mut wrong = Vec::new();
    for &(sql, dialect, expected) in CASES {
        let route = route_of_sql(sql, dialect);
        if route != expected {
            wrong.push(format!("{dialect:?} {sql:?}: {route}, expected {expected}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn route_of_sql_for_a_database_uses_its_dialect() {
    // `?1` is a SQLite placeholder; `$1` is PostgreSQL's; `INSERT OR REPLACE` is SQLite's.
    assert_eq!(
        Route::of_sql::<Sqlite>("SELECT * FROM t WHERE id = ?1"),
        READ
    );
    assert_eq!(
        Route::of_sql::<protected_pool::Postgres>("SELECT * FROM t WHERE id = $1"),
        READ
    );
    assert_eq!(
        Route::of_sql::<Sqlite>("SELECT group_concat(name) FROM t"),
        READ
    );
    assert_eq!(
        Route::of_sql::<protected_pool::Postgres>("SELECT group_concat(name) FROM t"),
        WRITE,
        "not a PostgreSQL built-in"
    );
    assert_eq!(
        Route::of_sql::<Sqlite>("INSERT OR REPLACE INTO t VALUES (1)"),
        WRITE
    );
}

#[test]
fn the_function_lists_are_lower_case_without_repeats() {
    for dialect in [PG, LITE] {
        let functions = dialect.read_only_functions();
        assert!(functions.len() > 50, "{dialect:?}");
        for (i, name) in functions.iter().enumerate() {
            assert_eq!(*name, name.to_ascii_lowercase(), "{dialect:?}");
            assert!(!functions[..i].contains(name), "{dialect:?}: {name} twice");
        }
        for writer in [
            "nextval",
            "setval",
            "pg_advisory_lock",
            "set_config",
            "lo_import",
        ] {
            assert!(!functions.contains(&writer), "{dialect:?}: {writer}");
        }
    }
}

async fn sqlite_pool(dir: &tempfile::TempDir) -> ProtectedPool<Sqlite> {
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let pool = ProtectedPool::sqlite()
        .primary(url)
        .connect()
        .await
        .expect("connect");
    pool.query(sqlx::query(
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    ))
    .execute()
    .await
    .expect("create the table");
    pool
}

#[tokio::test]
async fn a_write_through_query_runs_and_its_row_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;

    let done = pool
        .query(sqlx::query("INSERT INTO notes (body) VALUES (?1)").bind("first"))
        .execute()
        .await
        .expect("insert");
    assert_eq!(done.rows_affected(), 1);
    let id: i64 = pool
        .query(
            sqlx::query_scalar("INSERT INTO notes (body) VALUES (?1) RETURNING id").bind("second"),
        )
        .fetch_one()
        .await
        .expect("insert returning");
    assert_eq!(id, 2);

    let bodies: Vec<(i64, String)> = pool
        .query(sqlx::query_as("SELECT id, body FROM notes ORDER BY id"))
        .fetch_all()
        .await
        .expect("read");
    assert_eq!(bodies, [(1, "first".to_owned()), (2, "second".to_owned())]);
    // And outside the pool, in the file itself.
    let mut direct = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        dir.path().join("app.db").display()
    ))
    .await
    .unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut direct)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn with_the_write_breaker_open_reads_through_query_go_on_and_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite_pool(&dir).await;
    pool.query(sqlx::query("INSERT INTO notes (body) VALUES ('kept')"))
        .execute()
        .await
        .unwrap();
    pool.force_open(Route::Write, "primary").unwrap();

    // Provably read-only: the read route, whose breaker is closed.
    let body: String = pool
        .query(sqlx::query_scalar("SELECT body FROM notes WHERE id = ?1").bind(1_i64))
        .fetch_one()
        .await
        .expect("a read goes the read route");
    assert_eq!(body, "kept");
    let rows = pool
        .query(sqlx::query(
            "WITH n AS (SELECT * FROM notes) SELECT upper(body) FROM n",
        ))
        .fetch_all()
        .await
        .expect("a read-only WITH goes the read route");
    assert_eq!(rows.len(), 1);

    // Writes, and what cannot be proven read-only, are refused by the open write breaker.
    for sql in [
        "INSERT INTO notes (body) VALUES ('lost')",
        "INSERT OR REPLACE INTO notes (id, body) VALUES (1, 'lost')",
        "DELETE FROM notes",
        "SELECT last_insert_rowid()",
        "PRAGMA user_version = 7",
        "not sql at all",
    ] {
        let error = pool
            .query(sqlx::query(sql))
            .fetch_all()
            .await
            .expect_err(sql);
        assert!(error.is_circuit_open(), "{sql}: {error}");
        assert_eq!(error.route(), Some(Route::Write), "{sql}: {error}");
    }
    let error = pool
        .query(sqlx::query("UPDATE notes SET body = 'lost'"))
        .execute()
        .await
        .expect_err("an update with the write breaker open");
    assert!(error.is_circuit_open(), "{error}");

    // The other way round: the read breaker open, the write one closed.
    pool.reset(Route::Write, "primary").unwrap();
    pool.force_open(Route::Read, "primary").unwrap();
    let error = pool
        .query(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM notes"))
        .fetch_one()
        .await
        .expect_err("a read with the read breaker open");
    assert!(error.is_circuit_open(), "{error}");
    assert_eq!(error.route(), Some(Route::Read), "{error}");
    pool.query(sqlx::query(
        "UPDATE notes SET body = 'changed' WHERE id = 1",
    ))
    .execute()
    .await
    .expect("a write goes the write route");
    let body: String = pool
        .write(sqlx::query_scalar("SELECT body FROM notes WHERE id = 1"))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(body, "changed");
    let nothing_written: Vec<String> = pool
        .write(sqlx::query_scalar("SELECT body FROM notes"))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(nothing_written, ["changed"], "no refused write ran");
}
