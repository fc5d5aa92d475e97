//! A builder set up from a [`PoolConfig`].

use super::url::split_hosts;
use super::{EndpointSpec, PoolBuilder, Target};
use crate::backend::Backend;
use crate::config::{EndpointConfig, PoolConfig};
use crate::route::Route;

impl<DB: Backend> PoolBuilder<DB> {
    /// `from_config`, without making the cache when `with_cache` is false (for validation).
    pub(crate) fn configured(config: &PoolConfig, with_cache: bool) -> Self {
        let mut builder = Self::new()
            .endpoint_options(config.pool.clone())
            .read_preference(config.read_preference)
            .replica_selection(config.replica_selection)
            .max_replica_lag(config.max_replica_lag)
            .health_check_interval(config.health_check_interval)
            .recovery_probes(config.recovery_probes)
            .cache_timeout(config.cache.timeout)
            .idempotency(config.idempotency.clone());
        #[cfg(feature = "outbox")]
        if let Some(outbox) = &config.outbox {
            builder = builder.outbox(outbox.clone());
        }
        for route in Route::ALL {
            builder = builder.route(route, config.route(route));
        }
        let mut problems = Vec::new();
        let mut spec = |endpoint: &EndpointConfig, path: &str, default_name: String| {
            let target = match endpoint.resolve_url(path) {
                Ok(url) => Target::Url(url),
                Err(problem) => {
                    problems.push(problem);
                    Target::Unresolved
                }
            };
            let name = endpoint.name.clone().unwrap_or(default_name);
            EndpointSpec {
                name,
                target,
                options: endpoint.pool.clone(),
            }
        };
        builder.primary = config
            .primary
            .as_ref()
            .map(|primary| spec(primary, "primary", "primary".to_owned()));
        builder.replicas = config
            .replicas
            .iter()
            .enumerate()
            .map(|(index, replica)| {
                spec(
                    replica,
                    &format!("replicas[{index}]"),
                    format!("replica-{}", index + 1),
                )
            })
            .collect();
        // A primary URL with a host list is a whole cluster, as in code.
        if let Some(EndpointSpec {
            target: Target::Url(url),
            ..
        }) = &builder.primary
            && split_hosts(url).is_some()
        {
            let url = url.clone();
            let replicas = std::mem::take(&mut builder.replicas);
            builder = builder.cluster_at("primary.url", url);
            builder.replicas.extend(replicas);
        }
        config.cache_problems(&mut problems);
        problems.append(&mut builder.problems);
        if with_cache {
            builder.cache = config.build_cache(&mut problems);
        }
        builder.problems = problems;
        builder
    }
}
