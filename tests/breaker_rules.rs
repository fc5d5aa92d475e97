//! Trip rules in the closed state: consecutive failures, failure rate over count and time
//! windows, slow-call rate, and what never trips a breaker.

mod support;

use protected_pool::breaker::{BreakerConfig, Outcome, SlidingWindow, State, TransitionReason};
use support::{Rig, consecutive, ms, secs};

fn rate_config(window: SlidingWindow, rate: f64, minimum_calls: u32) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: None,
        failure_rate: Some(rate),
        window,
        minimum_calls,
        ..consecutive(1)
    }
}

#[test]
fn opens_after_exactly_n_consecutive_failures() {
    let rig = Rig::new(consecutive(3));
    rig.fail(2);
    assert_eq!(rig.state(), State::Closed);
    rig.fail(1);
    assert_eq!(rig.state(), State::Open);
    let change = rig.changes.lock().unwrap()[0].clone();
    assert_eq!(
        change.reason,
        TransitionReason::ConsecutiveFailures { count: 3 }
    );
}

#[test]
fn a_success_breaks_the_streak_and_ignored_outcomes_do_not() {
    let rig = Rig::new(consecutive(3));
    rig.fail(2);
    rig.succeed(1);
    rig.fail(2);
    assert_eq!(
        rig.state(),
        State::Closed,
        "streak restarted after the success"
    );
    rig.call(Outcome::Ignored);
    assert_eq!(rig.breaker.snapshot().consecutive_failures, 2);
    rig.fail(1);
    assert_eq!(
        rig.state(),
        State::Open,
        "ignored neither counted nor reset"
    );
}

#[test]
fn failure_rate_waits_for_minimum_calls_over_a_count_window() {
    let rig = Rig::new(rate_config(SlidingWindow::Count { size: 10 }, 0.5, 6));
    rig.fail(5);
    assert_eq!(rig.state(), State::Closed, "5 calls < minimum 6");
    rig.succeed(1);
    // The success brought the window to 6 calls at 5/6 failures: that trips.
    assert_eq!(rig.state(), State::Open);
    let change = rig.changes.lock().unwrap()[0].clone();
    match change.reason {
        TransitionReason::FailureRate { rate, calls } => {
            assert_eq!(calls, 6);
            assert!((rate - 5.0 / 6.0).abs() < 1e-9);
        }
        other => panic!("unexpected reason {other:?}"),
    }
}

#[test]
fn count_window_forgets_calls_older_than_its_size() {
    let rig = Rig::new(rate_config(SlidingWindow::Count { size: 4 }, 0.5, 4));
    rig.fail(1);
    rig.succeed(3);
    // Window [F S S S] = 25 %. Push the failure out and add one: [S S S F] = 25 %, then
    // [S S F F] = 50 % trips.
    rig.succeed(1);
    rig.fail(1);
    assert_eq!(rig.state(), State::Closed);
    let snapshot = rig.breaker.snapshot();
    assert_eq!((snapshot.window_calls, snapshot.window_failures), (4, 1));
    rig.fail(1);
    assert_eq!(rig.state(), State::Open);
}

#[test]
fn time_window_drops_whole_buckets_as_time_passes() {
    let window = SlidingWindow::Time {
        duration: secs(10),
        buckets: 5,
    };
    let rig = Rig::new(rate_config(window, 0.5, 4));
    rig.fail(1);
    rig.succeed(3);
    assert_eq!(rig.breaker.snapshot().window_calls, 4);
    rig.advance(secs(10));
    let snapshot = rig.breaker.snapshot();
    assert_eq!(snapshot.window_calls, 0, "all four left the window");
    // Fresh window: 2 failures of 4 calls trips at the 4th.
    rig.succeed(2);
    rig.fail(1);
    assert_eq!(rig.state(), State::Closed);
    rig.fail(1);
    assert_eq!(rig.state(), State::Open);
}

#[test]
fn time_window_trips_on_a_success_once_older_successes_have_left() {
    let window = SlidingWindow::Time {
        duration: secs(10),
        buckets: 10,
    };
    let rig = Rig::new(rate_config(window, 0.5, 4));
    rig.succeed(6);
    rig.advance(secs(5));
    rig.fail(3);
    assert_eq!(rig.state(), State::Closed, "3 of 9 calls failed");
    rig.advance(secs(6));
    // The six successes have left; the window now holds three failures and this success.
    rig.succeed(1);
    assert_eq!(rig.state(), State::Open);
}

#[test]
fn slow_calls_trip_the_slow_call_rule() {
    let config = BreakerConfig {
        consecutive_failures: None,
        slow_call_rate: Some(0.5),
        slow_call_duration: ms(100),
        window: SlidingWindow::Count { size: 4 },
        minimum_calls: 4,
        ..consecutive(1)
    };
    let rig = Rig::new(config);
    rig.call_taking(Outcome::Success, ms(99));
    rig.call_taking(Outcome::Success, ms(100));
    rig.call_taking(Outcome::Success, ms(10));
    assert_eq!(rig.state(), State::Closed, "3 calls < minimum 4");
    rig.call_taking(Outcome::Success, ms(500));
    assert_eq!(rig.state(), State::Open, "2 of 4 calls slow");
    let change = rig.changes.lock().unwrap()[0].clone();
    assert!(matches!(
        change.reason,
        TransitionReason::SlowCallRate { calls: 4, .. }
    ));
}

#[test]
fn rules_combine_and_the_first_that_holds_trips() {
    let config = BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate: Some(0.5),
        window: SlidingWindow::Count { size: 10 },
        minimum_calls: 4,
        ..consecutive(3)
    };
    let rig = Rig::new(config);
    rig.succeed(2);
    rig.fail(1);
    rig.succeed(0);
    rig.fail(1);
    // 2 of 4 = 50 % with a streak of only 2.
    assert_eq!(rig.state(), State::Open);
    let reason = rig.changes.lock().unwrap()[0].reason;
    assert!(matches!(reason, TransitionReason::FailureRate { .. }));
}

#[test]
fn open_breaker_rejects_with_retry_after_and_counts_rejections() {
    let rig = Rig::new(consecutive(1));
    rig.fail(1);
    rig.advance(ms(400));
    let rejected = rig.breaker.try_acquire().unwrap_err();
    assert_eq!(rejected.state, State::Open);
    assert_eq!(rejected.retry_after(), Some(ms(600)));
    assert!(rejected.to_string().contains("retry after"));
    assert_eq!(rig.breaker.snapshot().total_rejected, 1);
}

#[test]
fn forced_open_rejects_until_reset_and_disabled_never_trips() {
    let rig = Rig::new(consecutive(1));
    rig.breaker.force_open();
    rig.advance(secs(3600));
    let rejected = rig.breaker.try_acquire().unwrap_err();
    assert_eq!(
        (rejected.state, rejected.retry_after()),
        (State::ForcedOpen, None)
    );
    rig.breaker.reset();
    assert_eq!(rig.state(), State::Closed);

    rig.breaker.disable();
    rig.fail(50);
    assert_eq!(
        rig.state(),
        State::Disabled,
        "disabled passes and never trips"
    );
    let snapshot = rig.breaker.snapshot();
    assert_eq!(snapshot.total_failures, 50, "but still measures");
    rig.breaker.reset();
    assert_eq!(rig.state(), State::Closed);
    assert_eq!(rig.breaker.snapshot().consecutive_failures, 0);
    assert_eq!(
        rig.transitions(),
        vec![
            (State::Closed, State::ForcedOpen),
            (State::ForcedOpen, State::Closed),
            (State::Closed, State::Disabled),
            (State::Disabled, State::Closed),
        ]
    );
}

#[test]
fn outcome_of_a_permit_from_an_earlier_state_changes_nothing() {
    let rig = Rig::new(consecutive(2));
    let early = rig.breaker.try_acquire().unwrap();
    rig.fail(2);
    assert_eq!(rig.state(), State::Open);
    let before = rig.breaker.snapshot().retry_after;
    // A call admitted while closed finishes after the breaker opened.
    early.record(Outcome::Failure, ms(1));
    assert_eq!(rig.state(), State::Open);
    assert_eq!(
        rig.breaker.snapshot().retry_after,
        before,
        "open deadline untouched"
    );
    assert_eq!(rig.transitions().len(), 1);

    // Same after a reset: a stale success does not clear the new streak either.
    let stale = rig.breaker.try_acquire().unwrap_err();
    assert_eq!(stale.state, State::Open);
    rig.breaker.reset();
    let before_reset = rig.breaker.try_acquire().unwrap();
    rig.breaker.disable();
    rig.breaker.reset();
    rig.fail(1);
    before_reset.record(Outcome::Success, ms(1));
    assert_eq!(rig.breaker.snapshot().consecutive_failures, 1);
}

#[test]
fn reset_of_a_closed_breaker_clears_its_measurements() {
    let rig = Rig::new(consecutive(3));
    rig.fail(2);
    rig.breaker.reset();
    rig.fail(2);
    assert_eq!(rig.state(), State::Closed);
    assert!(
        rig.transitions().is_empty(),
        "no event for closed -> closed"
    );
}

#[test]
fn call_counts_err_as_failure_and_reports_rejection() {
    let rig = Rig::new(consecutive(2));
    assert_eq!(rig.breaker.call(|| Ok::<_, &str>(7)).unwrap(), 7);
    assert!(rig.breaker.call(|| Err::<(), _>("down")).is_err());
    assert!(rig.breaker.call(|| Err::<(), _>("down")).is_err());
    let error = rig.breaker.call(|| Ok::<_, &str>(1)).unwrap_err();
    assert!(matches!(
        error,
        protected_pool::breaker::CallError::Rejected(_)
    ));
}
