//! Listeners: every transition delivered once, in order, to callbacks and subscriptions.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use protected_pool::breaker::{ListenerId, Outcome, State, TransitionReason};
use support::{Rig, consecutive, ms, secs};

/// Runs `work` on its own thread and waits a bounded time for it, so that a listener deadlock
/// fails the test instead of hanging the suite.
fn within_deadline<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match finished.recv_timeout(Duration::from_secs(10)) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => panic!("still blocked after 10s: a listener deadlock"),
        Err(RecvTimeoutError::Disconnected) => panic!("the work panicked"),
    }
}

/// Closed -> Open -> HalfOpen -> Open -> HalfOpen -> Closed -> ForcedOpen -> Closed.
fn cycle(rig: &Rig) {
    rig.fail(1);
    rig.advance(secs(1));
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Failure, ms(1));
    rig.advance(secs(2));
    rig.breaker
        .try_acquire()
        .unwrap()
        .record(Outcome::Success, ms(1));
    rig.breaker.force_open();
    rig.breaker.reset();
}

#[test]
fn callbacks_see_every_transition_once_in_order_with_reason_and_time() {
    let rig = Rig::new(consecutive(1));
    cycle(&rig);
    let changes = rig.changes.lock().unwrap().clone();
    let expected = [
        (State::Closed, State::Open),
        (State::Open, State::HalfOpen),
        (State::HalfOpen, State::Open),
        (State::Open, State::HalfOpen),
        (State::HalfOpen, State::Closed),
        (State::Closed, State::ForcedOpen),
        (State::ForcedOpen, State::Closed),
    ];
    assert_eq!(rig.transitions(), expected);
    for (index, change) in changes.iter().enumerate() {
        assert_eq!(change.sequence, index as u64 + 1);
        assert_eq!(&*change.breaker, "test");
    }
    let times: Vec<_> = changes.iter().map(|c| c.clock_time).collect();
    assert_eq!(
        times,
        vec![
            secs(0),
            secs(1),
            secs(1),
            secs(3),
            secs(3),
            secs(3),
            secs(3)
        ]
    );
    assert!(changes.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(changes[2].reason, TransitionReason::TrialFailed);
    assert_eq!(changes[6].reason, TransitionReason::ManualReset);
    assert!(changes[0].to_string().contains("closed -> open"));
}

#[tokio::test]
async fn subscriptions_receive_the_same_sequence() {
    let rig = Rig::new(consecutive(1));
    let mut subscription = rig.breaker.subscribe();
    cycle(&rig);
    let mut received = Vec::new();
    while let Some(change) = subscription.try_recv() {
        received.push(change);
    }
    assert_eq!(received, *rig.changes.lock().unwrap());
    // Async delivery across tasks.
    let breaker = rig.breaker.clone();
    let waiter = tokio::spawn(async move { subscription.recv().await });
    tokio::task::yield_now().await;
    breaker.force_open();
    let change = waiter.await.unwrap().expect("one more transition");
    assert_eq!((change.from, change.to), (State::Closed, State::ForcedOpen));
}

#[test]
fn a_listener_may_call_back_into_the_breaker() {
    let rig = Rig::new(consecutive(1));
    let breaker = rig.breaker.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    rig.breaker.on_state_change(move |change| {
        // Reading and even steering the breaker from a listener must not deadlock; the
        // transition it causes is delivered after this one.
        sink.lock()
            .unwrap()
            .push((change.to, breaker.snapshot().state));
        if change.to == State::Open {
            breaker.reset();
        }
    });
    rig.fail(1);
    assert_eq!(rig.state(), State::Closed);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(State::Open, State::Open), (State::Closed, State::Closed)]
    );
    assert_eq!(
        rig.transitions(),
        vec![(State::Closed, State::Open), (State::Open, State::Closed)]
    );
}

#[test]
fn a_panicking_listener_is_contained_and_others_still_run() {
    let rig = Rig::new(consecutive(1));
    let calls = Arc::new(AtomicUsize::new(0));
    rig.breaker.on_state_change(|_| panic!("listener bug"));
    let counter = calls.clone();
    rig.breaker.on_state_change(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    rig.fail(1);
    rig.breaker.reset();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(rig.state(), State::Closed);
}

#[test]
fn removed_listeners_hear_nothing_more() {
    let rig = Rig::new(consecutive(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let id = rig.breaker.on_state_change(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    rig.fail(1);
    assert!(rig.breaker.remove_listener(id));
    assert!(!rig.breaker.remove_listener(id));
    rig.breaker.reset();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn concurrent_transitions_are_each_delivered_once_in_sequence_order() {
    let rig = Rig::new(consecutive(1));
    let threads = 4;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..500 {
                    rig.breaker.force_open();
                    rig.breaker.reset();
                }
            });
        }
    });
    let changes = rig.changes.lock().unwrap();
    let sequences: Vec<u64> = changes.iter().map(|c| c.sequence).collect();
    let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
    assert_eq!(sequences, expected, "no gap, no duplicate, in order");
    assert!(changes.windows(2).all(|w| w[0].to == w[1].from));
}

#[test]
fn a_listener_may_add_and_remove_listeners_on_its_own_breaker() {
    let rig = Rig::new(consecutive(1));
    let removed_saw = Arc::new(Mutex::new(Vec::new()));
    let sink = removed_saw.clone();
    let removed = rig.breaker.on_state_change(move |change| {
        sink.lock().unwrap().push((change.from, change.to));
    });
    let added_saw = Arc::new(Mutex::new(Vec::new()));
    let breaker = rig.breaker.clone();
    let added_sink = added_saw.clone();
    rig.breaker.on_state_change(move |change| {
        if change.to == State::Open {
            let sink = added_sink.clone();
            breaker.on_state_change(move |change| {
                sink.lock().unwrap().push((change.from, change.to));
            });
            breaker.remove_listener(removed);
        }
    });
    let rig = within_deadline(move || {
        rig.fail(1);
        rig.breaker.reset();
        rig.breaker.force_open();
        rig
    });
    assert_eq!(
        rig.transitions(),
        [
            (State::Closed, State::Open),
            (State::Open, State::Closed),
            (State::Closed, State::ForcedOpen),
        ]
    );
    // Added during the first transition: hears every one after it.
    assert_eq!(
        *added_saw.lock().unwrap(),
        [
            (State::Open, State::Closed),
            (State::Closed, State::ForcedOpen)
        ]
    );
    // Removed during the first transition, which it had already heard: nothing after it.
    assert_eq!(*removed_saw.lock().unwrap(), [(State::Closed, State::Open)]);
}

#[test]
fn a_listener_may_remove_itself() {
    let rig = Rig::new(consecutive(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let own_id = Arc::new(OnceLock::<ListenerId>::new());
    let (breaker, counter, id) = (rig.breaker.clone(), calls.clone(), own_id.clone());
    let registered = rig.breaker.on_state_change(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        breaker.remove_listener(*id.get().expect("set right after registering"));
    });
    own_id.set(registered).unwrap();
    let rig = within_deadline(move || {
        rig.fail(1);
        rig.breaker.reset();
        rig
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a one-shot listener");
    assert_eq!(rig.transitions().len(), 2);
    assert!(!rig.breaker.remove_listener(registered), "already gone");
}
