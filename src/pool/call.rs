//! One statement, taken apart, through the pool: how it may be replayed, its endpoints, then
//! what it may fall back on. The shared last step of `pool.read(q).fetch_*()` (see `routed`)
//! and of the pool's sqlx executors (see `executor`).

use std::future::Future;

use super::ProtectedPool;
use super::degrade::{CacheRequest, Plan};
use super::failover::Replay;
use super::operation::Fetching;
use super::statement::{FetchFn, Statement};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::fallback::{OwnFallback, Served};
use crate::route::Route;

/// How a single statement of `route` may be replayed; `replayable`: it only reads.
pub(super) fn replay_for(route: Route, replayable: bool) -> Replay {
    match route {
        Route::Read if replayable => Replay::Read,
        Route::Read => Replay::Never,
        // One statement for the primary: if a standby refused it (not executed), it moves to
        // the primary of the moment.
        Route::Write | Route::Auth => Replay::AfterRefusal,
    }
}

/// Runs a statement taken apart through the pool: its endpoints by `replay`, then what the
/// call may fall back on.
pub(super) fn run_statement<'p, DB: Backend, T: Send + 'static>(
    pool: &'p ProtectedPool<DB>,
    route: Route,
    replay: Replay,
    statement: Result<Statement<DB>, sqlx::Error>,
    fetch: FetchFn<DB, T>,
    cache: Option<CacheRequest<T>>,
    fallback: Option<OwnFallback<T>>,
) -> impl Future<Output = Result<Served<T>>> + Send + 'p {
    let unnamed = pool.inner.unnamed_statements;
    let prepared = statement
        .map(|statement| statement.unnamed_if(unnamed))
        .map_err(|source| Error::InvalidQuery { route, source });
    async move {
        // By reference: moved out, the statement would take its room in this future twice.
        let statement = match prepared {
            Ok(ref statement) => statement,
            Err(error) => return Err(error),
        };
        let inner = &pool.inner;
        let plan = Plan {
            route,
            sql: Some(statement.sql.as_str()),
            cache,
            fallback,
        };
        let run = Fetching { statement, fetch };
        // Held inline, not boxed: a box per call cost an allocation and a copy of the whole
        // endpoint loop's future, more than moving the (now smaller) call's future does.
        let call = std::pin::pin!(inner.failover(route, replay, run));
        inner.degrade(plan, call).await
    }
}
