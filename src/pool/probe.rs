//! Background health work, one supervised task per endpoint: recovery probes for open
//! breakers, replication-lag checks for replicas, and a check that idle connections outlived
//! no restart of their server.
//!
//! A probe is an ordinary half-open trial: when a breaker's open duration has passed, the
//! task takes the trial permit itself and runs a real statement on the endpoint, so a
//! recovered database closes its breakers with no user traffic and without a user call being
//! the one that finds out.
//!
//! Calls leave trials to the probe only while its task is alive. A task can die with the
//! runtime it was spawned on (a pool built in one runtime and used in another) or stall with
//! it, or unwind from a panic: it promises, before every round and every sleep, when it will
//! next be heard from. A call that finds the promise broken takes the trial itself and starts
//! a new task on the runtime it runs on; the old task, should it ever wake, sees it was
//! replaced and ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::PoolInner;
use super::attempt::{endpoint_error, judge};
use crate::backend::Backend;
use crate::breaker::{Outcome, State, coarse_nanos, duration_nanos};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::role::Role;
use crate::route::Route;

/// Shortest sleep between rounds, so a half-open breaker whose trial slots are all taken by
/// user calls does not make the task spin.
const MIN_WAIT: Duration = Duration::from_millis(50);
/// Slack on a task's promise, for a busy runtime.
const GRACE: Duration = Duration::from_secs(1);

/// The probe tasks of a pool, one slot per endpoint.
#[derive(Debug)]
pub(crate) struct Probes {
    enabled: bool,
    stop: watch::Sender<bool>,
    slots: Box<[Slot]>,
}

#[derive(Debug, Default)]
struct Slot {
    /// When, on the coarse clock ([`coarse_nanos`]), the task will have been heard from
    /// again; 0 when there is no live task. Read on every call: the coarse clock costs a
    /// fraction of a precise reading and the arithmetic from an `Instant`, and the promise
    /// has a second of slack.
    alive_until: AtomicU64,
    /// Which task owns the slot; a task that finds another number here ends.
    generation: AtomicU64,
    /// What the last trial that did not succeed met, for callers the breaker refuses.
    cause: Mutex<Option<Arc<Error>>>,
}

impl Probes {
    pub(crate) fn new(enabled: bool, endpoints: usize) -> Self {
        Self {
            enabled,
            stop: watch::Sender::new(false),
            slots: (0..endpoints).map(|_| Slot::default()).collect(),
        }
    }

    /// Whether endpoint `index`'s probe task is alive, and so owns the half-open trials.
    pub(crate) fn owns_trials(&self, index: usize) -> bool {
        self.enabled && self.slots[index].alive_until.load(Ordering::Acquire) > coarse_nanos()
    }

    /// What the last unsuccessful trial on endpoint `index` met.
    pub(crate) fn cause(&self, index: usize) -> Option<Arc<Error>> {
        self.slots[index]
            .cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_cause(&self, index: usize, cause: Option<Error>) {
        *self.slots[index]
            .cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = cause.map(Arc::new);
    }

    fn promise(&self, index: usize, generation: u64, within: Duration) {
        let slot = &self.slots[index];
        if slot.generation.load(Ordering::Acquire) == generation {
            let until = coarse_nanos()
                .saturating_add(duration_nanos(within + GRACE))
                .max(1);
            slot.alive_until.store(until, Ordering::Release);
        }
    }

    fn is_current(&self, index: usize, generation: u64) -> bool {
        self.slots[index].generation.load(Ordering::Acquire) == generation
    }

    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub(crate) fn stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Marks its slot dead when its task ends, however it ends (returned, dropped with its
/// runtime, unwound from a panic), unless another task took the slot over.
struct SlotGuard<DB: Backend> {
    pool: Weak<PoolInner<DB>>,
    index: usize,
    generation: u64,
}

impl<DB: Backend> Drop for SlotGuard<DB> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            let slot = &pool.probes.slots[self.index];
            if slot.generation.load(Ordering::Acquire) == self.generation {
                slot.alive_until.store(0, Ordering::Release);
            }
        }
    }
}

impl<DB: Backend> PoolInner<DB> {
    /// Starts every endpoint's task that is not alive, on the current tokio runtime (none
    /// outside one). Called when the pool is built.
    pub(crate) fn start_probes(&self) {
        for index in 0..self.endpoints.len() {
            self.revive_probe(index);
        }
    }

    /// Whether endpoint `index`'s probe owns its trials; if its task is not alive, starts a
    /// new one (which owns them from its first round on).
    pub(crate) fn probe_owns_trials(&self, index: usize) -> bool {
        let probes = &self.probes;
        if probes.owns_trials(index) || !probes.enabled {
            return probes.enabled;
        }
        self.revive_probe(index);
        false
    }

    #[cold]
    fn revive_probe(&self, index: usize) {
        let probes = &self.probes;
        if !probes.enabled || probes.stopped() || probes.owns_trials(index) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let slot = &probes.slots[index];
        let previous = slot.generation.load(Ordering::Acquire);
        // One caller wins the right to start the task; the others go on without it.
        if slot
            .generation
            .compare_exchange(previous, previous + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let generation = previous + 1;
        probes.promise(index, generation, self.round_budget());
        let guard = SlotGuard {
            pool: self.me.clone(),
            index,
            generation,
        };
        let wakeup = self.endpoints[index].wakeup.clone();
        runtime.spawn(probe_loop(guard, wakeup, probes.stop.subscribe()));
    }

    /// Endpoint `index`, a standby until now, says it is the primary. Its write and auth
    /// breakers may be open because it was a standby: that no longer holds, and writes must
    /// not wait out an open duration to reach the new primary.
    pub(crate) fn promoted(&self, index: usize) {
        let endpoint = &self.endpoints[index];
        for route in [Route::Write, Route::Auth] {
            let breaker = endpoint.breaker(route);
            if matches!(breaker.state(), State::Open | State::HalfOpen) {
                breaker.reset();
            }
        }
    }

    /// The longest one round may take: a trial per route, a lag check and an idle check.
    fn round_budget(&self) -> Duration {
        let trials: Duration = self.routes.iter().map(|route| route.timeout).sum();
        trials + self.lag_limit() + self.connect_timeout
    }

    fn lag_limit(&self) -> Duration {
        self.health_check_interval.max(Duration::from_secs(1))
    }

    /// One round on one endpoint; returns how long to sleep before the next.
    async fn probe_round(&self, index: usize, state: &mut LoopState) -> Duration {
        let endpoint = &self.endpoints[index];
        endpoint.publish_status();
        let now = Instant::now();
        if now >= state.next_health_check {
            state.next_health_check = now + self.health_check_interval;
            let closed = endpoint.check_health(self.connect_timeout).await;
            if closed > 0 {
                tracing::info!(
                    endpoint = &*endpoint.name,
                    closed,
                    "idle connections died with their server; closed them"
                );
            }
            if endpoint.role() == Some(Role::Replica) {
                endpoint.set_lag(self.measure_lag(endpoint).await);
            }
        }
        for (route, breaker) in endpoint.breakers() {
            let backoff = &mut state.backoff[route.index()];
            if backoff.until.is_some_and(|until| Instant::now() < until) {
                continue;
            }
            while breaker.time_until_trial() == Some(Duration::ZERO) {
                // None: every trial slot is taken by user calls, or the breaker moved on.
                let Some(permit) = breaker.try_acquire_trial() else {
                    break;
                };
                let started = Instant::now();
                let (outcome, error) = self.probe(endpoint, route).await;
                permit.record(outcome, started.elapsed());
                self.probes.set_cause(index, error);
                match outcome {
                    Outcome::Success => backoff.clear(),
                    Outcome::Failure => {
                        backoff.clear();
                        break;
                    }
                    // The server answered, but not so the breaker can close (it rejects our
                    // credentials, its database is being restored): ask again on the open
                    // schedule, not at once.
                    Outcome::Ignored => {
                        let wait = breaker.config().open.nominal(backoff.streak);
                        backoff.streak = backoff.streak.saturating_add(1);
                        backoff.until = Some(Instant::now() + wait);
                        break;
                    }
                }
            }
        }
        let mut wait = state
            .next_health_check
            .saturating_duration_since(Instant::now());
        let soonest_trial = endpoint
            .breakers()
            .filter_map(|(route, breaker)| {
                let until_trial = breaker.time_until_trial()?;
                let until_backoff = state.backoff[route.index()]
                    .until
                    .map_or(Duration::ZERO, |until| {
                        until.saturating_duration_since(Instant::now())
                    });
                Some(until_trial.max(until_backoff))
            })
            .min();
        if let Some(until) = soonest_trial {
            wait = wait.min(until);
        }
        wait.max(MIN_WAIT)
    }

    /// A real statement on a checkout, judged as a call of `route` would be; the error, when
    /// it was not a success.
    async fn probe(&self, endpoint: &Endpoint<DB>, route: Route) -> (Outcome, Option<Error>) {
        let limit = self.routes[route.index()].timeout;
        let attempt = async {
            let mut checkout = match endpoint.checkout(limit).await {
                Ok(checkout) => checkout,
                Err(deadpool::managed::PoolError::Backend(source)) => {
                    let judged = judge(self, &source, route);
                    let error = endpoint_error(endpoint, route, judged.class, false, source);
                    return (judged.outcome, Some(error));
                }
                // Waited for a connection the whole time: every one is busy, so the server
                // answers somebody. Not a verdict either way.
                Err(_) => return (Outcome::Ignored, None),
            };
            // On the write route the probe also asks what the server is: a breaker must not
            // close on a standby (a demoted primary behind the same address).
            let checked = checkout
                .run(async |raw| {
                    DB::probe(raw, route).await?;
                    match route {
                        Route::Write => DB::role(raw).await.map(Some),
                        Route::Read | Route::Auth => Ok(None),
                    }
                })
                .await;
            match checked {
                Ok(Some(observed)) if observed.role == Role::Replica => {
                    endpoint.roles().observe_server(observed);
                    let error = Error::NotPrimary {
                        route,
                        endpoint: endpoint.name.clone(),
                    };
                    (Outcome::Failure, Some(error))
                }
                Ok(observed) => {
                    if let Some(observed) = observed {
                        endpoint.roles().observe_server(observed);
                    }
                    (Outcome::Success, None)
                }
                Err(source) => {
                    let judged = judge(self, &source, route);
                    let broken = checkout.is_broken();
                    let error = endpoint_error(endpoint, route, judged.class, broken, source);
                    (judged.outcome, Some(error))
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => (
                Outcome::Failure,
                Some(Error::Timeout {
                    route,
                    endpoint: endpoint.name.clone(),
                    after: limit,
                    outcome_unknown: false,
                }),
            ),
        }
    }

    async fn measure_lag(&self, endpoint: &Endpoint<DB>) -> Option<Duration> {
        let limit = self.lag_limit();
        let attempt = async {
            let mut checkout = endpoint.checkout(limit).await.ok()?;
            let lag = checkout
                .run(async |raw| DB::replication_lag(raw).await)
                .await;
            lag.ok().flatten()
        };
        tokio::time::timeout(limit, attempt).await.ok().flatten()
    }
}

/// A route's probe backoff after trials the server answered without letting it close.
#[derive(Debug, Default)]
struct Backoff {
    until: Option<Instant>,
    streak: u32,
}

impl Backoff {
    fn clear(&mut self) {
        *self = Self::default();
    }
}

struct LoopState {
    next_health_check: Instant,
    backoff: [Backoff; 3],
}

impl LoopState {
    fn new() -> Self {
        Self {
            next_health_check: Instant::now(),
            backoff: Default::default(),
        }
    }
}

async fn probe_loop<DB: Backend>(
    guard: SlotGuard<DB>,
    wakeup: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let (index, generation) = (guard.index, guard.generation);
    let mut state = LoopState::new();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let Some(pool) = guard.pool.upgrade() else {
            return; // the pool is gone
        };
        if !pool.probes.is_current(index, generation) {
            return; // replaced while this task's runtime stood still
        }
        pool.probes.promise(index, generation, pool.round_budget());
        // Each round is a task of its own, so a panic in it (in a caller's classifier, say)
        // ends the round, not the probing.
        let round = tokio::spawn({
            let pool = pool.clone();
            async move {
                let wait = pool.probe_round(index, &mut state).await;
                (wait, state)
            }
        });
        let wait = match round.await {
            Ok((wait, kept)) => {
                state = kept;
                wait
            }
            Err(error) if error.is_panic() => {
                tracing::error!(
                    endpoint = &*pool.endpoints[index].name,
                    "a recovery probe round panicked; probing goes on"
                );
                state = LoopState::new();
                pool.health_check_interval
            }
            Err(_) => return, // the runtime is shutting down
        };
        pool.probes.promise(index, generation, wait);
        drop(pool);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            // A breaker of this endpoint opened: its open duration sets the next round.
            () = wakeup.notified() => {}
            // A stop, or the pool dropped its sender.
            _ = stop.changed() => return,
        }
    }
}
