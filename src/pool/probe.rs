//! Background health work, one task per endpoint: recovery probes for open breakers and
//! replication-lag checks for replicas.
//!
//! A probe is an ordinary half-open trial: when a breaker's open duration has passed, the
//! task takes the trial permit itself and pings the endpoint, so a recovered database closes
//! its breakers with no user traffic and without a user call being the one that finds out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::PoolInner;
use super::call::{Checkout, outcome_for};
use crate::backend::Backend;
use crate::breaker::Outcome;
use crate::endpoint::{Endpoint, Role};
use crate::route::Route;

/// Shortest sleep between rounds, so a half-open breaker whose trial slots are all taken by
/// user calls does not make the task spin.
const MIN_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub(crate) struct Probes {
    enabled: bool,
    started: AtomicBool,
    stop: watch::Sender<bool>,
}

impl Probes {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            started: AtomicBool::new(false),
            stop: watch::Sender::new(false),
        }
    }

    /// Whether the probes make the half-open trials (so calls never do).
    pub(crate) fn take_trials(&self) -> bool {
        self.enabled
    }

    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl<DB: Backend> PoolInner<DB> {
    /// Starts the tasks on the current tokio runtime, once. Called when the pool is built
    /// inside a runtime and again on every call, for a pool built outside one.
    pub(crate) fn start_probes(&self) {
        let probes = &self.probes;
        if !probes.enabled || probes.started.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if probes.started.swap(true, Ordering::Relaxed) || *probes.stop.borrow() {
            return;
        }
        for index in 0..self.endpoints.len() {
            let wakeup = self.endpoints[index].wakeup.clone();
            let stop = probes.stop.subscribe();
            runtime.spawn(probe_loop(self.me.clone(), index, wakeup, stop));
        }
    }

    /// One round on one endpoint; returns how long to sleep before the next.
    async fn probe_round(&self, index: usize, next_lag_check: &mut Instant) -> Duration {
        let endpoint = &self.endpoints[index];
        crate::telemetry::pool_status(&endpoint.name, endpoint.status());
        let now = Instant::now();
        if endpoint.role == Role::Replica && now >= *next_lag_check {
            *next_lag_check = now + self.health_check_interval;
            endpoint.set_lag(self.measure_lag(endpoint).await);
        }
        for (route, breaker) in endpoint.breakers() {
            while breaker.time_until_trial() == Some(Duration::ZERO) {
                // None: every trial slot is taken by user calls, or the breaker moved on.
                let Some(permit) = breaker.try_acquire_trial() else {
                    break;
                };
                let started = Instant::now();
                let outcome = self.ping(endpoint, route).await;
                permit.record(outcome, started.elapsed());
                if outcome != Outcome::Success {
                    break;
                }
            }
        }
        let mut wait = self.health_check_interval;
        if endpoint.role == Role::Replica {
            wait = wait.min(next_lag_check.saturating_duration_since(Instant::now()));
        }
        let soonest_trial = endpoint
            .breakers()
            .filter_map(|(_, breaker)| breaker.time_until_trial())
            .min();
        if let Some(until) = soonest_trial {
            wait = wait.min(until);
        }
        wait.max(MIN_WAIT)
    }

    /// A ping on a fresh checkout, judged as a call of `route` would be.
    async fn ping(&self, endpoint: &Endpoint<DB>, route: Route) -> Outcome {
        let limit = self.routes[route.index()].timeout;
        let attempt = async {
            let mut checkout = match endpoint.get().await {
                Ok(connection) => Checkout(Some(connection)),
                Err(deadpool::managed::PoolError::Backend(error)) => {
                    return outcome_for(self.classify(&error, route), route);
                }
                Err(_) => return Outcome::Failure,
            };
            let connection = checkout.connection();
            connection.busy = true;
            let result = sqlx::Connection::ping(&mut connection.raw).await;
            connection.busy = false;
            match result {
                Ok(()) => Outcome::Success,
                Err(error) => {
                    let class = self.classify(&error, route);
                    connection.broken = class == crate::ErrorClass::Connection;
                    outcome_for(class, route)
                }
            }
        };
        tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Outcome::Failure)
    }

    async fn measure_lag(&self, endpoint: &Endpoint<DB>) -> Option<Duration> {
        let limit = self.health_check_interval.max(Duration::from_secs(1));
        let attempt = async {
            let mut checkout = Checkout(Some(endpoint.get().await.ok()?));
            let connection = checkout.connection();
            connection.busy = true;
            let lag = DB::replication_lag(&mut connection.raw).await;
            connection.busy = false;
            lag.ok().flatten()
        };
        tokio::time::timeout(limit, attempt).await.ok().flatten()
    }
}

async fn probe_loop<DB: Backend>(
    pool: Weak<PoolInner<DB>>,
    index: usize,
    wakeup: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_lag_check = Instant::now();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let wait = {
            let Some(pool) = pool.upgrade() else {
                return; // the pool is gone
            };
            pool.probe_round(index, &mut next_lag_check).await
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // A breaker of this endpoint opened: its open duration sets the next round.
            () = wakeup.notified() => {}
            // A stop, or the pool dropped its sender.
            _ = stop.changed() => return,
        }
    }
}
