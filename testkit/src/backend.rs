//! Where a server's PostgreSQL runs: [`Backend`], chosen by `$PGTESTKIT_BACKEND`.

use crate::bins;
use crate::error::{HarnessError, Result};

/// Environment variable choosing the backend of new servers: `local` or
/// `container`. Unset or empty: `local` when the local PostgreSQL binaries
/// are found (see [`BIN_DIR_ENV`](crate::BIN_DIR_ENV)), else `container`.
pub const BACKEND_ENV: &str = "PGTESTKIT_BACKEND";

/// Where a [`PgServer`](crate::PgServer)'s PostgreSQL runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// A postmaster started from this machine's PostgreSQL binaries, as a
    /// child of the test process.
    Local,
    /// A Docker container, started through testcontainers.
    Container,
}

impl Backend {
    /// The backend new servers get: `$PGTESTKIT_BACKEND` if set (`local` or
    /// `container`), else [`Local`](Backend::Local) when the local binaries are
    /// found and [`Container`](Backend::Container) otherwise. An unknown value
    /// is an error.
    pub fn selected() -> Result<Backend> {
        selection().map(|(backend, _)| backend)
    }
}

/// The backend, and whether `$PGTESTKIT_BACKEND` chose it.
pub(crate) fn selection() -> Result<(Backend, bool)> {
    let value = std::env::var_os(BACKEND_ENV).unwrap_or_default();
    let value = value.to_string_lossy();
    match value.trim().to_ascii_lowercase().as_str() {
        "" => Ok(match bins::bin_dir() {
            Ok(_) => (Backend::Local, false),
            Err(_) => (Backend::Container, false),
        }),
        "local" => Ok((Backend::Local, true)),
        "container" | "docker" | "testcontainers" => Ok((Backend::Container, true)),
        other => Err(HarnessError::io(
            format!("reading ${BACKEND_ENV}"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{other}` is neither `local` nor `container`"),
            ),
        )),
    }
}
