//! Per-endpoint connection pool settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::too_long;
use crate::problem::ConfigProblem;

/// How one endpoint's connection pool behaves.
///
/// The builder's [`endpoint_options`](crate::PoolBuilder::endpoint_options) (or a config
/// file's `[pool]` table) sets them for every endpoint;
/// [`endpoint_options_for`](crate::PoolBuilder::endpoint_options_for) (or an endpoint's own
/// `pool` table) replaces them for one endpoint, so a replica may keep more connections than
/// the primary.
///
/// ```
/// use std::time::Duration;
/// use protected_pool::EndpointOptions;
///
/// let options = EndpointOptions {
///     max_connections: 20,
///     min_connections: 2,
///     idle_timeout: Some(Duration::from_secs(600)),
///     after_connect: vec!["SET search_path TO app".into()],
///     ..EndpointOptions::default()
/// };
/// assert!(options.validate().is_ok());
/// ```
///
/// # TCP keepalive
///
/// sqlx 0.9 has no client-side TCP keepalive setting (`PgConnectOptions` has no
/// `keepalives`/`keepalives_idle`, and the URL parameters of libpq's name are not read). What
/// can be set is the server's side: PostgreSQL's `tcp_keepalives_idle`,
/// `tcp_keepalives_interval` and `tcp_keepalives_count`, through the `options` URL parameter
/// (`postgres://app@db/app?options=-c%20tcp_keepalives_idle%3D60`). The server then probes
/// an idle client socket and ends its session when the client's host is gone; it does not make
/// this side notice a vanished server sooner: that is what
/// [`idle_check_after`](Self::idle_check_after), the operation timeouts and the health loop do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointOptions {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Connections kept open even when idle: opened by
    /// [`connect`](crate::PoolBuilder::connect) and topped up by the health loop (not while
    /// one of the endpoint's breakers is open). At most `max_connections`; default 0.
    pub min_connections: usize,
    /// Connections idle longer than this are closed by the health loop, never going below
    /// `min_connections`; `None` (the default) keeps them. Checked every
    /// [`health_check_interval`](crate::PoolBuilder::health_check_interval), so a connection
    /// may stay up to that much longer.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// SQL run on every new connection before it is handed out, in order, each as a simple
    /// query (so one entry may not hold parameters): `SET search_path TO app`,
    /// `SET statement_timeout = '5s'`, `SET application_name = 'billing'`. A statement that
    /// fails fails the connection's creation with its error; the connection is closed, never
    /// handed out. Runs before the builder's
    /// [`after_connect`](crate::PoolBuilder::after_connect) hook.
    ///
    /// Behind a [`transaction_pooler`](Self::transaction_pooler) a session setting reaches
    /// only the server connection that ran it, not the ones later statements run on: set
    /// such settings on the pooler's database entry or on the role (`ALTER ROLE app SET ...`).
    pub after_connect: Vec<String>,
    /// The endpoint is a transaction-mode pooler (PgBouncer with `pool_mode = transaction`,
    /// or alike): each transaction of a connection may run on a different server
    /// connection. PostgreSQL only; default off.
    ///
    /// When on:
    /// - Every operation on the endpoint runs in a transaction of its own (`BEGIN` ...
    ///   `COMMIT`, two more round trips): sqlx sends a statement's parse and its execution in
    ///   two round trips, and outside a transaction the pooler may put them on different
    ///   server connections (`unnamed prepared statement does not exist`, or worse, another
    ///   client's statement run with this one's parameters). A transaction the operation
    ///   opens itself ([`transaction`](crate::ProtectedPool::transaction), `conn.begin()`)
    ///   becomes a savepoint; `begin_with("BEGIN ISOLATION LEVEL ..")` is refused by sqlx
    ///   inside one.
    /// - A query given to the pool ([`read`](crate::ProtectedPool::read),
    ///   [`write`](crate::ProtectedPool::write), [`auth`](crate::ProtectedPool::auth)) runs as
    ///   an unnamed statement instead of a named prepared one: a named statement stays on the
    ///   server connection that prepared it, where the next client preparing the same name
    ///   fails with `prepared statement "sqlx_s_1" already exists`, and a client moved to
    ///   another server connection fails with `... does not exist`. (sqlx's
    ///   `statement_cache_capacity(0)` does not avoid this in sqlx 0.9: statements are still
    ///   named, only never cached nor closed.) This holds for the whole pool: with one
    ///   endpoint behind a pooler, queries on the others are not prepared either. Code given
    ///   a connection ([`read_with`](crate::ProtectedPool::read_with),
    ///   [`transaction`](crate::ProtectedPool::transaction)) must do the same itself:
    ///   `.persistent(false)` on its queries.
    /// - A statement given up on (a timeout, a cancelled call) is not stopped with
    ///   `pg_cancel_backend`: the server process seen when the connection was opened is not
    ///   this connection's, and may be running another client's statement by now. The
    ///   connection is closed instead, and the pooler drops its server connection. Bound
    ///   statements with a server-side `statement_timeout`.
    /// - Whether the endpoint is alive is asked with a statement, not a new connection: the
    ///   pooler takes connections whether its server is up or not, and its "cannot connect to
    ///   server" errors (SQLSTATE class 08) count as no answer.
    pub transaction_pooler: bool,
    /// Longest a new connection may take to open; a refused connection fails at once.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest a caller waits for a free connection when all are in use.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Connections older than this are closed when next returned; `None` keeps them.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Each connection's lifetime is shortened by a random fraction of up to this (0..1), so
    /// connections opened together do not all expire together.
    pub max_lifetime_jitter: f64,
    /// A connection idle longer than this is pinged before it is handed out. Fresher ones are
    /// handed out without a round trip; a connection that saw a connection error is never
    /// handed out again.
    #[serde(with = "humantime_serde")]
    pub idle_check_after: Duration,
}

impl Default for EndpointOptions {
    /// 10 connections at most and none kept open, 5 s to connect, 5 s to wait, 30 min
    /// lifetime with 10 % jitter, ping after 30 s idle, no idle timeout, nothing run after
    /// connecting, not behind a transaction pooler.
    fn default() -> Self {
        Self {
            max_connections: 10,
            min_connections: 0,
            idle_timeout: None,
            after_connect: Vec::new(),
            transaction_pooler: false,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(5),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            max_lifetime_jitter: 0.1,
            idle_check_after: Duration::from_secs(30),
        }
    }
}

/// The problem with a duration setting, if any: zero, or longer than any duration the crate
/// takes (365 days, see `breaker::too_long`: deadlines are `now + duration`, which panics
/// past what an `Instant` holds).
pub(crate) fn duration_problem(duration: Duration) -> Option<String> {
    if duration.is_zero() {
        Some("0s must be above zero".into())
    } else {
        too_long(duration)
    }
}

impl EndpointOptions {
    /// Every problem of these options, paths prefixed with `pool`.
    pub fn validate(&self) -> Result<(), crate::problem::ConfigError> {
        let mut problems = Vec::new();
        self.validate_into("pool", &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(crate::problem::ConfigError::new(problems))
        }
    }

    /// Appends every problem to `problems`, paths prefixed with `prefix`.
    pub fn validate_into(&self, prefix: &str, problems: &mut Vec<ConfigProblem>) {
        let mut report = |field: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{prefix}.{field}"), message));
        };
        if self.max_connections == 0 {
            report("max_connections", "0 must be at least 1".into());
        }
        if self.min_connections > self.max_connections {
            report(
                "min_connections",
                format!(
                    "{} is more than max_connections ({})",
                    self.min_connections, self.max_connections
                ),
            );
        }
        for (field, duration) in [
            ("connect_timeout", Some(self.connect_timeout)),
            ("wait_timeout", Some(self.wait_timeout)),
            ("max_lifetime", self.max_lifetime),
            ("idle_timeout", self.idle_timeout),
        ] {
            if let Some(problem) = duration.and_then(duration_problem) {
                report(field, problem);
            }
        }
        // Zero is fine here: every connection is checked before it is handed out.
        if let Some(problem) = too_long(self.idle_check_after) {
            report("idle_check_after", problem);
        }
        if !(self.max_lifetime_jitter >= 0.0 && self.max_lifetime_jitter < 1.0) {
            report(
                "max_lifetime_jitter",
                format!("{} is outside 0..1", self.max_lifetime_jitter),
            );
        }
        for (index, sql) in self.after_connect.iter().enumerate() {
            if sql.trim().is_empty() {
                report(
                    &format!("after_connect[{index}]"),
                    "an empty statement: remove it".into(),
                );
            }
        }
    }
}
