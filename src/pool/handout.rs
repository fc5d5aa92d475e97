//! Connections handed out of the pool's own call path: to a stream of rows, or to the caller
//! (an acquired connection, a transaction). The endpoints are tried in turn as for any call
//! until one hands out a connection and the use's first step (its first row, its `BEGIN`)
//! succeeds; what follows is the user's.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::PoolInner;
use super::attempt::{Attempt, Failed, endpoint_error, judge};
use super::failover::{Replay, call_error, exhausted};
use crate::backend::Backend;
use crate::breaker::{Outcome, Permit};
use crate::classify::ErrorClass;
use crate::endpoint::Checkout;
use crate::error::{Attempt as Tried, Error, Result};
use crate::route::Route;

/// A connection handed out, with the route's deadline for its use's first step and the
/// verdict that step owes the breaker.
pub(super) struct Taken<'a, DB: Backend> {
    pub(super) checkout: Checkout<DB>,
    pub(super) verdict: Verdict<'a, DB>,
    pub(super) deadline: tokio::time::Instant,
}

/// What a use's first step reports to: the breaker's permit and the endpoint's metrics.
pub(super) struct Verdict<'a, DB: Backend> {
    pool: &'a PoolInner<DB>,
    pub(super) endpoint: Arc<str>,
    pub(super) route: Route,
    permit: Permit<'a>,
    started: Instant,
    index: usize,
}

impl<DB: Backend> Verdict<'_, DB> {
    /// The first step went through: the breaker and the metrics hear of a success.
    pub(super) fn succeeded(self) -> Arc<str> {
        let elapsed = self.started.elapsed();
        self.permit.record(Outcome::Success, elapsed);
        self.pool.endpoints[self.index]
            .metrics(self.route)
            .success(elapsed);
        self.endpoint
    }

    /// The first step failed with `source`: judged once, recorded once; the connection is
    /// closed if the error broke it.
    pub(super) fn failed(self, checkout: &mut Checkout<DB>, source: sqlx::Error) -> Failed {
        let elapsed = self.started.elapsed();
        checkout.idle(Some(&source));
        let judged = judge(self.pool, &source, self.route);
        let broken = checkout.is_broken();
        self.permit.record(judged.outcome, elapsed);
        let endpoint = &self.pool.endpoints[self.index];
        endpoint
            .metrics(self.route)
            .failure(judged.class.as_str(), Some(elapsed));
        Failed {
            error: endpoint_error(endpoint, self.route, judged.class, broken, source),
            started: true,
            endpoint_level: broken,
            refused_read_only: false,
        }
    }

    /// The first step did not finish by the deadline: a failure of the endpoint (the
    /// checkout, still busy, closes the connection and asks the server to stop).
    pub(super) fn timed_out(self) -> Failed {
        let elapsed = self.started.elapsed();
        self.permit.record(Outcome::Failure, elapsed);
        let endpoint = &self.pool.endpoints[self.index];
        endpoint
            .metrics(self.route)
            .failure(ErrorClass::Timeout.as_str(), Some(elapsed));
        Failed {
            error: Error::Timeout {
                route: self.route,
                endpoint: self.endpoint,
                after: elapsed,
                outcome_unknown: true,
            },
            started: true,
            endpoint_level: true,
            refused_read_only: false,
        }
    }
}

/// A use of a connection handed out: its first step, and what it gives.
pub(super) trait Use<DB: Backend> {
    type Output;

    /// Takes the connection: `Ok` once the first step went through (the verdict told),
    /// `Err` with the verdict told of the failure.
    fn take<'a>(
        &'a mut self,
        taken: Taken<'a, DB>,
    ) -> impl Future<Output = Result<Self::Output, Failed>> + Send + 'a;
}

impl<DB: Backend> PoolInner<DB> {
    /// Hands a connection of `route` to `using` on each endpoint in turn, until its first
    /// step succeeds or the call must stop. `replay` says when a failed first step moves on
    /// ([`Replay::Read`]: after any failure of the endpoint; otherwise only when nothing was
    /// started).
    pub(super) async fn hand_out<U: Use<DB>>(
        &self,
        route: Route,
        replay: Replay,
        mut using: U,
    ) -> Result<U::Output> {
        let deadline = tokio::time::Instant::now() + self.routes[route.index()].timeout;
        let candidates = self.router.candidates(route, &self.endpoints)?;
        let mut tried: Vec<Tried> = Vec::new();
        for endpoint in candidates {
            if tokio::time::Instant::now() >= deadline && !tried.is_empty() {
                break;
            }
            let attempt = Attempt {
                pool: self,
                endpoint,
                route,
            };
            let failed = match attempt.hand_out(deadline).await {
                Ok((checkout, permit, started)) => {
                    let taken = Taken {
                        checkout,
                        verdict: Verdict {
                            pool: self,
                            endpoint: endpoint.name.clone(),
                            route,
                            permit,
                            started,
                            index: endpoint.index,
                        },
                        deadline,
                    };
                    match using.take(taken).await {
                        Ok(value) => return Ok(value),
                        Err(failed) => failed,
                    }
                }
                Err(failed) => failed,
            };
            let go_on = match replay {
                Replay::Read => failed.endpoint_level,
                Replay::AfterRefusal | Replay::Never => failed.endpoint_level && !failed.started,
            };
            if !go_on {
                return Err(call_error(route, tried, endpoint, failed));
            }
            tried.push(Tried {
                endpoint: endpoint.name.clone(),
                error: failed.error,
            });
        }
        Err(exhausted(route, tried))
    }
}
