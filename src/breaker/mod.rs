//! A circuit breaker, usable on its own.
//!
//! ```
//! use protected_pool::breaker::{BreakerConfig, CircuitBreaker, Outcome, State};
//! use std::time::Duration;
//!
//! let breaker = CircuitBreaker::new("inventory", BreakerConfig::read()).unwrap();
//! for _ in 0..3 {
//!     let permit = breaker.try_acquire().unwrap();
//!     // ... the call failed with an infrastructure error ...
//!     permit.record(Outcome::Failure, Duration::from_millis(2));
//! }
//! assert_eq!(breaker.state(), State::Open);
//! let rejected = breaker.try_acquire().unwrap_err();
//! assert!(rejected.retry_after().unwrap() <= Duration::from_secs(3));
//! ```
//!
//! States: closed (calls pass, outcomes measured), open (calls rejected with a `retry_after`),
//! half-open (a limited number of trial calls decide), plus forced-open and disabled by hand.
//! The file list maps onto the parts: `config` (rules and presets), `core` (the state machine),
//! `permit` (RAII permits and rejection), `window` (striped sliding windows), `listener`
//! (events), `snapshot` (reports), `clock` (injected time).

mod clock;
mod config;
mod core;
mod listener;
mod permit;
mod snapshot;
mod state;
mod window;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use clock::{Clock, ManualClock, SystemClock};
pub(crate) use clock::{coarse_nanos, duration_nanos};
pub(crate) use config::too_long;
pub use config::{BreakerConfig, OpenDuration, SlidingWindow};
pub use listener::{ListenerId, StateChange, Subscription};
pub use permit::{Permit, Rejected};
pub use snapshot::BreakerSnapshot;
pub use state::{Outcome, State, TransitionReason};

use crate::problem::{ConfigError, ConfigProblem};
use clock::ClockSource;
use core::Inner;

/// A circuit breaker. Cheap to clone: clones share one breaker.
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreaker {
    /// A breaker on the system clock; fails if the config is invalid.
    pub fn new(name: impl Into<Arc<str>>, config: BreakerConfig) -> Result<Self, ConfigError> {
        Self::builder(name).config(config).build()
    }

    /// A builder, for a custom clock or a fixed jitter seed.
    pub fn builder(name: impl Into<Arc<str>>) -> BreakerBuilder {
        BreakerBuilder {
            name: name.into(),
            config: BreakerConfig::default(),
            clock: None,
            seed: None,
        }
    }

    /// Asks to make a call. Closed (or disabled): a permit at the cost of one atomic load.
    /// Open: a rejection saying when to retry. Half-open: a trial permit while a slot is free.
    #[inline(always)]
    pub fn try_acquire(&self) -> Result<Permit<'_>, Rejected> {
        self.inner.try_acquire()
    }

    /// Like [`try_acquire`](Self::try_acquire), but never admits a trial call: open or
    /// half-open, the caller is refused (with `retry_after`) and the trials are left to a
    /// health probe using [`try_acquire_trial`](Self::try_acquire_trial), so no caller is the
    /// one that finds out whether the service is back.
    #[inline(always)]
    pub fn try_acquire_untried(&self) -> Result<Permit<'_>, Rejected> {
        self.inner.try_acquire_untried()
    }

    /// A half-open trial permit if one is free right now (turning an open breaker whose open
    /// duration has passed half-open), else `None`; a refusal is not counted. For health
    /// probes, which only ever want to make trial calls.
    pub fn try_acquire_trial(&self) -> Option<Permit<'_>> {
        self.inner.try_acquire_trial()
    }

    /// Runs `f` under the breaker, counting `Err` as a failure.
    ///
    /// The call is timed only when the slow-call rule is on.
    pub fn call<T, E>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, CallError<E>> {
        let permit = self.try_acquire().map_err(CallError::Rejected)?;
        let timed = self.inner.times_calls();
        let start = if timed { self.inner.now() } else { 0 };
        let result = f();
        let elapsed = if timed {
            Duration::from_nanos(self.inner.now().saturating_sub(start))
        } else {
            Duration::ZERO
        };
        match result {
            Ok(value) => {
                permit.record(Outcome::Success, elapsed);
                Ok(value)
            }
            Err(error) => {
                permit.record(Outcome::Failure, elapsed);
                Err(CallError::Failed(error))
            }
        }
    }

    /// The current state. An open breaker turns half-open at the first call after its open
    /// duration, so this may read `Open` with a zero `retry_after` for a while.
    pub fn state(&self) -> State {
        self.inner.state()
    }

    /// How long until a trial call would be admitted: `Some(ZERO)` when half-open or when the
    /// open duration has passed, the remaining open time while open, `None` when closed,
    /// disabled or forced open. Recovery probes sleep on this.
    pub fn time_until_trial(&self) -> Option<Duration> {
        self.inner.time_until_trial()
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The configuration in force.
    pub fn config(&self) -> BreakerConfig {
        self.inner.config()
    }

    /// Changes thresholds, open durations and half-open limits while the breaker runs,
    /// keeping its state, its window's contents and its counts. The new rules apply from the
    /// next outcome. The window's shape (`window`) cannot change: that would drop what it
    /// holds; build a new breaker for that.
    ///
    /// ```
    /// use protected_pool::breaker::{BreakerConfig, CircuitBreaker};
    ///
    /// let breaker = CircuitBreaker::new("orders", BreakerConfig::write()).unwrap();
    /// breaker
    ///     .update_config(BreakerConfig { consecutive_failures: Some(20), ..breaker.config() })
    ///     .unwrap();
    /// assert_eq!(breaker.config().consecutive_failures, Some(20));
    /// ```
    pub fn update_config(&self, config: BreakerConfig) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        config.validate_into("", &mut problems);
        let current = self.inner.config();
        if config.window != current.window {
            problems.push(ConfigProblem::new(
                "window",
                format!(
                    "cannot change while the breaker runs (it is {:?}); build a new breaker",
                    current.window
                ),
            ));
        }
        if !problems.is_empty() {
            return Err(ConfigError::new(problems));
        }
        self.inner.update_config(config);
        Ok(())
    }

    /// Everything the breaker knows, as a serializable struct.
    pub fn snapshot(&self) -> BreakerSnapshot {
        self.inner.snapshot()
    }

    /// Closes the breaker and clears its window, failure streak and backoff.
    pub fn reset(&self) {
        self.inner
            .set_state(State::Closed, TransitionReason::ManualReset);
    }

    /// Rejects every call until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.inner
            .set_state(State::ForcedOpen, TransitionReason::ManualForceOpen);
    }

    /// Lets every call through and keeps measuring, but never trips, until
    /// [`reset`](Self::reset).
    pub fn disable(&self) {
        self.inner
            .set_state(State::Disabled, TransitionReason::ManualDisable);
    }

    /// Calls `listener` on every transition, on the thread that caused it, after the breaker's
    /// own lock is released (the listener may call back into the breaker). Transitions arrive
    /// once each and in order. A panicking listener is contained.
    ///
    /// No lock is held while listeners run, so a listener may add or remove listeners on this
    /// breaker: one added from a callback hears the transitions after the one being delivered.
    pub fn on_state_change(
        &self,
        listener: impl Fn(&StateChange) + Send + Sync + 'static,
    ) -> ListenerId {
        self.inner.listeners.add_callback(Arc::new(listener))
    }

    /// An async stream of transitions from now on.
    pub fn subscribe(&self) -> Subscription {
        self.inner.listeners.subscribe()
    }

    /// Removes a callback registered with [`on_state_change`](Self::on_state_change).
    /// Returns whether it was registered. It hears no transition after this returns, save for
    /// one that another thread was already delivering.
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        self.inner.listeners.remove(id)
    }
}

/// Builds a [`CircuitBreaker`].
#[must_use]
pub struct BreakerBuilder {
    name: Arc<str>,
    config: BreakerConfig,
    clock: Option<Arc<dyn Clock>>,
    seed: Option<u64>,
}

impl fmt::Debug for BreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerBuilder")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("clock", &self.clock)
            .field("seed", &self.seed)
            .finish()
    }
}

impl BreakerBuilder {
    /// The rules (default: [`BreakerConfig::write`]).
    pub fn config(mut self, config: BreakerConfig) -> Self {
        self.config = config;
        self
    }

    /// A clock other than the system clock, e.g. a [`ManualClock`] in tests.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Seeds the open-duration jitter, for reproducible schedules.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates the config and builds the breaker.
    pub fn build(self) -> Result<CircuitBreaker, ConfigError> {
        self.config.validate()?;
        let clock = match self.clock {
            Some(clock) => ClockSource::Custom(clock),
            None => ClockSource::System(SystemClock::new()),
        };
        let rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Ok(CircuitBreaker {
            inner: Arc::new(Inner::new(self.name, self.config, clock, rng)),
        })
    }
}

/// Error of [`CircuitBreaker::call`].
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker refused the call; `f` did not run.
    #[error(transparent)]
    Rejected(Rejected),
    /// `f` ran and failed.
    #[error("call failed: {0}")]
    Failed(E),
}

const _: () = {
    const fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<CircuitBreaker>();
};
