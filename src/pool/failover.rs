//! The endpoints of one call, tried in turn: the one loop every call goes through.

use super::PoolInner;
use super::attempt::{Attempt, Budget, Done, Failed};
use super::operation::Operation;
use crate::backend::Backend;
use crate::endpoint::Endpoint;
use crate::error::{Attempt as Tried, Error, Result};
use crate::route::Route;

/// Whether a call's operation may run more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replay {
    /// A read: after an endpoint-level failure (refused, unreachable, hung, connection lost)
    /// it runs again on the next endpoint, and once more on the same endpoint when a reused
    /// connection had died while idle. Each endpoint gets an equal share of the time left to
    /// get a connection.
    Read,
    /// Runs at most once: endpoints are passed over only until one has a connection for it.
    Never,
}

impl<DB: Backend> PoolInner<DB> {
    /// Runs `operation` on the route's endpoints in the router's order until one serves it or
    /// the call must stop.
    ///
    /// Cancel-safe: if the returned future is dropped, the breaker permit is released without
    /// an outcome and a connection caught mid-statement is closed rather than reused.
    pub(crate) async fn failover<O>(
        &self,
        route: Route,
        replay: Replay,
        mut operation: O,
    ) -> Result<Done<O::Output>>
    where
        O: Operation<DB::Connection>,
    {
        let deadline = tokio::time::Instant::now() + self.routes[route.index()].timeout;
        let candidates = self.router.candidates(route, &self.endpoints);
        let mut tried = Vec::new();
        let mut candidates = candidates.into_iter();
        while let Some(endpoint) = candidates.next() {
            let now = tokio::time::Instant::now();
            if now >= deadline && !tried.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(now);
            let others_left = replay == Replay::Read && candidates.len() > 0;
            let share = if replay == Replay::Read {
                left / u32::try_from(candidates.len() + 1).unwrap_or(u32::MAX)
            } else {
                left
            };
            let budget = Budget {
                share_end: now + share,
                deadline,
                others_left,
            };
            let attempt = Attempt {
                pool: self,
                endpoint,
                route,
            };
            let retry_dead = replay == Replay::Read;
            match attempt.run(&mut operation, budget, retry_dead).await {
                Ok(done) => return Ok(done),
                Err(failed) => {
                    let go_on =
                        failed.endpoint_level && (replay == Replay::Read || !failed.started);
                    if !go_on {
                        return Err(call_error(route, tried, endpoint, failed));
                    }
                    tried.push(Tried {
                        endpoint: endpoint.name.clone(),
                        error: failed.error,
                    });
                }
            }
        }
        Err(exhausted(route, tried))
    }
}

/// The call's error: the endpoint's own when it was the only one tried, else every attempt.
fn call_error<DB: Backend>(
    route: Route,
    mut tried: Vec<Tried>,
    endpoint: &Endpoint<DB>,
    failed: Failed,
) -> Error {
    if tried.is_empty() {
        return failed.error;
    }
    tried.push(Tried {
        endpoint: endpoint.name.clone(),
        error: failed.error,
    });
    exhausted(route, tried)
}

/// Every candidate was tried (or the time ran out).
fn exhausted(route: Route, mut attempts: Vec<Tried>) -> Error {
    if attempts.len() == 1 {
        return attempts.pop().expect("one attempt").error;
    }
    Error::AllEndpointsFailed { route, attempts }
}
