//! Helpers shared by the breaker tests: a breaker on a manual clock and a transition recorder.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use protected_pool::breaker::{
    BreakerConfig, CircuitBreaker, ManualClock, OpenDuration, Outcome, SlidingWindow, State,
    StateChange,
};

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Consecutive failures only, no jitter, fixed schedule 1 s x2 up to 8 s.
pub fn consecutive(n: u32) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(n),
        failure_rate: None,
        slow_call_rate: None,
        window: SlidingWindow::Count { size: 10 },
        minimum_calls: 1,
        open: OpenDuration {
            base: secs(1),
            multiplier: 2.0,
            max: secs(8),
            jitter: 0.0,
        },
        half_open_max_calls: 1,
        success_threshold: 1,
        max_wait_in_half_open: secs(5),
        ..BreakerConfig::default()
    }
}

pub struct Rig {
    pub breaker: CircuitBreaker,
    pub clock: ManualClock,
    pub changes: Arc<Mutex<Vec<StateChange>>>,
}

impl Rig {
    pub fn new(config: BreakerConfig) -> Self {
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::builder("test")
            .config(config)
            .clock(clock.clone())
            .jitter_seed(7)
            .build()
            .expect("valid config");
        let changes = Arc::new(Mutex::new(Vec::new()));
        let sink = changes.clone();
        breaker.on_state_change(move |change| sink.lock().unwrap().push(change.clone()));
        Self {
            breaker,
            clock,
            changes,
        }
    }

    /// One call through the breaker with this outcome; panics if it was rejected.
    pub fn call(&self, outcome: Outcome) {
        self.call_taking(outcome, Duration::ZERO);
    }

    pub fn call_taking(&self, outcome: Outcome, elapsed: Duration) {
        self.breaker
            .try_acquire()
            .unwrap_or_else(|rejected| panic!("call rejected: {rejected}"))
            .record(outcome, elapsed);
    }

    pub fn fail(&self, times: usize) {
        for _ in 0..times {
            self.call(Outcome::Failure);
        }
    }

    pub fn succeed(&self, times: usize) {
        for _ in 0..times {
            self.call(Outcome::Success);
        }
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// (from, to) of every transition so far.
    pub fn transitions(&self) -> Vec<(State, State)> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.from, c.to))
            .collect()
    }
}
