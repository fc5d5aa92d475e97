//! A built pool's breakers wired to its listeners, its metrics, its logs and its probes.

use std::sync::Arc;

use super::super::events::{PoolListeners, PoolStateChange};
use crate::breaker::{CircuitBreaker, State, StateChange};
use crate::route::Route;
use crate::telemetry;

/// The breaker of `route` on the endpoint `name`, reporting to the pool's listeners and waking
/// the endpoint's probe task when it opens.
pub(super) fn wire_breaker(
    breaker: &CircuitBreaker,
    name: &Arc<str>,
    route: Route,
    listeners: &Arc<PoolListeners>,
    probe_wakeup: &Arc<tokio::sync::Notify>,
) {
    let (sink, endpoint, wakeup) = (listeners.clone(), name.clone(), probe_wakeup.clone());
    telemetry::breaker_state(route, name, State::Closed);
    breaker.on_state_change(move |change| {
        if change.to == State::Open {
            wakeup.notify_one();
        }
        telemetry::transition(route, &endpoint, change.from, change.to);
        log_transition(route, &endpoint, change);
        sink.emit(&PoolStateChange {
            route,
            endpoint: endpoint.clone(),
            change: change.clone(),
        });
    });
}

/// A breaker opening is an incident (WARN); closing again is the all-clear (INFO).
fn log_transition(route: Route, endpoint: &str, change: &StateChange) {
    let (from, to, reason) = (change.from.as_str(), change.to.as_str(), change.reason);
    match change.to {
        State::Open | State::ForcedOpen => tracing::warn!(
            route = route.as_str(), endpoint, from, to, %reason,
            "circuit breaker opened"
        ),
        State::Closed => {
            tracing::info!(route = route.as_str(), endpoint, from, to, %reason, "circuit breaker closed");
        }
        State::HalfOpen | State::Disabled => {
            tracing::info!(route = route.as_str(), endpoint, from, to, %reason, "circuit breaker changed state");
        }
    }
}
