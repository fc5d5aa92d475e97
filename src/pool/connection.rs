//! Connections and transactions handed to the caller: for sqlx code that needs a connection
//! of its own (`sqlx::migrate!().run(..)`, several statements, a transaction held across
//! calls). Getting one is a protected call of its route (breaker, failover, deadline); what
//! the caller then runs on it is the caller's.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx_core::transaction::TransactionManager;
use tokio::time::timeout_at;

use super::ProtectedPool;
use super::attempt::Failed;
use super::failover::Replay;
use super::handout::{Taken, Use};
use crate::backend::Backend;
use crate::classify::ErrorClass;
use crate::endpoint::Checkout;
use crate::error::{Error, Result};
use crate::route::Route;

type Manager<DB> = <DB as sqlx::Database>::TransactionManager;

/// A connection of one endpoint, held by the caller until dropped; it dereferences to the
/// driver's connection (`&mut *conn` is a sqlx executor). See [`ProtectedPool::acquire`].
///
/// What runs on it is the caller's: the pool does not see its errors, so it does not judge
/// them or tell the breaker; it checks the connection (a ping) before handing it out again,
/// and closes it if it no longer answers. Dropped inside a transaction, the transaction is
/// rolled back before the connection is used again.
pub struct ProtectedConnection<DB: Backend> {
    checkout: Checkout<DB>,
    endpoint: Arc<str>,
    route: Route,
}

impl<DB: Backend> ProtectedConnection<DB> {
    /// The endpoint the connection belongs to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The route it was acquired on.
    pub fn route(&self) -> Route {
        self.route
    }
}

impl<DB: Backend> fmt::Debug for ProtectedConnection<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectedConnection")
            .field("endpoint", &self.endpoint)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Deref for ProtectedConnection<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        self.checkout.raw()
    }
}

impl<DB: Backend> DerefMut for ProtectedConnection<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.checkout.raw_mut()
    }
}

impl<DB: Backend> Drop for ProtectedConnection<DB> {
    fn drop(&mut self) {
        let raw = self.checkout.raw_mut();
        if Manager::<DB>::get_transaction_depth(raw) > 0 {
            // Sent before the connection's next statement, whoever gets it.
            Manager::<DB>::start_rollback(raw);
        }
    }
}

/// A transaction on the write route, held by the caller: `&mut *tx` is a sqlx executor,
/// [`commit`](Self::commit) ends it. Dropped without a commit, it is rolled back. See
/// [`ProtectedPool::begin`].
#[must_use = "a transaction is rolled back unless committed"]
pub struct ProtectedTransaction<DB: Backend> {
    connection: ProtectedConnection<DB>,
}

impl<DB: Backend> fmt::Debug for ProtectedTransaction<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectedTransaction")
            .field("endpoint", &self.connection.endpoint)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Deref for ProtectedTransaction<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.connection
    }
}

impl<DB: Backend> DerefMut for ProtectedTransaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.connection
    }
}

impl<DB: Backend> ProtectedTransaction<DB> {
    /// Commits. A commit whose answer is lost reports an unknown outcome
    /// ([`Error::is_outcome_unknown`]); it is never retried.
    pub async fn commit(mut self) -> Result<()> {
        let result = Manager::<DB>::commit(&mut self.connection).await;
        self.end(result)
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<()> {
        let result = Manager::<DB>::rollback(&mut self.connection).await;
        self.end(result)
    }

    fn end(&mut self, result: Result<(), sqlx::Error>) -> Result<()> {
        let connection = &mut self.connection;
        result.map_err(|source| {
            connection.checkout.idle(Some(&source));
            let broken = connection.checkout.is_broken();
            Error::Database {
                route: connection.route,
                endpoint: connection.endpoint.clone(),
                class: if broken {
                    ErrorClass::Connection
                } else {
                    DB::classify(&source)
                },
                outcome_unknown: broken,
                source,
            }
        })
    }
}

impl<DB: Backend> ProtectedPool<DB> {
    /// A connection of `route`, held until dropped: for sqlx code that needs one of its own
    /// (several statements on one session, `sqlx::migrate!().run(..)`, which takes
    /// `&pool` directly). Getting it goes through the route's breakers and endpoints like
    /// any call; what runs on it afterwards is not replayed, measured or timed by the pool.
    ///
    /// Behind a transaction-mode pooler (`EndpointOptions::transaction_pooler`) a held
    /// connection is a server connection only inside a transaction: use
    /// [`begin`](Self::begin) there, with `.persistent(false)` statements.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> Result<(), sqlx::Error> {
    /// use protected_pool::Route;
    ///
    /// let mut conn = pool.acquire(Route::Write).await?;
    /// sqlx::query("SELECT pg_advisory_lock(42)").execute(&mut *conn).await?;
    /// sqlx::query("SELECT pg_advisory_unlock(42)").execute(&mut *conn).await?;
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self, route: Route) -> Result<ProtectedConnection<DB>> {
        let replay = if route == Route::Read {
            Replay::Read
        } else {
            Replay::Never
        };
        self.inner.hand_out(route, replay, Acquire { route }).await
    }

    /// Begins a transaction on the write route (the primary), held by the caller, as sqlx's
    /// `pool.begin()` does: `&mut *tx` is an executor, `tx.commit()` ends it, dropping it
    /// rolls it back. `BEGIN` goes through the breakers and endpoints like any call; for a
    /// transaction the pool retries on serialization failures, see
    /// [`transaction`](Self::transaction).
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> Result<(), sqlx::Error> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// sqlx::query("UPDATE accounts SET balance = balance + 10 WHERE id = 2")
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin(&self) -> Result<ProtectedTransaction<DB>> {
        self.inner
            .hand_out(Route::Write, Replay::Never, Begin)
            .await
    }
}

/// A connection handed to the caller as it is.
struct Acquire {
    route: Route,
}

impl<DB: Backend> Use<DB> for Acquire {
    type Output = ProtectedConnection<DB>;

    async fn take<'a>(
        &'a mut self,
        taken: Taken<'a, DB>,
    ) -> Result<ProtectedConnection<DB>, Failed> {
        let endpoint = taken.verdict.succeeded();
        let mut checkout = taken.checkout;
        checkout.hand_to_caller();
        Ok(ProtectedConnection {
            checkout,
            endpoint,
            route: self.route,
        })
    }
}

/// A connection handed to the caller in a transaction: `BEGIN` is the first step.
struct Begin;

impl<DB: Backend> Use<DB> for Begin {
    type Output = ProtectedTransaction<DB>;

    async fn take<'a>(
        &'a mut self,
        taken: Taken<'a, DB>,
    ) -> Result<ProtectedTransaction<DB>, Failed> {
        let Taken {
            mut checkout,
            verdict,
            deadline,
        } = taken;
        let begun = timeout_at(deadline, Manager::<DB>::begin(checkout.busy(), None)).await;
        match begun {
            Ok(Ok(())) => {
                checkout.idle(None);
                checkout.hand_to_caller();
                let endpoint = verdict.succeeded();
                Ok(ProtectedTransaction {
                    connection: ProtectedConnection {
                        checkout,
                        endpoint,
                        route: Route::Write,
                    },
                })
            }
            Ok(Err(source)) => Err(verdict.failed(&mut checkout, source)),
            Err(_) => Err(verdict.timed_out()),
        }
    }
}
