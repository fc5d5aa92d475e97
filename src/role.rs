//! What a server is to the pool: a primary or a standby. A leaf: the backends report it and
//! the endpoints keep it (see `endpoint/role.rs`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What an endpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Takes writes and, by default, reads.
    Primary,
    /// A read-only copy (a streaming standby).
    Replica,
}

impl Role {
    /// Lower-case name, as used in reports, logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a server said about itself: its role, and which server it is (two endpoints may
/// reach one server, e.g. a moved address and the server's own: that is one primary, not a
/// split brain).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by `Backend`'s sealed methods, unnameable outside the crate
pub struct Observed {
    /// Primary or standby.
    pub role: Role,
    /// What tells this server from others (PostgreSQL: its address and port as it sees them
    /// and when its postmaster started); `None` when nothing does.
    pub server: Option<String>,
}
