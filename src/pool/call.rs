//! One protected call: pick endpoints, take a breaker permit and a connection on each in turn,
//! run the statement under the route's deadline, classify, record, fail over when allowed.

use std::sync::Arc;
use std::time::Instant;

use deadpool::managed::{PoolError, TimeoutType};
use tokio::time::timeout_at;

use super::PoolInner;
use super::query::QueryFuture;
use crate::backend::Backend;
use crate::breaker::{Outcome, Permit};
use crate::classify::ErrorClass;
use crate::endpoint::{Connection, Endpoint, Outstanding, PooledConnection, Role};
use crate::error::{Attempt, Error, Result};
use crate::route::Route;

/// A connection on one endpoint with the breaker's permission to use it.
struct Lease<'a, DB: Backend> {
    endpoint: &'a Endpoint<DB>,
    permit: Permit<'a>,
    checkout: Checkout<DB>,
    started: Instant,
    /// When this attempt must be done, and the time it was given.
    deadline: tokio::time::Instant,
    budget: std::time::Duration,
    _outstanding: Outstanding<'a>,
}

/// A call's value and the endpoint that gave it.
pub(crate) struct Done<T> {
    pub(crate) value: T,
    pub(crate) endpoint: Arc<str>,
}

/// What a failed attempt allows next.
enum Next {
    /// Nothing reached the database: another endpoint may serve the call.
    TryAnother,
    /// Stop here and report.
    Stop,
}

impl<DB: Backend> PoolInner<DB> {
    /// Runs `operation` once. Endpoints are tried in order until one hands out a connection;
    /// once the operation has started it is not repeated elsewhere.
    ///
    /// Cancel-safe: if the returned future is dropped, the breaker permit is released without
    /// an outcome and a connection caught mid-statement is closed rather than reused.
    pub(crate) async fn run_once<T, F>(&self, route: Route, operation: F) -> Result<Done<T>>
    where
        F: AsyncFnOnce(&mut DB::Connection) -> Result<T, sqlx::Error>,
    {
        let deadline = self.deadline(route);
        let mut tried = Tried::new(self.router.candidates(route, &self.endpoints));
        let mut lease = self.next_lease(route, deadline, false, &mut tried).await?;
        let result = timeout_at(lease.deadline, operation(lease.connection())).await;
        let endpoint = lease.endpoint;
        self.finish(route, lease, result)
            .map_err(|error| tried.fail(route, endpoint, error))
    }

    /// Runs `operation`, again on the next endpoint if it fails with an infrastructure error,
    /// until one succeeds or the route's deadline passes. Only for operations that are safe to
    /// repeat (reads).
    pub(crate) async fn run_replayable<T, F>(&self, route: Route, operation: F) -> Result<Done<T>>
    where
        F: AsyncFn(&mut DB::Connection) -> Result<T, sqlx::Error>,
    {
        let deadline = self.deadline(route);
        let mut tried = Tried::new(self.router.candidates(route, &self.endpoints));
        loop {
            let mut lease = self.next_lease(route, deadline, true, &mut tried).await?;
            let result = timeout_at(lease.deadline, operation(lease.connection())).await;
            let endpoint = lease.endpoint;
            match self.finish(route, lease, result) {
                Ok(value) => return Ok(value),
                Err(error) => tried.after_replayable(route, endpoint, error, deadline)?,
            }
        }
    }

    /// [`run_once`](Self::run_once) or [`run_replayable`](Self::run_replayable) for a query
    /// whose builder type has been erased (see `pool/query.rs`): no closure type of this
    /// crate's generic code ends up in the future, which keeps it `Send`.
    pub(crate) async fn run_erased<T>(
        &self,
        route: Route,
        replayable: bool,
        fetch: &(dyn for<'c> Fn(&'c mut DB::Connection) -> QueryFuture<'c, T> + Send + Sync),
    ) -> Result<Done<T>> {
        let deadline = self.deadline(route);
        let mut tried = Tried::new(self.router.candidates(route, &self.endpoints));
        loop {
            let mut lease = self
                .next_lease(route, deadline, replayable, &mut tried)
                .await?;
            let result = timeout_at(lease.deadline, fetch(lease.connection())).await;
            let endpoint = lease.endpoint;
            match self.finish(route, lease, result) {
                Ok(value) => return Ok(value),
                Err(error) if replayable => {
                    tried.after_replayable(route, endpoint, error, deadline)?;
                }
                Err(error) => return Err(tried.fail(route, endpoint, error)),
            }
        }
    }

    /// A lease on the next endpoint that can give one, passing over refusals and endpoints
    /// that fail before anything is sent.
    ///
    /// A replayable operation gives each endpoint an equal share of the time left, so that a
    /// hung endpoint costs a share rather than the whole deadline and the next one still gets
    /// its turn; an operation that runs once gets all the time left.
    async fn next_lease<'a>(
        &'a self,
        route: Route,
        deadline: tokio::time::Instant,
        replayable: bool,
        tried: &mut Tried<'a, DB>,
    ) -> Result<Lease<'a, DB>> {
        while let Some(endpoint) = tried.next_endpoint() {
            let now = tokio::time::Instant::now();
            let left = deadline.saturating_duration_since(now);
            let share = if replayable {
                left / u32::try_from(tried.remaining() + 1).unwrap_or(u32::MAX)
            } else {
                left
            };
            match self.lease(route, endpoint, now + share).await {
                Ok(lease) => return Ok(lease),
                Err((error, Next::TryAnother)) => tried.record(endpoint, error),
                Err((error, Next::Stop)) => return Err(tried.fail(route, endpoint, error)),
            }
        }
        Err(tried.exhausted(route))
    }

    fn deadline(&self, route: Route) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.routes[route.index()].timeout
    }

    /// A breaker permit and a connection on `endpoint`.
    async fn lease<'a>(
        &'a self,
        route: Route,
        endpoint: &'a Endpoint<DB>,
        deadline: tokio::time::Instant,
    ) -> Result<Lease<'a, DB>, (Error, Next)> {
        if let (Role::Replica, Some(max), Some(lag)) =
            (endpoint.role, self.max_replica_lag, endpoint.lag())
        {
            if lag > max {
                let error = Error::ReplicaLagging {
                    endpoint: endpoint.name.clone(),
                    lag,
                    max,
                };
                return Err((error, Next::TryAnother));
            }
        }
        let breaker = endpoint.breaker(route);
        // With recovery probes, trials are the probe's: a caller is never the one sent to a
        // server that may still be hung.
        let permit = if self.probes.take_trials() {
            breaker.try_acquire_untried()
        } else {
            breaker.try_acquire()
        };
        let permit = permit.map_err(|rejected| {
            endpoint.metrics(route).rejected();
            let error = Error::CircuitOpen {
                route,
                endpoint: endpoint.name.clone(),
                rejected,
            };
            (error, Next::TryAnother)
        })?;
        let outstanding = endpoint.start_call();
        let started = Instant::now();
        let budget = deadline.saturating_duration_since(tokio::time::Instant::now());
        let connection = match timeout_at(deadline, endpoint.get()).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(pool_error)) => {
                let (class, source) = match pool_error {
                    PoolError::Backend(error) => (self.classify(&error, route), error),
                    PoolError::Timeout(TimeoutType::Wait) => {
                        (ErrorClass::Resource, sqlx::Error::PoolTimedOut)
                    }
                    PoolError::Timeout(_) => (
                        ErrorClass::Timeout,
                        sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "checking a pooled connection timed out",
                        )),
                    ),
                    PoolError::Closed => return Err((Error::Closed, Next::Stop)),
                    other => (
                        ErrorClass::Unknown,
                        sqlx::Error::Protocol(format!("connection pool: {other}")),
                    ),
                };
                if class == ErrorClass::Connection {
                    endpoint.connection_lost();
                }
                endpoint.metrics(route).failure(class, None);
                permit.record(outcome_for(class, route), started.elapsed());
                let next = if class.counts_as_failure(route) {
                    Next::TryAnother
                } else {
                    Next::Stop
                };
                let error = Error::Database {
                    route,
                    endpoint: endpoint.name.clone(),
                    class,
                    outcome_unknown: false,
                    source,
                };
                return Err((error, next));
            }
            Err(_) => {
                permit.record(Outcome::Failure, started.elapsed());
                endpoint.metrics(route).failure(ErrorClass::Timeout, None);
                let error = Error::Timeout {
                    route,
                    endpoint: endpoint.name.clone(),
                    after: budget,
                    outcome_unknown: false,
                };
                // Nothing was sent: another endpoint may take the call if time is left.
                return Err((error, Next::TryAnother));
            }
        };
        Ok(Lease {
            endpoint,
            permit,
            checkout: Checkout(Some(connection)),
            started,
            deadline,
            budget,
            _outstanding: outstanding,
        })
    }

    /// Records the outcome of an operation that ran on a leased connection.
    fn finish<T>(
        &self,
        route: Route,
        mut lease: Lease<'_, DB>,
        result: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
    ) -> Result<Done<T>> {
        let elapsed = lease.started.elapsed();
        let endpoint = lease.endpoint.name.clone();
        let metrics = lease.endpoint.metrics(route);
        let error = match result {
            Ok(Ok(value)) => {
                lease.checkout.connection().busy = false;
                lease.permit.record(Outcome::Success, elapsed);
                metrics.success(elapsed);
                return Ok(Done { value, endpoint });
            }
            Ok(Err(source)) => {
                let class = self.classify(&source, route);
                let connection = lease.checkout.connection();
                connection.busy = false;
                // Never hand a dead connection out again.
                connection.broken = class == ErrorClass::Connection;
                lease.permit.record(outcome_for(class, route), elapsed);
                metrics.failure(class, Some(elapsed));
                Error::Database {
                    route,
                    endpoint,
                    class,
                    // The server answering with an error means nothing ran. A connection lost
                    // after the statement left says nothing about whether it ran.
                    outcome_unknown: matches!(class, ErrorClass::Connection | ErrorClass::Unknown),
                    source,
                }
            }
            Err(_) => {
                // Still busy: the checkout closes the connection instead of returning it.
                lease.permit.record(Outcome::Failure, elapsed);
                metrics.failure(ErrorClass::Timeout, Some(elapsed));
                Error::Timeout {
                    route,
                    endpoint,
                    after: lease.budget,
                    outcome_unknown: true,
                }
            }
        };
        Err(error)
    }

    pub(crate) fn classify(&self, error: &sqlx::Error, route: Route) -> ErrorClass {
        self.classifier
            .as_ref()
            .and_then(|classify| classify(error, route))
            .unwrap_or_else(|| DB::classify(error))
    }
}

impl<DB: Backend> Lease<'_, DB> {
    /// The raw connection, marked busy until the outcome is recorded.
    fn connection(&mut self) -> &mut DB::Connection {
        let connection = self.checkout.connection();
        connection.busy = true;
        &mut connection.raw
    }
}

/// The endpoints a call may still try, and what happened on those it tried.
struct Tried<'a, DB: Backend> {
    candidates: std::vec::IntoIter<&'a Endpoint<DB>>,
    attempts: Vec<Attempt>,
}

impl<'a, DB: Backend> Tried<'a, DB> {
    fn new(candidates: Vec<&'a Endpoint<DB>>) -> Self {
        Self {
            candidates: candidates.into_iter(),
            attempts: Vec::new(),
        }
    }

    fn next_endpoint(&mut self) -> Option<&'a Endpoint<DB>> {
        self.candidates.next()
    }

    /// Candidates not tried yet.
    fn remaining(&self) -> usize {
        self.candidates.len()
    }

    fn record(&mut self, endpoint: &Endpoint<DB>, error: Error) {
        self.attempts.push(Attempt {
            endpoint: endpoint.name.clone(),
            error,
        });
    }

    /// A replayable operation failed on `endpoint`: go on if it was an infrastructure failure
    /// and the deadline leaves time, else this is the call's error.
    fn after_replayable(
        &mut self,
        route: Route,
        endpoint: &Endpoint<DB>,
        error: Error,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        let infrastructure = error
            .class()
            .is_some_and(|class| class.counts_as_failure(route));
        if infrastructure && tokio::time::Instant::now() < deadline {
            self.record(endpoint, error);
            Ok(())
        } else {
            Err(self.fail(route, endpoint, error))
        }
    }

    /// The call's error: the endpoint's own error when it was the only one tried, else every
    /// attempt.
    fn fail(&mut self, route: Route, endpoint: &Endpoint<DB>, error: Error) -> Error {
        if self.attempts.is_empty() {
            return error;
        }
        self.record(endpoint, error);
        self.exhausted(route)
    }

    /// Every candidate was tried.
    fn exhausted(&mut self, route: Route) -> Error {
        let mut attempts = std::mem::take(&mut self.attempts);
        if attempts.len() == 1 {
            return attempts.pop().expect("one attempt").error;
        }
        Error::AllEndpointsFailed { route, attempts }
    }
}

/// What the breaker hears about an error of `class` on `route`.
pub(crate) fn outcome_for(class: ErrorClass, route: Route) -> Outcome {
    if class.counts_as_failure(route) {
        Outcome::Failure
    } else if class == ErrorClass::Query {
        // The server answered; as far as its health goes, that is a success.
        Outcome::Success
    } else {
        Outcome::Ignored
    }
}

/// A checked-out connection that goes back to the pool only in a known state: if its caller
/// was cancelled mid-statement (still busy) or it saw a connection error, it is closed at
/// once, so the pool's count drops immediately and the slot can open a fresh connection.
pub(crate) struct Checkout<DB: Backend>(pub(crate) Option<Connection<DB>>);

impl<DB: Backend> Checkout<DB> {
    pub(crate) fn connection(&mut self) -> &mut PooledConnection<DB> {
        self.0.as_mut().expect("present until dropped")
    }
}

impl<DB: Backend> Drop for Checkout<DB> {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            if connection.busy || connection.broken {
                Endpoint::discard(connection);
            }
        }
    }
}
