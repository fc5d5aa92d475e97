//! Where a server is: a URL in the file, or the environment variable holding it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::problem::ConfigProblem;

/// Where an endpoint is: its URL, or the environment variable holding it (to keep passwords
/// out of files).
///
/// Its `Debug` shows no URL: a URL may hold a password.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// Its name in errors, reports and metrics; default `primary` / `replica-N`.
    pub name: Option<String>,
    /// Connection URL.
    pub url: Option<String>,
    /// Environment variable holding the connection URL.
    pub url_env: Option<String>,
}

impl fmt::Debug for EndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointConfig")
            .field("name", &self.name)
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("url_env", &self.url_env)
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
pub(super) fn resolve_url(
    url: Option<&str>,
    env: Option<&str>,
    path: &str,
) -> Result<String, ConfigProblem> {
    match (url, env) {
        (Some(_), Some(_)) => Err(ConfigProblem::new(
            path,
            "give either url or url_env, not both",
        )),
        (Some(url), None) => Ok(url.to_owned()),
        (None, Some(name)) => std::env::var(name).map_err(|_| {
            ConfigProblem::new(
                format!("{path}.url_env"),
                format!("environment variable {name} is not set (or not UTF-8)"),
            )
        }),
        (None, None) => Err(ConfigProblem::new(path, "needs url or url_env")),
    }
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
}
