//! One endpoint's try at a call: the breaker's permit, a connection, the operation, and one
//! verdict recorded on the breaker and in the metrics.
//!
//! Deadlines: the endpoint's share of the call's time bounds getting a connection (the
//! breaker, a wait for a free one, a connect). Once the operation runs, it keeps the rest of
//! the route's deadline. A read that other endpoints could still serve is checked when its
//! share is spent: if the server answers a new connection it is alive and the read is merely
//! slow, so it goes on; if not, the endpoint is hung and the read moves on.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::PoolError;

use super::PoolInner;
use super::operation::Operation;
use crate::backend::Backend;
use crate::breaker::{Outcome, Permit};
use crate::classify::ErrorClass;
use crate::endpoint::{Checkout, Endpoint, Stopped};
use crate::error::{Error, Result};
use crate::fallback::{Served, Source};
use crate::role::Role;
use crate::route::Route;
use crate::timer::Timer;

/// A call's value and the endpoint that gave it.
pub(crate) struct Done<T> {
    pub(crate) value: T,
    pub(crate) endpoint: Arc<str>,
}

impl<T> Done<T> {
    /// The value, as served by its endpoint.
    pub(crate) fn served(self) -> Served<T> {
        Served::new(
            self.value,
            Source::Database {
                endpoint: self.endpoint,
            },
        )
    }
}

/// Why an attempt failed, and what that allows next.
pub(super) struct Failed {
    pub(super) error: Error,
    /// Whether the operation may have reached the server. A call that runs once stops here.
    pub(super) started: bool,
    /// Whether the failure was the endpoint's (it refused, could not be reached, hung, lost
    /// the connection): another endpoint may serve a read. An error the server answered with
    /// is the call's answer and is never replayed.
    pub(super) endpoint_level: bool,
    /// A standby refused the statement (`25006` on the write route): it was not executed.
    pub(super) refused_read_only: bool,
}

/// The time an attempt has.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    /// The clock when the attempt starts.
    pub(super) now: Instant,
    /// This endpoint's share of the time left, from `now`.
    pub(super) share: Duration,
    /// The end of this endpoint's share: getting a connection must be done by then.
    pub(super) share_end: tokio::time::Instant,
    /// The route's deadline: the operation must be done by then.
    pub(super) deadline: tokio::time::Instant,
    /// Whether another endpoint could still take the call (so a hung endpoint should be
    /// found out when the share is spent).
    pub(super) others_left: bool,
}

/// One classification of an error, and what the breaker hears of it.
pub(super) struct Judged {
    pub(super) class: ErrorClass,
    pub(super) outcome: Outcome,
}

/// Classifies `error` once (the caller's classifier first), and what the breaker of `route`
/// makes of that class.
pub(super) fn judge<DB: Backend>(
    pool: &PoolInner<DB>,
    error: &sqlx::Error,
    route: Route,
) -> Judged {
    let class = pool
        .classifier
        .as_ref()
        .and_then(|classify| classify(error, route))
        .unwrap_or_else(|| DB::classify(error));
    let outcome = if class.counts_as_failure(route) {
        Outcome::Failure
    } else if class == ErrorClass::Query {
        // The server answered; as far as its health goes, that is a success.
        Outcome::Success
    } else {
        Outcome::Ignored
    };
    Judged { class, outcome }
}

/// The error of a failed operation or connect on `endpoint`.
pub(super) fn endpoint_error<DB: Backend>(
    endpoint: &Endpoint<DB>,
    route: Route,
    class: ErrorClass,
    outcome_unknown: bool,
    source: sqlx::Error,
) -> Error {
    Error::Database {
        route,
        endpoint: endpoint.name.clone(),
        class,
        outcome_unknown,
        source,
    }
}

/// One endpoint's try at a call of `route`.
pub(super) struct Attempt<'a, DB: Backend> {
    pub(super) pool: &'a PoolInner<DB>,
    pub(super) endpoint: &'a Endpoint<DB>,
    pub(super) route: Route,
}

impl<'a, DB: Backend> Attempt<'a, DB> {
    /// Runs `operation` here. `retry_dead` allows one more run on another connection of this
    /// endpoint when a reused connection turns out to have died while idle (only for
    /// operations that may be repeated).
    pub(super) async fn run<O>(
        &self,
        operation: &mut O,
        budget: Budget,
        retry_dead: bool,
    ) -> Result<Done<O::Output>, Failed>
    where
        O: Operation<DB::Connection>,
    {
        let (endpoint, route) = (self.endpoint, self.route);
        let now = budget.now;
        self.check_lag()?;
        self.check_role()?;
        let permit = self.permit()?;
        // Counted only where it chooses between replicas: the count is one cache line that
        // every thread writes twice per call.
        let pool = self.pool;
        let counted = pool.router.counts_outstanding(pool.endpoints.len());
        let _outstanding = counted.then(|| endpoint.start_call());
        let mut timer_slot = pin!(None);
        let mut timer = Timer::new(timer_slot.as_mut());
        let mut checkout = match self
            .checkout(budget.share_end, budget.share, now, &mut timer)
            .await
        {
            Ok(checkout) => checkout,
            Err(refused) => return Err(refused.record(permit, now)),
        };
        // A new connection may just have found the server to be a standby.
        self.check_role()?;
        let mut retried = false;
        let result = loop {
            let result = self
                .operate(&mut checkout, operation, budget, &mut timer)
                .await;
            // A reused connection that died before answering says nothing about the server:
            // it died while idle (a restart since). Counted against the connection, not the
            // breaker: the next checkout checks its siblings first.
            let died_idle =
                matches!(&result, Ok(Err(_))) && checkout.is_broken() && !checkout.is_fresh();
            if died_idle && retry_dead && !retried {
                retried = true;
                drop(checkout);
                let now = Instant::now();
                let left = budget
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::from_std(now));
                checkout = match self.checkout(budget.deadline, left, now, &mut timer).await {
                    Ok(checkout) => checkout,
                    Err(refused) => return Err(refused.record(permit, now)),
                };
                continue;
            }
            break result;
        };
        let elapsed = now.elapsed();
        let metrics = endpoint.metrics(route);
        let failed = match result {
            Ok(Ok(value)) => {
                permit.record(Outcome::Success, elapsed);
                metrics.success(elapsed);
                return Ok(Done {
                    value,
                    endpoint: endpoint.name.clone(),
                });
            }
            Ok(Err(source)) => {
                let judged = judge(self.pool, &source, route);
                let broken = checkout.is_broken();
                let refused_read_only = route != Route::Read && is_read_only(&source);
                if refused_read_only {
                    // A standby answers every statement of this session the same way.
                    checkout.evict();
                }
                permit.record(judged.outcome, elapsed);
                metrics.failure(judged.class.as_str(), Some(elapsed));
                Failed {
                    // An answer from the server means the statement did not take effect; a
                    // connection lost after it left says nothing about whether it ran.
                    error: endpoint_error(endpoint, route, judged.class, broken, source),
                    started: true,
                    endpoint_level: broken,
                    refused_read_only,
                }
            }
            Err(Stalled { hung }) => {
                // Still busy: the checkout closes the connection and asks the server to stop
                // the statement.
                permit.record(Outcome::Failure, elapsed);
                metrics.failure(ErrorClass::Timeout.as_str(), Some(elapsed));
                Failed {
                    error: Error::Timeout {
                        route,
                        endpoint: endpoint.name.clone(),
                        after: elapsed,
                        outcome_unknown: true,
                    },
                    started: true,
                    endpoint_level: hung,
                    refused_read_only: false,
                }
            }
        };
        Err(failed)
    }

    /// A connection for a use the pool does not run itself (a stream of rows, a connection
    /// or transaction handed to the caller), with the breaker's permit for it. Getting it
    /// must be done by `by`; the caller records the permit's outcome.
    pub(super) async fn hand_out(
        &self,
        by: tokio::time::Instant,
    ) -> Result<(Checkout<DB>, Permit<'a>, Instant), Failed> {
        let now = Instant::now();
        self.check_lag()?;
        self.check_role()?;
        let permit = self.permit()?;
        let mut timer_slot = pin!(None);
        let within = by.saturating_duration_since(tokio::time::Instant::from_std(now));
        let checkout = match self
            .checkout(by, within, now, &mut Timer::new(timer_slot.as_mut()))
            .await
        {
            Ok(checkout) => checkout,
            Err(refused) => return Err(refused.record(permit, now)),
        };
        // A new connection may just have found the server to be a standby.
        self.check_role()?;
        Ok((checkout, permit, now))
    }

    fn check_lag(&self) -> Result<(), Failed> {
        let endpoint = self.endpoint;
        if let (Role::Replica, Some(max), Some(lag)) = (
            endpoint.likely_role(),
            self.pool.max_replica_lag,
            endpoint.lag(),
        ) && lag > max
        {
            let error = Error::ReplicaLagging {
                endpoint: endpoint.name.clone(),
                lag,
                max,
            };
            return Err(not_started(error, true));
        }
        Ok(())
    }

    /// A call for the primary passes over an endpoint that says it is a standby.
    fn check_role(&self) -> Result<(), Failed> {
        let (endpoint, route) = (self.endpoint, self.route);
        if route != Route::Read && endpoint.role() == Some(Role::Replica) {
            let error = Error::NotPrimary {
                route,
                endpoint: endpoint.name.clone(),
            };
            return Err(not_started(error, true));
        }
        Ok(())
    }

    fn permit(&self) -> Result<Permit<'a>, Failed> {
        let (pool, endpoint, route) = (self.pool, self.endpoint, self.route);
        let breaker = endpoint.breaker(route);
        // While the endpoint's probe is alive the trials are its own: a caller is never the
        // one sent to a server that may still be hung.
        let probe_owns_trials = pool.probe_owns_trials(endpoint.index);
        let permit = if probe_owns_trials {
            breaker.try_acquire_untried()
        } else {
            breaker.try_acquire()
        };
        permit.map_err(|rejected| {
            endpoint.metrics(route).rejected();
            let error = Error::CircuitOpen {
                route,
                endpoint: endpoint.name.clone(),
                rejected,
                cause: pool.probes.cause(endpoint.index),
            };
            not_started(error, true)
        })
    }

    /// A connection, by `by` (`within` after `started`), on `timer`. Nothing has been sent
    /// yet whatever happens here.
    async fn checkout(
        &self,
        by: tokio::time::Instant,
        within: Duration,
        started: Instant,
        timer: &mut Timer<'_>,
    ) -> Result<Checkout<DB>, Refused> {
        let (pool, endpoint, route) = (self.pool, self.endpoint, self.route);
        let wait = within.min(pool.wait_timeout);
        let wait_end = if wait == within {
            by
        } else {
            tokio::time::Instant::from_std(started) + wait
        };
        let (class, error) = match endpoint.checkout_by(wait_end, by, timer).await {
            Ok(checkout) => return Ok(checkout),
            Err(Stopped::Waited) => {
                // Our own pool is full: the server was not asked anything, and its breaker
                // hears nothing.
                let error = Error::Saturated {
                    route,
                    endpoint: endpoint.name.clone(),
                    waited: wait,
                };
                return Err(Refused::unheard(error, true));
            }
            Err(Stopped::Pool(PoolError::Closed)) => {
                return Err(Refused::unheard(Error::Closed, false));
            }
            Err(Stopped::Pool(PoolError::Backend(source))) => {
                let judged = judge(pool, &source, route);
                if DB::breaks_connection(&source) || judged.class == ErrorClass::Connection {
                    endpoint.connection_lost();
                }
                endpoint.metrics(route).failure(judged.class.as_str(), None);
                // A connect the server refused for an infrastructure reason is the
                // endpoint's failure; one it answered otherwise (a bad password) is the call's.
                return Err(Refused {
                    failed: not_started(
                        endpoint_error(endpoint, route, judged.class, false, source),
                        judged.outcome == Outcome::Failure,
                    ),
                    outcome: Some(judged.outcome),
                });
            }
            Err(Stopped::Pool(other)) => {
                let source = sqlx::Error::Protocol(format!("connection pool: {other}"));
                let class = ErrorClass::Unknown;
                (class, endpoint_error(endpoint, route, class, false, source))
            }
            Err(Stopped::TimedOut) => (
                ErrorClass::Timeout,
                Error::Timeout {
                    route,
                    endpoint: endpoint.name.clone(),
                    after: started.elapsed(),
                    outcome_unknown: false,
                },
            ),
        };
        endpoint.metrics(route).failure(class.as_str(), None);
        Err(Refused {
            failed: not_started(error, true),
            outcome: Some(Outcome::Failure),
        })
    }

    /// Runs the operation under the budget; `Err` if it did not finish in time.
    async fn operate<O>(
        &self,
        checkout: &mut Checkout<DB>,
        operation: &mut O,
        budget: Budget,
        timer: &mut Timer<'_>,
    ) -> Result<Result<O::Output, sqlx::Error>, Stalled>
    where
        O: Operation<DB::Connection>,
    {
        let run = checkout.run(async |raw| operation.run(raw).await);
        let mut run = pin!(run);
        if budget.others_left && budget.share_end < budget.deadline {
            if let Some(result) = timer.within(budget.share_end, &mut run).await {
                return Ok(result);
            }
            // The share is spent and the operation still runs: slow, or hung?
            let now = tokio::time::Instant::now();
            let limit =
                (budget.deadline.saturating_duration_since(now) / 2).min(self.pool.connect_timeout);
            let alive = tokio::select! {
                biased;
                result = &mut run => return Ok(result),
                alive = Box::pin(self.endpoint.answers(limit)) => alive,
            };
            if !alive {
                return Err(Stalled { hung: true });
            }
        }
        timer
            .within(budget.deadline, run)
            .await
            .ok_or(Stalled { hung: false })
    }
}

/// The operation did not finish in time; `hung` when the server did not answer a new
/// connection either.
struct Stalled {
    hung: bool,
}

/// Whether the server refused a statement because it is read-only (`25006`: a standby, or a
/// primary demoted under us). Decided from the code itself, whatever a classifier says.
fn is_read_only(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("25006"))
}

/// No connection: the failure, and what the breaker hears of it (nothing when the server was
/// not asked).
struct Refused {
    failed: Failed,
    outcome: Option<Outcome>,
}

impl Refused {
    fn unheard(error: Error, endpoint_level: bool) -> Self {
        Self {
            failed: not_started(error, endpoint_level),
            outcome: None,
        }
    }

    fn record(self, permit: Permit<'_>, started: Instant) -> Failed {
        if let Some(outcome) = self.outcome {
            permit.record(outcome, started.elapsed());
        }
        self.failed
    }
}

fn not_started(error: Error, endpoint_level: bool) -> Failed {
    Failed {
        error,
        started: false,
        endpoint_level,
        refused_read_only: false,
    }
}
