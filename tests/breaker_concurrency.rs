//! Many threads hammer one breaker through open -> half-open -> closed cycles: half-open never
//! admits more trials than its limit at once, and the breaker never gets stuck.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protected_pool::breaker::{
    BreakerConfig, CircuitBreaker, ManualClock, OpenDuration, Outcome, SlidingWindow, State,
};

const THREADS: usize = 8;
const MAX_TRIALS: u32 = 3;

fn config() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(5),
        failure_rate: Some(0.5),
        window: SlidingWindow::Count { size: 20 },
        minimum_calls: 10,
        open: OpenDuration {
            base: Duration::from_millis(10),
            multiplier: 2.0,
            max: Duration::from_millis(40),
            jitter: 0.5,
        },
        half_open_max_calls: MAX_TRIALS,
        success_threshold: 4,
        // Long enough that no trial is reclaimed here: reclaiming is tested on its own, and a
        // reclaimed trial legitimately overlaps its replacement.
        max_wait_in_half_open: Duration::from_secs(3600),
        ..BreakerConfig::default()
    }
}

#[test]
fn half_open_limit_holds_and_every_cycle_completes() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder("hammered")
        .config(config())
        .clock(clock.clone())
        .build()
        .unwrap();
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let sink = transitions.clone();
    breaker.on_state_change(move |change| sink.lock().unwrap().push((change.from, change.to)));

    let healthy = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    // Trials in flight per half-open epoch: trials of an earlier epoch may still be running
    // after a re-open, but only the current epoch's trials count, and those are limited.
    let trials_in_flight = Mutex::new(HashMap::<u64, usize>::new());
    let max_trials_seen = AtomicUsize::new(0);
    let calls = AtomicU64::new(0);

    std::thread::scope(|scope| {
        for worker in 0..THREADS {
            let (breaker, healthy, stop) = (&breaker, &healthy, &stop);
            let (in_flight, max_seen, calls) = (&trials_in_flight, &max_trials_seen, &calls);
            scope.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let Ok(permit) = breaker.try_acquire() else {
                        std::hint::spin_loop();
                        continue;
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    let trial = permit.is_trial();
                    if trial {
                        let epoch = permit.epoch();
                        let now = {
                            let mut map = in_flight.lock().unwrap();
                            let count = map.entry(epoch).or_default();
                            *count += 1;
                            *count
                        };
                        max_seen.fetch_max(now, Ordering::SeqCst);
                        // Hold the trial for a moment so trials really overlap.
                        std::thread::yield_now();
                        *in_flight.lock().unwrap().get_mut(&epoch).unwrap() -= 1;
                    }
                    // Some callers are cancelled (permit dropped), the rest report.
                    match (n + worker as u64) % 7 {
                        0 => drop(permit),
                        1 => permit.record(Outcome::Ignored, Duration::ZERO),
                        _ if healthy.load(Ordering::Relaxed) => {
                            permit.record(Outcome::Success, Duration::ZERO)
                        }
                        _ => permit.record(Outcome::Failure, Duration::ZERO),
                    }
                }
            });
        }

        // The driver: alternate outages and recoveries while moving time.
        let wait_for = |want: State| {
            for _ in 0..200_000 {
                if breaker.state() == want {
                    return true;
                }
                clock.advance(Duration::from_millis(1));
                std::thread::yield_now();
            }
            false
        };
        for cycle in 0..25 {
            healthy.store(false, Ordering::SeqCst);
            assert!(wait_for(State::Open), "cycle {cycle}: never opened");
            healthy.store(true, Ordering::SeqCst);
            assert!(
                wait_for(State::Closed),
                "cycle {cycle}: stuck in {:?}",
                breaker.state()
            );
        }
        stop.store(true, Ordering::SeqCst);
    });

    assert!(
        max_trials_seen.load(Ordering::SeqCst) <= MAX_TRIALS as usize,
        "{} trials at once, limit {MAX_TRIALS}",
        max_trials_seen.load(Ordering::SeqCst)
    );
    assert!(max_trials_seen.load(Ordering::SeqCst) >= 1);
    let transitions = transitions.lock().unwrap();
    assert!(
        transitions.windows(2).all(|w| w[0].1 == w[1].0),
        "broken chain"
    );
    let closes = transitions
        .iter()
        .filter(|(from, to)| (*from, *to) == (State::HalfOpen, State::Closed))
        .count();
    assert_eq!(closes, 25);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.half_open_trials, 0, "no trial slot leaked");
    assert_eq!(snapshot.state, State::Closed);
    assert!(calls.load(Ordering::Relaxed) > 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_tasks_leave_no_trial_slot_behind() {
    let clock = ManualClock::new();
    let breaker = CircuitBreaker::builder("tasks")
        .config(config())
        .clock(clock.clone())
        .build()
        .unwrap();
    for round in 0..50 {
        breaker.force_open();
        breaker.reset();
        for _ in 0..5 {
            breaker
                .try_acquire()
                .unwrap()
                .record(Outcome::Failure, Duration::ZERO);
        }
        assert_eq!(breaker.state(), State::Open);
        clock.advance(Duration::from_millis(100));
        let mut tasks = Vec::new();
        let (tell, mut asked) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..16 {
            let breaker = breaker.clone();
            let tell = tell.clone();
            tasks.push(tokio::spawn(async move {
                let permit = breaker.try_acquire();
                tell.send(()).unwrap();
                let Ok(permit) = permit else { return };
                // Hang until aborted: the permit must come back when the task is dropped.
                std::future::pending::<()>().await;
                permit.record(Outcome::Success, Duration::ZERO);
            }));
        }
        // Wait until every task has asked for its permit (a full half-open refuses some).
        for _ in 0..16 {
            asked.recv().await.unwrap();
        }
        assert_eq!(
            breaker.snapshot().half_open_trials,
            MAX_TRIALS,
            "round {round}"
        );
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        let snapshot = breaker.snapshot();
        assert_eq!(
            snapshot.half_open_trials, 0,
            "round {round}: trial slot leaked"
        );
        assert_eq!(snapshot.state, State::HalfOpen);
    }
}

/// Refusals are counted exactly however many threads refuse at once, more threads than the
/// breaker has stripes included: a stripe's first thread counts its own refusals with plain
/// stores, the threads that share the stripe after it with atomic increments, and the two
/// never lose each other's counts.
#[test]
fn every_refusal_is_counted_from_more_threads_than_stripes() {
    // More than the most stripes a breaker has (64), so that threads share stripes.
    const REFUSERS: u64 = 160;
    const EACH: u64 = 20_000;
    let breaker = CircuitBreaker::builder("refusing")
        .config(config())
        .build()
        .unwrap();
    breaker.force_open();
    let start = std::sync::Barrier::new(REFUSERS as usize);
    std::thread::scope(|scope| {
        for _ in 0..REFUSERS {
            let (breaker, start) = (&breaker, &start);
            scope.spawn(move || {
                start.wait();
                for n in 0..EACH {
                    // Both ways of asking: with and without trials of its own.
                    let refused = if n % 2 == 0 {
                        breaker.try_acquire().is_err()
                    } else {
                        breaker.try_acquire_untried().is_err()
                    };
                    assert!(refused, "a forced-open breaker let a call through");
                }
            });
        }
    });
    assert_eq!(breaker.snapshot().total_rejected, REFUSERS * EACH);
}
