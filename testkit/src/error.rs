//! The harness's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, controlling or querying a
/// throwaway PostgreSQL server.
///
/// Every variant renders a self-contained message; the ones about a server
/// that misbehaved carry the tail of its log so a failing test shows why.
#[derive(Debug)]
#[non_exhaustive]
pub enum HarnessError {
    /// No directory holding `initdb`, `pg_ctl` and `postgres` was found.
    BinariesNotFound {
        /// Every place that was looked at, in order, with what was wrong there.
        searched: Vec<String>,
    },
    /// No `pgbouncer` program was found (see [`PgBouncer`](crate::PgBouncer)).
    PgBouncerNotFound {
        /// Every place that was looked at, in order.
        searched: Vec<String>,
    },
    /// Running as root (PostgreSQL refuses that), but there is no `postgres`
    /// OS user to run the server as.
    NoServerUser {
        /// The user name that was looked up.
        user: String,
    },
    /// An I/O operation of the harness itself failed.
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A PostgreSQL program (initdb, pg_ctl, psql, pg_basebackup, ...) exited
    /// unsuccessfully.
    CommandFailed {
        /// The program and its arguments.
        command: String,
        /// Its exit code, if it exited normally.
        code: Option<i32>,
        /// What it wrote to stdout.
        stdout: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// The server did not start (or a replica did not become ready).
    StartFailed {
        /// What went wrong.
        message: String,
        /// Path of the server log.
        log_path: PathBuf,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// Something did not finish in time.
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long the harness waited.
        after: Duration,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The operation needs a running server, but it is stopped or was killed.
    NotRunning,
    /// `start_again` was called while the server is running.
    AlreadyRunning,
    /// A change of role that cannot be made on these servers as they are: promoting a server
    /// that is not a standby, or rejoining a server as a standby of one that is itself in
    /// recovery, of itself, or of a server on another backend.
    Refused {
        /// What was asked, naming the servers by port.
        what: String,
        /// Why it cannot be done, and what to do instead.
        why: String,
    },
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }
}

fn write_tail(f: &mut fmt::Formatter<'_>, log_tail: &str) -> fmt::Result {
    if log_tail.trim().is_empty() {
        write!(f, "\n--- server log is empty ---")
    } else {
        write!(f, "\n--- server log (tail) ---\n{}", log_tail.trim_end())
    }
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::BinariesNotFound { searched } => {
                write!(
                    f,
                    "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; looked in:"
                )?;
                for place in searched {
                    write!(f, "\n  - {place}")?;
                }
                write!(
                    f,
                    "\ninstall PostgreSQL (Debian: `apt-get install postgresql`) or set \
                     {} to its bin directory",
                    crate::bins::BIN_DIR_ENV
                )
            }
            HarnessError::PgBouncerNotFound { searched } => {
                write!(f, "no pgbouncer program found; looked in:")?;
                for place in searched {
                    write!(f, "\n  - {place}")?;
                }
                write!(
                    f,
                    "\ninstall it (Debian: `apt-get install pgbouncer`) or set {} to it",
                    crate::pgbouncer::PGBOUNCER_ENV
                )
            }
            HarnessError::NoServerUser { user } => write!(
                f,
                "running as root, and PostgreSQL refuses to run as root, but there is no \
                 `{user}` OS user in /etc/passwd to run it as"
            ),
            HarnessError::Io { context, source } => write!(f, "{context}: {source}"),
            HarnessError::CommandFailed {
                command,
                code,
                stdout,
                stderr,
            } => {
                match code {
                    Some(code) => write!(f, "`{command}` exited with code {code}")?,
                    None => write!(f, "`{command}` was killed by a signal")?,
                }
                if !stderr.trim().is_empty() {
                    write!(f, "\nstderr: {}", stderr.trim_end())?;
                }
                if !stdout.trim().is_empty() {
                    write!(f, "\nstdout: {}", stdout.trim_end())?;
                }
                Ok(())
            }
            HarnessError::StartFailed {
                message,
                log_path,
                log_tail,
            } => {
                write!(f, "{message} (log: {})", log_path.display())?;
                write_tail(f, log_tail)
            }
            HarnessError::Timeout {
                what,
                after,
                log_tail,
            } => {
                write!(f, "timed out after {after:?} waiting for {what}")?;
                if log_tail.trim().is_empty() {
                    Ok(())
                } else {
                    write_tail(f, log_tail)
                }
            }
            HarnessError::NotRunning => write!(f, "the PostgreSQL server is not running"),
            HarnessError::AlreadyRunning => write!(f, "the PostgreSQL server is already running"),
            HarnessError::Refused { what, why } => write!(f, "refused {what}: {why}"),
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HarnessError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
