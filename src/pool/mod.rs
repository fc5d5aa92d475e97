//! `ProtectedPool`: the handle service code uses.

mod builder;
mod call;
mod events;
mod query;

use std::fmt;
use std::sync::Arc;

use sqlx::Postgres;

pub use builder::PoolBuilder;
pub use events::PoolStateChange;
pub use query::{RoutableQuery, Routed};

use crate::backend::Backend;
use crate::breaker::CircuitBreaker;
use crate::classify::Classifier;
use crate::endpoint::{Endpoint, PoolStatus, Role};
use crate::error::{Error, Result};
use crate::route::{Route, RouteConfig};
use events::PoolListeners;

/// A pool of database connections with a circuit breaker per route on each endpoint.
///
/// Cheap to clone: clones share the pool. `DB` is [`sqlx::Postgres`] (the default) or
/// [`sqlx::Sqlite`].
///
/// ```no_run
/// # async fn demo() -> protected_pool::Result<()> {
/// use protected_pool::ProtectedPool;
///
/// let pool: ProtectedPool = ProtectedPool::builder()
///     .primary("postgres://app:secret@db-primary/app")
///     .connect()
///     .await?;
/// let name: String = pool
///     .read(sqlx::query_scalar("SELECT name FROM users WHERE id = $1").bind(42_i64))
///     .fetch_one()
///     .await?;
/// pool.write(sqlx::query("UPDATE users SET name = $1 WHERE id = $2").bind("Ada").bind(42_i64))
///     .execute()
///     .await?;
/// # Ok(()) }
/// ```
pub struct ProtectedPool<DB: Backend = Postgres> {
    inner: Arc<PoolInner<DB>>,
}

pub(crate) struct PoolInner<DB: Backend> {
    primary: Endpoint<DB>,
    routes: [RouteConfig; 3],
    classifier: Option<Classifier>,
    listeners: Arc<PoolListeners>,
}

impl<DB: Backend> Clone for ProtectedPool<DB> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<DB: Backend> fmt::Debug for ProtectedPool<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectedPool")
            .field("primary", &self.inner.primary)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Drop for PoolInner<DB> {
    fn drop(&mut self) {
        self.primary.close();
    }
}

impl<DB: Backend> ProtectedPool<DB> {
    /// A builder; name the database with the type, e.g. `ProtectedPool::<Sqlite>::builder()`,
    /// or let the binding's type say it.
    pub fn builder() -> PoolBuilder<DB> {
        PoolBuilder::new()
    }

    /// A read query: `pool.read(sqlx::query_as(..).bind(..)).fetch_one().await`.
    pub fn read<Q>(&self, query: Q) -> Routed<'_, DB, Q> {
        Routed::new(self, Route::Read, query)
    }

    /// A write statement, on the primary, never replayed.
    pub fn write<Q>(&self, query: Q) -> Routed<'_, DB, Q> {
        Routed::new(self, Route::Write, query)
    }

    /// A query of the auth route (logins, session checks).
    pub fn auth<Q>(&self, query: Q) -> Routed<'_, DB, Q> {
        Routed::new(self, Route::Auth, query)
    }

    /// Runs any sqlx code on one connection, on `route`.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use protected_pool::Route;
    ///
    /// let (users, orders): (i64, i64) = pool
    ///     .with_connection(Route::Read, async |conn| {
    ///         let users = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&mut *conn).await?;
    ///         let orders = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut *conn).await?;
    ///         Ok((users, orders))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_connection<T, F>(&self, route: Route, operation: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut DB::Connection) -> Result<T, sqlx::Error>,
    {
        self.inner.run(route, operation).await
    }

    /// Runs `operation` in a transaction on the write route: committed if it returns `Ok`,
    /// rolled back if it returns `Err`. A commit whose answer is lost reports an unknown
    /// outcome and is not retried.
    pub async fn transaction<T, F>(&self, operation: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut sqlx::Transaction<'_, DB>) -> Result<T, sqlx::Error>,
    {
        self.inner
            .run(
                Route::Write,
                async move |connection: &mut DB::Connection| {
                    let mut transaction = sqlx::Connection::begin(connection).await?;
                    let value = operation(&mut transaction).await?;
                    transaction.commit().await?;
                    Ok(value)
                },
            )
            .await
    }

    /// Calls `listener` on every state change of every breaker of the pool.
    pub fn on_state_change(&self, listener: impl Fn(&PoolStateChange) + Send + Sync + 'static) {
        self.inner.listeners.add(Arc::new(listener));
    }

    /// The breaker of `route` on the named endpoint, for inspection and manual control.
    pub fn breaker(&self, route: Route, endpoint: &str) -> Result<&CircuitBreaker> {
        Ok(self.endpoint(endpoint)?.breaker(route))
    }

    /// Closes the breaker of `route` on `endpoint` and clears its measurements.
    pub fn reset(&self, route: Route, endpoint: &str) -> Result<()> {
        self.breaker(route, endpoint)?.reset();
        Ok(())
    }

    /// Forces the breaker of `route` on `endpoint` open until reset (isolates the endpoint).
    pub fn force_open(&self, route: Route, endpoint: &str) -> Result<()> {
        self.breaker(route, endpoint)?.force_open();
        Ok(())
    }

    /// Lets every call of `route` through to `endpoint` until reset, still measuring.
    pub fn disable(&self, route: Route, endpoint: &str) -> Result<()> {
        self.breaker(route, endpoint)?.disable();
        Ok(())
    }

    /// Names and roles of the endpoints.
    pub fn endpoints(&self) -> Vec<(Arc<str>, Role)> {
        vec![(self.inner.primary.name.clone(), self.inner.primary.role)]
    }

    /// Connection counts of the named endpoint's pool.
    pub fn status(&self, endpoint: &str) -> Result<PoolStatus> {
        Ok(self.endpoint(endpoint)?.status())
    }

    /// Closes every endpoint's pool: waiting and later calls fail with [`Error::Closed`].
    pub fn close(&self) {
        self.inner.primary.close();
    }

    fn endpoint(&self, name: &str) -> Result<&Endpoint<DB>> {
        let primary = &self.inner.primary;
        if &*primary.name == name {
            Ok(primary)
        } else {
            Err(Error::UnknownEndpoint(name.to_owned()))
        }
    }
}

const _: () = {
    const fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<ProtectedPool<sqlx::Postgres>>();
    assert_send_sync_clone::<ProtectedPool<sqlx::Sqlite>>();
};
