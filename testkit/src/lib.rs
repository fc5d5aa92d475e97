//! Throwaway real PostgreSQL servers for `protected-pool`'s tests, examples
//! and benches.
//!
//! Each [`PgServer`] gets its own temp dir (data dir, unix socket dir and
//! log), a free port on 127.0.0.1, and a config tuned for tests (`fsync`
//! and `synchronous_commit` off, small `shared_buffers`) that is also ready
//! for streaming replication. Servers start in parallel without clashing.
//! Dropping a server stops it and removes its directory.
//!
//! # Speed
//!
//! A server starts in roughly 0.1–0.2 s; the first one in a process takes
//! about a second more, for the one `initdb` whose result every later server
//! copies (from memory, so nothing is left on disk when the process exits).
//! Server directories go to `/dev/shm` (tmpfs) when it exists, where writing a
//! data dir is several times faster than on disk; set `$PGTESTKIT_TMPDIR` to
//! put them elsewhere. The postmaster is started directly rather than with
//! `pg_ctl start -w`, whose 100 ms polling interval was half the start time;
//! readiness is the same check pg_ctl makes (`postmaster.pid` says `ready`),
//! every 5 ms, plus a TCP connect.
//!
//! # Leftovers
//!
//! If a test process dies without unwinding (SIGKILL, Ctrl-C, a server kept in
//! a `static`), its servers outlive it; the next process that starts a server
//! stops them and removes their directories (each directory names the process
//! that owns it).
//!
//! ```no_run
//! use protected_pool_testkit::{PgServer, HarnessError};
//!
//! # async fn demo() -> Result<(), HarnessError> {
//! let pg = PgServer::builder().max_connections(20).password_auth(true).start().await?;
//! let url = pg.app_url(); // postgres://app:app-password@127.0.0.1:PORT/postgres
//! assert_eq!(pg.psql("SELECT 1").await?, "1");
//!
//! pg.pause()?;            // every connection hangs
//! pg.resume()?;
//! pg.kill9().await?;      // crash
//! pg.start_again().await?; // crash recovery, same port
//!
//! let replica = PgServer::streaming_replica(&pg).await?;
//! assert_eq!(replica.psql("SELECT pg_is_in_recovery()").await?, "t");
//! # let _ = url; Ok(()) }
//! ```
//!
//! # Binaries and users
//!
//! The PostgreSQL binaries come from `$PGTESTKIT_BIN_DIR` if set, else from
//! the first `PATH` entry holding `initdb`, `pg_ctl` and `postgres`, else from
//! the highest `/usr/lib/postgresql/<version>/bin`. If none is found,
//! starting a server fails with [`HarnessError::BinariesNotFound`] listing
//! every place looked at. When running as root, the PostgreSQL programs run
//! as the `postgres` OS user (PostgreSQL refuses to run as root).
//!
//! Needs Linux (`/proc`) and a tokio runtime with the IO, time and process
//! drivers (`#[tokio::test]` has them).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bins;
mod error;
mod procs;
mod server;
mod template;

pub use bins::BIN_DIR_ENV;
pub use error::{HarnessError, Result};
pub use server::{APP_PASSWORD, APP_USER, PgServer, PgServerBuilder, TMPDIR_ENV};

/// Same as [`PgServer::streaming_replica`].
pub async fn streaming_replica(primary: &PgServer) -> Result<PgServer> {
    PgServer::streaming_replica(primary).await
}
