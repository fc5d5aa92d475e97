//! One protected call: breaker permit, connection, statement under the route's timeout,
//! classification, outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use deadpool::managed::{PoolError, TimeoutType};

use super::PoolInner;
use crate::backend::Backend;
use crate::breaker::Outcome;
use crate::classify::ErrorClass;
use crate::endpoint::{Connection, Endpoint};
use crate::error::{Error, Result};
use crate::route::Route;

impl<DB: Backend> PoolInner<DB> {
    /// Runs `operation` on a connection of the primary, on `route`.
    ///
    /// Cancel-safe: if the returned future is dropped, the breaker permit is released without
    /// an outcome and a connection caught mid-statement is closed rather than reused.
    pub(crate) async fn run<T, F>(&self, route: Route, operation: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut DB::Connection) -> Result<T, sqlx::Error>,
    {
        let endpoint = &self.primary;
        let permit =
            endpoint
                .breaker(route)
                .try_acquire()
                .map_err(|rejected| Error::CircuitOpen {
                    route,
                    endpoint: endpoint.name.clone(),
                    rejected,
                })?;
        let timeout = self.routes[route.index()].timeout;
        let started = Instant::now();
        // Set once a connection is in hand: from then on the statement may reach the server.
        let sent = AtomicBool::new(false);
        let attempt = async {
            let mut checkout = Checkout(Some(endpoint.get().await?));
            let connection = checkout.connection();
            sent.store(true, Ordering::Relaxed);
            connection.busy = true;
            let result = operation(&mut connection.raw).await;
            connection.busy = false;
            Ok::<_, PoolError<sqlx::Error>>((checkout, result))
        };
        let finished = tokio::time::timeout(timeout, attempt).await;
        let elapsed = started.elapsed();
        let sent = sent.load(Ordering::Relaxed);

        let (class, source) = match finished {
            Err(_) => {
                permit.record(Outcome::Failure, elapsed);
                return Err(Error::Timeout {
                    route,
                    endpoint: endpoint.name.clone(),
                    after: timeout,
                    outcome_unknown: sent,
                });
            }
            Ok(Ok((_, Ok(value)))) => {
                permit.record(Outcome::Success, elapsed);
                return Ok(value);
            }
            Ok(Ok((mut checkout, Err(error)))) => {
                let class = self.classify(&error, route);
                // Never hand a dead connection out again.
                checkout.connection().broken = class == ErrorClass::Connection;
                (class, error)
            }
            Ok(Err(pool_error)) => match pool_error {
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
                PoolError::Closed => return Err(Error::Closed),
                other => (
                    ErrorClass::Unknown,
                    sqlx::Error::Protocol(format!("connection pool: {other}")),
                ),
            },
        };
        permit.record(outcome_for(class, route), elapsed);
        Err(Error::Database {
            route,
            endpoint: endpoint.name.clone(),
            class,
            // The server answered with an error: nothing ran. A lost connection after the
            // statement left says nothing about whether it ran.
            outcome_unknown: sent && matches!(class, ErrorClass::Connection | ErrorClass::Unknown),
            source,
        })
    }

    fn classify(&self, error: &sqlx::Error, route: Route) -> ErrorClass {
        self.classifier
            .as_ref()
            .and_then(|classify| classify(error, route))
            .unwrap_or_else(|| DB::classify(error))
    }
}

/// What the breaker hears about an error of `class` on `route`.
fn outcome_for(class: ErrorClass, route: Route) -> Outcome {
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
struct Checkout<DB: Backend>(Option<Connection<DB>>);

impl<DB: Backend> Checkout<DB> {
    fn connection(&mut self) -> &mut crate::endpoint::PooledConnection<DB> {
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
