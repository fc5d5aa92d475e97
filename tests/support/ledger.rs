//! The ledger the outbox tests write to (`writer int, n int, amount bigint`), read back with
//! psql. Included with `#[path = "support/ledger.rs"] mod ledger;`.
#![allow(dead_code)] // each test file uses its own part

use protected_pool_testkit::PgServer;

/// Rows, distinct (writer, n) pairs and the sum of amounts in the ledger.
pub async fn ledger(pg: &PgServer) -> (i64, i64, i64) {
    let out = pg
        .psql("SELECT count(*), count(DISTINCT (writer, n)), coalesce(sum(amount), 0) FROM ledger")
        .await
        .expect("read the ledger");
    let fields: Vec<i64> = out
        .split('|')
        .map(|field| field.trim().parse().expect("a number"))
        .collect();
    (fields[0], fields[1], fields[2])
}
