//! What a call the breaker refuses allocates on the calling thread: counted by a global
//! allocator, printed, and held to a bound so that an added allocation on the refusal path
//! fails here. A real SQLite database (in memory) stands behind the pool, and the call never
//! reaches it. What a read that runs allocates is in `pg_alloc.rs`: on SQLite, whether the
//! driver's worker thread has answered when the caller polls changes the caller's count.

#[path = "support/alloc.rs"]
mod alloc;

use protected_pool::{ProtectedPool, Route};

use alloc::per_call;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// A call the breaker refuses reaches no connection, and allocates as few times as a read
/// that ran.
#[test]
fn a_refused_call_allocates_at_most_three_times() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = ProtectedPool::sqlite()
            .primary("sqlite::memory:")
            .recovery_probes(false)
            .connect()
            .await
            .expect("connect");
        pool.force_open(Route::Read, "primary").expect("force open");
        let refused = per_call(async || {
            let error = pool
                .read(sqlx::query_scalar::<_, i64>("SELECT 1"))
                .fetch_one()
                .await
                .expect_err("refused");
            assert!(error.is_circuit_open());
        })
        .await;
        println!("allocations per refused read: {refused:.2}");
        // The error holds shared names only. 5 when first counted here, 3 while the
        // endpoints' order was a `Vec`, 2 while the endpoint loop's future was boxed.
        assert!(
            refused <= 1.5,
            "a refused read allocates {refused:.2} times (at most 1)"
        );
    });
}
