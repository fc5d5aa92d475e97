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
        Target::Url(url) => match ConnectOptionsOf::<DB>::from_str(url) {
            Ok(options) => Some(options),
            Err(error) => {
                // The driver's message only: the URL itself may hold a password.
                problems.push(ConfigProblem::new(
                    format!("{path}.url"),
                    format!("not a valid connection URL: {error}"),
                ));
                None
            }
        },
    }
}
