//! What a read through the pool allocates on the calling thread, against the same statement
//! run by sqlx on a PostgreSQL connection of its own: counted by a global allocator, printed,
//! and held to a bound so that an added allocation on the closed path fails here.
//!
//! PostgreSQL, not SQLite: sqlx's SQLite driver answers from a worker thread, and whether the
//! answer is there when the caller first polls decides whether the caller's side allocates 2
//! or 4 times. A run settles into one or the other for thousands of calls, for the pool and
//! for sqlx alone independently, so the difference said nothing about the pool (it ranged
//! from -2 to +1.8). A PostgreSQL answer comes over a socket, after the caller has polled and
//! parked: every call takes the same path. Both sides run on one current-thread runtime, so
//! every task it runs is counted.

#[path = "support/alloc.rs"]
mod alloc;

use protected_pool::{Postgres, ProtectedPool};
use protected_pool_testkit::PgServer;
use sqlx::Connection;

use alloc::per_call;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// The most allocations a read through the pool may add to sqlx's own, per call: none. The
/// pool runs the statement on sqlx's executor future as sqlx boxes it, with no box of its own
/// on top. 6 when first counted (on SQLite); 3 while the endpoints in the order they are tried
/// were a `Vec`; 2 while the endpoint loop's future was boxed; 1 while the statement's future
/// was boxed again by the pool. The half leaves room for what runs now and then on the same
/// thread (0.02 per call, on both sides), not for one more allocation per call.
const READ_EXTRA_AT_MOST: f64 = 0.5;

/// The same with a bound argument. sqlx consumes a statement's arguments when it runs it, and
/// a read keeps its own to run again on the next endpoint, so each run gets a copy: the
/// encoded values and their types, 2 allocations.
const READ_WITH_ARGUMENT_EXTRA_AT_MOST: f64 = READ_EXTRA_AT_MOST + 2.0;

/// Allocations per read through the pool and by sqlx alone, on one server: with no argument,
/// then with one.
fn reads_through_the_pool_and_alone() -> [(f64, f64); 2] {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pg = PgServer::start().await.expect("start the server");
        let pool = ProtectedPool::<Postgres>::builder()
            .primary(pg.url())
            .recovery_probes(false)
            .connect()
            .await
            .expect("connect");
        let mut alone = sqlx::PgConnection::connect(&pg.url())
            .await
            .expect("connect");
        let mut counts = [(0.0, 0.0); 2];
        for (with_argument, count) in [false, true].into_iter().zip(&mut counts) {
            let query = || match with_argument {
                true => sqlx::query_scalar::<_, i64>("SELECT $1::int8").bind(7_i64),
                false => sqlx::query_scalar::<_, i64>("SELECT 7::int8"),
            };
            let through_pool = per_call(async || {
                let got = pool.read(query()).fetch_one().await.expect("read");
                assert_eq!(got, 7);
            })
            .await;
            let sqlx_alone = per_call(async || {
                let got = query().fetch_one(&mut alone).await.expect("read");
                assert_eq!(got, 7);
            })
            .await;
            println!(
                "allocations per read{} on the calling thread: through the pool \
                 {through_pool:.2}, sqlx alone {sqlx_alone:.2}, the pool's own {:.2}",
                if with_argument {
                    " with an argument"
                } else {
                    ""
                },
                through_pool - sqlx_alone
            );
            *count = (through_pool, sqlx_alone);
        }
        counts
    })
}

#[test]
fn a_read_allocates_no_more_than_sqlx_alone_but_a_copy_of_its_arguments() {
    let [(plain_pool, plain_alone), (bound_pool, bound_alone)] = reads_through_the_pool_and_alone();
    let extra = plain_pool - plain_alone;
    assert!(
        extra <= READ_EXTRA_AT_MOST,
        "a read through the pool allocates {extra:.2} times more than sqlx alone \
         (at most {READ_EXTRA_AT_MOST:.1})"
    );
    let extra = bound_pool - bound_alone;
    assert!(
        extra <= READ_WITH_ARGUMENT_EXTRA_AT_MOST,
        "a read with an argument through the pool allocates {extra:.2} times more than sqlx \
         alone (at most {READ_WITH_ARGUMENT_EXTRA_AT_MOST:.1})"
    );
}
