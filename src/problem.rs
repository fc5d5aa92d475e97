//! What is wrong with a configuration: one [`ConfigProblem`] per mistake, all of them in one
//! [`ConfigError`].
//!
//! The breaker, the endpoint options and the pool's configuration file all report through
//! these, so this file depends on nothing else in the crate: whatever validates can use it
//! without pulling the rest along.

use std::fmt;

use serde::Serialize;

/// One problem in a configuration: where and what.
///
/// Neither part ever holds a value taken from a connection URL: a URL may carry a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConfigProblem {
    /// Field path, e.g. `open.max` or `breakers.write.failure_rate`.
    pub path: String,
    /// What is wrong with the value.
    pub message: String,
}

impl ConfigProblem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A configuration was rejected; lists every problem found.
///
/// ```
/// use protected_pool::config::{ConfigError, ConfigProblem};
///
/// let error = ConfigError::new(vec![
///     ConfigProblem::new("pool.max_connections", "0 must be at least 1"),
///     ConfigProblem::new("timeouts.read", "0s must be above zero"),
/// ]);
/// assert_eq!(
///     error.to_string(),
///     "invalid configuration (2 problems)\n  \
///      - pool.max_connections: 0 must be at least 1\n  \
///      - timeouts.read: 0s must be above zero",
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct ConfigError {
    /// Every problem, in field order.
    pub problems: Vec<ConfigProblem>,
}

impl ConfigError {
    /// An error holding these problems.
    pub fn new(problems: Vec<ConfigProblem>) -> Self {
        Self { problems }
    }
}

impl From<ConfigProblem> for ConfigError {
    fn from(problem: ConfigProblem) -> Self {
        ConfigError::new(vec![problem])
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} problems)",
            self.problems.len()
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}
