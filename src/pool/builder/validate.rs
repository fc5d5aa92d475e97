//! A builder's settings checked as a whole: every problem at once, or a validated value that
//! holds what building needs (connect options, breakers), so building cannot fail.

use std::sync::Arc;

use super::url::connect_options;
use super::{ConnectOptionsOf, PoolBuilder};
use crate::backend::Backend;
use crate::breaker::CircuitBreaker;
use crate::endpoint::{EndpointOptions, duration_problem};
use crate::problem::{ConfigError, ConfigProblem};
use crate::route::Route;

/// One endpoint, ready to build.
pub(super) struct ValidEndpoint<DB: Backend> {
    pub(super) name: Arc<str>,
    pub(super) connect: ConnectOptionsOf<DB>,
    /// Its pool settings: its own, else the pool's.
    pub(super) options: EndpointOptions,
    /// Its breaker per route, in [`Route::ALL`] order, not wired to anything yet.
    pub(super) breakers: [CircuitBreaker; 3],
}

/// A configuration with no problem: the primary first, then the replicas.
pub(crate) struct Validated<DB: Backend> {
    pub(super) endpoints: Vec<ValidEndpoint<DB>>,
}

impl<DB: Backend> PoolBuilder<DB> {
    /// Every problem of the configuration, or the validated endpoints.
    pub(crate) fn check(&self) -> Result<Validated<DB>, ConfigError> {
        let mut problems = self.problems.clone();
        let primary = match &self.primary {
            None => {
                problems.push(ConfigProblem::new(
                    "primary",
                    "no primary endpoint: call .primary(url)",
                ));
                None
            }
            Some(spec) => connect_options::<DB>(spec, "primary", &mut problems),
        };
        let replicas: Vec<_> = self
            .replicas
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                connect_options::<DB>(spec, &format!("replicas[{index}]"), &mut problems)
            })
            .collect();
        self.check_names(&mut problems);
        self.options.validate_into("pool", &mut problems);
        let own_options = self.own_options(&mut problems);
        for route in Route::ALL {
            let config = &self.routes[route.index()];
            config
                .breaker
                .validate_into(&format!("breakers.{route}"), &mut problems);
            if let Some(problem) = duration_problem(config.timeout) {
                problems.push(ConfigProblem::new(format!("timeouts.{route}"), problem));
            }
        }
        for (path, duration) in [
            ("cache.timeout", self.cache_timeout),
            ("health_check_interval", self.health_check_interval),
        ] {
            if let Some(problem) = duration_problem(duration) {
                problems.push(ConfigProblem::new(path, problem));
            }
        }
        problems.extend(self.idempotency.problems("idempotency"));
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &self.outbox {
            problems.extend(outbox.problems("outbox"));
        }
        if !problems.is_empty() {
            return Err(ConfigError::new(problems));
        }
        let specs = self.primary.iter().chain(&self.replicas);
        let connects = std::iter::once(primary).chain(replicas);
        let mut endpoints = Vec::with_capacity(self.replicas.len() + 1);
        for ((spec, connect), options) in specs.zip(connects).zip(own_options) {
            // Every URL without a problem parsed: `connect` is there.
            let Some(connect) = connect else { continue };
            let name: Arc<str> = spec.name.as_str().into();
            let breakers = Route::ALL.map(|route| {
                let config = self.routes[route.index()].breaker.clone();
                CircuitBreaker::new(format!("{name}/{route}"), config)
            });
            let [read, write, auth] = breakers;
            endpoints.push(ValidEndpoint {
                name,
                connect,
                options: options.unwrap_or_else(|| self.options.clone()),
                breakers: [read?, write?, auth?],
            });
        }
        Ok(Validated { endpoints })
    }

    /// Each endpoint's own pool settings, if it has any (in endpoint order), each checked
    /// at its path: `endpoint_options_for` by name, else the endpoint's own `pool` table.
    fn own_options(&self, problems: &mut Vec<ConfigProblem>) -> Vec<Option<EndpointOptions>> {
        let paths = std::iter::once("primary".to_owned())
            .filter(|_| self.primary.is_some())
            .chain((0..self.replicas.len()).map(|index| format!("replicas[{index}]")));
        let specs = self.primary.iter().chain(&self.replicas);
        let own: Vec<Option<EndpointOptions>> = specs
            .zip(paths)
            .map(|(spec, path)| {
                if let Some((_, options)) =
                    self.options_for.iter().find(|(name, _)| *name == spec.name)
                {
                    options
                        .validate_into(&format!("endpoint_options_for({:?})", spec.name), problems);
                    Some(options.clone())
                } else {
                    let options = spec.options.clone()?;
                    options.validate_into(&format!("{path}.pool"), problems);
                    Some(options)
                }
            })
            .collect();
        for (name, _) in &self.options_for {
            let known = self
                .primary
                .iter()
                .chain(&self.replicas)
                .any(|spec| spec.name == *name);
            if !known {
                problems.push(ConfigProblem::new(
                    format!("endpoint_options_for({name:?})"),
                    "no endpoint has this name",
                ));
            }
        }
        own
    }

    fn check_names(&self, problems: &mut Vec<ConfigProblem>) {
        let mut names: Vec<&str> = self.primary.iter().map(|spec| spec.name.as_str()).collect();
        for (index, spec) in self.replicas.iter().enumerate() {
            if names.contains(&spec.name.as_str()) {
                problems.push(ConfigProblem::new(
                    format!("replicas[{index}].name"),
                    format!("{:?} is already the name of another endpoint", spec.name),
                ));
            }
            names.push(&spec.name);
        }
    }
}
