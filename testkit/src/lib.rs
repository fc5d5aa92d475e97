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
//! # Roles and moving addresses
//!
//! Servers change roles the way a cluster's nodes do, each keeping its port:
//! [`promote`](PgServer::promote) a standby,
//! [`rejoin_as_standby_of`](PgServer::rejoin_as_standby_of) the new primary
//! with the old one, or both at once with
//! [`switchover_to`](PgServer::switchover_to); an old primary
//! [started again](PgServer::start_again) after a promotion is a split brain.
//! A [`FaultProxy`] in front stands for an address that moves between
//! servers, as a DNS name or a virtual IP does:
//! [`point_to`](FaultProxy::point_to) the new primary.
//!
//! ```no_run
//! use protected_pool_testkit::{FaultProxy, PgServer, HarnessError};
//!
//! # async fn demo() -> Result<(), HarnessError> {
//! let a = PgServer::start().await?;
//! let b = PgServer::streaming_replica(&a).await?;
//! let writer = FaultProxy::to_server(&a).await?; // the primary's address
//! let url = a.url_via(&writer);
//!
//! a.kill9().await?;                  // failover
//! b.promote().await?;
//! writer.point_to(&b);               // the address moves with the role
//! a.rejoin_as_standby_of(&b).await?; // a's port now reaches a standby
//! # let _ = url; Ok(()) }
//! ```
//!
//! # PgBouncer
//!
//! [`PgBouncer`] runs the machine's real `pgbouncer` in front of a server, in transaction
//! mode by default, on a port of its own: for code that must work behind a pooler.
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
//! # Backends: local processes or containers
//!
//! `$PGTESTKIT_BACKEND` ([`BACKEND_ENV`]) picks where new servers run:
//! `local` (the default when the binaries above are found) or `container`
//! (the default when they are not): a Docker container per server, started
//! through testcontainers, from the image `$PGTESTKIT_IMAGE:$PGTESTKIT_IMAGE_TAG`
//! ([`IMAGE_ENV`], [`IMAGE_TAG_ENV`]; default `postgres:15`, the official
//! image). The same tests run on both: every method works on both, with the
//! same URLs (`127.0.0.1`, a fixed published port kept across
//! [`start_again`](PgServer::start_again)), the same settings and the same
//! authentication rules. What differs is where things are:
//! [`data_dir`](PgServer::data_dir) is inside the container (the path returned
//! does not exist), [`log_path`](PgServer::log_path) is a copy of `docker
//! logs`, [`pid`](PgServer::pid) is the container's main process as the engine
//! reports it, `listen_addresses` is `*` (the port is published on 127.0.0.1
//! only), and faults are Docker operations (`docker kill`, `pause`, `start`).
//! [`PgServer::backend`] tells which backend a server runs on. A streaming
//! replica, and an old primary rejoining as a standby (a new container on the
//! same port), need an image whose entrypoint honours `REPLICATE_FROM`, which
//! the local image does and the official one does not. Servers start in about
//! 0.7 s with the local image instead of 0.2 s. Containers are labelled with the
//! process that owns them, and removed like leftover directories.
//!
//! No image registry is needed: `.ci/postgres-image.sh` builds the image
//! `protected-pool/postgres:15-local` with `docker import` from this machine's
//! PostgreSQL 15, its shared libraries, a static busybox and an entrypoint
//! (`.ci/postgres-image-entrypoint.sh`) that mirrors the official image's
//! `POSTGRES_*` variables, and ships a cluster made by `initdb` at build time
//! (a container's first start only configures it: about 0.7 s instead of 2 s).
//! It also installs and starts a Docker engine (Debian's `docker.io`) if none
//! answers, and prints the environment to use:
//!
//! ```text
//! eval "$(.ci/postgres-image.sh)"   # DOCKER_HOST, PGTESTKIT_IMAGE, PGTESTKIT_IMAGE_TAG
//! PGTESTKIT_BACKEND=container cargo test --test pg_classification
//! ```
//!
//! `.ci/run` does this for the harness's tests and every `tests/pg_*.rs`.
//!
//! Needs Linux (`/proc`) and a tokio runtime with the IO, time and process
//! drivers (`#[tokio::test]` has them); the container backend needs a Docker
//! engine on this machine (it publishes ports on its 127.0.0.1 and mounts a
//! directory of it).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod bins;
mod container;
mod error;
mod local;
mod options;
mod pgbouncer;
mod procs;
mod programs;
mod proxy;
mod run;
mod runner;
mod server;
mod site;
mod template;

pub use backend::{BACKEND_ENV, Backend};
pub use bins::BIN_DIR_ENV;
pub use container::{IMAGE_ENV, IMAGE_TAG_ENV, SUPERUSER_PASSWORD};
pub use error::{HarnessError, Result};
pub use pgbouncer::{PGBOUNCER_ENV, PgBouncer, PgBouncerBuilder};
pub use proxy::{FaultMode, FaultProxy};
pub use server::{APP_PASSWORD, APP_USER, PgServer, PgServerBuilder};
pub use site::TMPDIR_ENV;

/// Same as [`PgServer::streaming_replica`].
pub async fn streaming_replica(primary: &PgServer) -> Result<PgServer> {
    PgServer::streaming_replica(primary).await
}
