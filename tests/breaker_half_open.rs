//! Half-open: trial limits, closing and re-opening, RAII trial permits, reclaiming stuck trials.

mod support;

use protected_pool::breaker::{BreakerConfig, Outcome, State, TransitionReason};
use support::{Rig, consecutive, ms, secs};

fn half_open_rig(max_calls: u32, success_threshold: u32) -> Rig {
    let rig = Rig::new(BreakerConfig {
        half_open_max_calls: max_calls,
        success_threshold,
        ..consecutive(1)
    });
    rig.fail(1);
    rig.advance(secs(1));
    rig
}

#[test]
fn first_call_after_the_open_duration_is_a_trial() {
    let rig = half_open_rig(1, 1);
    assert_eq!(
        rig.state(),
        State::Open,
        "turns half-open lazily, at the next call"
    );
    let permit = rig.breaker.try_acquire().unwrap();
    assert!(permit.is_trial());
    assert_eq!(rig.state(), State::HalfOpen);
    let change = rig.changes.lock().unwrap()[1].clone();
    assert_eq!(
        change.reason,
        TransitionReason::OpenDurationElapsed { open_for: secs(1) }
    );
    permit.record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::Closed);
}

#[test]
fn admits_at_most_half_open_max_calls_at_once() {
    let rig = half_open_rig(2, 3);
    let first = rig.breaker.try_acquire().unwrap();
    rig.advance(ms(300));
    let second = rig.breaker.try_acquire().unwrap();
    let full = rig.breaker.try_acquire().unwrap_err();
    assert_eq!(full.state, State::HalfOpen);
    // The oldest trial is reclaimed at max_wait (5 s) after it started: 4.7 s from now.
    assert_eq!(full.retry_after(), Some(ms(4700)));
    first.record(Outcome::Success, ms(1));
    // A slot is free again; successes accumulate across trials until the threshold.
    let third = rig.breaker.try_acquire().unwrap();
    second.record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::HalfOpen);
    third.record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::Closed);
    let reason = rig.changes.lock().unwrap().last().unwrap().reason;
    assert_eq!(reason, TransitionReason::TrialsSucceeded { successes: 3 });
}

#[test]
fn one_failed_trial_reopens_and_other_trials_then_count_nothing() {
    let rig = half_open_rig(2, 1);
    let good = rig.breaker.try_acquire().unwrap();
    let bad = rig.breaker.try_acquire().unwrap();
    bad.record(Outcome::Failure, ms(1));
    assert_eq!(rig.state(), State::Open);
    good.record(Outcome::Success, ms(1));
    assert_eq!(
        rig.state(),
        State::Open,
        "a trial of the previous half-open counts nothing"
    );
    assert_eq!(
        rig.transitions(),
        vec![
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Open),
        ]
    );
}

#[test]
fn a_dropped_trial_frees_its_slot_and_records_nothing() {
    let rig = half_open_rig(1, 1);
    let cancelled = rig.breaker.try_acquire().unwrap();
    assert!(rig.breaker.try_acquire().is_err(), "the only slot is taken");
    drop(cancelled);
    assert_eq!(rig.state(), State::HalfOpen);
    assert_eq!(rig.breaker.snapshot().half_open_trials, 0);
    let next = rig.breaker.try_acquire().unwrap();
    assert!(next.is_trial());
    next.record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::Closed);
}

#[tokio::test]
async fn a_trial_cancelled_inside_a_timeout_frees_its_slot() {
    let rig = half_open_rig(1, 1);
    let breaker = rig.breaker.clone();
    let call = async {
        let permit = breaker.try_acquire().unwrap();
        std::future::pending::<()>().await;
        permit.record(Outcome::Success, ms(1));
    };
    let timed_out = tokio::time::timeout(ms(10), call).await;
    assert!(timed_out.is_err());
    assert_eq!(rig.breaker.snapshot().half_open_trials, 0);
    assert!(rig.breaker.try_acquire().unwrap().is_trial());
}

#[test]
fn ignored_trial_outcome_frees_the_slot_without_deciding() {
    let rig = half_open_rig(1, 1);
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Ignored, ms(1));
    assert_eq!(rig.state(), State::HalfOpen);
    assert!(rig.breaker.try_acquire().unwrap().is_trial());
}

#[test]
fn a_trial_held_past_max_wait_is_reclaimed() {
    let rig = half_open_rig(1, 1);
    let stuck = rig.breaker.try_acquire().unwrap();
    rig.advance(ms(4999));
    assert!(rig.breaker.try_acquire().is_err());
    rig.advance(ms(1));
    let fresh = rig
        .breaker
        .try_acquire()
        .expect("stuck trial reclaimed after 5 s");
    // The reclaimed caller finally answers: too late, it decides nothing.
    stuck.record(Outcome::Failure, ms(1));
    assert_eq!(rig.state(), State::HalfOpen);
    fresh.record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::Closed);
}

#[test]
fn a_slow_trial_reopens_when_the_slow_rule_is_on() {
    let rig = Rig::new(BreakerConfig {
        slow_call_rate: Some(1.0),
        slow_call_duration: ms(100),
        ..consecutive(1)
    });
    rig.fail(1);
    rig.advance(secs(1));
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Success, ms(250));
    assert_eq!(rig.state(), State::Open);
    let reason = rig.changes.lock().unwrap().last().unwrap().reason;
    assert_eq!(reason, TransitionReason::TrialTooSlow);
}

#[test]
fn closing_clears_the_window_and_streak() {
    let rig = half_open_rig(1, 1);
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Success, ms(1));
    let snapshot = rig.breaker.snapshot();
    assert_eq!(snapshot.state, State::Closed);
    assert_eq!(snapshot.consecutive_failures, 0);
    assert_eq!(snapshot.window_calls, 0);
    assert_eq!(snapshot.opened_at, None);
}

#[test]
fn a_probe_asking_for_a_trial_is_not_a_refused_call() {
    let rig = half_open_rig(1, 2);
    let probe = rig
        .breaker
        .try_acquire_trial()
        .expect("the open duration has passed");
    assert!(probe.is_trial());
    assert_eq!(rig.state(), State::HalfOpen);
    // The only slot is taken: a probe gets nothing and nothing is counted; a call is refused.
    assert!(rig.breaker.try_acquire_trial().is_none());
    assert_eq!(rig.breaker.snapshot().total_rejected, 0);
    assert!(rig.breaker.try_acquire().is_err());
    assert_eq!(rig.breaker.snapshot().total_rejected, 1);
    probe.record(Outcome::Success, ms(1));
    // Closed: there is no trial to make.
    rig.breaker
        .try_acquire_trial()
        .expect("a second trial")
        .record(Outcome::Success, ms(1));
    assert_eq!(rig.state(), State::Closed);
    assert!(rig.breaker.try_acquire_trial().is_none());
}
