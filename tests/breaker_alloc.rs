//! The closed path and open rejection allocate nothing: a counting global allocator proves it.

#[path = "support/alloc.rs"]
mod alloc;

use std::hint::black_box;
use std::time::Duration;

use protected_pool::breaker::{
    BreakerConfig, CircuitBreaker, OpenDuration, Outcome, SlidingWindow, State,
};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = alloc::allocations();
    f();
    alloc::allocations() - before
}

fn configs() -> Vec<(&'static str, BreakerConfig)> {
    vec![
        ("read preset (time window)", BreakerConfig::read()),
        (
            "count window + slow rule",
            BreakerConfig {
                failure_rate: Some(0.5),
                slow_call_rate: Some(0.5),
                slow_call_duration: Duration::from_millis(10),
                window: SlidingWindow::Count { size: 100 },
                ..BreakerConfig::write()
            },
        ),
    ]
}

#[test]
fn closed_path_allocates_nothing() {
    for (name, config) in configs() {
        let breaker = CircuitBreaker::new("alloc", config).unwrap();
        // Warm up: thread stripe assignment and lazily built state happen once.
        breaker
            .try_acquire()
            .unwrap()
            .record(Outcome::Success, Duration::ZERO);
        let n = allocations_during(|| {
            for i in 0..10_000u32 {
                let permit = black_box(breaker.try_acquire()).unwrap();
                let outcome = if i % 50 == 0 {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                // Now and then a failure or a slow call, so the window has work to do.
                let elapsed = Duration::from_millis(if i % 50 == 25 { 20 } else { 1 });
                permit.record(outcome, elapsed);
            }
            let dropped = breaker.try_acquire().unwrap();
            drop(dropped);
        });
        assert_eq!(breaker.state(), State::Closed, "{name}");
        assert_eq!(n, 0, "{name}: {n} allocations on the closed path");
    }
}

#[test]
fn rejection_allocates_nothing() {
    let config = BreakerConfig {
        open: OpenDuration {
            base: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            ..OpenDuration::default()
        },
        ..BreakerConfig::read()
    };
    let breaker = CircuitBreaker::new("alloc", config).unwrap();
    for _ in 0..3 {
        breaker
            .try_acquire()
            .unwrap()
            .record(Outcome::Failure, Duration::ZERO);
    }
    assert_eq!(breaker.state(), State::Open);
    let _ = breaker.try_acquire();
    let n = allocations_during(|| {
        for _ in 0..10_000 {
            let rejected = black_box(breaker.try_acquire()).unwrap_err();
            assert!(rejected.retry_after().is_some());
        }
    });
    assert_eq!(n, 0, "{n} allocations on rejection");
}

#[test]
fn the_counter_does_count() {
    // Guards the test itself: an allocation on this thread must be seen.
    let n = allocations_during(|| {
        black_box(vec![1u8; 64]);
    });
    assert!(n >= 1);
}
