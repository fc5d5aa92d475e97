//! Errors the server answered with, against real PostgreSQL servers: an ERROR (not FATAL) from
//! a server means the server is alive, whatever its SQLSTATE. It is the statement's answer (a
//! `Query` error), a success for the endpoint's health, and no reason to replay a read on
//! another endpoint. And whatever a custom classifier makes of an error, a connection that
//! died is never handed out again.
//!
//! Every test starts its own servers, so tests run in parallel.

#[path = "support/pool.rs"]
mod pool_support;
#[path = "support/scenario.rs"]
mod scenario;

use std::time::Duration;

use pool_support::{Counted, counted};
use protected_pool::{EndpointOptions, Error, ErrorClass, Postgres, ProtectedPool, Route};
use protected_pool_testkit::PgServer;
use scenario::{eventually, guarded, ms};

const PRIMARY: &str = "primary";
const REPLICA: &str = "replica-1";

/// SQLSTATEs the built-in table does not list, each raised as an ERROR by a healthy server: a
/// limit of the statement (54000 statement too complex, 54001), a CASE with no match, a cursor
/// or transaction misuse, diagnostics, a foreign-data wrapper's error, a snapshot too old, and
/// codes of the application's own (`RAISE ... USING ERRCODE`).
const ANSWERED: &[(&str, &str)] = &[
    ("54000", "program_limit_exceeded"),
    ("54001", "statement_too_complex"),
    ("20000", "case_not_found"),
    ("24000", "invalid_cursor_state"),
    ("0B000", "invalid_transaction_initiation"),
    (
        "0Z002",
        "stacked_diagnostics_accessed_without_active_handler",
    ),
    ("HV000", "fdw_error"),
    ("72000", "snapshot_too_old"),
    ("P9999", "an application's own code"),
    ("ZZ123", "an application's own code"),
];

/// For each code, one read on the primary (with a replica configured) raises it: the error is
/// a `Query` error whose statement is known not to have completed, the primary's read breaker
/// counts a success, the read is not replayed on the replica (its breaker hears nothing), and
/// the error is the primary's own, not a list of endpoints that "failed".
///
/// Codes outside the table fall to `Unknown`, which counts as a failure ("to be safe"): a
/// statement that raises an application error three times opens the read breaker of a healthy
/// primary, and every such read is run a second time on the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_fatal_server_errors_are_answers_not_failures() {
    let primary = PgServer::start().await.expect("start the primary");
    primary
        .psql(
            "CREATE FUNCTION raise_code(code text) RETURNS int LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE EXCEPTION 'raised on purpose: %', code USING ERRCODE = code;
             END $$",
        )
        .await
        .expect("create the function");
    // A base backup of the primary: the replica has the function too.
    let replica = PgServer::streaming_replica(&primary)
        .await
        .expect("start a streaming replica");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(primary.url())
        .replica(replica.url())
        .connect()
        .await
        .expect("connect");

    let mut wrong = Vec::new();
    for &(code, name) in ANSWERED {
        // Each code on its own: what an earlier one did to the breakers does not carry over.
        for endpoint in [PRIMARY, REPLICA] {
            pool.reset(Route::Read, endpoint).unwrap();
        }
        let snapshot = |endpoint| pool.breaker(Route::Read, endpoint).unwrap().snapshot();
        let (primary_before, replica_before) = (snapshot(PRIMARY), snapshot(REPLICA));
        let error = guarded(
            "a read that raises an error",
            pool.read(sqlx::query_scalar::<_, i32>("SELECT raise_code($1)").bind(code))
                .fetch_one(),
        )
        .await
        .expect_err("raise_code returned");
        let (primary_after, replica_after) = (snapshot(PRIMARY), snapshot(REPLICA));

        let mut problems = Vec::new();
        if error.class() != Some(ErrorClass::Query) {
            problems.push(format!("class {:?}, not Query", error.class()));
        }
        if error.database_code().as_deref() != Some(code) {
            problems.push(format!("SQLSTATE {:?}", error.database_code()));
        }
        let primary_counted = counted(&primary_before, &primary_after);
        if primary_counted != Counted::Success {
            problems.push(format!(
                "the primary's breaker counted a {primary_counted:?}"
            ));
        }
        let replica_calls = replica_after.total_calls - replica_before.total_calls;
        if replica_calls != 0 || replica_after.total_rejected != replica_before.total_rejected {
            problems.push(format!(
                "the read was replayed on the replica ({replica_calls} call(s) on its breaker)"
            ));
        }
        if error.is_outcome_unknown() {
            problems.push("said to have an unknown outcome".to_owned());
        }
        if let Error::AllEndpointsFailed { .. } = error {
            problems.push("reported as failed on every endpoint".to_owned());
        }
        if !problems.is_empty() {
            wrong.push(format!(
                "{code} ({name}): {}; error: {error}",
                problems.join("; ")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} errors a healthy server answered with were taken for endpoint failures:\n{}",
        wrong.len(),
        ANSWERED.len(),
        wrong.join("\n")
    );
}

/// A custom classifier calls every error a `Query` error (an application that wants no error
/// to trip its breakers). The pool's only connection is then terminated on the server: the
/// next call may fail, but the connection must not be handed out again, so the call after it
/// succeeds on a fresh one. Whether a connection is reused is decided from the raw error, not
/// from the class (DESIGN.md, section 3).
///
/// Today a connection is discarded only when its error is classified `Connection`: the dead
/// socket goes back to the pool, and every later call fails with an I/O error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_classifier_cannot_keep_a_dead_connection() {
    const APPLICATION: &str = "classifier-test";
    let pg = PgServer::start().await.expect("start the server");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(format!("{}?application_name={APPLICATION}", pg.url()))
        .endpoint_options(EndpointOptions {
            max_connections: 1,
            ..EndpointOptions::default()
        })
        .classify(|_error, _route| Some(ErrorClass::Query))
        .connect()
        .await
        .expect("connect");
    let read = || {
        guarded(
            "a read",
            pool.read(sqlx::query_scalar::<_, i32>("SELECT 1"))
                .fetch_one(),
        )
    };
    assert_eq!(read().await.expect("a healthy read"), 1);
    assert_eq!(pool.status(PRIMARY).unwrap().size, 1);

    let terminated = pg
        .psql(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = '{APPLICATION}'"
        ))
        .await
        .expect("psql");
    // The pool's one backend, and at times a second: with the pool's connection in use, the
    // health loop asks the server its role over a short-lived connection of its own, under
    // the same application name.
    let terminated: u32 = terminated.parse().expect("a count");
    assert!(
        (1..=2).contains(&terminated),
        "the pool's backend, and at most the health loop's: {terminated}"
    );
    let mut gone = false;
    for _ in 0..100 {
        let left = pg
            .psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{APPLICATION}'"
            ))
            .await
            .expect("psql");
        if left == "0" {
            gone = true;
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    assert!(gone, "the terminated backend did not exit");

    // The call that meets the dead connection may fail.
    let first = read().await;
    let second = read().await;
    let third = read().await;
    assert!(
        matches!(second, Ok(1)),
        "the call after the one that met the terminated connection failed: {}; (the first: \
         {:?}; the next: {:?}); the dead connection was put back in the pool because the \
         classifier called its error a Query error",
        second.as_ref().map_err(ToString::to_string).unwrap_err(),
        first.map_err(|error| error.to_string()),
        third.map_err(|error| error.to_string()),
    );
    assert!(
        eventually(Duration::from_secs(1), || pool
            .status(PRIMARY)
            .unwrap()
            .size
            <= 1)
        .await,
        "{:?}",
        pool.status(PRIMARY)
    );
}
