//! Keyed writes and the outbox against real PostgreSQL servers and real outbox files: the
//! primary killed under two writers, a connection cut after the statement was sent, a queued
//! write the database refuses, a full queue.
//!
//! The servers run with `synchronous_commit` on (the server default; the harness turns it off
//! for speed): with it off, a commit the server acknowledged can be lost by a crash, and no
//! client can make a write exactly-once then.

#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/scenario.rs"]
mod scenario;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger::ledger;
use protected_pool::outbox::{OutboxConfig, OutboxEvent};
use protected_pool::{
    DurableWrite, Error, HealthStatus, Postgres, ProtectedPool, Route, RouteConfig, Source,
    WriteOutcome,
};
use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};
use scenario::{guarded, ms};

const LEDGER: &str = "CREATE TABLE ledger (writer int NOT NULL, n int NOT NULL, amount bigint NOT NULL CHECK (amount > 0))";

async fn server() -> PgServer {
    let pg = PgServer::builder()
        .setting("synchronous_commit", "on")
        .start()
        .await
        .expect("start PostgreSQL");
    pg.psql(LEDGER).await.expect("create the ledger");
    pg
}

fn pool_on(url: String, outbox: &std::path::Path) -> ProtectedPool<Postgres> {
    ProtectedPool::postgres()
        .primary(url)
        .route(
            Route::Write,
            RouteConfig {
                timeout: Duration::from_secs(2),
                ..RouteConfig::write()
            },
        )
        .health_check_interval(ms(100))
        .outbox(OutboxConfig::new(outbox))
        .build()
        .expect("build the pool")
}

fn entry(writer: i32, n: i32) -> DurableWrite {
    DurableWrite::new("INSERT INTO ledger (writer, n, amount) VALUES ($1, $2, $3)")
        .bind(writer)
        .bind(n)
        .bind(i64::from(n) + 1)
}

fn events(pool: &ProtectedPool<Postgres>) -> Arc<Mutex<Vec<OutboxEvent>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    pool.outbox()
        .expect("an outbox")
        .on_event(move |event| sink.lock().unwrap().push(event.clone()));
    seen
}

/// Two writers send 1,000 keyed writes each through `or_enqueue` while the primary is killed
/// (kill -9) and started again. Every call returns at once with a receipt (applied or
/// queued), and once the primary is back and the outbox drained, the ledger holds every write
/// exactly once: 2,000 rows, 2,000 distinct entries, the exact sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_is_applied_exactly_once_through_a_primary_kill() {
    let pg = server().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pool = pool_on(pg.url(), &dir.path().join("outbox.sqlite"));
    const PER_WRITER: i32 = 1_000;
    let queued = Arc::new(Mutex::new(HashMap::<&str, u32>::new()));
    let mut writers = Vec::new();
    for writer in 0..2 {
        let pool = pool.clone();
        let queued = queued.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..PER_WRITER {
                let receipt = pool
                    .write(entry(writer, n))
                    .idempotent(format!("ledger:{writer}:{n}"))
                    .or_enqueue()
                    .execute()
                    .await
                    .unwrap_or_else(|error| panic!("write {writer}/{n} failed: {error}"));
                let kind = match receipt.source() {
                    Source::Database { .. } => "applied",
                    Source::Queued { .. } => "queued",
                    other => panic!("unexpected source {other:?}"),
                };
                *queued.lock().unwrap().entry(kind).or_default() += 1;
                if n % 50 == 0 {
                    tokio::time::sleep(ms(5)).await;
                }
            }
        }));
    }
    // Let some writes through, then crash the primary under them.
    let started = Instant::now();
    while ledger(&pg).await.0 < 200 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "writes never reached the server"
        );
        tokio::time::sleep(ms(20)).await;
    }
    pg.kill9().await.expect("kill the primary");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again().await.expect("start the primary again");
    for writer in writers {
        guarded("a writer", writer).await.expect("writer task");
    }
    let drained = pool
        .outbox()
        .expect("an outbox")
        .wait_until_empty(Duration::from_secs(60))
        .await;
    assert!(
        drained,
        "the outbox still holds {} writes",
        pool.outbox().unwrap().depth()
    );
    let counts = queued.lock().unwrap().clone();
    assert!(
        counts.get("queued").copied().unwrap_or(0) > 0,
        "no write was queued, so the kill tested nothing: {counts:?}"
    );
    let total = i64::from(PER_WRITER) * 2;
    let sum: i64 = 2 * (1..=i64::from(PER_WRITER)).sum::<i64>();
    assert_eq!(
        ledger(&pg).await,
        (total, total, sum),
        "receipts: {counts:?}"
    );
    let health = pool.health();
    let outbox = health.outbox.expect("an outbox in the health report");
    assert_eq!(outbox.depth, 0);
    assert_eq!(outbox.dead_letters, 0);
    assert_eq!(outbox.replayed, u64::from(counts["queued"]));
}

/// A keyed write whose connection is cut while its `COMMIT` runs (the server commits, the
/// answer is lost) is tried again and found applied; one cut while its statement runs (the
/// server rolls back) is tried again and applied. Either way the row is there once. The same
/// cut on a write without a key is reported as an unknown outcome and not tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_write_cut_after_it_was_sent_is_applied_once() {
    let pg = server().await;
    pg.psql(
        "CREATE FUNCTION linger() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.8); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON ledger
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.writer = 1) EXECUTE FUNCTION linger();",
    )
    .await
    .expect("a trigger that makes COMMIT slow");
    let proxy = Arc::new(FaultProxy::to_server(&pg).await.expect("a fault proxy"));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pool = ProtectedPool::postgres()
        .primary(pg.url_via(&proxy))
        .outbox(OutboxConfig::new(dir.path().join("outbox.sqlite")))
        .connect()
        .await
        .expect("connect");
    pool.create_idempotency_table().await.expect("key table");

    let cut_soon = |after: Duration| {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            proxy.set_mode(FaultMode::Reset);
            tokio::time::sleep(ms(30)).await;
            proxy.set_mode(FaultMode::Pass);
        })
    };

    // Cut during COMMIT: writer 1 rows sleep in a deferred trigger at commit.
    let cut = cut_soon(ms(300));
    let outcome = guarded(
        "a keyed write cut during COMMIT",
        pool.write(sqlx::query("INSERT INTO ledger VALUES (1, 1, 10)"))
            .idempotent("cut:commit")
            .execute(),
    )
    .await
    .expect("the keyed write succeeds after the cut");
    cut.await.unwrap();
    assert_eq!(
        outcome,
        WriteOutcome::AlreadyApplied,
        "the commit went through before the cut"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM ledger WHERE writer = 1 AND n = 1")
            .await
            .unwrap(),
        "1"
    );

    // Cut while the statement runs: it never commits, and the retry applies it.
    let cut = cut_soon(ms(300));
    let outcome = guarded(
        "a keyed write cut mid-statement",
        pool.write(sqlx::query(
            "INSERT INTO ledger SELECT 2, 1, 10 FROM pg_sleep(0.8)",
        ))
        .idempotent("cut:statement")
        .execute(),
    )
    .await
    .expect("the keyed write succeeds after the cut");
    cut.await.unwrap();
    assert_eq!(outcome, WriteOutcome::Applied { rows_affected: 1 });
    assert_eq!(
        pg.psql("SELECT count(*) FROM ledger WHERE writer = 2")
            .await
            .unwrap(),
        "1"
    );

    // Without a key the same cut leaves the caller not knowing, and nothing is tried again.
    let cut = cut_soon(ms(300));
    let error = guarded(
        "a write without a key cut during COMMIT",
        pool.write(sqlx::query("INSERT INTO ledger VALUES (1, 2, 10)"))
            .execute(),
    )
    .await
    .expect_err("the cut fails a write without a key");
    cut.await.unwrap();
    assert!(error.is_outcome_unknown(), "{error}");
}

/// A queued write the database refuses on replay (a CHECK constraint) becomes a dead letter,
/// reported through an event and `health()`; the writes queued before and after it are applied
/// in order. Retried after the constraint is dropped, it is applied; a discarded one is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_is_dead_lettered_and_the_rest_applied_in_order() {
    let pg = server().await;
    pg.psql("ALTER TABLE ledger ADD COLUMN id bigserial")
        .await
        .unwrap();
    let proxy = FaultProxy::to_server(&pg).await.expect("a fault proxy");
    proxy.set_mode(FaultMode::Refuse);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pool = pool_on(pg.url_via(&proxy), &dir.path().join("outbox.sqlite"));
    let seen = events(&pool);
    let amounts: [i64; 5] = [5, 7, -1, 11, 13];
    for (n, amount) in (0..).zip(amounts) {
        let receipt = pool
            .write(
                DurableWrite::new("INSERT INTO ledger (writer, n, amount) VALUES ($1, $2, $3)")
                    .bind(9)
                    .bind(n)
                    .bind(amount),
            )
            .idempotent(format!("order:{n}"))
            .or_enqueue()
            .execute()
            .await
            .expect("queued");
        assert!(
            matches!(receipt.source(), Source::Queued { position, .. } if *position == u64::try_from(n).unwrap() + 1),
            "{:?}",
            receipt.source()
        );
        assert!(receipt.is_stale());
    }
    assert_eq!(pool.health().status, HealthStatus::Degraded);
    proxy.set_mode(FaultMode::Pass);
    let outbox = pool.outbox().unwrap();
    assert!(
        outbox.wait_until_empty(Duration::from_secs(30)).await,
        "not drained"
    );
    assert_eq!(
        pg.psql("SELECT string_agg(amount::text, ',' ORDER BY id) FROM ledger")
            .await
            .unwrap(),
        "5,7,11,13",
        "the rest applied, in order"
    );
    let dead = outbox.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].key, "order:2");
    assert!(
        dead[0].error.contains("check constraint"),
        "{}",
        dead[0].error
    );
    assert_eq!(
        dead[0].write.as_ref().map(|write| write.values().to_vec()),
        Some(vec![9.into(), 2.into(), (-1_i64).into()])
    );
    let dead_event = seen.lock().unwrap().iter().find_map(|event| match event {
        OutboxEvent::DeadLettered { id, key, .. } => Some((*id, key.clone())),
        _ => None,
    });
    assert_eq!(dead_event, Some((dead[0].id, "order:2".to_owned())));
    let health = pool.health();
    assert_eq!(health.outbox.unwrap().dead_letters, 1);
    assert_eq!(
        health.status,
        HealthStatus::Degraded,
        "a dead letter wants attention"
    );

    pg.psql("ALTER TABLE ledger DROP CONSTRAINT ledger_amount_check")
        .await
        .unwrap();
    assert!(outbox.retry_dead_letter(dead[0].id).await.unwrap());
    assert!(
        !outbox.retry_dead_letter(dead[0].id).await.unwrap(),
        "moved once"
    );
    assert!(outbox.wait_until_empty(Duration::from_secs(30)).await);
    assert_eq!(
        pg.psql("SELECT string_agg(amount::text, ',' ORDER BY id) FROM ledger")
            .await
            .unwrap(),
        "5,7,11,13,-1"
    );
    assert!(outbox.dead_letters().await.unwrap().is_empty());
    assert_eq!(pool.health().status, HealthStatus::Healthy);
}

/// A full outbox refuses the next write with a clear error and keeps what it holds: once the
/// primary is back exactly the queued writes are applied, the refused one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_refuses_clearly_and_keeps_its_content() {
    let pg = server().await;
    let proxy = FaultProxy::to_server(&pg).await.expect("a fault proxy");
    proxy.set_mode(FaultMode::Refuse);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pool = ProtectedPool::postgres()
        .primary(pg.url_via(&proxy))
        .outbox(OutboxConfig::new(dir.path().join("outbox.sqlite")).max_writes(3))
        .build()
        .expect("build");
    for n in 0..3 {
        pool.write(entry(4, n))
            .idempotent(format!("full:{n}"))
            .or_enqueue()
            .execute()
            .await
            .expect("queued");
    }
    let error = pool
        .write(entry(4, 3))
        .idempotent("full:3")
        .or_enqueue()
        .execute()
        .await
        .expect_err("the fourth write does not fit");
    assert!(
        matches!(
            error,
            Error::OutboxFull {
                writes: 3,
                max_writes: 3,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("the outbox is full"), "{message}");
    assert!(message.contains("neither applied nor queued"), "{message}");
    assert!(!message.contains(&pg.url_via(&proxy)), "no URL in errors");
    // The same key queued again is not queued twice.
    let again = pool
        .write(entry(4, 0))
        .idempotent("full:0")
        .or_enqueue()
        .execute()
        .await
        .expect("the same key again");
    assert!(matches!(again.source(), Source::Queued { position: 1, .. }));
    assert_eq!(pool.outbox().unwrap().depth(), 3);

    proxy.set_mode(FaultMode::Pass);
    assert!(
        pool.outbox()
            .unwrap()
            .wait_until_empty(Duration::from_secs(30))
            .await
    );
    assert_eq!(
        pg.psql("SELECT string_agg(n::text, ',' ORDER BY n) FROM ledger WHERE writer = 4")
            .await
            .unwrap(),
        "0,1,2"
    );
}

/// The same key twice applies once, and the second call says so; the key table's name is
/// the configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_applies_once_across_calls() {
    let pg = server().await;
    let pool = ProtectedPool::postgres()
        .primary(pg.url())
        .idempotency(protected_pool::IdempotencyConfig::default().table("public.applied_keys"))
        .connect()
        .await
        .expect("connect");
    let write = || {
        pool.write(sqlx::query("INSERT INTO ledger VALUES (7, 1, 100)"))
            .idempotent("once")
            .execute()
    };
    assert_eq!(
        write().await.unwrap(),
        WriteOutcome::Applied { rows_affected: 1 }
    );
    assert_eq!(write().await.unwrap(), WriteOutcome::AlreadyApplied);
    assert_eq!(pg.psql("SELECT count(*) FROM ledger").await.unwrap(), "1");
    assert_eq!(
        pg.psql("SELECT key FROM public.applied_keys")
            .await
            .unwrap(),
        "once"
    );
    // A statement the server refuses leaves no key behind: fixed, it can be applied.
    let error = pool
        .write(sqlx::query("INSERT INTO ledger VALUES (7, 2, -5)"))
        .idempotent("refused")
        .execute()
        .await
        .expect_err("the CHECK constraint refuses it");
    assert_eq!(error.database_code().as_deref(), Some("23514"));
    assert_eq!(
        pool.write(sqlx::query("INSERT INTO ledger VALUES (7, 2, 5)"))
            .idempotent("refused")
            .execute()
            .await
            .unwrap(),
        WriteOutcome::Applied { rows_affected: 1 }
    );
}
