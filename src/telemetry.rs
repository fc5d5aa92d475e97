//! Metrics (through the `metrics` crate) and the names they are published under.
//!
//! Install a recorder (for example `metrics-exporter-prometheus`) **before** building the pool:
//! the counters of the hot path are registered once, when the pool is built, so that a call
//! costs an atomic increment rather than a label lookup.
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `protected_pool_calls_total` | counter | `route`, `endpoint`, `outcome` | attempts on an endpoint (`success`, `failure`, `rejected`) and calls served without one (`cache`, `fallback`; `endpoint="none"`) |
//! | `protected_pool_errors_total` | counter | `route`, `endpoint`, `class` | failed attempts by [`ErrorClass`](crate::ErrorClass) |
//! | `protected_pool_call_duration_seconds` | histogram | `route`, `endpoint`, `outcome` | time of an attempt, from connection checkout to result |
//! | `protected_pool_breaker_state` | gauge | `route`, `endpoint` | 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled |
//! | `protected_pool_breaker_transitions_total` | counter | `route`, `endpoint`, `from`, `to` | state changes |
//! | `protected_pool_connections` | gauge | `endpoint`, `state` | `open`, `idle`, `waiting` and `max` connections of the endpoint's pool |
//! | `protected_pool_replica_lag_seconds` | gauge | `endpoint` | replication lag as last measured |
//! | `protected_pool_cache_lookups_total` | counter | `route`, `result` | cache fallback lookups: `hit`, `miss`, `error` |
//! | `protected_pool_cache_errors_total` | counter | `cache`, `operation` | failed cache operations (`get`, `put`, `encode`, `decode`) |
//! | `protected_pool_fallback_failures_total` | counter | `route`, `reason` | async fallbacks that failed: `error` (their error or a panic) or `timeout` (no answer within the call's timeout) |
//! | `protected_pool_endpoint_role` | gauge | `endpoint` | the role its server last reported: 0 unknown, 1 primary, 2 replica |
//! | `protected_pool_role_changes_total` | counter | `endpoint`, `from`, `to` | role changes (`primary`, `replica`, `unknown`) |
//! | `protected_pool_transaction_retries_total` | counter | | transactions run again after the server rolled them back (serialization failure, deadlock) |
//! | `protected_pool_keyed_write_retries_total` | counter | | keyed writes tried again after a failure that may pass (its key makes that safe) |
//! | `protected_pool_outbox_depth` | gauge | | writes waiting in the outbox |
//! | `protected_pool_outbox_bytes` | gauge | | their size, as the outbox's byte bound counts it |
//! | `protected_pool_outbox_oldest_age_seconds` | gauge | | how long the oldest has waited (0 when empty) |
//! | `protected_pool_outbox_queued_total` | counter | | writes queued |
//! | `protected_pool_outbox_replayed_total` | counter | `outcome` | queued writes applied (`applied`) or found applied already (`already_applied`) |
//! | `protected_pool_outbox_dead_lettered_total` | counter | | queued writes the database refused (constraint, bad data), moved to the dead letters |
//! | `protected_pool_outbox_dead_letters` | gauge | | dead letters kept now |
//! | `protected_pool_outbox_rejected_total` | counter | | writes not queued because the outbox was full |

use metrics::{Counter, Histogram, Label};

use crate::breaker::State;
use crate::route::Route;

/// Attempts and calls, by `route`, `endpoint` and `outcome`.
pub const CALLS: &str = "protected_pool_calls_total";
/// Failed attempts by `route`, `endpoint` and error `class`.
pub const ERRORS: &str = "protected_pool_errors_total";
/// Attempt durations in seconds, by `route`, `endpoint` and `outcome`.
pub const CALL_DURATION: &str = "protected_pool_call_duration_seconds";
/// Breaker state by `route` and `endpoint` (see [`state_value`]).
pub const BREAKER_STATE: &str = "protected_pool_breaker_state";
/// Breaker state changes by `route`, `endpoint`, `from` and `to`.
pub const BREAKER_TRANSITIONS: &str = "protected_pool_breaker_transitions_total";
/// Connections of an endpoint's pool by `state` (`open`, `idle`, `waiting`, `max`).
pub const CONNECTIONS: &str = "protected_pool_connections";
/// Replication lag in seconds by `endpoint`.
pub const REPLICA_LAG: &str = "protected_pool_replica_lag_seconds";
/// Cache fallback lookups by `route` and `result` (`hit`, `miss`, `error`).
pub const CACHE_LOOKUPS: &str = "protected_pool_cache_lookups_total";
/// Failed cache operations by `cache` and `operation`.
pub const CACHE_ERRORS: &str = "protected_pool_cache_errors_total";
/// Async fallbacks that failed, by `route` and `reason` (`error`, `timeout`).
pub const FALLBACK_FAILURES: &str = "protected_pool_fallback_failures_total";

/// An endpoint's role as its server last said: 0 unknown, 1 primary, 2 replica.
pub const ROLE: &str = "protected_pool_endpoint_role";
/// Role changes, by `endpoint`, `from` and `to`.
pub const ROLE_CHANGES: &str = "protected_pool_role_changes_total";

/// The `endpoint` label of calls no endpoint served.
pub const NO_ENDPOINT: &str = "none";

/// The value of [`BREAKER_STATE`] for a state.
pub const fn state_value(state: State) -> f64 {
    match state {
        State::Closed => 0.0,
        State::Open => 1.0,
        State::HalfOpen => 2.0,
        State::ForcedOpen => 3.0,
        State::Disabled => 4.0,
    }
}

/// The handles one route on one endpoint updates on every call.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    route: Route,
    endpoint: std::sync::Arc<str>,
    success: Counter,
    failure: Counter,
    rejected: Counter,
    success_duration: Histogram,
    failure_duration: Histogram,
}

fn call_labels(route: Route, endpoint: &str, outcome: &'static str) -> Vec<Label> {
    vec![
        Label::new("route", route.as_str()),
        Label::new("endpoint", endpoint.to_owned()),
        Label::new("outcome", outcome),
    ]
}

impl RouteMetrics {
    pub(crate) fn new(route: Route, endpoint: std::sync::Arc<str>) -> Self {
        let counter = |outcome| metrics::counter!(CALLS, call_labels(route, &endpoint, outcome));
        let histogram =
            |outcome| metrics::histogram!(CALL_DURATION, call_labels(route, &endpoint, outcome));
        Self {
            success: counter("success"),
            failure: counter("failure"),
            rejected: counter("rejected"),
            success_duration: histogram("success"),
            failure_duration: histogram("failure"),
            route,
            endpoint,
        }
    }

    pub(crate) fn success(&self, elapsed: std::time::Duration) {
        self.success.increment(1);
        self.success_duration.record(elapsed);
    }

    /// A failed attempt of error class `class` (its label); `elapsed` is `None` when it
    /// failed before a connection was had.
    pub(crate) fn failure(&self, class: &'static str, elapsed: Option<std::time::Duration>) {
        self.failure.increment(1);
        if let Some(elapsed) = elapsed {
            self.failure_duration.record(elapsed);
        }
        metrics::counter!(
            ERRORS,
            "route" => self.route.as_str(),
            "endpoint" => self.endpoint.to_string(),
            "class" => class,
        )
        .increment(1);
    }

    pub(crate) fn rejected(&self) {
        self.rejected.increment(1);
    }
}

/// `protected_pool_transaction_retries_total`.
pub const TRANSACTION_RETRIES: &str = "protected_pool_transaction_retries_total";

/// A transaction run again after the server rolled it back.
pub(crate) fn transaction_retried() {
    metrics::counter!(TRANSACTION_RETRIES).increment(1);
}

/// Keyed writes tried again.
pub const KEYED_WRITE_RETRIES: &str = "protected_pool_keyed_write_retries_total";

/// A keyed write tried again.
pub(crate) fn keyed_write_retry() {
    metrics::counter!(KEYED_WRITE_RETRIES).increment(1);
}

/// Writes waiting in the outbox.
pub const OUTBOX_DEPTH: &str = "protected_pool_outbox_depth";
/// Their size in bytes.
pub const OUTBOX_BYTES: &str = "protected_pool_outbox_bytes";
/// How long the oldest has waited, in seconds.
pub const OUTBOX_OLDEST_AGE: &str = "protected_pool_outbox_oldest_age_seconds";
/// Writes queued.
pub const OUTBOX_QUEUED: &str = "protected_pool_outbox_queued_total";
/// Queued writes applied, by `outcome` (`applied`, `already_applied`).
pub const OUTBOX_REPLAYED: &str = "protected_pool_outbox_replayed_total";
/// Queued writes moved to the dead letters.
pub const OUTBOX_DEAD_LETTERED: &str = "protected_pool_outbox_dead_lettered_total";
/// Dead letters kept now.
pub const OUTBOX_DEAD_LETTERS: &str = "protected_pool_outbox_dead_letters";
/// Writes refused by a full outbox.
pub const OUTBOX_REJECTED: &str = "protected_pool_outbox_rejected_total";

/// A call served without an endpoint, from the cache or a fallback.
pub(crate) fn served_without_endpoint(route: Route, outcome: &'static str) {
    metrics::counter!(CALLS, call_labels(route, NO_ENDPOINT, outcome)).increment(1);
}

pub(crate) fn cache_lookup(route: Route, result: &'static str) {
    metrics::counter!(CACHE_LOOKUPS, "route" => route.as_str(), "result" => result).increment(1);
}

/// An async fallback failed: `reason` is `error` or `timeout`.
pub(crate) fn fallback_failed(route: Route, reason: &'static str) {
    metrics::counter!(FALLBACK_FAILURES, "route" => route.as_str(), "reason" => reason)
        .increment(1);
}

pub(crate) fn cache_error(cache: &'static str, operation: &'static str) {
    metrics::counter!(CACHE_ERRORS, "cache" => cache, "operation" => operation).increment(1);
}

pub(crate) fn breaker_state(route: Route, endpoint: &str, state: State) {
    metrics::gauge!(
        BREAKER_STATE,
        "route" => route.as_str(),
        "endpoint" => endpoint.to_owned(),
    )
    .set(state_value(state));
}

pub(crate) fn transition(route: Route, endpoint: &str, from: State, to: State) {
    metrics::counter!(
        BREAKER_TRANSITIONS,
        "route" => route.as_str(),
        "endpoint" => endpoint.to_owned(),
        "from" => from.as_str(),
        "to" => to.as_str(),
    )
    .increment(1);
    breaker_state(route, endpoint, to);
}

/// Connection counts of an endpoint's pool: `open`, `idle`, `waiting` and `max`.
pub(crate) fn pool_status(endpoint: &str, [open, idle, waiting, max]: [usize; 4]) {
    for (state, value) in [
        ("open", open),
        ("idle", idle),
        ("waiting", waiting),
        ("max", max),
    ] {
        metrics::gauge!(CONNECTIONS, "endpoint" => endpoint.to_owned(), "state" => state)
            .set(value as f64);
    }
}

pub(crate) fn replica_lag(endpoint: &str, lag: Option<std::time::Duration>) {
    if let Some(lag) = lag {
        metrics::gauge!(REPLICA_LAG, "endpoint" => endpoint.to_owned()).set(lag.as_secs_f64());
    }
}

/// An endpoint's role changed (`primary`, `replica`, `unknown`).
pub(crate) fn role_change(endpoint: &str, from: &'static str, to: &'static str) {
    metrics::counter!(
        ROLE_CHANGES,
        "endpoint" => endpoint.to_owned(),
        "from" => from,
        "to" => to,
    )
    .increment(1);
    let value = match to {
        "primary" => 1.0,
        "replica" => 2.0,
        _ => 0.0,
    };
    metrics::gauge!(ROLE, "endpoint" => endpoint.to_owned()).set(value);
}
