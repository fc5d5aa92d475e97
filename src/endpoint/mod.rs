//! One endpoint: a database server, its connection pool and its breaker per route.

mod after_connect;
mod checkout;
mod manager;
mod options;
mod role;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{Object, Pool, PoolError, Timeouts};
use serde::Serialize;

pub use after_connect::AfterConnectFuture;
pub(crate) use after_connect::{AfterConnect, AfterConnectHook};
pub use options::EndpointOptions;
pub(crate) use options::duration_problem;

use crate::backend::Backend;
use crate::breaker::{CircuitBreaker, State};
use crate::role::Role;
use crate::route::Route;
use crate::telemetry::RouteMetrics;
use crate::timer::Timer;
pub(crate) use checkout::Checkout;
pub(crate) use manager::{ConnectionManager, PooledConnection};
pub use role::RoleChange;
pub(crate) use role::RoleState;

/// No timeouts for deadpool on a call's checkout: each would be a timer of its own on every
/// checkout; the call's one timer bounds it (see [`Endpoint::checkout_by`]). A static, so
/// that no call's future holds a copy.
static NO_TIMEOUTS: Timeouts = Timeouts {
    wait: None,
    create: None,
    recycle: None,
};

/// Why [`Endpoint::checkout_by`] gave no connection.
#[derive(Debug)]
pub(crate) enum Stopped {
    /// No connection was free by the end of the wait: the server was not asked anything.
    Waited,
    /// Opening or checking a connection was not done in time.
    TimedOut,
    /// The pool said why.
    Pool(PoolError<sqlx::Error>),
}

/// Connection counts of one endpoint's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Most connections allowed.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open connections not in use.
    pub idle: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

pub(crate) type Connection<DB> = Object<ConnectionManager<DB>>;

pub(crate) struct Endpoint<DB: Backend> {
    pub(crate) name: Arc<str>,
    /// Its place in the pool's endpoints (the primary is 0).
    pub(crate) index: usize,
    /// The role it was declared with: what it is taken for until its server says otherwise.
    pub(crate) hint: Role,
    pool: Pool<ConnectionManager<DB>>,
    /// Connections kept open, and how long an idle one may stay beyond them.
    min_connections: usize,
    idle_timeout: Option<Duration>,
    /// Held by whatever opens or checks connections outside a caller's call, so that two of
    /// them never make the same missing connection (deadpool counts one only once it is
    /// made): a top-up (`connect`'s warm-up or the health loop's), `connect`'s first check,
    /// and the health loop's look at idle connections, which skips a round rather than wait.
    opening: tokio::sync::Mutex<()>,
    breakers: [CircuitBreaker; 3],
    metrics: [RouteMetrics; 3],
    /// Calls using this endpoint right now, for least-outstanding replica choice.
    outstanding: AtomicUsize,
    /// Replication lag in ms as last measured; `u64::MAX` when unknown (not a replica, not
    /// measured yet, or the last measurement failed).
    lag_ms: AtomicU64,
    /// Wakes this endpoint's probe task when one of its breakers opens.
    pub(crate) wakeup: Arc<tokio::sync::Notify>,
}

/// Counts a call as outstanding on an endpoint while it lives.
pub(crate) struct Outstanding<'e>(&'e AtomicUsize);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<DB: Backend> fmt::Debug for Endpoint<DB> {
    // Deliberately not the connect options: they hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("hint", &self.hint)
            .field("role", &self.role())
            .field("pool", &self.status())
            .field("lag", &self.lag())
            .finish()
    }
}

impl<DB: Backend> Endpoint<DB> {
    pub(crate) fn new(
        name: Arc<str>,
        index: usize,
        hint: Role,
        manager: ConnectionManager<DB>,
        options: &EndpointOptions,
        breakers: [CircuitBreaker; 3],
        wakeup: Arc<tokio::sync::Notify>,
    ) -> Self {
        let pool = Pool::builder(manager)
            .max_size(options.max_connections)
            .timeouts(Timeouts {
                wait: Some(options.wait_timeout),
                create: None,
                // The manager bounds its own ping (see `recycle`).
                recycle: None,
            })
            .runtime(Runtime::Tokio1)
            .build()
            .expect("a runtime is set, so building the pool cannot fail");
        let metrics = Route::ALL.map(|route| RouteMetrics::new(route, name.clone()));
        Self {
            name,
            index,
            hint,
            pool,
            min_connections: options.min_connections,
            idle_timeout: options.idle_timeout,
            opening: tokio::sync::Mutex::new(()),
            breakers,
            metrics,
            outstanding: AtomicUsize::new(0),
            lag_ms: AtomicU64::new(u64::MAX),
            wakeup,
        }
    }

    /// The role its server last reported; `None` before the first connection, or since it
    /// could not be reached.
    pub(crate) fn role(&self) -> Option<Role> {
        self.roles().get()
    }

    /// The role it is taken for: the one its server last reported, else the declared one.
    pub(crate) fn likely_role(&self) -> Role {
        self.role().unwrap_or(self.hint)
    }

    /// Its role as its server last reported, kept by the connection manager, which learns
    /// it on every new connection.
    pub(crate) fn roles(&self) -> &RoleState {
        self.pool.manager().roles()
    }

    /// Which server answered last, when known (see `Backend::role`).
    pub(crate) fn server(&self) -> Option<Arc<str>> {
        self.roles().server()
    }

    pub(crate) fn roles_arc(&self) -> Arc<RoleState> {
        self.pool.manager().roles().clone()
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub(crate) fn start_call(&self) -> Outstanding<'_> {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(&self.outstanding)
    }

    /// Replication lag as last measured by the health probe.
    pub(crate) fn lag(&self) -> Option<Duration> {
        match self.lag_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub(crate) fn set_lag(&self, lag: Option<Duration>) {
        crate::telemetry::replica_lag(&self.name, lag);
        let ms = lag.map_or(u64::MAX, |lag| {
            u64::try_from(lag.as_millis()).unwrap_or(u64::MAX - 1)
        });
        self.lag_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn breaker(&self, route: Route) -> &CircuitBreaker {
        &self.breakers[route.index()]
    }

    pub(crate) fn metrics(&self, route: Route) -> &RouteMetrics {
        &self.metrics[route.index()]
    }

    pub(crate) fn breakers(&self) -> impl Iterator<Item = (Route, &CircuitBreaker)> {
        Route::ALL.into_iter().zip(self.breakers.iter())
    }

    /// A connection: waiting for a free one until `wait_end` (refused with [`Stopped::Waited`]),
    /// and getting it (opening or checking one) until `by` ([`Stopped::TimedOut`]), on one
    /// timer that is armed only if the connection is not there at once.
    pub(crate) async fn checkout_by(
        &self,
        wait_end: tokio::time::Instant,
        by: tokio::time::Instant,
        timer: &mut Timer<'_>,
    ) -> Result<Checkout<DB>, Stopped> {
        let mut got = std::pin::pin!(self.pool.timeout_get(&NO_TIMEOUTS));
        let mut working = false;
        let got = std::future::poll_fn(|cx| {
            let begun = manager::work_begun();
            if let Poll::Ready(got) = got.as_mut().poll(cx) {
                return Poll::Ready(got.map_err(Stopped::Pool));
            }
            working = working || manager::work_begun() != begun;
            let until = if working { by } else { wait_end.min(by) };
            timer.poll_until(until, cx).map(|()| {
                Err(if working {
                    Stopped::TimedOut
                } else {
                    Stopped::Waited
                })
            })
        })
        .await?;
        Ok(Checkout::new(got, self.idle_timeout.is_some()))
    }

    /// A connection, waiting at most `wait` for a free one (a wait of zero takes one only if
    /// one is free now). Opening or checking one is bounded by the manager, not by `wait`.
    pub(crate) async fn checkout(
        &self,
        wait: Duration,
    ) -> Result<Checkout<DB>, PoolError<sqlx::Error>> {
        let timeouts = Timeouts {
            wait: Some(wait),
            create: None,
            recycle: None,
        };
        let got = self.pool.timeout_get(&timeouts).await;
        let records_use = self.idle_timeout.is_some();
        got.map(|connection| Checkout::new(connection, records_use))
    }

    /// A free connection for the pool's own use, if one is idle now; it does not count as
    /// use for the idle timeout.
    async fn checkout_quietly(&self) -> Result<Checkout<DB>, PoolError<sqlx::Error>> {
        let timeouts = Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        let got = self.pool.timeout_get(&timeouts).await;
        got.map(|connection| Checkout::new(connection, false))
    }

    /// Keeps the health loop from opening or checking connections until the guard is dropped
    /// (see [`ProtectedPool::connect`](crate::ProtectedPool::connect)).
    pub(crate) async fn hold_opening(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.opening.lock().await
    }

    /// Opens connections until `min_connections` are open, each within `limit`; returns
    /// how many were opened. Connections idle in the pool are taken first, so only the
    /// missing ones are opened; all are given back at once.
    pub(crate) async fn top_up(&self, limit: Duration) -> Result<usize, PoolError<sqlx::Error>> {
        if self.min_connections == 0 {
            return Ok(0);
        }
        let _only_one = self.opening.lock().await;
        let before = self.pool.status().size;
        if before >= self.min_connections {
            return Ok(0);
        }
        let mut held = Vec::with_capacity(self.min_connections);
        while self.pool.status().size < self.min_connections {
            let taken = tokio::time::timeout(limit, self.checkout_quietly()).await;
            match taken {
                Ok(Ok(checkout)) => held.push(checkout),
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(PoolError::Timeout(deadpool::managed::TimeoutType::Create)),
            }
        }
        Ok(self.pool.status().size.saturating_sub(before))
    }

    /// Closes connections idle past the idle timeout, keeping `min_connections` open;
    /// returns how many were closed.
    fn close_idle(&self) -> usize {
        let Some(idle_timeout) = self.idle_timeout else {
            return 0;
        };
        let mut closable = self.pool.status().size.saturating_sub(self.min_connections);
        self.pool
            .retain(|connection, _| {
                let close = closable > 0 && connection.used_at.elapsed() >= idle_timeout;
                closable -= usize::from(close);
                !close
            })
            .removed
            .len()
    }

    /// A new connection could not be made: the idle ones are suspect too, and what the
    /// server is (primary or standby) is not known until the next connection says.
    pub(crate) fn connection_lost(&self) {
        self.pool.manager().connection_lost();
    }

    /// Whether the server answers a new connection within `limit` (any answer, an error
    /// included).
    pub(crate) async fn answers(&self, limit: Duration) -> bool {
        self.pool.manager().answers(limit).await
    }

    /// The health loop's look at the endpoint: asks its server what it is (primary or
    /// standby). An idle pooled connection is used when there is one; if it is dead, the
    /// server went away since it was last used (a crash, a restart): every idle connection
    /// not checked since is closed now, so no caller meets one. With no idle connection the
    /// question goes over a connection of its own, outside the pool, so the pool's counts are
    /// the callers' alone. Before that, connections idle past the idle timeout are closed;
    /// after it, connections are opened up to `min_connections`. Returns how many dead
    /// connections were closed.
    pub(crate) async fn check_health(&self, limit: Duration) -> usize {
        let idle_closed = self.close_idle();
        if idle_closed > 0 {
            tracing::debug!(
                endpoint = &*self.name,
                idle_closed,
                "closed idle connections"
            );
        }
        let (closed, answered) = self.check_idle_connections(limit).await;
        // While a breaker is not closed, its recovery probe connects through the pool, and
        // every new connection says what the server is: no need to ask on the side, nor to
        // open connections to a server that is likely away.
        let probing = self
            .breakers()
            .any(|(_, breaker)| !matches!(breaker.state(), State::Closed | State::Disabled));
        if probing {
            return closed;
        }
        match self.top_up(limit).await {
            // A new connection said what the server is.
            Ok(opened) if opened > 0 => return closed,
            Ok(_) if answered => return closed,
            Ok(_) => {}
            Err(error) => tracing::debug!(
                endpoint = &*self.name,
                %error,
                "could not open the connections min_connections keeps"
            ),
        }
        if DB::CHANGES_ROLES {
            self.pool.manager().ask_role(limit).await;
        }
        closed
    }

    /// The first part of [`check_health`](Self::check_health): asks over an idle
    /// connection, closing dead ones. Returns how many were closed, and whether that settled
    /// the question (an answer, a hang, or an error from a live connection).
    async fn check_idle_connections(&self, limit: Duration) -> (usize, bool) {
        // Not while a top-up or `connect`'s first check opens connections: what is idle was
        // just made, and a top-up could take the idle connection seen here and leave this
        // checkout making another (deadpool counts one only once it is made). Waiting
        // instead would line this check up with the end of `connect`, when the caller's
        // first calls come: one finding the only connection out here would open another.
        let Ok(_no_top_up) = self.opening.try_lock() else {
            return (0, false);
        };
        let mut closed = 0;
        while self.pool.status().available > 0 {
            let checkout = tokio::time::timeout(limit, self.checkout_quietly()).await;
            let Ok(Ok(mut checkout)) = checkout else {
                break;
            };
            let asked = tokio::time::timeout(limit, checkout.run(async |raw| DB::role(raw).await));
            let dead = match asked.await {
                Ok(Ok(observed)) => {
                    self.roles().observe_server(observed);
                    return (closed, true);
                }
                Ok(Err(_)) => checkout.is_broken() && !checkout.is_fresh(),
                Err(_) => return (closed, true), // a hang is the breakers' business
            };
            drop(checkout);
            if !dead {
                return (closed, true);
            }
            let manager = self.pool.manager();
            closed += self
                .pool
                .retain(|connection, _| manager.checked_since_last_loss(connection))
                .removed
                .len();
        }
        (closed, false)
    }

    pub(crate) fn status(&self) -> PoolStatus {
        let status = self.pool.status();
        PoolStatus {
            max_size: status.max_size,
            size: status.size,
            idle: status.available,
            waiting: status.waiting,
        }
    }

    /// Publishes the connection counts as metrics.
    pub(crate) fn publish_status(&self) {
        let status = self.status();
        crate::telemetry::pool_status(
            &self.name,
            [status.size, status.idle, status.waiting, status.max_size],
        );
    }

    pub(crate) fn close(&self) {
        self.pool.close();
    }
}
