//! Where a server is: a URL in the file, or the environment variable holding it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::endpoint::EndpointOptions;
use crate::problem::ConfigProblem;

/// Where an endpoint is: its URL, or the environment variable holding it (to keep passwords
/// out of files).
///
/// Its `Debug` shows no URL: a URL may hold a password.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// Its name in errors, reports and metrics; default `primary` / `replica-N`.
    pub name: Option<String>,
    /// Connection URL.
    pub url: Option<String>,
    /// Environment variable holding the connection URL.
    pub url_env: Option<String>,
    /// Its own connection pool settings, replacing the document's `[pool]` table for this
    /// endpoint as a whole: a setting not given here takes its default, not `[pool]`'s.
    ///
    /// ```toml
    /// [[replicas]]
    /// url_env = "REPLICA_URL"
    /// pool = { max_connections = 40, min_connections = 4, after_connect = ["SET search_path TO app"] }
    /// ```
    pub pool: Option<EndpointOptions>,
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_env", &self.url_env)
            .field("pool", &self.pool)
            .finish()
    }
}

impl EndpointConfig {
    /// The URL, from the file or the environment; a problem at `path` if neither gives one.
    pub(crate) fn resolve_url(&self, path: &str) -> Result<String, ConfigProblem> {
        resolve_url(self.url.as_deref(), self.url_env.as_deref(), path)
    }
}

/// The URL given by `url` or by the environment variable `env`, the settings at `path`.
///
/// Text that does not start with a scheme is refused here, without being shown: the checks
/// that come later quote what stands before the first `:`, and in a connection string of
/// `key=value` pairs that can be a password.
pub(super) fn resolve_url(
    url: Option<&str>,
    env: Option<&str>,
    path: &str,
) -> Result<String, ConfigProblem> {
    const NOT_A_URL: &str = "is not a URL: it must start with a scheme such as postgres: \
                             (connection strings of key=value pairs are not read)";
    match (url, env) {
        (Some(_), Some(_)) => Err(ConfigProblem::new(
            path,
            "give either url or url_env, not both",
        )),
        (Some(url), None) if !starts_with_scheme(url) => Err(ConfigProblem::new(
            format!("{path}.url"),
            format!("the text {NOT_A_URL}"),
        )),
        (Some(url), None) => Ok(url.to_owned()),
        (None, Some(name)) => match std::env::var(name) {
            Ok(url) if starts_with_scheme(&url) => Ok(url),
            Ok(_) => Err(ConfigProblem::new(
                format!("{path}.url_env"),
                format!("what environment variable {name} holds {NOT_A_URL}"),
            )),
            Err(_) => Err(ConfigProblem::new(
                format!("{path}.url_env"),
                format!("environment variable {name} is not set (or not UTF-8)"),
            )),
        },
        (None, None) => Err(ConfigProblem::new(path, "needs url or url_env")),
    }
}

/// Whether `text` starts with a URL scheme and its `:` (RFC 3986: a letter, then letters,
/// digits, `+`, `-` or `.`).
fn starts_with_scheme(text: &str) -> bool {
    text.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

#[cfg(test)]
mod tests {
    use crate::PoolConfig;

    #[test]
    fn urls_are_validated_as_the_named_database() {
        let config = PoolConfig::from_toml("[primary]\nurl = \"sqlite::memory:\"\n").unwrap();
        config.validate_for::<sqlx::Sqlite>().unwrap();
        let error = config.validate().unwrap_err();
        assert_eq!(error.problems[0].path, "primary.url", "{error}");
    }

    #[test]
    fn a_connection_string_is_refused_without_being_shown() {
        let config =
            PoolConfig::from_toml("[primary]\nurl = \"user=app password=hunter2 hostaddr=::1\"\n")
                .unwrap();
        let error = config.validate().unwrap_err();
        assert_eq!(error.problems.len(), 1, "{error}");
        assert_eq!(error.problems[0].path, "primary.url", "{error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn a_scheme_is_a_letter_then_letters_digits_and_plus_minus_dot() {
        for url in [
            "postgres://db/app",
            "sqlite::memory:",
            "redis+unix:///run/redis.sock",
        ] {
            assert!(super::starts_with_scheme(url), "{url}");
        }
        for url in [
            "db/app",
            "pw@db:5432/app",
            "password=pw host=[::1]",
            "1db:5432",
            ":x",
        ] {
            assert!(!super::starts_with_scheme(url), "{url}");
        }
    }
}
