//! The local backend: the postmaster runs from this machine's PostgreSQL binaries, as a child
//! of the test process, on a data dir in the server's temp dir.

mod data_dir;
mod postmaster;
mod runner;

pub(crate) use runner::LocalServer;
