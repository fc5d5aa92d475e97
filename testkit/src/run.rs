//! [`Run`]: what a runner does with its server, whichever backend it runs on.

use crate::error::Result;
use crate::site::Site;

/// Lines of server log included in errors.
pub(crate) const ERROR_LOG_LINES: usize = 30;

/// How [`Run::stop`] stops a server, named as for `pg_ctl stop -m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StopMode {
    /// Disconnects clients, checkpoints, exits (SIGINT to the postmaster).
    Fast,
    /// Exits at once, without a checkpoint (SIGQUIT to the postmaster).
    Immediate,
}

/// What a runner does with its server. Both runners do all of it; the public methods of
/// [`PgServer`](crate::PgServer) document what each one means.
pub(crate) trait Run: Sized {
    /// Where the server lives on this machine.
    fn site(&self) -> &Site;
    fn pid(&self) -> Option<u32>;
    fn is_running(&self) -> bool;
    fn is_paused(&self) -> bool;
    fn log_tail(&self, n: usize) -> String;
    /// The host and port a standby of this server connects to (they differ from the
    /// published ones in a container network).
    fn address_for_standbys(&self) -> (String, u16);
    /// `psql` as the superuser in database `db`; see [`PgServer::psql`](crate::PgServer::psql).
    async fn psql(&self, db: &str, sql: &str) -> Result<String>;
    async fn kill9(&self) -> Result<()>;
    /// Does nothing if the server is not running; resumes it first if paused.
    async fn stop(&self, mode: StopMode) -> Result<()>;
    fn pause(&self) -> Result<()>;
    fn resume(&self) -> Result<()>;
    /// Starts the stopped or killed server again, on its port and data.
    async fn start_again(&self) -> Result<()>;
    /// A new server, a standby of this one, started (not yet known to stream).
    async fn replica(&self) -> Result<Self>;
    /// Makes this server, stopped or not, a standby of `primary` on its own port, and starts
    /// it (not yet known to stream).
    async fn rejoin(&self, primary: &Self) -> Result<()>;
}
