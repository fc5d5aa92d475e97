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
