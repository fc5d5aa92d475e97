//! Endpoint URLs read as the pool's database's connect options, with problems that never
//! repeat the URL (it may hold a password).

use std::str::FromStr;

use super::{ConnectOptionsOf, EndpointSpec, Target};
use crate::backend::Backend;
use crate::problem::ConfigProblem;

/// Whether `url` is one of this database's (sqlx would parse some others without a word).
fn has_scheme<DB: Backend>(url: &str) -> bool {
    url.split_once(':').is_some_and(|(scheme, _)| {
        <DB as sqlx::Database>::URL_SCHEMES.contains(&scheme.to_ascii_lowercase().as_str())
    })
}

pub(super) fn connect_options<DB: Backend>(
    spec: &EndpointSpec<DB>,
    path: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<ConnectOptionsOf<DB>> {
    if spec.name.trim().is_empty() {
        problems.push(ConfigProblem::new(
            format!("{path}.name"),
            "an endpoint name must not be empty",
        ));
    }
    match &spec.target {
        Target::Options(options) => Some((**options).clone()),
        Target::Unresolved => None,
        Target::Url(url) if !has_scheme::<DB>(url) => {
            // Not a word of the text itself: without a known scheme there is no telling
            // where a password sits in it (`host=db password=...` has none at all).
            problems.push(ConfigProblem::new(
                format!("{path}.url"),
                format!(
                    "not a {} URL: it must start with {}:",
                    DB::SYSTEM,
                    <DB as sqlx::Database>::URL_SCHEMES.join(": or ")
                ),
            ));
            None
        }
        Target::Url(url) => {
            if let Some(problem) = unknown_parameter::<DB>(url) {
                problems.push(ConfigProblem::new(format!("{path}.url"), problem));
                return None;
            }
            match ConnectOptionsOf::<DB>::from_str(url) {
                Ok(options) => Some(options),
                Err(_) => {
                    // Not the driver's message: it quotes the values it rejects, and a
                    // value may be a password.
                    problems.push(ConfigProblem::new(
                        format!("{path}.url"),
                        format!(
                            "not a valid {} connection URL: check its host, port, database \
                             and parameter values (the text is not repeated here, as it may \
                             hold a password)",
                            DB::SYSTEM
                        ),
                    ));
                    None
                }
            }
        }
    }
}

/// The first query parameter of `url` that this database does not know, named without its
/// value.
fn unknown_parameter<DB: Backend>(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').map_or(pair, |(key, _)| key))
        .find(|key| {
            let known = DB::URL_PARAMETERS.contains(key)
                || (key.starts_with("options[") && key.ends_with(']'));
            !known
        })
        .map(|key| {
            // A key is a name, not a secret; still, only a short, plain one is repeated.
            let shown = if key.len() <= 40
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_[]".contains(c))
            {
                format!("`{key}`")
            } else {
                "a parameter".to_owned()
            };
            format!(
                "{shown} is not a {} connection parameter (known: {})",
                DB::SYSTEM,
                DB::URL_PARAMETERS.join(", ")
            )
        })
}

/// One host of a multi-host URL, as an endpoint of its own.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ClusterHost {
    /// `host:port`, the endpoint's name.
    pub(super) name: String,
    /// The URL with this host alone.
    pub(super) url: String,
}

/// A libpq-style multi-host URL taken apart (`postgres://u:p@h1:5432,h2:5433/db?..`).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Cluster {
    pub(super) hosts: Vec<ClusterHost>,
    /// Whether `target_session_attrs` asked for a standby (`read-only`, `standby`,
    /// `prefer-standby`): reads then prefer replicas.
    pub(super) prefer_standby: bool,
}

/// Splits a URL naming several hosts into one URL per host, the way libpq reads
/// `postgres://h1,h2:5433/db` (sqlx takes one host). `None` for a URL with one host;
/// `Some(Err(problem))` for one that cannot be read (the problem never quotes the URL).
pub(super) fn split_hosts(url: &str) -> Option<Result<Cluster, String>> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    if !hosts.contains(',') {
        return None;
    }
    Some(split(scheme, userinfo, hosts, tail))
}

fn split(scheme: &str, userinfo: Option<&str>, hosts: &str, tail: &str) -> Result<Cluster, String> {
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let mut prefer_standby = false;
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|query| query.split('&')) {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => match value {
                "any" | "read-write" | "primary" => {}
                "read-only" | "standby" | "prefer-standby" => prefer_standby = true,
                _ => {
                    return Err("target_session_attrs must be any, read-write, primary, \
                                read-only, standby or prefer-standby"
                        .to_owned());
                }
            },
            _ => kept.push(pair),
        }
    }
    let query = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    let userinfo = userinfo.map_or(String::new(), |userinfo| format!("{userinfo}@"));
    let mut out = Vec::new();
    for (index, host) in hosts.split(',').enumerate() {
        let (name_host, port) = host_and_port(host)
            .ok_or_else(|| format!("host {} of the host list is empty or malformed", index + 1))?;
        out.push(ClusterHost {
            name: format!("{name_host}:{}", port.unwrap_or("5432")),
            url: format!("{scheme}://{userinfo}{host}{path}{query}"),
        });
    }
    Ok(Cluster {
        hosts: out,
        prefer_standby,
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_and_port(host: &str) -> Option<(&str, Option<&str>)> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        match after {
            "" => (name, None),
            _ => (name, Some(after.strip_prefix(':')?)),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let port_ok = port.is_none_or(|port| !port.is_empty() && port.parse::<u16>().is_ok());
    (!name.is_empty() && port_ok).then_some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_becomes_one_url_per_host() {
        let cluster = split_hosts(
            "postgres://app:pw@h1:5432,h2:5433,[::1]/app?sslmode=disable&target_session_attrs=read-write",
        )
        .expect("several hosts")
        .expect("readable");
        let urls: Vec<_> = cluster
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h.url.as_str()))
            .collect();
        assert_eq!(
            urls,
            [
                ("h1:5432", "postgres://app:pw@h1:5432/app?sslmode=disable"),
                ("h2:5433", "postgres://app:pw@h2:5433/app?sslmode=disable"),
                ("::1:5432", "postgres://app:pw@[::1]/app?sslmode=disable"),
            ]
        );
        assert!(!cluster.prefer_standby);
    }

    #[test]
    fn one_host_is_not_a_cluster_and_bad_lists_say_so_without_the_url() {
        assert_eq!(split_hosts("postgres://app:pw@h1/app"), None);
        let problem = split_hosts("postgres://app:s3cr3t@h1,:x/app")
            .unwrap()
            .unwrap_err();
        assert!(!problem.contains("s3cr3t"), "{problem}");
        let standby = split_hosts("postgres://h1,h2/app?target_session_attrs=prefer-standby");
        assert!(standby.unwrap().unwrap().prefer_standby);
    }
}
