//! Building a `ProtectedPool`: the setters live here; reading a config file, validation, URL
//! parsing and the wiring of breakers to listeners and metrics each have a file.

mod from_config;
mod url;
mod validate;
mod wiring;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::events::{PoolListener, PoolListeners, PoolStateChange};
use super::keyed::{IdempotencyConfig, Keys};
use super::probe::Probes;
use super::topology::{ClusterEvent, ClusterListener, Topology};
use super::{PoolInner, ProtectedPool};
use crate::backend::Backend;
use crate::breaker::BreakerConfig;
use crate::cache::lately::RecentStores;
use crate::cache::{Cache, MemoryCache, PoolCache};
use crate::classify::{Classifier, ErrorClass};
use crate::config::PoolConfig;
use crate::endpoint::{
    AfterConnect, AfterConnectFuture, AfterConnectHook, ConnectionManager, Endpoint,
    EndpointOptions,
};
use crate::error::Result;
use crate::fallback::{FallbackContext, FallbackRequest, RouteFallbacks, box_async};
use crate::problem::ConfigProblem;
use crate::role::Role;
use crate::route::{Route, RouteConfig};
use crate::router::{ReadPreference, ReplicaSelection, Router};

type ConnectOptionsOf<DB> = <<DB as sqlx::Database>::Connection as Connection>::Options;

enum Target<DB: Backend> {
    Url(String),
    Options(Box<ConnectOptionsOf<DB>>),
    /// The configuration did not say where (a problem already recorded).
    Unresolved,
}

struct EndpointSpec<DB: Backend> {
    name: String,
    target: Target<DB>,
    /// Its own pool settings (a config file's endpoint `pool` table), replacing the pool's.
    options: Option<EndpointOptions>,
}

/// Builds a [`ProtectedPool`]. Every problem in the configuration is reported at once by
/// [`build`](Self::build) or [`connect`](Self::connect).
#[must_use]
pub struct PoolBuilder<DB: Backend> {
    primary: Option<EndpointSpec<DB>>,
    replicas: Vec<EndpointSpec<DB>>,
    options: EndpointOptions,
    /// Settings of one endpoint each, by name, replacing `options` for it.
    options_for: Vec<(String, EndpointOptions)>,
    after_connect: Option<AfterConnectHook<DB>>,
    routes: [RouteConfig; 3],
    read_preference: ReadPreference,
    replica_selection: ReplicaSelection,
    max_replica_lag: Option<Duration>,
    health_check_interval: Duration,
    probes: bool,
    classifier: Option<Classifier>,
    listeners: Vec<PoolListener>,
    cluster_listeners: Vec<ClusterListener>,
    cache: Option<Arc<dyn Cache>>,
    /// About how many values `cache` holds, when it is a [`MemoryCache`].
    cache_entries: Option<u64>,
    cache_timeout: Duration,
    fallbacks: RouteFallbacks,
    pub(super) idempotency: IdempotencyConfig,
    #[cfg(feature = "outbox")]
    pub(super) outbox: Option<crate::outbox::OutboxConfig>,
    /// Problems found while reading a [`PoolConfig`], reported with the rest by `build`.
    problems: Vec<ConfigProblem>,
    _database: PhantomData<DB>,
}

impl<DB: Backend> fmt::Debug for PoolBuilder<DB> {
    // Without the URLs: they may hold passwords.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("primary", &self.primary.as_ref().map(|spec| &spec.name))
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|spec| &spec.name)
                    .collect::<Vec<_>>(),
            )
            .field("options", &self.options)
            .field("options_for", &self.options_for)
            .field("after_connect", &self.after_connect.is_some())
            .field("routes", &self.routes)
            .field("cache", &self.cache)
            .field("fallbacks", &self.fallbacks)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Default for PoolBuilder<DB> {
    fn default() -> Self {
        Self::new()
    }
}

impl<DB: Backend> PoolBuilder<DB> {
    /// A builder for a pool of `DB`, for code generic over the database (otherwise
    /// [`ProtectedPool::builder`], [`ProtectedPool::postgres`] or [`ProtectedPool::sqlite`]).
    pub fn new() -> Self {
        Self {
            primary: None,
            replicas: Vec::new(),
            options: EndpointOptions::default(),
            options_for: Vec::new(),
            after_connect: None,
            routes: Route::ALL.map(RouteConfig::for_route),
            read_preference: ReadPreference::default(),
            replica_selection: ReplicaSelection::default(),
            max_replica_lag: Some(Duration::from_secs(10)),
            health_check_interval: Duration::from_secs(1),
            probes: true,
            classifier: None,
            listeners: Vec::new(),
            cluster_listeners: Vec::new(),
            cache: None,
            cache_entries: None,
            cache_timeout: Duration::from_millis(250),
            fallbacks: RouteFallbacks::default(),
            idempotency: IdempotencyConfig::default(),
            #[cfg(feature = "outbox")]
            outbox: None,
            problems: Vec::new(),
            _database: PhantomData,
        }
    }

    /// A builder set up as `config` says. Add what only code can give (listeners, a
    /// classifier, fallbacks, a custom cache) and [`build`](Self::build): that reports every
    /// problem of the configuration, those found here (an unset environment variable, ...)
    /// included.
    pub fn from_config(config: &PoolConfig) -> Self {
        Self::configured(config, true)
    }

    /// The primary endpoint, named `primary`, by URL (`postgres://..`, `sqlite://..`).
    ///
    /// A URL naming several hosts, the way libpq takes them
    /// (`postgres://app@h1:5432,h2:5432/app?target_session_attrs=read-write`), is a whole
    /// cluster: see [`cluster`](Self::cluster).
    pub fn primary(self, url: impl Into<String>) -> Self {
        self.primary_named("primary", url)
    }

    /// The primary endpoint under a name of your choosing (shown in errors, reports, metrics).
    /// Which endpoint is the primary is read from the servers while the pool runs: this is
    /// where writes go until they say otherwise.
    pub fn primary_named(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        let url = url.into();
        if url::split_hosts(&url).is_some() {
            return self.cluster(url);
        }
        self.primary = Some(EndpointSpec {
            name: name.into(),
            target: Target::Url(url),
            options: None,
        });
        self
    }

    /// Every server of a cluster from one libpq-style URL with a host list
    /// (`postgres://app:pw@h1:5432,h2:5432,h3/app?target_session_attrs=read-write`): one
    /// endpoint per host, named `host:port`, the first declared primary and the others
    /// replicas. The declaration is a hint: each server says what it is, and writes go to the
    /// one that says it is the primary. `target_session_attrs=read-only`, `standby` or
    /// `prefer-standby` make reads prefer replicas; `any`, `read-write` and `primary` change
    /// nothing (writes always go to the primary).
    ///
    /// ```
    /// use protected_pool::{ProtectedPool, Role};
    ///
    /// # let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// # let _guard = runtime.enter();
    /// let pool = ProtectedPool::builder()
    ///     .cluster("postgres://app:secret@db-a:5432,db-b:5432/app?target_session_attrs=read-write")
    ///     .build()
    ///     .unwrap();
    /// let endpoints = pool.endpoints();
    /// assert_eq!(&*endpoints[0].0, "db-a:5432");
    /// assert_eq!(endpoints[1], ("db-b:5432".into(), Role::Replica));
    /// ```
    pub fn cluster(self, url: impl Into<String>) -> Self {
        self.cluster_at("cluster", url.into())
    }

    /// [`cluster`](Self::cluster), its problems reported at `path`.
    pub(crate) fn cluster_at(mut self, path: &str, url: String) -> Self {
        let cluster = match url::split_hosts(&url) {
            Some(Ok(cluster)) => cluster,
            Some(Err(problem)) => {
                self.problems.push(ConfigProblem::new(path, problem));
                return self;
            }
            // One host: a cluster of one.
            None => return self.primary_named("primary", url),
        };
        if cluster.prefer_standby {
            self.read_preference = ReadPreference::PreferReplica;
        }
        let mut hosts = cluster.hosts.into_iter();
        if let Some(first) = hosts.next() {
            self.primary = Some(EndpointSpec {
                name: first.name,
                target: Target::Url(first.url),
                options: None,
            });
        }
        for host in hosts {
            self.replicas.push(EndpointSpec {
                name: host.name,
                target: Target::Url(host.url),
                options: None,
            });
        }
        self
    }

    /// The primary endpoint from sqlx connect options (`PgConnectOptions`,
    /// `SqliteConnectOptions`).
    pub fn primary_with(mut self, name: impl Into<String>, options: ConnectOptionsOf<DB>) -> Self {
        self.primary = Some(EndpointSpec {
            name: name.into(),
            target: Target::Options(Box::new(options)),
            options: None,
        });
        self
    }

    /// A read replica, named `replica-N` (N counting from 1 in the order added).
    pub fn replica(self, url: impl Into<String>) -> Self {
        let name = format!("replica-{}", self.replicas.len() + 1);
        self.replica_named(name, url)
    }

    /// A read replica under a name of your choosing.
    pub fn replica_named(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.replicas.push(EndpointSpec {
            name: name.into(),
            target: Target::Url(url.into()),
            options: None,
        });
        self
    }

    /// A read replica from sqlx connect options.
    pub fn replica_with(mut self, name: impl Into<String>, options: ConnectOptionsOf<DB>) -> Self {
        self.replicas.push(EndpointSpec {
            name: name.into(),
            target: Target::Options(Box::new(options)),
            options: None,
        });
        self
    }

    /// Where reads go (default: the primary, replicas as fallback).
    pub fn read_preference(mut self, preference: ReadPreference) -> Self {
        self.read_preference = preference;
        self
    }

    /// How reads choose among replicas (default: fewest calls in flight).
    pub fn replica_selection(mut self, selection: ReplicaSelection) -> Self {
        self.replica_selection = selection;
        self
    }

    /// Replicas lagging more than this behind the primary are skipped (default 10 s; `None`
    /// never skips for lag).
    pub fn max_replica_lag(mut self, max: Option<Duration>) -> Self {
        self.max_replica_lag = max;
        self
    }

    /// How often replica lag is measured, and the longest a recovery probe task sleeps
    /// (default 1 s).
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }

    /// Whether background probes close recovered breakers and measure replica lag (default
    /// on). Without them a breaker waits for a user call to try it.
    pub fn recovery_probes(mut self, enabled: bool) -> Self {
        self.probes = enabled;
        self
    }

    /// Connection pool settings of every endpoint (but those given their own with
    /// [`endpoint_options_for`](Self::endpoint_options_for)).
    pub fn endpoint_options(mut self, options: EndpointOptions) -> Self {
        self.options = options;
        self
    }

    /// Connection pool settings of the endpoint named `name`, replacing those of
    /// [`endpoint_options`](Self::endpoint_options) for it: a replica that takes most reads
    /// may keep more connections than the primary. A name that is no endpoint's is a
    /// problem reported by [`build`](Self::build); a second call for a name replaces the
    /// first.
    ///
    /// ```
    /// use protected_pool::{EndpointOptions, ProtectedPool};
    ///
    /// # let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// # let _guard = runtime.enter();
    /// let common = EndpointOptions { max_connections: 10, ..EndpointOptions::default() };
    /// let pool = ProtectedPool::builder()
    ///     .primary("postgres://app@db-primary/app")
    ///     .replica("postgres://app@db-replica/app")
    ///     .endpoint_options(common.clone())
    ///     .endpoint_options_for("replica-1", EndpointOptions { max_connections: 40, ..common })
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(pool.status("primary").unwrap().max_size, 10);
    /// assert_eq!(pool.status("replica-1").unwrap().max_size, 40);
    /// ```
    pub fn endpoint_options_for(
        mut self,
        name: impl Into<String>,
        options: EndpointOptions,
    ) -> Self {
        let name = name.into();
        self.options_for.retain(|(known, _)| *known != name);
        self.options_for.push((name, options));
        self
    }

    /// Runs `hook` on every new connection of every endpoint before it is handed out, after
    /// the endpoint's [`after_connect`](EndpointOptions::after_connect) statements, as
    /// sqlx's `PoolOptions::after_connect` does: to set `search_path`, `statement_timeout`,
    /// `application_name`, register types... An error fails that connection's creation (the
    /// caller gets it, classified as any error opening a connection is) and the connection
    /// is closed, never handed out. It runs within the endpoint's `connect_timeout`.
    ///
    /// ```
    /// use protected_pool::ProtectedPool;
    /// use sqlx::Executor;
    ///
    /// let builder = ProtectedPool::<sqlx::Postgres>::builder()
    ///     .primary("postgres://app@db/app")
    ///     .after_connect(|conn| {
    ///         Box::pin(async move {
    ///             conn.execute("SET application_name = 'billing'").await?;
    ///             Ok(())
    ///         })
    ///     });
    /// ```
    pub fn after_connect<F>(mut self, hook: F) -> Self
    where
        F: for<'c> Fn(&'c mut DB::Connection) -> AfterConnectFuture<'c> + Send + Sync + 'static,
    {
        self.after_connect = Some(Arc::new(hook));
        self
    }

    /// Breaker rules and timeout of `route`.
    pub fn route(mut self, route: Route, config: RouteConfig) -> Self {
        self.routes[route.index()] = config;
        self
    }

    /// Breaker rules of `route`.
    pub fn breaker(mut self, route: Route, config: BreakerConfig) -> Self {
        self.routes[route.index()].breaker = config;
        self
    }

    /// Per-operation timeout of `route`.
    pub fn timeout(mut self, route: Route, timeout: Duration) -> Self {
        self.routes[route.index()].timeout = timeout;
        self
    }

    /// Overrides classification: return `Some(class)` to decide, `None` for the built-in rule.
    pub fn classify(
        mut self,
        classifier: impl Fn(&sqlx::Error, Route) -> Option<ErrorClass> + Send + Sync + 'static,
    ) -> Self {
        self.classifier = Some(Arc::new(classifier));
        self
    }

    /// Calls `listener` on every state change of every breaker.
    pub fn on_state_change(
        mut self,
        listener: impl Fn(&PoolStateChange) + Send + Sync + 'static,
    ) -> Self {
        self.listeners.push(Arc::new(listener));
        self
    }

    /// Calls `listener` on every change in what the pool knows of its cluster: an endpoint's
    /// role as its server reports it (a promotion, a demotion, an address that moved), and
    /// two primaries at once (split brain) and its end.
    pub fn on_cluster_event(
        mut self,
        listener: impl Fn(&ClusterEvent) + Send + Sync + 'static,
    ) -> Self {
        self.cluster_listeners.push(Arc::new(listener));
        self
    }

    /// Where [`cached`](crate::Routed::cached) reads keep their results (default: a
    /// [`MemoryCache`] of at most 10,000 values and 64 MiB).
    pub fn cache(mut self, cache: impl Cache) -> Self {
        // The note of recent stores is sized to the cache, when the pool knows its size.
        self.cache_entries = (&cache as &dyn std::any::Any)
            .downcast_ref::<MemoryCache>()
            .map(MemoryCache::entries_hint);
        self.cache = Some(Arc::new(cache));
        self
    }

    /// The longest a cache read or write may take; one that takes longer counts as a miss or
    /// is dropped (default 250 ms). Keeps a slow cache from slowing reads.
    pub fn cache_timeout(mut self, timeout: Duration) -> Self {
        self.cache_timeout = timeout;
        self
    }

    /// A fallback for every call of `route` whose result is a `T`, run when no endpoint can
    /// serve the call, after the cache and the call's own fallback; `None` from it means no
    /// fallback. One per route and result type: a second replaces the first, and so does an
    /// async one ([`fallback_async`](Self::fallback_async)) for the same route and type.
    ///
    /// ```
    /// use protected_pool::{ProtectedPool, Route};
    ///
    /// let builder = ProtectedPool::<sqlx::Postgres>::builder()
    ///     .primary("postgres://app@db/app")
    ///     // Reads that count something report zero while the database is away.
    ///     .fallback(Route::Read, |context| {
    ///         context.sql.filter(|sql| sql.starts_with("SELECT count(")).map(|_| 0_i64)
    ///     });
    /// ```
    pub fn fallback<T: Send + 'static>(
        mut self,
        route: Route,
        fallback: impl Fn(&FallbackContext<'_>) -> Option<T> + Send + Sync + 'static,
    ) -> Self {
        self.fallbacks.add(route, fallback);
        self
    }

    /// Where keyed writes ([`Routed::idempotent`](crate::Routed::idempotent)) record their keys,
    /// and for how long.
    pub fn idempotency(mut self, config: IdempotencyConfig) -> Self {
        self.idempotency = config;
        self
    }

    /// Gives the pool an outbox: keyed [`DurableWrite`](crate::DurableWrite)s sent with
    /// [`or_enqueue`](crate::Keyed::or_enqueue) wait in it while the write route cannot take
    /// them, and are applied from it, in order and exactly once, when it can. Writes queued
    /// before a restart are applied after it. See [`crate::outbox`].
    ///
    /// ```
    /// use protected_pool::{ProtectedPool, outbox::OutboxConfig};
    ///
    /// let builder = ProtectedPool::postgres()
    ///     .primary("postgres://app@db/app")
    ///     .outbox(OutboxConfig::new("/var/lib/app/outbox.sqlite").max_writes(50_000));
    /// ```
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn outbox(mut self, config: crate::outbox::OutboxConfig) -> Self {
        self.outbox = Some(config);
        self
    }

    /// Like [`fallback`](Self::fallback), with a fallback that can await: another database, a
    /// Redis, an HTTP service. It is given an owned [`FallbackRequest`] and runs for every
    /// call of `route` whose result is a `T`, when no endpoint can serve it, after the cache
    /// and the call's own fallback. `Ok(None)` declines.
    ///
    /// One fallback per route and result type, sync or async: this replaces a sync fallback
    /// registered for the same route and `T`, and [`fallback`](Self::fallback) replaces this
    /// one.
    ///
    /// It has what is left of the route's operation timeout, counted from the start of the
    /// call ([`FallbackRequest::budget`]), and is dropped when that runs out. If it fails
    /// (its `Err`, running out of time, a panic), the call returns its own error with the
    /// failure attached ([`Error::fallback_error`](crate::Error::fallback_error)); failures
    /// are counted in `protected_pool_fallback_failures_total` and logged at level warn.
    ///
    /// ```no_run
    /// use protected_pool::{ProtectedPool, Route};
    ///
    /// # async fn demo() -> protected_pool::Result<()> {
    /// let backup = ProtectedPool::<sqlx::Postgres>::builder()
    ///     .primary("postgres://app@backup-db/app")
    ///     .build()?;
    /// let pool = ProtectedPool::<sqlx::Postgres>::builder()
    ///     .primary("postgres://app@db/app")
    ///     // Reads that return one string are asked of the backup while the database is away.
    ///     .fallback_async(Route::Read, move |request| {
    ///         let backup = backup.clone();
    ///         async move {
    ///             let Some(sql) = request.sql else { return Ok(None) };
    ///             backup
    ///                 .read(sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)))
    ///                 .fetch_optional()
    ///                 .await
    ///         }
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn fallback_async<T, F, Fut, E>(mut self, route: Route, fallback: F) -> Self
    where
        T: Send + 'static,
        F: Fn(FallbackRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Option<T>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.fallbacks.add_async(route, box_async(fallback));
        self
    }

    /// Builds the pool without opening a connection: the first call connects. Recovery
    /// probes start now when called inside a tokio runtime, else with the first call.
    pub fn build(self) -> Result<ProtectedPool<DB>> {
        let validated = self.check()?;
        let unnamed_statements = validated
            .endpoints
            .iter()
            .any(|endpoint| endpoint.options.transaction_pooler);
        let listeners = Arc::new(PoolListeners::default());
        for listener in self.listeners {
            listeners.add(listener);
        }
        let count = validated.endpoints.len();
        let endpoints: Vec<Endpoint<DB>> = validated
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(index, endpoint)| {
                let role = if index == 0 {
                    Role::Primary
                } else {
                    Role::Replica
                };
                let wakeup = Arc::new(tokio::sync::Notify::new());
                for (route, breaker) in Route::ALL.into_iter().zip(&endpoint.breakers) {
                    wiring::wire_breaker(breaker, &endpoint.name, route, &listeners, &wakeup);
                }
                let after_connect = AfterConnect::new(
                    endpoint.options.after_connect.clone(),
                    self.after_connect.clone(),
                );
                let manager = ConnectionManager::<DB>::new(
                    endpoint.name.clone(),
                    endpoint.connect,
                    &endpoint.options,
                    after_connect,
                );
                Endpoint::new(
                    endpoint.name,
                    index,
                    role,
                    manager,
                    &endpoint.options,
                    endpoint.breakers,
                    wakeup,
                )
            })
            .collect();
        let topology = Topology::watch(
            endpoints
                .iter()
                .map(|endpoint| (endpoint.name.clone(), endpoint.roles_arc()))
                .collect(),
            self.cluster_listeners,
        );
        #[cfg(feature = "outbox")]
        let outbox = self
            .outbox
            .map(|config| Arc::new(crate::outbox::Outbox::new(config)));
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &outbox {
            // The replayer waits while the write route cannot serve; it goes on as soon as a
            // write breaker closes.
            let outbox = Arc::downgrade(outbox);
            listeners.add(Arc::new(move |change: &PoolStateChange| {
                if change.route == Route::Write
                    && change.change.to == crate::breaker::State::Closed
                    && let Some(outbox) = outbox.upgrade()
                {
                    outbox.wake.notify_one();
                }
            }));
        }
        let cache_entries = match self.cache {
            Some(_) => self.cache_entries,
            None => Some(MemoryCache::DEFAULT_MAX_ENTRIES),
        };
        let inner = Arc::new_cyclic(|me| PoolInner {
            me: me.clone(),
            endpoints,
            topology,
            router: Router::new(self.read_preference, self.replica_selection),
            routes: self.routes,
            max_replica_lag: self.max_replica_lag,
            health_check_interval: self.health_check_interval,
            wait_timeout: self.options.wait_timeout,
            connect_timeout: self.options.connect_timeout,
            probes: Probes::new(self.probes, count),
            classifier: self.classifier,
            listeners,
            cache: PoolCache::new(self.cache),
            cache_timeout: self.cache_timeout,
            recent_stores: RecentStores::new(cache_entries),
            fallbacks: self.fallbacks,
            keys: Keys::new(self.idempotency, DB::SYSTEM),
            #[cfg(feature = "outbox")]
            outbox: outbox.clone(),
            #[cfg(feature = "outbox")]
            replayer: std::sync::Mutex::new(None),
            unnamed_statements,
            started: std::time::Instant::now(),
        });
        let pool = Arc::downgrade(&inner);
        inner.topology.on_promotion(Box::new(move |index| {
            if let Some(pool) = pool.upgrade() {
                pool.promoted(index);
            }
        }));
        inner.start_probes();
        #[cfg(feature = "outbox")]
        inner.ensure_replayer();
        Ok(ProtectedPool { inner })
    }

    /// Builds the pool and checks that the primary answers, so a wrong password or an
    /// unreachable server is reported now rather than at the first call. The check goes
    /// through the write route and counts toward its breaker like any call. Then every
    /// endpoint opens its [`min_connections`](EndpointOptions::min_connections); one that
    /// cannot is left to the health loop, which tries again.
    pub async fn connect(self) -> Result<ProtectedPool<DB>> {
        let pool = self.build()?;
        {
            // The health loop starts with the pool, and it opens connections too. deadpool
            // counts a connection only once it is made, so two openers at once can each make
            // the one that was missing: the loop waits while the check opens the first.
            let mut opening = Vec::with_capacity(pool.inner.endpoints.len());
            for endpoint in pool.inner.endpoints.iter() {
                opening.push(endpoint.hold_opening().await);
            }
            pool.with_connection(Route::Write, async |connection| connection.ping().await)
                .await?;
        }
        pool.inner.warm_up().await;
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &pool.inner.outbox {
            // A file that cannot be opened is reported now, not at the first queued write.
            outbox.store().await?;
        }
        Ok(pool)
    }
}
