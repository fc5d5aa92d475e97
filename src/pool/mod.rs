//! `ProtectedPool`: the handle service code uses.

mod attempt;
mod builder;
#[cfg(feature = "route-by-sql")]
mod by_sql;
mod call;
mod connection;
mod degrade;
mod events;
mod executor;
mod failover;
mod handout;
mod keyed;
mod operation;
mod probe;
#[cfg(feature = "outbox")]
mod replay;
mod retry;
mod routed;
mod statement;
mod stream;
mod topology;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use builder::PoolBuilder;
#[cfg(feature = "route-by-sql")]
#[cfg_attr(docsrs, doc(cfg(feature = "route-by-sql")))]
pub use by_sql::BySql;
pub use connection::{ProtectedConnection, ProtectedTransaction};
pub use events::PoolStateChange;
pub use executor::OnRoute;
pub use keyed::{IdempotencyConfig, Keyed, KeyedWrite, MAX_KEY_LEN, WriteOutcome};
#[cfg(feature = "outbox")]
pub use replay::Enqueueing;
pub use retry::TransactionRetry;
pub use routed::{
    AsyncFallback, Cacheable, CallFallback, Degradable, NoFallback, NotCacheable, Routed,
};
pub use statement::RoutableQuery;
pub use stream::RowStream;
pub use topology::ClusterEvent;

use crate::backend::Backend;
use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::cache::PoolCache;
use crate::cache::lately::RecentStores;
use crate::classify::Classifier;
use crate::config::PoolConfig;
use crate::endpoint::{Endpoint, PoolStatus};
use crate::error::{Error, Result};
use crate::fallback::RouteFallbacks;
use crate::fallback::Served;
use crate::health::{EndpointHealth, EndpointRole, HealthReport, RouteHealth};
use crate::problem::{ConfigError, ConfigProblem};
use crate::role::Role;
use crate::route::{Route, RouteConfig};
use crate::router::Router;
use degrade::Plan;
use events::PoolListeners;
use failover::Replay;
use operation::{Closure, Once};

/// The database of a [`ProtectedPool`] whose type names none: [`sqlx::Postgres`] when the
/// `postgres` feature is on (it is by default), else [`sqlx::Sqlite`].
///
/// Features unify across a build: another crate that turns `postgres` on makes this
/// PostgreSQL. Code built with `sqlite` alone should name its database,
/// `ProtectedPool<Sqlite>`, so that it keeps compiling then.
#[cfg(feature = "postgres")]
// Labelled by what it needs, either database, rather than by this definition's own cfg.
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub type DefaultDatabase = sqlx::Postgres;
/// The database of a [`ProtectedPool`] whose type names none: [`sqlx::Postgres`] when the
/// `postgres` feature is on (it is by default), else [`sqlx::Sqlite`].
///
/// Features unify across a build: another crate that turns `postgres` on makes this
/// PostgreSQL. Code built with `sqlite` alone should name its database,
/// `ProtectedPool<Sqlite>`, so that it keeps compiling then.
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
pub type DefaultDatabase = sqlx::Sqlite;

/// A pool of database connections with a circuit breaker per route on each endpoint.
///
/// Cheap to clone: clones share the pool. `DB` is [`sqlx::Postgres`] or [`sqlx::Sqlite`];
/// left out, it is [`DefaultDatabase`].
///
/// ```no_run
/// # async fn demo() -> protected_pool::Result<()> {
/// use protected_pool::ProtectedPool;
///
/// let pool = ProtectedPool::builder()
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
pub struct ProtectedPool<DB: Backend = DefaultDatabase> {
    inner: Arc<PoolInner<DB>>,
}

pub(crate) struct PoolInner<DB: Backend> {
    /// This pool, for the probe tasks, which must not keep it alive.
    me: std::sync::Weak<PoolInner<DB>>,
    /// The declared primary first, then the replicas.
    endpoints: Vec<Endpoint<DB>>,
    /// Which of them is the primary now, and who hears when that changes.
    topology: Arc<topology::Topology>,
    router: Router,
    routes: [RouteConfig; 3],
    max_replica_lag: Option<Duration>,
    health_check_interval: Duration,
    /// The longest a call waits for a free connection of an endpoint.
    wait_timeout: Duration,
    /// The longest opening (or pinging) a connection may take.
    connect_timeout: Duration,
    probes: probe::Probes,
    classifier: Option<Classifier>,
    listeners: Arc<PoolListeners>,
    cache: PoolCache,
    /// The longest a cache operation may take before it counts as a miss.
    cache_timeout: Duration,
    /// What was stored in the cache lately, not to store it again.
    recent_stores: RecentStores,
    fallbacks: RouteFallbacks,
    /// The key table of keyed writes.
    keys: keyed::Keys,
    /// Where keyed writes wait while the write route cannot take them.
    #[cfg(feature = "outbox")]
    outbox: Option<Arc<crate::outbox::Outbox>>,
    /// The task that applies the outbox's writes.
    #[cfg(feature = "outbox")]
    replayer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Queries given to the pool run as unnamed statements: an endpoint is behind a
    /// transaction pooler (see `EndpointOptions::transaction_pooler`).
    unnamed_statements: bool,
    /// When the pool was built.
    started: std::time::Instant,
}

impl<DB: Backend> PoolInner<DB> {
    /// Opens every endpoint's `min_connections`, endpoints at once; one that cannot is
    /// left to the health loop.
    async fn warm_up(&self) {
        let limit = self.connect_timeout;
        let mut warming = tokio::task::JoinSet::new();
        for index in 0..self.endpoints.len() {
            let Some(pool) = self.me.upgrade() else {
                return;
            };
            warming.spawn(async move {
                let endpoint = &pool.endpoints[index];
                if let Err(error) = endpoint.top_up(limit).await {
                    tracing::warn!(
                        endpoint = &*endpoint.name,
                        %error,
                        "could not open min_connections; the health loop tries again"
                    );
                }
            });
        }
        while warming.join_next().await.is_some() {}
    }
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
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Drop for PoolInner<DB> {
    fn drop(&mut self) {
        self.probes.stop();
        #[cfg(feature = "outbox")]
        if let Some(replayer) = self
            .replayer
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            replayer.abort();
        }
        for endpoint in &self.endpoints {
            endpoint.close();
        }
    }
}

impl ProtectedPool {
    /// A builder for a pool of the [`DefaultDatabase`] (PostgreSQL, unless only the `sqlite`
    /// feature is on): `let pool = ProtectedPool::builder().primary(url).connect().await?`
    /// needs no type written out. For a given database, [`ProtectedPool::postgres`],
    /// [`ProtectedPool::sqlite`], or [`PoolBuilder::new`] in code generic over it.
    ///
    /// ```no_run
    /// # async fn demo() -> protected_pool::Result<()> {
    /// // No annotation: the builder names its database.
    /// let pool = protected_pool::ProtectedPool::builder()
    ///     .primary("postgres://app:secret@db-primary/app")
    ///     .connect()
    ///     .await?;
    /// let one: i32 = pool.read(sqlx::query_scalar("SELECT 1")).fetch_one().await?;
    /// # let _ = one; Ok(()) }
    /// ```
    pub fn builder() -> PoolBuilder<DefaultDatabase> {
        PoolBuilder::new()
    }
}

#[cfg(feature = "postgres")]
impl ProtectedPool<sqlx::Postgres> {
    /// A builder for a pool of PostgreSQL servers.
    ///
    /// ```no_run
    /// # async fn demo() -> protected_pool::Result<()> {
    /// let pool = protected_pool::ProtectedPool::postgres()
    ///     .primary("postgres://app:secret@db-primary/app")
    ///     .connect()
    ///     .await?;
    /// # let _ = pool; Ok(()) }
    /// ```
    pub fn postgres() -> PoolBuilder<sqlx::Postgres> {
        PoolBuilder::new()
    }
}

#[cfg(feature = "sqlite")]
impl ProtectedPool<sqlx::Sqlite> {
    /// A builder for a pool on a SQLite database.
    ///
    /// ```
    /// # async fn demo() -> protected_pool::Result<()> {
    /// let pool = protected_pool::ProtectedPool::sqlite()
    ///     .primary("sqlite::memory:")
    ///     .connect()
    ///     .await?;
    /// let two: i64 = pool.read(sqlx::query_scalar("SELECT 1 + 1")).fetch_one().await?;
    /// assert_eq!(two, 2);
    /// # Ok(()) }
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(demo()).unwrap();
    /// ```
    pub fn sqlite() -> PoolBuilder<sqlx::Sqlite> {
        PoolBuilder::new()
    }
}

impl<DB: Backend> ProtectedPool<DB> {
    /// A read query: `pool.read(sqlx::query_as(..).bind(..)).fetch_one().await`.
    pub fn read<Q>(&self, query: Q) -> Routed<'_, DB, Q> {
        Routed::new(self, Route::Read, query)
    }

    /// A write statement, on the primary, never replayed, never cached.
    pub fn write<Q>(&self, query: Q) -> Routed<'_, DB, Q, NotCacheable> {
        Routed::new(self, Route::Write, query)
    }

    /// A pool as `config` says, built without connecting (see [`PoolBuilder::build`]); for
    /// listeners, fallbacks or a custom cache, use [`PoolBuilder::from_config`].
    pub fn from_config(config: &PoolConfig) -> Result<Self> {
        PoolBuilder::from_config(config).build()
    }

    /// A query of the auth route (logins, session checks).
    pub fn auth<Q>(&self, query: Q) -> Routed<'_, DB, Q> {
        Routed::new(self, Route::Auth, query)
    }

    /// A query whose route is read from its SQL (feature `route-by-sql`): the read route when
    /// the statement is provably read-only, else the write route; SQL that does not parse is
    /// a write, never an error. [`route_by_sql`](crate::route_by_sql) states the rule, and
    /// [`Route::of_sql`] gives the route a statement would take. Either way the call is
    /// never cached (a read that wants the cache says so with [`read`](Self::read)); a read
    /// is replayed on the next endpoint like any other. The SQL is parsed on every call, which
    /// `read` and `write` do not do: a hot path that knows its route can say it.
    ///
    /// Takes [`sqlx::query()`], [`sqlx::query_as()`], [`sqlx::query_scalar()`] and their
    /// `_with` forms; the compile-time checked macros (`query!`) say their route with
    /// [`read`](Self::read) or [`write`](Self::write).
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// // A replica may answer this one...
    /// let users: i64 = pool.query(sqlx::query_scalar("SELECT count(*) FROM users")).fetch_one().await?;
    /// // ...the primary takes these.
    /// pool.query(sqlx::query("INSERT INTO users (name) VALUES ($1)").bind("ada")).execute().await?;
    /// let job: Option<i64> = pool
    ///     .query(sqlx::query_scalar("SELECT id FROM jobs LIMIT 1 FOR UPDATE SKIP LOCKED"))
    ///     .fetch_optional()
    ///     .await?;
    /// # let _ = (users, job); Ok(()) }
    /// ```
    #[cfg(feature = "route-by-sql")]
    #[cfg_attr(docsrs, doc(cfg(feature = "route-by-sql")))]
    pub fn query<Q: RoutableQuery<DB>>(
        &self,
        query: Q,
    ) -> Routed<'_, DB, BySql<DB, Q>, NotCacheable> {
        let (route, query) = BySql::route(query);
        Routed::new(self, route, query)
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
    ///
    /// The operation runs at most once: if an endpoint cannot hand out a connection the call
    /// moves to the next one, but once the operation has started it is not repeated. For a read
    /// that may be repeated on another endpoint, use [`read_with`](Self::read_with).
    pub async fn with_connection<T: 'static, F>(&self, route: Route, operation: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut DB::Connection) -> Result<T, sqlx::Error>,
    {
        let inner = &self.inner;
        let call = inner.failover(route, Replay::Never, Once::new(operation));
        let served = inner.degrade(Plan::bare(route), call);
        served.await.map(Served::into_inner)
    }

    /// Runs a read that is safe to repeat: if it fails with an infrastructure error (a lost
    /// connection, a timeout) it runs again on the next endpoint, within the read route's
    /// timeout. It must not write.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// let total: i64 = pool
    ///     .read_with(async |conn| {
    ///         sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&mut *conn).await
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn read_with<T: 'static, F>(&self, operation: F) -> Result<T>
    where
        F: AsyncFn(&mut DB::Connection) -> Result<T, sqlx::Error>,
    {
        let inner = &self.inner;
        let call = inner.failover(Route::Read, Replay::Read, Closure(operation));
        let served = inner.degrade(Plan::bare(Route::Read), call);
        served.await.map(Served::into_inner)
    }

    /// Runs `operation` in a transaction on the write route: committed if it returns `Ok`,
    /// rolled back if it returns `Err`. A commit whose answer is lost reports an unknown
    /// outcome and is not retried.
    pub async fn transaction<T: 'static, F>(&self, operation: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut sqlx::Transaction<'_, DB>) -> Result<T, sqlx::Error>,
    {
        let inner = &self.inner;
        let call = inner.failover(
            Route::Write,
            Replay::Never,
            Once::new(async move |connection: &mut DB::Connection| {
                let mut transaction = sqlx::Connection::begin(connection).await?;
                let value = operation(&mut transaction).await?;
                transaction.commit().await?;
                Ok(value)
            }),
        );
        let served = inner.degrade(Plan::bare(Route::Write), call);
        served.await.map(Served::into_inner)
    }

    /// Calls `listener` on every state change of every breaker of the pool. A listener may
    /// add listeners from its callback; one that panics does not keep the others from
    /// hearing the change.
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

    /// Changes the thresholds of `route`'s breaker on every endpoint while the pool runs,
    /// keeping each breaker's state and measurements (see
    /// [`CircuitBreaker::update_config`]). Nothing changes unless the new config is valid for
    /// all of them.
    pub fn update_breaker(&self, route: Route, config: BreakerConfig) -> Result<()> {
        let in_route = |error: ConfigError| {
            ConfigError::new(
                error
                    .problems
                    .into_iter()
                    .map(|problem| {
                        ConfigProblem::new(
                            format!("breakers.{route}.{}", problem.path),
                            problem.message,
                        )
                    })
                    .collect(),
            )
        };
        // All breakers of a route share one config and one window shape: the first one's
        // answer is every one's, so none changes unless all can.
        for endpoint in &self.inner.endpoints {
            endpoint
                .breaker(route)
                .update_config(config.clone())
                .map_err(in_route)?;
        }
        Ok(())
    }

    /// Names and roles of the endpoints, the declared primary first: each role as its
    /// server last reported it, or as declared while it is not known.
    pub fn endpoints(&self) -> Vec<(Arc<str>, Role)> {
        self.inner
            .endpoints
            .iter()
            .map(|endpoint| (endpoint.name.clone(), endpoint.likely_role()))
            .collect()
    }

    /// The named endpoint's role as its server last reported it; `None` before its first
    /// connection or while it cannot be reached.
    pub fn role(&self, endpoint: &str) -> Result<Option<Role>> {
        Ok(self.endpoint(endpoint)?.role())
    }

    /// Calls `listener` on every change in what the pool knows of its cluster (see
    /// [`PoolBuilder::on_cluster_event`]).
    pub fn on_cluster_event(&self, listener: impl Fn(&ClusterEvent) + Send + Sync + 'static) {
        self.inner.topology.add_listener(Arc::new(listener));
    }

    /// The named replica's replication lag as last measured by the health probe (`None`
    /// before the first measurement, after a failed one, and for the primary).
    pub fn replica_lag(&self, endpoint: &str) -> Result<Option<Duration>> {
        Ok(self.endpoint(endpoint)?.lag())
    }

    /// Connection counts of the named endpoint's pool.
    pub fn status(&self, endpoint: &str) -> Result<PoolStatus> {
        Ok(self.endpoint(endpoint)?.status())
    }

    /// Closes every endpoint's pool and stops the recovery probes: waiting and later calls
    /// fail with [`Error::Closed`].
    pub fn close(&self) {
        self.inner.probes.stop();
        for endpoint in &self.inner.endpoints {
            endpoint.close();
        }
    }

    /// Every breaker's and endpoint's state, with an overall verdict, for a `/health`
    /// endpoint or a dashboard. Holds no URL and no credential.
    pub fn health(&self) -> HealthReport {
        let endpoints = self.inner.endpoints.iter().map(|endpoint| {
            let replica_lag = endpoint.lag();
            let lagging = endpoint.likely_role() == Role::Replica
                && matches!(
                    (replica_lag, self.inner.max_replica_lag),
                    (Some(lag), Some(max)) if lag > max
                );
            endpoint.publish_status();
            let breakers = endpoint
                .breakers()
                .map(|(route, breaker)| RouteHealth::new(route, breaker.snapshot()))
                .collect();
            EndpointHealth::new(
                endpoint.name.clone(),
                EndpointRole {
                    declared: endpoint.hint,
                    discovered: endpoint.role(),
                    changed_at: endpoint.roles().changed_at(),
                },
                endpoint.status(),
                replica_lag,
                lagging,
                breakers,
            )
        });
        let inner = &self.inner;
        HealthReport::new(
            inner.started.elapsed(),
            inner.cache.kind(),
            endpoints.collect(),
            inner.topology.split_brain(),
            #[cfg(feature = "outbox")]
            inner.outbox.as_ref().map(|outbox| outbox.health()),
        )
    }

    fn endpoint(&self, name: &str) -> Result<&Endpoint<DB>> {
        self.inner
            .endpoints
            .iter()
            .find(|endpoint| &*endpoint.name == name)
            .ok_or_else(|| Error::UnknownEndpoint(name.to_owned()))
    }
}

const _: () = {
    const fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    #[cfg(feature = "postgres")]
    assert_send_sync_clone::<ProtectedPool<sqlx::Postgres>>();
    #[cfg(feature = "sqlite")]
    assert_send_sync_clone::<ProtectedPool<sqlx::Sqlite>>();
};
