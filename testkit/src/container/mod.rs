//! The container backend: servers whose PostgreSQL runs in a Docker
//! container started through testcontainers (the `postgres` module of
//! testcontainers-modules, with the image name and tag from
//! [`IMAGE_ENV`] / [`IMAGE_TAG_ENV`]).
//!
//! Every container
//! - publishes 5432 on a fixed port of 127.0.0.1 picked before it is created,
//!   so a container started again after a stop or a kill keeps its URL, and
//!   so does the new container a rejoin replaces it with;
//! - joins the Docker network `pgtestkit` (created when missing, never
//!   removed), where a streaming replica reaches its primary by container name;
//! - mounts the server's socket dir, where PostgreSQL makes a second unix
//!   socket, so that the harness's `psql` connects as on the local backend
//!   (over a unix socket: `client_addr` is null, the client is not counted
//!   among the TCP clients tests look at);
//! - gets the harness's settings as `-c name=value` arguments of `postgres`,
//!   and its own `pg_hba.conf` (`hba_file`), copied into the container, with
//!   the rules of the local backend for the container's network (`samenet`:
//!   the Docker bridge the host's connections arrive from). The superuser
//!   also has the password [`SUPERUSER_PASSWORD`] (the official image wants
//!   one);
//! - is labelled with the test process that owns it; the next process that
//!   starts a container removes those of processes that died without
//!   unwinding.
//!
//! Fault injection maps onto the Docker API: `kill9` is `docker kill -s KILL`,
//! `stop_fast` / `stop_immediate` send the postmaster SIGINT / SIGQUIT and wait
//! until the container exited, `pause` / `resume` are `docker pause` /
//! `docker unpause`, `start_again` is `docker start`. Replicas and rejoined
//! standbys are made by the image's entrypoint (`REPLICATE_FROM`).

mod engine;
mod handle;
mod runner;
mod spec;

pub(crate) use runner::ContainerServer;
pub use spec::{IMAGE_ENV, IMAGE_TAG_ENV, SUPERUSER_PASSWORD};
