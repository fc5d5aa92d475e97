//! Open duration: exponential growth on re-open, cap, reset on close, jitter bounds.

mod support;

use std::time::Duration;

use protected_pool::breaker::{
    BreakerConfig, CircuitBreaker, ManualClock, OpenDuration, Outcome, State,
};
use support::{Rig, consecutive, ms, secs};

/// Re-opens the breaker from half-open and returns the open duration it reported.
fn reopen(rig: &Rig) -> Duration {
    let retry = rig
        .breaker
        .try_acquire()
        .unwrap_err()
        .retry_after()
        .unwrap();
    rig.advance(retry);
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Failure, ms(1));
    assert_eq!(rig.state(), State::Open);
    retry
}

#[test]
fn grows_by_the_multiplier_up_to_max_and_resets_on_close() {
    let rig = Rig::new(consecutive(1));
    rig.fail(1);
    let durations: Vec<_> = (0..6).map(|_| reopen(&rig)).collect();
    assert_eq!(
        durations,
        vec![secs(1), secs(2), secs(4), secs(8), secs(8), secs(8)]
    );
    // Close through a successful trial: the schedule starts over.
    let retry = rig
        .breaker
        .try_acquire()
        .unwrap_err()
        .retry_after()
        .unwrap();
    rig.advance(retry);
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::Closed);
    rig.fail(1);
    assert_eq!(
        rig.breaker.try_acquire().unwrap_err().retry_after(),
        Some(secs(1))
    );
    assert_eq!(rig.breaker.snapshot().opens, 8);
}

#[test]
fn manual_reset_also_restarts_the_schedule() {
    let rig = Rig::new(consecutive(1));
    rig.fail(1);
    reopen(&rig);
    reopen(&rig);
    rig.breaker.reset();
    rig.fail(1);
    assert_eq!(
        rig.breaker.try_acquire().unwrap_err().retry_after(),
        Some(secs(1))
    );
}

#[test]
fn nominal_schedule_saturates_instead_of_overflowing() {
    let open = OpenDuration {
        base: secs(1),
        multiplier: 10.0,
        max: secs(60),
        jitter: 0.0,
    };
    assert_eq!(open.nominal(0), secs(1));
    assert_eq!(open.nominal(1), secs(10));
    assert_eq!(open.nominal(2), secs(60));
    assert_eq!(open.nominal(u32::MAX), secs(60));
}

#[test]
fn jitter_shortens_by_at_most_its_fraction_and_varies() {
    let config = BreakerConfig {
        open: OpenDuration {
            base: secs(10),
            multiplier: 2.0,
            max: secs(10),
            jitter: 0.25,
        },
        ..consecutive(1)
    };
    let mut seen = Vec::new();
    for seed in 0..200 {
        let breaker = CircuitBreaker::builder("jitter")
            .config(config.clone())
            .clock(ManualClock::new())
            .jitter_seed(seed)
            .build()
            .unwrap();
        breaker
            .try_acquire()
            .unwrap()
            .record(Outcome::Failure, ms(1));
        let open_for = breaker.try_acquire().unwrap_err().retry_after().unwrap();
        assert!(
            open_for > ms(7500) && open_for <= secs(10),
            "{open_for:?} outside (7.5 s, 10 s]"
        );
        seen.push(open_for);
    }
    seen.sort();
    seen.dedup();
    assert!(
        seen.len() > 150,
        "jitter should spread durations, got {}",
        seen.len()
    );
    let spread = *seen.last().unwrap() - seen[0];
    assert!(
        spread > secs(2),
        "spread {spread:?} should cover most of 2.5 s"
    );
}

#[test]
fn same_seed_same_schedule() {
    let config = BreakerConfig {
        open: OpenDuration {
            jitter: 0.5,
            ..consecutive(1).open
        },
        ..consecutive(1)
    };
    let durations = |seed| {
        let breaker = CircuitBreaker::builder("seeded")
            .config(config.clone())
            .clock(ManualClock::new())
            .jitter_seed(seed)
            .build()
            .unwrap();
        breaker
            .try_acquire()
            .unwrap()
            .record(Outcome::Failure, ms(1));
        breaker.try_acquire().unwrap_err().retry_after()
    };
    assert_eq!(durations(42), durations(42));
}
