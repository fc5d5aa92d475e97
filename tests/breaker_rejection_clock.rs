//! A refusal while the trials are left to a probe reads no clock: the moment to retry at goes
//! in the rejection, and the wait is worked out only when asked for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protected_pool::breaker::{BreakerConfig, CircuitBreaker, Clock, ManualClock, Outcome, State};

/// A manual clock that counts how often it is read.
#[derive(Debug, Clone)]
struct CountingClock {
    time: ManualClock,
    reads: Arc<AtomicU64>,
}

impl Clock for CountingClock {
    fn now(&self) -> Duration {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.time.now()
    }
}

#[test]
fn an_untried_refusal_reads_no_clock_and_its_wait_is_worked_out_when_asked() {
    let clock = CountingClock {
        time: ManualClock::new(),
        reads: Arc::default(),
    };
    let config = BreakerConfig {
        consecutive_failures: Some(1),
        ..BreakerConfig::write()
    };
    let breaker = CircuitBreaker::builder("db")
        .config(config)
        .clock(clock.clone())
        .jitter_seed(7)
        .build()
        .unwrap();
    breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Failure, Duration::from_millis(1));
    assert_eq!(breaker.state(), State::Open);

    let before = clock.reads.load(Ordering::SeqCst);
    let refusals: Vec<_> = (0..1000)
        .map(|_| breaker.try_acquire_untried().unwrap_err())
        .collect();
    assert_eq!(
        clock.reads.load(Ordering::SeqCst),
        before,
        "1,000 refusals read the clock"
    );

    // Asked, the wait is as of the asking: it shrinks as time passes.
    let first = refusals[0].retry_after().expect("open: a time to retry");
    assert!(first > Duration::ZERO);
    clock.time.advance(first / 2);
    let later = refusals[0].retry_after().unwrap();
    assert_eq!(later, first - first / 2);
    clock.time.advance(first);
    assert_eq!(refusals[0].retry_after(), Some(Duration::ZERO));
    assert_eq!(refusals[0], refusals[999], "the same moment to retry at");
}
