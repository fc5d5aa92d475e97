//! The endpoints of one call, tried in turn: the one loop every call goes through.

use std::future::Future;
use std::time::Duration;

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
    /// A single statement for the primary: it runs at most once, except that a statement a
    /// standby refused (`25006`: it was not executed) moves to the primary of the moment.
    AfterRefusal,
    /// Runs at most once: endpoints are passed over only until one has a connection for it.
    Never,
}

impl<DB: Backend> PoolInner<DB> {
    /// Runs `operation` on the route's endpoints in the router's order until one serves it or
    /// the call must stop.
    ///
    /// Cancel-safe: if the returned future is dropped, the breaker permit is released without
    /// an outcome and a connection caught mid-statement is closed rather than reused.
    ///
    /// The call starts when this is called, not when the future is first polled. Not an
    /// `async fn`: a wrapper future would hold the loop's future besides its own state, and
    /// copy all of it in on its first poll.
    pub(crate) fn failover<O>(
        &self,
        route: Route,
        replay: Replay,
        operation: O,
    ) -> impl Future<Output = Result<Done<O::Output>>>
    where
        O: Operation<DB::Connection>,
    {
        let timeout = self.routes[route.index()].timeout;
        self.failover_from(
            route,
            replay,
            operation,
            tokio::time::Instant::now(),
            timeout,
        )
    }

    /// [`failover`](Self::failover) within a deadline of the caller's: one try of a call
    /// that may try more than once within the route's timeout (a keyed write).
    pub(crate) async fn failover_until<O>(
        &self,
        route: Route,
        replay: Replay,
        operation: O,
        deadline: tokio::time::Instant,
    ) -> Result<Done<O::Output>>
    where
        O: Operation<DB::Connection>,
    {
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        self.failover_from(route, replay, operation, now, left)
            .await
    }

    /// The loop itself, from `started` (the clock read once for the call) with `timeout`
    /// left.
    async fn failover_from<O>(
        &self,
        route: Route,
        replay: Replay,
        mut operation: O,
        started: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Done<O::Output>>
    where
        O: Operation<DB::Connection>,
    {
        let deadline = started + timeout;
        let mut queue = self.router.candidates(route, &self.endpoints)?;
        let mut tried: Vec<Tried> = Vec::new();
        let mut rediscovered = false;
        let mut first = true;
        while !queue.is_empty() {
            let endpoint = queue.remove(0);
            // The first try works from what the call was given: no clock read, no arithmetic.
            let (now, left) = if std::mem::take(&mut first) {
                (started, timeout)
            } else {
                let now = tokio::time::Instant::now();
                (now, deadline.saturating_duration_since(now))
            };
            if now >= deadline && !tried.is_empty() {
                break;
            }
            let others_left = replay == Replay::Read && !queue.is_empty();
            let share = if others_left {
                left / u32::try_from(queue.len() + 1).unwrap_or(u32::MAX)
            } else {
                left
            };
            let budget = Budget {
                now: now.into_std(),
                share,
                share_end: if share == left { deadline } else { now + share },
                deadline,
                others_left,
            };
            let attempt = Attempt {
                pool: self,
                endpoint,
                route,
            };
            let retry_dead = replay == Replay::Read;
            let failed = match attempt.run(&mut operation, budget, retry_dead).await {
                Ok(done) => return Ok(done),
                Err(failed) => failed,
            };
            let refused_as_standby = failed.refused_read_only;
            let go_on = match replay {
                Replay::Read => failed.endpoint_level,
                Replay::AfterRefusal => {
                    refused_as_standby || (failed.endpoint_level && !failed.started)
                }
                Replay::Never => failed.endpoint_level && !failed.started,
            };
            if refused_as_standby && !rediscovered {
                // The primary this call was sent to is a standby now: ask every endpoint what
                // it is, so this call (if it may move) and the next ones go to the primary
                // of the moment.
                rediscovered = true;
                Box::pin(self.rediscover(deadline)).await;
            }
            if !go_on {
                return Err(call_error(route, tried, endpoint, failed));
            }
            tried.push(Tried {
                endpoint: endpoint.name.clone(),
                error: failed.error,
            });
            if refused_as_standby {
                let candidates = self.router.candidates(route, &self.endpoints)?;
                queue = candidates
                    .into_iter()
                    .filter(|candidate| !tried.iter().any(|t| t.endpoint == candidate.name))
                    .collect();
            }
        }
        Err(exhausted(route, tried))
    }

    /// Asks every endpoint what it is now, within `deadline`.
    async fn rediscover(&self, deadline: tokio::time::Instant) {
        for endpoint in &self.endpoints {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            endpoint.check_health(left.min(self.connect_timeout)).await;
        }
    }
}

/// The call's error: the endpoint's own when it was the only one tried, else every attempt.
pub(super) fn call_error<DB: Backend>(
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
pub(super) fn exhausted(route: Route, mut attempts: Vec<Tried>) -> Error {
    if attempts.len() == 1 {
        return attempts.pop().expect("one attempt").error;
    }
    Error::AllEndpointsFailed { route, attempts }
}
