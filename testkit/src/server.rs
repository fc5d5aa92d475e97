//! [`PgServer`] and its builder: the face of a server, whichever runner runs it.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use crate::backend::Backend;
use crate::error::Result;
use crate::options::Options;
use crate::run::StopMode;
use crate::runner::Runner;
use crate::site::{HOST, Site};

/// The login role that [`PgServerBuilder::password_auth`] creates.
pub const APP_USER: &str = "app";
/// The password of [`APP_USER`].
pub const APP_PASSWORD: &str = "app-password";

/// Options for a server; start it with [`PgServerBuilder::start`].
///
/// Every server is replication-ready: `wal_level = replica`,
/// `max_wal_senders = 10`, `hot_standby = on`, `wal_log_hints = on` (for
/// `pg_rewind`), and `pg_hba.conf` lets the superuser `postgres` replicate
/// from 127.0.0.1 without a password, so [`PgServer::streaming_replica`] works
/// on any of them.
#[derive(Clone, Debug, Default)]
pub struct PgServerBuilder {
    options: Options,
}

impl PgServerBuilder {
    /// The default options (same as [`PgServer::builder`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `max_connections` (PostgreSQL's default is 100).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.options.max_connections = Some(n);
        self
    }

    /// When on, creates the login role [`APP_USER`] with password
    /// [`APP_PASSWORD`] (allowed to create objects in database `postgres`)
    /// and requires `scram-sha-256` for TCP connections from 127.0.0.1 by
    /// every user except the superuser `postgres`, which keeps `trust` so the
    /// harness can administrate. Off by default: everything is `trust`.
    pub fn password_auth(mut self, on: bool) -> Self {
        self.options.password_auth = on;
        self
    }

    /// Adds a `postgresql.conf` setting, written after (so overriding) the
    /// harness's own. The value is quoted for you: `setting("work_mem",
    /// "8MB")`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.settings.push((name.into(), value.into()));
        self
    }

    /// How long to wait for the server to accept connections before giving
    /// up with an error holding the server log's tail (default 60 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.options.start_timeout = timeout;
        self
    }

    /// Creates and starts the server, on the backend `$PGTESTKIT_BACKEND`
    /// selects (see [`Backend::selected`]).
    pub async fn start(self) -> Result<PgServer> {
        let password_auth = self.options.password_auth;
        let server = PgServer {
            runner: Runner::start(self.options).await?,
        };
        if password_auth {
            server
                .psql(&format!(
                    "CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}';\n\
                     GRANT CREATE ON DATABASE postgres TO {APP_USER};\n\
                     GRANT ALL ON SCHEMA public TO {APP_USER};"
                ))
                .await?;
        }
        Ok(server)
    }
}

/// A throwaway PostgreSQL server: its own temp dir (data dir, unix socket
/// dir, log file), listening on 127.0.0.1 at a free port.
///
/// Dropping it stops the server (immediate mode, resuming it first if it was
/// paused) and removes the temp dir, also when a test panics. Dropping never
/// panics. If the test process itself dies without unwinding (SIGKILL, Ctrl-C),
/// the next process that starts a server removes the leftovers.
///
/// All methods take `&self`, so a server can be shared (e.g. in an `Arc`)
/// between the code under test and the code injecting faults. Linux only (it
/// reads `/proc`).
///
/// # Roles
///
/// A server starts as a primary, or as a standby with
/// [`streaming_replica`](Self::streaming_replica). Roles change as in a real
/// cluster, each server keeping its port (so a URL that reached the primary
/// may reach a standby afterwards): [`promote`](Self::promote) a standby,
/// [`rejoin_as_standby_of`](Self::rejoin_as_standby_of) a new primary, or
/// both at once with [`switchover_to`](Self::switchover_to). For a split
/// brain, promote a standby, then [`start_again`](Self::start_again) the old
/// primary, stopped or killed: it comes back as a primary too.
///
/// ```no_run
/// use protected_pool_testkit::{PgServer, HarnessError};
///
/// # async fn demo() -> Result<(), HarnessError> {
/// let a = PgServer::start().await?;
/// let b = PgServer::streaming_replica(&a).await?;
/// a.switchover_to(&b).await?; // b is the primary, a streams from it
/// b.switchover_to(&a).await?; // and back
///
/// a.kill9().await?;           // failover...
/// b.promote().await?;
/// a.start_again().await?;     // ...and a split brain: two primaries
/// a.rejoin_as_standby_of(&b).await?; // a's own writes are rewound away
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PgServer {
    runner: Runner,
}

impl PgServer {
    /// Starts a server with the default options.
    pub async fn start() -> Result<PgServer> {
        Self::builder().start().await
    }

    /// Options for a new server.
    pub fn builder() -> PgServerBuilder {
        PgServerBuilder::default()
    }

    /// Makes a hot standby of `primary` on a port of its own, and waits until
    /// it is in recovery, answers queries, and streams from the primary. It
    /// takes the primary's options (max_connections, settings, ...).
    ///
    /// Locally it is made with `pg_basebackup -R -X stream` into a new temp
    /// dir; on the container backend, by the entrypoint of a new container
    /// (`REPLICATE_FROM`, which the image of `.ci/postgres-image.sh` honours
    /// and the official one does not).
    pub async fn streaming_replica(primary: &PgServer) -> Result<PgServer> {
        Ok(PgServer {
            runner: primary.runner.replica().await?,
        })
    }

    fn site(&self) -> &Site {
        self.runner.site()
    }

    // ---- where it is -----------------------------------------------------

    /// Where this server runs.
    pub fn backend(&self) -> Backend {
        self.runner.backend()
    }

    /// The TCP port, on 127.0.0.1. It never changes, whatever happens to the
    /// server.
    pub fn port(&self) -> u16 {
        self.site().port()
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The server's TCP address, `127.0.0.1:port` (e.g. for
    /// [`FaultProxy::retarget`](crate::FaultProxy::retarget)).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port()))
    }

    /// A URL for the superuser `postgres` and database `postgres`, e.g.
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres", None, "postgres")
    }

    /// A URL for `user` (with `password`, if any) and database `db`;
    /// components are percent-encoded.
    pub fn url_for(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut url = format!("postgres://{}", pct_encode(user));
        if let Some(pw) = password {
            url.push(':');
            url.push_str(&pct_encode(pw));
        }
        let _ = write!(url, "@{HOST}:{}/{}", self.port(), pct_encode(db));
        url
    }

    /// The URL for [`APP_USER`] with [`APP_PASSWORD`] and database `postgres`
    /// (the role exists only with [`PgServerBuilder::password_auth`]).
    pub fn app_url(&self) -> String {
        self.url_for(APP_USER, Some(APP_PASSWORD), "postgres")
    }

    /// The data directory.
    ///
    /// On the container backend it is inside the container
    /// (`/var/lib/postgresql/data`); this is then `data` in
    /// [`root_dir`](Self::root_dir), a path that does not exist.
    pub fn data_dir(&self) -> &Path {
        self.site().data_dir()
    }

    /// The directory holding the server's unix socket.
    ///
    /// On the container backend, a directory of this machine mounted into the
    /// container, where PostgreSQL makes a second socket: `.s.PGSQL.5432`, for
    /// the port inside the container.
    pub fn socket_dir(&self) -> &Path {
        self.site().socket_dir()
    }

    /// The temp dir holding the data dir, the socket dir and the log.
    ///
    /// On the container backend it is on this machine and holds the socket
    /// dir and the log copy; it is removed on drop all the same.
    pub fn root_dir(&self) -> &Path {
        self.site().root()
    }

    /// The server log (the postmaster's stderr).
    ///
    /// On the container backend, a copy of the container's log (`docker
    /// logs`, stdout and stderr) that the harness appends to as it is written.
    pub fn log_path(&self) -> &Path {
        self.site().log_path()
    }

    /// The last `n` lines of the server log (empty if there is none yet);
    /// on the container backend, of `docker logs`.
    pub fn log_tail(&self, n: usize) -> String {
        self.runner.log_tail(n)
    }

    /// The directory of the PostgreSQL binaries in use.
    ///
    /// On the container backend, those of this machine if found (its `psql`
    /// is the client the harness uses), else an empty path (so
    /// [`command`](Self::command) looks programs up in `PATH`).
    pub fn bin_dir(&self) -> &Path {
        &self.site().bin_dir
    }

    /// A command for the PostgreSQL program `program` (e.g. `"psql"`) from
    /// [`bin_dir`](Self::bin_dir), run the way the harness runs its own: as
    /// the `postgres` OS user when running as root, in the server's temp dir,
    /// with an environment holding only `PATH`, `LD_LIBRARY_PATH`, `HOME` (the
    /// temp dir) and `LC_ALL=C` (so no stray `PG*` variables apply), stdin
    /// from /dev/null, and killed when dropped.
    pub fn command(&self, program: &str) -> Command {
        self.site().command(program)
    }

    // ---- its process -------------------------------------------------------

    /// The postmaster's pid, read from `postmaster.pid`; `None` unless the
    /// server is running (a paused server is running).
    ///
    /// On the container backend, the pid of the container's main process (the
    /// postmaster) on the Docker host, as the engine reports it.
    pub fn pid(&self) -> Option<u32> {
        self.runner.pid()
    }

    /// Whether the postmaster is alive (paused counts as alive).
    pub fn is_running(&self) -> bool {
        self.runner.is_running()
    }

    /// Whether [`pause`](Self::pause) was called without a matching
    /// [`resume`](Self::resume) (or stop, kill, restart) since.
    pub fn is_paused(&self) -> bool {
        self.runner.is_paused()
    }

    /// Starts the server again on the same data dir and port, after
    /// [`kill9`](Self::kill9) or a stop. Crash recovery runs if it was killed.
    /// Fails with [`HarnessError::AlreadyRunning`](crate::HarnessError::AlreadyRunning)
    /// if it runs.
    ///
    /// It comes back in the role it had: a standby stays one. An old primary
    /// started again after its standby was [promoted](Self::promote) is a
    /// primary, beside the new one: a split brain, each taking writes the
    /// other never sees. [`rejoin_as_standby_of`](Self::rejoin_as_standby_of)
    /// ends it, throwing the old primary's own writes away.
    pub async fn start_again(&self) -> Result<()> {
        self.runner.start_again().await
    }

    /// Stops the server if it runs (fast mode), then starts it again on the
    /// same data dir and port.
    pub async fn restart(&self) -> Result<()> {
        self.stop_fast().await?;
        self.start_again().await
    }

    /// SIGKILLs the postmaster and every process it forked, as in a crash,
    /// and waits until they are gone. The server stops answering; the data
    /// dir stays, so [`start_again`](Self::start_again) brings it back.
    pub async fn kill9(&self) -> Result<()> {
        self.runner.kill9().await
    }

    /// `pg_ctl stop -m fast`: disconnects clients, checkpoints, exits. Does
    /// nothing if the server is not running; resumes it first if paused.
    pub async fn stop_fast(&self) -> Result<()> {
        self.runner.stop(StopMode::Fast).await
    }

    /// `pg_ctl stop -m immediate`: exits at once, without a checkpoint (the
    /// next start runs crash recovery). Does nothing if the server is not
    /// running; resumes it first if paused.
    pub async fn stop_immediate(&self) -> Result<()> {
        self.runner.stop(StopMode::Immediate).await
    }

    /// SIGSTOPs the postmaster and all its children (backends included), so
    /// new connections and established ones hang. Undo with
    /// [`resume`](Self::resume); stopping, killing and dropping resume first.
    pub fn pause(&self) -> Result<()> {
        self.runner.pause()
    }

    /// SIGCONTs the postmaster and all its children.
    pub fn resume(&self) -> Result<()> {
        self.runner.resume()
    }

    // ---- roles -------------------------------------------------------------

    /// Promotes this standby to a primary (`pg_promote()`), and returns once
    /// `pg_is_in_recovery()` is false. It keeps its port; its standbys, if
    /// any, follow it to its new timeline. Fails with
    /// [`HarnessError::Refused`](crate::HarnessError::Refused) if it is not a
    /// standby.
    ///
    /// Its old primary, if still running, stays a primary: stop it first for
    /// a failover, or see [`switchover_to`](Self::switchover_to).
    pub async fn promote(&self) -> Result<()> {
        self.runner.promote().await
    }

    /// Makes this server, an old primary (running, stopped or killed), a hot
    /// standby of `primary` on the same port, and returns once it streams
    /// from `primary`: an address that reached the old primary now reaches a
    /// standby, which refuses writes. Whatever it wrote that `primary` never
    /// saw is thrown away.
    ///
    /// Locally the server is stopped and its data dir rewound with `pg_rewind
    /// -R` (every server has `wal_log_hints = on` for it); on the container
    /// backend its container is replaced by a new one, on the same port, made
    /// from a base backup of `primary` (a stopped container's data cannot be
    /// rewound: `pg_rewind` needs the server stopped, and a container without
    /// its postmaster is stopped too).
    ///
    /// Fails with [`HarnessError::Refused`](crate::HarnessError::Refused) if
    /// `primary` is in recovery, is this server, or runs on another backend.
    pub async fn rejoin_as_standby_of(&self, primary: &PgServer) -> Result<()> {
        self.runner.rejoin(&primary.runner).await
    }

    /// A switchover from this primary to `standby`: stops this server cleanly
    /// (so every write it took has reached `standby`), promotes `standby`, and
    /// makes this server a standby of it ([`rejoin_as_standby_of`](Self::rejoin_as_standby_of)).
    /// Both keep their ports: the roles behind the two addresses swap.
    pub async fn switchover_to(&self, standby: &PgServer) -> Result<()> {
        self.stop_fast().await?;
        standby.promote().await?;
        self.rejoin_as_standby_of(standby).await
    }

    // ---- admin ---------------------------------------------------------------

    /// Runs `sql` (one or more statements) through `psql` as the superuser in
    /// database `postgres`, over the unix socket (on the container backend:
    /// the one in [`socket_dir`](Self::socket_dir), or with `docker exec` when
    /// this machine has no `psql`), and returns its stdout with
    /// the trailing newline removed: unaligned, tuples only, quiet, so
    /// `psql("SELECT 1, 2")` is `"1|2"`. Stops at the first error, which
    /// becomes [`HarnessError::CommandFailed`](crate::HarnessError::CommandFailed)
    /// holding psql's stderr.
    pub async fn psql(&self, sql: &str) -> Result<String> {
        self.psql_db("postgres", sql).await
    }

    /// Like [`psql`](Self::psql), in database `db`.
    pub async fn psql_db(&self, db: &str, sql: &str) -> Result<String> {
        self.runner.psql(db, sql).await
    }

    /// `CREATE DATABASE "name"`.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        self.psql(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map(drop)
    }
}

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(pct_encode("a b@c:d/é"), "a%20b%40c%3Ad%2F%C3%A9");
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }
}
