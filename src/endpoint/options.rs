//! Per-endpoint connection pool settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::too_long;
use crate::problem::ConfigProblem;

/// How one endpoint's connection pool behaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointOptions {
    /// Most connections open at once.
    pub max_connections: usize,
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
    /// 10 connections, 5 s to connect, 5 s to wait, 30 min lifetime with 10 % jitter, ping
    /// after 30 s idle.
    fn default() -> Self {
        Self {
            max_connections: 10,
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
    /// Appends every problem to `problems`, paths prefixed with `prefix`.
    pub fn validate_into(&self, prefix: &str, problems: &mut Vec<ConfigProblem>) {
        let mut report = |field: &str, message: String| {
            problems.push(ConfigProblem::new(format!("{prefix}.{field}"), message));
        };
        if self.max_connections == 0 {
            report("max_connections", "0 must be at least 1".into());
        }
        for (field, duration) in [
            ("connect_timeout", Some(self.connect_timeout)),
            ("wait_timeout", Some(self.wait_timeout)),
            ("max_lifetime", self.max_lifetime),
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
    }
}
