//! Helpers for the classification tests: what a route's breaker made of one call.
//!
//! Included with `#[path = "support/pool.rs"] mod pool_support;` so it does not pull in the
//! breaker helpers of `support/mod.rs`.
#![allow(dead_code)]

use std::fmt;

use protected_pool::breaker::BreakerSnapshot;
use protected_pool::{Backend, ProtectedPool, Route};

/// The endpoint name every test pool uses (the builder's default).
pub const ENDPOINT: &str = "primary";

/// How a route's breaker recorded one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Recorded as a failure: counts toward opening the breaker.
    Failure,
    /// Recorded as a success (the server answered, even if with an error).
    Success,
    /// Recorded as ignored: neither success nor failure.
    Ignored,
}

/// The breaker of `route` on the test endpoint, as of now.
pub fn snapshot<DB: Backend>(pool: &ProtectedPool<DB>, route: Route) -> BreakerSnapshot {
    pool.breaker(route, ENDPOINT)
        .expect("the test endpoint exists")
        .snapshot()
}

/// Totals of a snapshot, for messages.
struct Totals<'a>(&'a BreakerSnapshot);

impl fmt::Display for Totals<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "failures={} successes={} ignored={} rejected={}",
            self.0.total_failures,
            self.0.total_successes,
            self.0.total_ignored,
            self.0.total_rejected
        )
    }
}

/// What exactly one call between `before` and `after` was recorded as. Panics unless exactly
/// one outcome was recorded.
pub fn counted(before: &BreakerSnapshot, after: &BreakerSnapshot) -> Counted {
    let failures = after.total_failures - before.total_failures;
    let successes = after.total_successes - before.total_successes;
    let ignored = after.total_ignored - before.total_ignored;
    match (failures, successes, ignored) {
        (1, 0, 0) => Counted::Failure,
        (0, 1, 0) => Counted::Success,
        (0, 0, 1) => Counted::Ignored,
        _ => panic!(
            "expected exactly one recorded outcome on {}: before {}, after {}",
            after.name,
            Totals(before),
            Totals(after)
        ),
    }
}

/// Runs `call` and returns its result with what the breaker of `route` made of it.
pub async fn recorded<DB, T>(
    pool: &ProtectedPool<DB>,
    route: Route,
    call: impl Future<Output = T>,
) -> (T, Counted)
where
    DB: Backend,
{
    let before = snapshot(pool, route);
    let result = call.await;
    let after = snapshot(pool, route);
    (result, counted(&before, &after))
}

/// The error of a call that must fail.
pub fn expect_err<T: fmt::Debug>(result: protected_pool::Result<T>) -> protected_pool::Error {
    match result {
        Ok(value) => panic!("expected an error, got Ok({value:?})"),
        Err(error) => error,
    }
}
