//! The deadpool manager: opens sqlx connections and decides which may be handed out again.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use sqlx::{ConnectOptions, Connection};

use super::EndpointOptions;
use super::after_connect::AfterConnect;
use super::role::RoleState;
use crate::backend::Backend;
use crate::breaker::{coarse_nanos, duration_nanos};

/// A pooled connection and what the pool needs to know about it. The flags are set only by
/// [`Checkout`](super::Checkout), which owns the connection while it is out of the pool.
pub(crate) struct PooledConnection<DB: Backend> {
    pub(crate) raw: DB::Connection,
    /// A statement is in flight. If the connection comes back still busy, its caller was
    /// cancelled (or timed out) mid-statement and the protocol state is unknown: it is closed,
    /// not reused, and the server is asked to stop the statement.
    pub(crate) busy: bool,
    /// It saw an error that ends a session (I/O, TLS, protocol, FATAL).
    pub(crate) broken: bool,
    /// The server process behind it, where there is one and it is this connection's alone
    /// (not behind a transaction pooler).
    pub(crate) server_pid: Option<i32>,
    /// Each operation on it runs in a transaction of its own (behind a transaction pooler).
    pub(crate) one_transaction_per_call: bool,
    /// When a caller last gave it back (or when it was opened): the health loop's own use
    /// does not count, so its checks do not keep an idle connection from timing out.
    pub(crate) used_at: Instant,
    /// When it reaches its max lifetime, on the coarse clock ([`coarse_nanos`]).
    expires_at: Option<u64>,
    /// When it was opened or last handed out, on the coarse clock.
    handed_out_at: u64,
    /// The endpoint's connection-loss count when this connection was last known good.
    checked_at_loss: u64,
}

impl<DB: Backend> PooledConnection<DB> {
    /// Has the connection checked before it is handed out again: it was in the caller's
    /// hands, where no error it met was seen by the pool.
    pub(crate) fn check_before_reuse(&mut self) {
        self.checked_at_loss = u64::MAX;
    }
}

thread_local! {
    /// How many times a manager on this thread began to open or check a connection. A
    /// checkout compares it before and after each poll: when it moved, the pool gave that
    /// checkout a slot and is working on its connection, so it no longer waits for a free one.
    static WORK_BEGUN: Cell<u64> = const { Cell::new(0) };
}

/// See [`WORK_BEGUN`].
#[inline]
pub(crate) fn work_begun() -> u64 {
    WORK_BEGUN.with(Cell::get)
}

fn begin_work() {
    WORK_BEGUN.with(|count| count.set(count.get().wrapping_add(1)));
}

pub(crate) struct ConnectionManager<DB: Backend> {
    name: Arc<str>,
    options: <DB::Connection as Connection>::Options,
    after_connect: AfterConnect<DB>,
    /// Behind a transaction pooler: the server process seen at connect time is not this
    /// connection's (see `EndpointOptions::transaction_pooler`).
    shared_servers: bool,
    /// What every new connection says its server is.
    roles: Arc<RoleState>,
    /// When the health loop may next ask the server its role on a connection of its own, and
    /// how many times in a row it answered with an error.
    ask_again_at: Mutex<Option<Instant>>,
    ask_refusals: AtomicU32,
    /// How many times a connection of this endpoint was lost. When a connection dies, its
    /// siblings opened to the same server process very likely died with it (a crash, a
    /// restart, a failover): every connection older than the loss is pinged before it is
    /// handed out again.
    losses: Arc<AtomicU64>,
    connect_timeout: Duration,
    max_lifetime: Option<Duration>,
    max_lifetime_jitter: f64,
    idle_check_after: Duration,
}

impl<DB: Backend> ConnectionManager<DB> {
    pub(crate) fn new(
        name: Arc<str>,
        options: <DB::Connection as Connection>::Options,
        settings: &EndpointOptions,
        after_connect: AfterConnect<DB>,
    ) -> Self {
        Self {
            name: name.clone(),
            options,
            after_connect,
            shared_servers: settings.transaction_pooler,
            roles: Arc::new(RoleState::new(name)),
            ask_again_at: Mutex::new(None),
            ask_refusals: AtomicU32::new(0),
            losses: Arc::new(AtomicU64::new(0)),
            connect_timeout: settings.connect_timeout,
            max_lifetime: settings.max_lifetime,
            max_lifetime_jitter: settings.max_lifetime_jitter,
            idle_check_after: settings.idle_check_after,
        }
    }

    pub(crate) fn roles(&self) -> &Arc<RoleState> {
        &self.roles
    }

    /// Counts a lost connection. What the server is (primary or standby) is not known until
    /// a new connection says: a lost server may come back as something else.
    pub(crate) fn connection_lost(&self) {
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.roles.observe(None);
    }

    /// Whether `connection` was known good after the last loss on this endpoint.
    pub(crate) fn checked_since_last_loss(&self, connection: &PooledConnection<DB>) -> bool {
        connection.checked_at_loss == self.losses.load(Ordering::Relaxed)
    }

    /// Asks the server to stop the statement the process `pid` is running, in the
    /// background: called when a connection is given up mid-statement, so the server does
    /// not run on for a caller that is gone (it notices a closed socket only when it next
    /// writes to it).
    pub(crate) fn stop_statement(&self, pid: i32) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (options, limit) = (self.options.clone(), self.connect_timeout);
        runtime.spawn(async move {
            match tokio::time::timeout(limit, DB::cancel(&options, pid)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, pid, "could not stop a statement"),
                Err(_) => tracing::debug!(pid, "no answer to a statement cancel"),
            }
        });
    }

    /// Asks the server what it is over a connection of its own, closed at once; a server
    /// that cannot be reached is of no known role. A hang changes nothing: it is the
    /// breakers' business.
    pub(crate) async fn ask_role(&self, limit: Duration) {
        // A server that answers with an error (it rejects our credentials, its database is
        // being restored) is asked again on a doubling schedule, not every round.
        let now = Instant::now();
        if self
            .ask_again_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| now < at)
        {
            return;
        }
        let asked = async {
            let mut connection = Box::pin(self.options.connect()).await?;
            let role = DB::role(&mut connection).await;
            let _ = connection.close().await;
            role
        };
        let answer = tokio::time::timeout(limit, asked).await;
        let refusals = match answer {
            Ok(Ok(observed)) => {
                self.roles.observe_server(observed);
                0
            }
            // It answered, but would not say.
            Ok(Err(sqlx::Error::Database(_))) => {
                self.ask_refusals.fetch_add(1, Ordering::Relaxed) + 1
            }
            Ok(Err(_)) => {
                self.roles.observe(None);
                0
            }
            Err(_) => 0,
        };
        if refusals == 0 {
            self.ask_refusals.store(0, Ordering::Relaxed);
        }
        let wait = (refusals > 0).then(|| {
            Duration::from_secs(1)
                .saturating_mul(1 << refusals.min(6))
                .min(Duration::from_secs(60))
        });
        *self
            .ask_again_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = wait.map(|wait| now + wait);
    }

    /// Whether the server answers a new connection within `limit`: any answer, an error
    /// included, says it is alive.
    ///
    /// A transaction pooler takes connections whether its server is up or not: there the
    /// question is a statement, and an error saying the pooler cannot reach its server (a
    /// connection-class SQLSTATE) is no answer.
    pub(crate) async fn answers(&self, limit: Duration) -> bool {
        let shared_servers = self.shared_servers;
        let asked = async {
            let mut connection = Box::pin(self.options.connect()).await?;
            if shared_servers {
                DB::role(&mut connection).await?;
            }
            Ok::<_, sqlx::Error>(connection)
        };
        match tokio::time::timeout(limit, asked).await {
            Ok(Err(sqlx::Error::Database(error)))
                if shared_servers && error.code().is_some_and(|code| code.starts_with("08")) =>
            {
                false
            }
            Ok(Ok(connection)) => {
                // Said goodbye in the background: the answer is already in.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection.close()).await;
                });
                true
            }
            Ok(Err(sqlx::Error::Database(_))) => true,
            Ok(Err(_)) | Err(_) => false,
        }
    }

    fn lifetime(&self) -> Option<Duration> {
        self.max_lifetime
            .map(|max| max.mul_f64(1.0 - self.max_lifetime_jitter * fastrand::f64()))
    }
}

impl<DB: Backend> ConnectionManager<DB> {
    /// Opens a connection and asks the server what it is: see `create`.
    async fn open(&self) -> Result<PooledConnection<DB>, sqlx::Error> {
        // Our own timeout, so a server that accepts TCP but never answers fails with a
        // timeout after connect_timeout, and a refused connection fails at once with its cause.
        let raw = match tokio::time::timeout(self.connect_timeout, self.options.connect()).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                self.roles.observe(None);
                return Err(error);
            }
            Err(_) => {
                return Err(sqlx::Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.connect_timeout),
                )));
            }
        };
        let mut raw = raw;
        // One round trip says which server process this is (to stop a statement given up on)
        // and what the server is now: a primary, or a standby.
        let (server_pid, observed) =
            match tokio::time::timeout(self.connect_timeout, DB::describe(&mut raw)).await {
                Ok(described) => described?,
                Err(_) => {
                    return Err(sqlx::Error::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connect timed out after {:?}", self.connect_timeout),
                    )));
                }
            };
        self.roles.observe_server(observed);
        // Part of opening the connection, so within the same bound.
        let set_up = self.after_connect.run(&self.name, &mut raw);
        match tokio::time::timeout(self.connect_timeout, set_up).await {
            Ok(set_up) => set_up?,
            Err(_) => {
                return Err(sqlx::Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "after_connect did not finish within {:?}",
                        self.connect_timeout
                    ),
                )));
            }
        }
        let coarse_at = coarse_nanos();
        Ok(PooledConnection {
            raw,
            busy: false,
            broken: false,
            server_pid: server_pid.filter(|_| !self.shared_servers),
            one_transaction_per_call: self.shared_servers,
            used_at: Instant::now(),
            expires_at: self
                .lifetime()
                .map(|lifetime| coarse_at.saturating_add(duration_nanos(lifetime))),
            handed_out_at: coarse_at,
            checked_at_loss: self.losses.load(Ordering::Relaxed),
        })
    }

    /// Pings a connection before it is handed out again. Bounded here rather than by
    /// deadpool's recycle timeout, which would arm a timer on every checkout, pinged or not.
    /// A ping that hangs drops the connection and the pool opens another.
    async fn ping(&self, connection: &mut PooledConnection<DB>) -> RecycleResult<sqlx::Error> {
        match tokio::time::timeout(self.connect_timeout, connection.raw.ping()).await {
            Ok(pinged) => pinged.map_err(|error| {
                // Dead while it sat in the pool: its siblings very likely died with it.
                self.connection_lost();
                RecycleError::Backend(error)
            }),
            Err(_) => Err(RecycleError::message(format!(
                "no answer to a ping within {:?}",
                self.connect_timeout
            ))),
        }
    }
}

impl<DB: Backend> managed::Manager for ConnectionManager<DB> {
    type Type = PooledConnection<DB>;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        begin_work();
        // Boxed: this future sits inside every checkout's, and so inside every call's, which
        // is moved and, with many calls in flight, held once per call.
        Box::pin(self.open()).await
    }

    async fn recycle(
        &self,
        connection: &mut Self::Type,
        _: &Metrics,
    ) -> RecycleResult<Self::Error> {
        begin_work();
        if connection.busy {
            return Err(RecycleError::message(
                "cancelled in the middle of a statement",
            ));
        }
        if connection.broken {
            return Err(RecycleError::message("saw a connection error"));
        }
        // One reading of the coarse clock for both checks: lifetimes and idle checks are
        // seconds to hours, and a precise reading on every checkout is measurable.
        let now = coarse_nanos();
        if connection.expires_at.is_some_and(|at| now >= at) {
            return Err(RecycleError::message("reached its max lifetime"));
        }
        let losses = self.losses.load(Ordering::Relaxed);
        if connection.checked_at_loss != losses
            || now.saturating_sub(connection.handed_out_at) >= duration_nanos(self.idle_check_after)
        {
            // Boxed: a ping is rare, and this future sits inside deadpool's checkout future
            // several times over (its recycle timeout wraps it), so inside every call's.
            Box::pin(self.ping(connection)).await?;
            connection.checked_at_loss = losses;
        }
        connection.handed_out_at = now;
        Ok(())
    }
}
