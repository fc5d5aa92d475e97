//! The state machine.
//!
//! Two layers. The hot layer is a handful of atomics read on every call: the packed state word,
//! the open deadline, the consecutive-failure counter and the striped outcome counters. Closed
//! calls and open rejections touch nothing else, take no lock and allocate nothing. The cold
//! layer, [`Control`] behind a mutex, owns every transition, the half-open trial slots and the
//! backoff schedule; a transition publishes the new state word last, so a reader that sees a
//! state also sees what the transition set up for it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::clock::{ClockSource, WallAnchor, duration_nanos};
use super::config::{BreakerConfig, SlidingWindow};
use super::listener::{Listeners, StateChange};
use super::permit::{Permit, Rejected};
use super::state::{Outcome, STATE_MASK, State, TransitionReason, pack, unpack_state};
use super::window::Stripes;

const CLOSED: u64 = State::Closed.code();
const OPEN: u64 = State::Open.code();
const DISABLED: u64 = State::Disabled.code();

/// The thresholds as the hot path reads them: atomics, so that they can be changed while the
/// breaker runs without a lock on the path of every call.
#[derive(Debug)]
struct Rules {
    /// `u32::MAX` when the rule is off.
    consecutive_failures: AtomicU32,
    /// `f64` bits; [`OFF`] when the rule is off.
    failure_rate: AtomicU64,
    /// `f64` bits; [`OFF`] when the rule is off.
    slow_call_rate: AtomicU64,
    /// A call this long (ns) or longer is slow; [`OFF`] when the slow-call rule is off: then
    /// no call is slow.
    slow_call: AtomicU64,
    /// Whether any rate rule is on, i.e. whether the window is kept at all.
    rate_rules: AtomicBool,
    /// The window's kind is fixed for the breaker's life.
    count_window: bool,
    minimum_calls: AtomicU64,
}

/// An atomic rule that is off.
const OFF: u64 = u64::MAX;

fn rate_bits(rate: Option<f64>) -> u64 {
    rate.map_or(OFF, f64::to_bits)
}

fn rate_of(bits: u64) -> Option<f64> {
    (bits != OFF).then(|| f64::from_bits(bits))
}

impl Rules {
    fn new(config: &BreakerConfig) -> Self {
        let rules = Self {
            consecutive_failures: AtomicU32::new(0),
            failure_rate: AtomicU64::new(OFF),
            slow_call_rate: AtomicU64::new(OFF),
            slow_call: AtomicU64::new(OFF),
            rate_rules: AtomicBool::new(false),
            count_window: matches!(config.window, SlidingWindow::Count { .. }),
            minimum_calls: AtomicU64::new(0),
        };
        rules.set(config);
        rules
    }

    fn set(&self, config: &BreakerConfig) {
        let relaxed = Ordering::Relaxed;
        self.consecutive_failures
            .store(config.consecutive_failures.unwrap_or(u32::MAX), relaxed);
        self.failure_rate
            .store(rate_bits(config.failure_rate), relaxed);
        self.slow_call_rate
            .store(rate_bits(config.slow_call_rate), relaxed);
        let slow_call = config.slow_call_rate.map_or(OFF, |_| {
            duration_nanos(config.slow_call_duration).min(OFF - 1)
        });
        self.slow_call.store(slow_call, relaxed);
        self.minimum_calls
            .store(u64::from(config.minimum_calls), relaxed);
        self.rate_rules.store(
            config.failure_rate.is_some() || config.slow_call_rate.is_some(),
            relaxed,
        );
    }

    #[inline(always)]
    fn is_slow(&self, elapsed: Duration) -> bool {
        let limit = self.slow_call.load(Ordering::Relaxed);
        limit != OFF && duration_nanos(elapsed) >= limit
    }

    fn times_calls(&self) -> bool {
        self.slow_call.load(Ordering::Relaxed) != OFF
    }

    #[inline(always)]
    fn rate_rules(&self) -> bool {
        self.rate_rules.load(Ordering::Relaxed)
    }

    fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    fn failure_rate(&self) -> Option<f64> {
        rate_of(self.failure_rate.load(Ordering::Relaxed))
    }

    fn slow_call_rate(&self) -> Option<f64> {
        rate_of(self.slow_call_rate.load(Ordering::Relaxed))
    }

    fn minimum_calls(&self) -> u64 {
        self.minimum_calls.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    word: AtomicU64,
    /// Clock reading (ns) at which an open breaker admits its first trial.
    open_until: AtomicU64,
    consecutive: AtomicU32,
    /// Clock reading of the last counted failure, plus one; 0 = never.
    last_failure: AtomicU64,
    /// The window may hold failures or slow calls, so a success may still trip a rate rule.
    window_dirty: AtomicBool,
    /// The count window has held `minimum_calls` since it was last cleared. It never empties
    /// until then, so after this a success cannot trip a rate rule.
    warmed: AtomicBool,
    rules: Rules,
    stripes: Stripes,
    clock: ClockSource,
    wall: WallAnchor,
    pub(crate) name: Arc<str>,
    control: Mutex<Control>,
    pub(crate) listeners: Listeners,
}

#[derive(Debug)]
struct Control {
    state: State,
    generation: u64,
    entered_at: u64,
    opened_at: Option<u64>,
    /// Re-opens from half-open since the breaker last closed; the backoff exponent.
    reopens: u32,
    opens: u64,
    trials: Vec<Trial>,
    next_ticket: u64,
    trial_successes: u32,
    sequence: u64,
    rng: fastrand::Rng,
    config: BreakerConfig,
}

#[derive(Debug, Clone, Copy)]
struct Trial {
    ticket: u64,
    acquired_at: u64,
}

impl Inner {
    pub(crate) fn new(
        name: Arc<str>,
        config: BreakerConfig,
        clock: ClockSource,
        rng: fastrand::Rng,
    ) -> Self {
        let now = clock.now_nanos();
        Self {
            word: AtomicU64::new(pack(State::Closed, 0)),
            open_until: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            last_failure: AtomicU64::new(0),
            window_dirty: AtomicBool::new(false),
            warmed: AtomicBool::new(false),
            rules: Rules::new(&config),
            stripes: Stripes::new(config.window),
            wall: WallAnchor::new(&clock),
            clock,
            name,
            control: Mutex::new(Control {
                state: State::Closed,
                generation: 0,
                entered_at: now,
                opened_at: None,
                reopens: 0,
                opens: 0,
                trials: Vec::with_capacity(config.half_open_max_calls as usize),
                next_ticket: 1,
                trial_successes: 0,
                sequence: 0,
                rng,
                config,
            }),
            listeners: Listeners::new(),
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        // Nothing in the control section can panic half-way through a change, so a poisoned
        // lock still guards consistent data.
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    /// Whether outcomes need an elapsed time (the slow-call rule is on).
    pub(crate) fn times_calls(&self) -> bool {
        self.rules.times_calls()
    }

    /// How long until the breaker admits a trial call: zero when half-open (or open past its
    /// duration), `None` when it is closed, disabled or forced open.
    pub(crate) fn time_until_trial(&self) -> Option<Duration> {
        let word = self.word.load(Ordering::Acquire);
        match unpack_state(word) {
            State::Open => {
                let until = self.open_until.load(Ordering::Acquire);
                Some(Duration::from_nanos(
                    until.saturating_sub(self.clock.now_nanos()),
                ))
            }
            State::HalfOpen => Some(Duration::ZERO),
            State::Closed | State::Disabled | State::ForcedOpen => None,
        }
    }

    pub(crate) fn state(&self) -> State {
        unpack_state(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn config(&self) -> BreakerConfig {
        self.control().config.clone()
    }

    /// Replaces the thresholds, open durations and half-open limits, keeping the state, the
    /// window's contents and the counts. The window's shape is fixed: `config` must have the
    /// same `window` (checked by the caller).
    pub(crate) fn update_config(&self, config: BreakerConfig) {
        let mut control = self.control();
        self.rules.set(&config);
        // New thresholds may already be met by what the window holds, and a new minimum may
        // not be: let the next outcome look again.
        self.warmed.store(false, Ordering::Relaxed);
        self.window_dirty.store(true, Ordering::Relaxed);
        control.config = config;
    }

    #[inline(always)]
    pub(crate) fn try_acquire(&self) -> Result<Permit<'_>, Rejected> {
        let word = self.word.load(Ordering::Acquire);
        match word & STATE_MASK {
            CLOSED | DISABLED => Ok(Permit::normal(self, word)),
            OPEN => {
                let now = self.clock.now_nanos();
                let until = self.open_until.load(Ordering::Acquire);
                if now < until {
                    self.stripes.record_rejected();
                    return Err(Rejected::new(State::Open, Some(until), &self.clock));
                }
                self.acquire_cold(now, true)
            }
            _ => self.acquire_cold(self.clock.now_nanos(), true),
        }
    }

    /// A permit only while closed or disabled: when trial calls are left to a health probe,
    /// callers are refused until it has closed the breaker.
    #[inline(always)]
    pub(crate) fn try_acquire_untried(&self) -> Result<Permit<'_>, Rejected> {
        let word = self.word.load(Ordering::Acquire);
        match word & STATE_MASK {
            CLOSED | DISABLED => Ok(Permit::normal(self, word)),
            _ => Err(self.refuse_untried(word)),
        }
    }

    #[cold]
    fn refuse_untried(&self, word: u64) -> Rejected {
        self.stripes.record_rejected();
        let state = unpack_state(word);
        // No clock read: the moment goes in the rejection, the wait is worked out if asked.
        let retry_at = match state {
            // A trial is (or is about to be) under way: soon.
            State::Open | State::HalfOpen => Some(self.open_until.load(Ordering::Acquire)),
            _ => None,
        };
        Rejected::new(state, retry_at, &self.clock)
    }

    /// A half-open trial permit if one is free now, for health probes: no refusal is counted,
    /// since a probe that finds nothing to try is not a call.
    pub(crate) fn try_acquire_trial(&self) -> Option<Permit<'_>> {
        match unpack_state(self.word.load(Ordering::Acquire)) {
            State::Open | State::HalfOpen => self
                .acquire_cold(self.clock.now_nanos(), false)
                .ok()
                .filter(Permit::is_trial),
            State::Closed | State::Disabled | State::ForcedOpen => None,
        }
    }

    /// Half-open admission, the move from open to half-open, and forced-open rejection.
    #[cold]
    fn acquire_cold(&self, now: u64, count_refusal: bool) -> Result<Permit<'_>, Rejected> {
        let result = {
            let mut control = self.control();
            if control.state == State::Open {
                let until = self.open_until.load(Ordering::Acquire);
                if now >= until {
                    let open_for = now.saturating_sub(control.entered_at);
                    self.transition(
                        &mut control,
                        State::HalfOpen,
                        TransitionReason::OpenDurationElapsed {
                            open_for: Duration::from_nanos(open_for),
                        },
                        now,
                    );
                }
            }
            let word = pack(control.state, control.generation);
            match control.state {
                State::Closed | State::Disabled => Ok(Permit::normal(self, word)),
                State::Open => Err(Rejected::new(
                    State::Open,
                    Some(self.open_until.load(Ordering::Acquire)),
                    &self.clock,
                )),
                State::ForcedOpen => Err(Rejected::new(State::ForcedOpen, None, &self.clock)),
                State::HalfOpen => self.admit_trial(&mut control, word, now),
            }
        };
        if result.is_err() && count_refusal {
            self.stripes.record_rejected();
        }
        self.listeners.deliver();
        result
    }

    fn admit_trial(
        &self,
        control: &mut Control,
        word: u64,
        now: u64,
    ) -> Result<Permit<'_>, Rejected> {
        let max_wait = duration_nanos(control.config.max_wait_in_half_open);
        // A trial held past max_wait belongs to a caller that is stuck or gone: reclaim it.
        control
            .trials
            .retain(|trial| now.saturating_sub(trial.acquired_at) < max_wait);
        if control.trials.len() < control.config.half_open_max_calls as usize {
            let ticket = control.next_ticket;
            control.next_ticket += 1;
            control.trials.push(Trial {
                ticket,
                acquired_at: now,
            });
            return Ok(Permit::trial(self, word, ticket));
        }
        let oldest = control
            .trials
            .iter()
            .map(|trial| trial.acquired_at)
            .min()
            .unwrap_or(now);
        // Saturating: a custom clock may read close to the end of its range.
        let retry_at = oldest.saturating_add(max_wait);
        Err(Rejected::new(State::HalfOpen, Some(retry_at), &self.clock))
    }

    /// Outcome of a closed or disabled permit.
    #[inline(always)]
    pub(crate) fn record_normal(&self, word: u64, outcome: Outcome, elapsed: Duration) {
        // The common case, small enough to inline into the caller: a fast success while the
        // breaker is still in the permit's state, with no failure streak to reset and nothing
        // in the window that a success could tip over a threshold.
        if outcome == Outcome::Success
            && !self.rules.is_slow(elapsed)
            && self.word.load(Ordering::Acquire) == word
            && self.consecutive.load(Ordering::Relaxed) == 0
            && !self.window_dirty.load(Ordering::Relaxed)
        {
            let in_window = self.rules.rate_rules();
            let now = if in_window && self.stripes.needs_time() {
                self.clock.now_nanos()
            } else {
                0
            };
            self.stripes.record(false, false, now, in_window);
            return;
        }
        self.record_normal_slow(word, outcome, elapsed);
    }

    #[inline(never)]
    fn record_normal_slow(&self, word: u64, outcome: Outcome, elapsed: Duration) {
        let failed = match outcome {
            Outcome::Success => false,
            Outcome::Failure => true,
            Outcome::Ignored => {
                self.stripes.record_ignored();
                return;
            }
        };
        let rules = &self.rules;
        let slow = rules.is_slow(elapsed);
        // A permit from an earlier state or generation only feeds the totals: the window and
        // the failure streak belong to the state that is current now.
        let live = self.word.load(Ordering::Acquire) == word;
        let in_window = live && rules.rate_rules();
        let now = if failed || (in_window && self.stripes.needs_time()) {
            self.clock.now_nanos()
        } else {
            0
        };
        self.stripes.record(failed, slow, now, in_window);
        if failed {
            self.last_failure
                .store(now.saturating_add(1), Ordering::Relaxed);
        }
        if !live {
            return;
        }
        let closed = word & STATE_MASK == CLOSED;
        if failed {
            let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
            if in_window {
                self.mark_dirty();
            }
            if closed && streak >= rules.consecutive_failures() {
                self.trip(
                    word,
                    TransitionReason::ConsecutiveFailures { count: streak },
                    now,
                );
            } else if closed && in_window {
                self.evaluate(word);
            }
            return;
        }
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if !(closed && in_window) {
            return;
        }
        // A fast success can only trip a rate rule by bringing the window up to minimum_calls
        // (count window) or by older calls having left it (time window); a slow one raises the
        // slow rate. Either way only when the window holds failures or slow calls.
        if slow {
            self.mark_dirty();
            self.evaluate(word);
        } else if self.window_dirty.load(Ordering::Relaxed)
            && !(rules.count_window && self.warmed.load(Ordering::Relaxed))
        {
            self.evaluate(word);
        }
    }

    #[inline]
    fn mark_dirty(&self) {
        if !self.window_dirty.load(Ordering::Relaxed) {
            self.window_dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Checks the rate rules over the window. Reads the clock itself: on the count-window
    /// path the caller has not.
    #[cold]
    fn evaluate(&self, word: u64) {
        let rules = &self.rules;
        let now = self.clock.now_nanos();
        let counts = self.stripes.window(now);
        if counts.failures == 0 && counts.slow == 0 {
            self.window_dirty.store(false, Ordering::Relaxed);
        }
        if counts.calls < rules.minimum_calls() {
            return;
        }
        self.warmed.store(true, Ordering::Relaxed);
        let calls = counts.calls as f64;
        let failure_rate = counts.failures as f64 / calls;
        let slow_rate = counts.slow as f64 / calls;
        let reason = if rules
            .failure_rate()
            .is_some_and(|limit| failure_rate >= limit)
        {
            TransitionReason::FailureRate {
                rate: failure_rate,
                calls: counts.calls,
            }
        } else if rules
            .slow_call_rate()
            .is_some_and(|limit| slow_rate >= limit)
        {
            TransitionReason::SlowCallRate {
                rate: slow_rate,
                calls: counts.calls,
            }
        } else {
            return;
        };
        self.trip(word, reason, now);
    }

    /// Opens a closed breaker, unless it already left the state `word` describes.
    #[cold]
    fn trip(&self, word: u64, reason: TransitionReason, now: u64) {
        {
            let mut control = self.control();
            if pack(control.state, control.generation) != word {
                return;
            }
            self.transition(&mut control, State::Open, reason, now);
        }
        self.listeners.deliver();
    }

    /// Outcome of a half-open trial.
    #[cold]
    pub(crate) fn record_trial(&self, word: u64, ticket: u64, outcome: Outcome, elapsed: Duration) {
        let slow = self.rules.is_slow(elapsed);
        let now = self.clock.now_nanos();
        match outcome {
            Outcome::Ignored => self.stripes.record_ignored(),
            Outcome::Success => self.stripes.record(false, slow, now, false),
            Outcome::Failure => {
                self.stripes.record(true, slow, now, false);
                self.last_failure
                    .store(now.saturating_add(1), Ordering::Relaxed);
            }
        }
        {
            let mut control = self.control();
            if !Self::take_trial(&mut control, word, ticket) {
                return;
            }
            match outcome {
                Outcome::Ignored => {}
                Outcome::Failure => {
                    self.consecutive.fetch_add(1, Ordering::Relaxed);
                    self.reopen(&mut control, TransitionReason::TrialFailed, now);
                }
                Outcome::Success if slow => {
                    self.consecutive.store(0, Ordering::Relaxed);
                    self.reopen(&mut control, TransitionReason::TrialTooSlow, now);
                }
                Outcome::Success => {
                    self.consecutive.store(0, Ordering::Relaxed);
                    control.trial_successes += 1;
                    if control.trial_successes >= control.config.success_threshold {
                        let successes = control.trial_successes;
                        self.transition(
                            &mut control,
                            State::Closed,
                            TransitionReason::TrialsSucceeded { successes },
                            now,
                        );
                    }
                }
            }
        }
        self.listeners.deliver();
    }

    /// A trial permit dropped without an outcome: free its slot, count nothing.
    #[cold]
    pub(crate) fn release_trial(&self, word: u64, ticket: u64) {
        let mut control = self.control();
        Self::take_trial(&mut control, word, ticket);
    }

    /// Removes a live trial's slot; false if the trial was reclaimed or the breaker moved on.
    fn take_trial(control: &mut Control, word: u64, ticket: u64) -> bool {
        if pack(control.state, control.generation) != word {
            return false;
        }
        match control.trials.iter().position(|t| t.ticket == ticket) {
            Some(index) => {
                control.trials.swap_remove(index);
                true
            }
            None => false,
        }
    }

    fn reopen(&self, control: &mut Control, reason: TransitionReason, now: u64) {
        control.reopens = control.reopens.saturating_add(1);
        self.transition(control, State::Open, reason, now);
    }

    /// Moves to `to` by hand; no event if the breaker is already there. A reset of a closed
    /// breaker still clears its window and failure streak.
    pub(crate) fn set_state(&self, to: State, reason: TransitionReason) {
        let now = self.clock.now_nanos();
        {
            let mut control = self.control();
            if control.state == to {
                if to == State::Closed {
                    self.clear_measurements();
                }
                return;
            }
            self.transition(&mut control, to, reason, now);
        }
        self.listeners.deliver();
    }

    /// The one place state changes. Publishes the state word last.
    fn transition(&self, control: &mut Control, to: State, reason: TransitionReason, now: u64) {
        let from = control.state;
        control.state = to;
        control.generation += 1;
        control.entered_at = now;
        control.trials.clear();
        control.trial_successes = 0;
        match to {
            State::Open => {
                let open = control.config.open;
                let nominal = duration_nanos(open.nominal(control.reopens));
                let cut = (nominal as f64 * open.jitter * control.rng.f64()) as u64;
                self.open_until.store(
                    now.saturating_add(nominal - cut.min(nominal)),
                    Ordering::Release,
                );
                control.opened_at = Some(now);
                control.opens += 1;
            }
            State::ForcedOpen => {
                control.opened_at = Some(now);
                control.opens += 1;
            }
            State::Closed => {
                control.reopens = 0;
                control.opened_at = None;
                self.clear_measurements();
            }
            State::Disabled => control.opened_at = None,
            State::HalfOpen => {}
        }
        self.word
            .store(pack(to, control.generation), Ordering::Release);
        control.sequence += 1;
        self.listeners.enqueue(StateChange {
            breaker: self.name.clone(),
            from,
            to,
            reason,
            at: self.wall.wall(now),
            clock_time: Duration::from_nanos(now),
            sequence: control.sequence,
        });
    }

    fn clear_measurements(&self) {
        self.stripes.clear_window();
        self.consecutive.store(0, Ordering::Relaxed);
        self.window_dirty.store(false, Ordering::Relaxed);
        self.warmed.store(false, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> super::snapshot::BreakerSnapshot {
        let now = self.clock.now_nanos();
        let control = self.control();
        let window = self.stripes.window(now);
        let totals = self.stripes.totals();
        let rate = |part: u64| {
            if window.calls == 0 {
                0.0
            } else {
                part as f64 / window.calls as f64
            }
        };
        let retry_after = match control.state {
            State::Open => Some(Duration::from_nanos(
                self.open_until.load(Ordering::Acquire).saturating_sub(now),
            )),
            _ => None,
        };
        let last_failure = self.last_failure.load(Ordering::Relaxed);
        super::snapshot::BreakerSnapshot {
            name: self.name.clone(),
            state: control.state,
            window_calls: window.calls,
            window_failures: window.failures,
            window_slow_calls: window.slow,
            failure_rate: rate(window.failures),
            slow_call_rate: rate(window.slow),
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            last_failure_at: (last_failure != 0).then(|| self.wall.wall(last_failure - 1)),
            opened_at: control.opened_at.map(|at| self.wall.wall(at)),
            opens: control.opens,
            time_in_state: Duration::from_nanos(now.saturating_sub(control.entered_at)),
            retry_after,
            half_open_trials: control.trials.len() as u32,
            total_calls: totals.calls + totals.ignored,
            total_successes: totals.calls - totals.failures,
            total_failures: totals.failures,
            total_slow_calls: totals.slow,
            total_ignored: totals.ignored,
            total_rejected: totals.rejected,
        }
    }
}
