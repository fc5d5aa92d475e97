//! Per-call cost of a circuit breaker: protected-pool against failsafe 1.3 and recloser 1.4,
//! with a bare call as the baseline, all in one run.
//!
//! Groups (ids are `group/function`):
//! - `closed_success`: acquire, call the bare function, record its success. The breaker stays
//!   closed throughout (checked after each benchmark).
//! - `open_rejection`: the same call on a breaker tripped open by real failures and kept open
//!   for an hour, so every measured call is rejected on the normal open path (protected-pool:
//!   `State::Open`, not the `force_open()` path).
//! - `two_threads`: `closed_success` with two OS threads calling one shared breaker at once.
//!   The figure is the wall time for both threads to make `iters` calls each, divided by
//!   `iters` (criterion divides), i.e. time per call per thread, comparable to the one-thread
//!   figure: perfect scaling gives the same number as `closed_success`. The control
//!   `protected-pool/count-unshared` gives each thread its own breaker: the gap between it
//!   and the one-thread figure is the machine, the gap between it and the shared figure is
//!   contention.
//!
//! Contenders:
//! - `bare`: an `#[inline(never)]` function returning `Ok(black_box(x))`, no breaker.
//! - `protected-pool/count`: failure rate 0.5 over a count window of 100 calls,
//!   `minimum_calls` 100, no consecutive-failure rule, the closest match to recloser's
//!   ring-buffer rule. No clock read on the closed path.
//! - `protected-pool/read-preset`: `BreakerConfig::read()` (3 consecutive failures or a 50 %
//!   failure rate over a 30 s time window), which reads the clock on every recorded outcome.
//!   In `open_rejection` its open duration is set to one hour so it stays open.
//! - `protected-pool/untried` (in `open_rejection` only): the count configuration asked with
//!   `try_acquire_untried`, the pool's own path while a recovery probe owns the trial calls:
//!   the refusal reads no clock (`retry_after` is worked out when asked).
//! - `failsafe`: `consecutive_failures(5, backoff::constant(1 h))`, called through
//!   `CircuitBreaker::call`.
//! - `recloser`: `error_rate(0.5)`, `closed_len(100)`, `open_wait(1 h)`, called through
//!   `Recloser::call`.
//!
//! Run with `cargo bench --bench breaker`; a quick smoke run:
//! `cargo bench --bench breaker -- --warm-up-time 0.2 --measurement-time 0.5`.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use failsafe::CircuitBreaker as _;
use protected_pool::breaker::{
    BreakerConfig, CircuitBreaker, OpenDuration, Outcome, Rejected, SlidingWindow, State,
};
use recloser::Recloser;

/// Long enough that no benchmark ever sees a breaker leave its open state.
const LONG_OPEN: Duration = Duration::from_secs(3600);

/// The protected call: as cheap as a real function call can be.
#[inline(never)]
fn bare(x: u64) -> Result<u64, ()> {
    Ok::<u64, ()>(black_box(x))
}

/// The failing call used to trip breakers.
#[inline(never)]
fn failing(x: u64) -> Result<u64, ()> {
    black_box(x);
    Err(())
}

// ---------------------------------------------------------------------------------------------
// protected-pool
// ---------------------------------------------------------------------------------------------

/// Acquire, call, record: the closed path as an application writes it with protected-pool.
#[inline]
fn pp_call(
    breaker: &CircuitBreaker,
    f: impl FnOnce() -> Result<u64, ()>,
) -> Result<u64, Option<Rejected>> {
    let permit = breaker.try_acquire().map_err(Some)?;
    let result = f();
    let outcome = if result.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    permit.record(outcome, Duration::ZERO);
    result.map_err(|()| None)
}

/// The same, asked as the pool asks while a recovery probe owns the trial calls.
#[inline]
fn pp_call_untried(
    breaker: &CircuitBreaker,
    f: impl FnOnce() -> Result<u64, ()>,
) -> Result<u64, Option<Rejected>> {
    let permit = breaker.try_acquire_untried().map_err(Some)?;
    let result = f();
    permit.record(
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        },
        Duration::ZERO,
    );
    result.map_err(|()| None)
}

fn one_hour_open() -> OpenDuration {
    OpenDuration {
        base: LONG_OPEN,
        multiplier: 1.0,
        max: LONG_OPEN,
        jitter: 0.0,
    }
}

/// Failure rate 0.5 over the last 100 calls, evaluated once 100 calls are in.
fn pp_count_config() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: None,
        failure_rate: Some(0.5),
        slow_call_rate: None,
        window: SlidingWindow::Count { size: 100 },
        minimum_calls: 100,
        open: one_hour_open(),
        ..BreakerConfig::default()
    }
}

fn pp_count() -> CircuitBreaker {
    CircuitBreaker::new("bench-count", pp_count_config()).expect("valid count config")
}

fn pp_read_preset() -> CircuitBreaker {
    CircuitBreaker::new("bench-read", BreakerConfig::read()).expect("valid read preset")
}

/// The read preset, except that it stays open for an hour once tripped.
fn pp_read_preset_long_open() -> CircuitBreaker {
    let config = BreakerConfig {
        open: one_hour_open(),
        ..BreakerConfig::read()
    };
    CircuitBreaker::new("bench-read-open", config).expect("valid read config")
}

/// Trips the breaker with real failures; panics unless it ends up `State::Open`.
fn pp_trip(breaker: &CircuitBreaker) {
    for i in 0..10_000 {
        if let Err(Some(_)) = pp_call(breaker, || failing(i)) {
            break;
        }
    }
    assert_eq!(breaker.state(), State::Open, "protected-pool did not trip");
    assert!(matches!(pp_call(breaker, || bare(1)), Err(Some(_))));
}

fn pp_assert_closed(breaker: &CircuitBreaker) {
    assert_eq!(breaker.state(), State::Closed, "protected-pool left closed");
}

// ---------------------------------------------------------------------------------------------
// failsafe
// ---------------------------------------------------------------------------------------------

fn failsafe_breaker() -> impl failsafe::CircuitBreaker + Send + Sync {
    let backoff = failsafe::backoff::constant(LONG_OPEN);
    let policy = failsafe::failure_policy::consecutive_failures(5, backoff);
    failsafe::Config::new().failure_policy(policy).build()
}

fn failsafe_trip(breaker: &impl failsafe::CircuitBreaker) {
    for i in 0..10_000 {
        if let Err(failsafe::Error::Rejected) = breaker.call(|| failing(i)) {
            break;
        }
    }
    assert!(!breaker.is_call_permitted(), "failsafe did not trip");
}

fn failsafe_assert_closed(breaker: &impl failsafe::CircuitBreaker) {
    assert!(breaker.call(|| bare(1)).is_ok(), "failsafe left closed");
}

// ---------------------------------------------------------------------------------------------
// recloser
// ---------------------------------------------------------------------------------------------

fn recloser_breaker() -> Recloser {
    Recloser::custom()
        .error_rate(0.5)
        .closed_len(100)
        .open_wait(LONG_OPEN)
        .build()
}

fn recloser_trip(breaker: &Recloser) {
    // The ring buffer must fill (100 calls) before the rate is looked at.
    for i in 0..10_000 {
        if let Err(recloser::Error::Rejected) = breaker.call(|| failing(i)) {
            break;
        }
    }
    assert!(
        matches!(breaker.call(|| bare(1)), Err(recloser::Error::Rejected)),
        "recloser did not trip"
    );
}

fn recloser_assert_closed(breaker: &Recloser) {
    assert!(breaker.call(|| bare(1)).is_ok(), "recloser left closed");
}

// ---------------------------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------------------------

fn closed_success(c: &mut Criterion) {
    let mut group = c.benchmark_group("closed_success");

    group.bench_function("bare", |b| b.iter(|| bare(black_box(7))));

    let count = pp_count();
    group.bench_function("protected-pool/count", |b| {
        b.iter(|| pp_call(&count, || bare(black_box(7))))
    });
    pp_assert_closed(&count);

    let read = pp_read_preset();
    group.bench_function("protected-pool/read-preset", |b| {
        b.iter(|| pp_call(&read, || bare(black_box(7))))
    });
    pp_assert_closed(&read);

    let fs = failsafe_breaker();
    group.bench_function("failsafe", |b| b.iter(|| fs.call(|| bare(black_box(7)))));
    failsafe_assert_closed(&fs);

    let rc = recloser_breaker();
    group.bench_function("recloser", |b| b.iter(|| rc.call(|| bare(black_box(7)))));
    recloser_assert_closed(&rc);

    group.finish();
}

fn open_rejection(c: &mut Criterion) {
    let mut group = c.benchmark_group("open_rejection");

    // No breaker rejects anything; kept so the group reads against the same baseline.
    group.bench_function("bare", |b| b.iter(|| bare(black_box(7))));

    let count = pp_count();
    pp_trip(&count);
    group.bench_function("protected-pool/count", |b| {
        b.iter(|| pp_call(&count, || bare(black_box(7))))
    });
    assert_eq!(count.state(), State::Open);

    let read = pp_read_preset_long_open();
    pp_trip(&read);
    group.bench_function("protected-pool/read-preset", |b| {
        b.iter(|| pp_call(&read, || bare(black_box(7))))
    });
    assert_eq!(read.state(), State::Open);

    let untried = pp_count();
    pp_trip(&untried);
    group.bench_function("protected-pool/untried", |b| {
        b.iter(|| pp_call_untried(&untried, || bare(black_box(7))))
    });
    assert_eq!(untried.state(), State::Open);

    let fs = failsafe_breaker();
    failsafe_trip(&fs);
    group.bench_function("failsafe", |b| b.iter(|| fs.call(|| bare(black_box(7)))));
    assert!(!fs.is_call_permitted());

    let rc = recloser_breaker();
    recloser_trip(&rc);
    group.bench_function("recloser", |b| b.iter(|| rc.call(|| bare(black_box(7)))));
    assert!(matches!(
        rc.call(|| bare(1)),
        Err(recloser::Error::Rejected)
    ));

    group.finish();
}

/// Runs `$call` (a closure expression) `$iters` times on each of two OS threads started
/// together; returns the wall time from the first thread's start to the last thread's end
/// (thread spawn and join excluded).
///
/// The expression is written out twice, so each thread runs a closure of its own type, as the
/// unshared control does: whatever the closures capture (one breaker) is shared, the machine
/// code is not. With both threads in one closure's code, even a `try_acquire` that writes
/// nothing ran 1.6x slower than the same on two breakers through two closures (2.11 against
/// 1.33 ns), and two closures on one breaker 1.02x (7.56 against 7.44 ns): the difference was
/// the harness, not the sharing.
macro_rules! on_two_threads {
    ($iters:expr, $call:expr) => {
        on_two_threads_each($iters, &$call, &$call)
    };
}

/// As [`on_two_threads!`], with a different call on each thread.
fn on_two_threads_each<R>(
    iters: u64,
    call_a: &(impl Fn(u64) -> R + Sync),
    call_b: &(impl Fn(u64) -> R + Sync),
) -> Duration {
    let barrier = Barrier::new(2);
    let run = |call: &dyn Fn(u64) -> R| {
        barrier.wait();
        let start = Instant::now();
        for i in 0..iters {
            black_box(call(black_box(i)));
        }
        (start, Instant::now())
    };
    let ((start_a, end_a), (start_b, end_b)) = std::thread::scope(|scope| {
        let a = scope.spawn(|| run(call_a));
        let b = scope.spawn(|| run(call_b));
        (
            a.join().expect("bench thread panicked"),
            b.join().expect("bench thread panicked"),
        )
    });
    end_a.max(end_b) - start_a.min(start_b)
}

fn two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("two_threads");

    group.bench_function("bare", |b| {
        b.iter_custom(|iters| on_two_threads!(iters, |x| bare(x)))
    });

    let count = pp_count();
    group.bench_function("protected-pool/count", |b| {
        b.iter_custom(|iters| on_two_threads!(iters, |x| pp_call(&count, || bare(x))))
    });
    pp_assert_closed(&count);

    // Control: the same work with a breaker per thread, so nothing is shared. What this costs
    // over the one-thread figure is the machine running two threads at once, not contention.
    let (own_a, own_b) = (pp_count(), pp_count());
    group.bench_function("protected-pool/count-unshared", |b| {
        b.iter_custom(|iters| {
            on_two_threads_each(iters, &|x| pp_call(&own_a, || bare(x)), &|x| {
                pp_call(&own_b, || bare(x))
            })
        })
    });

    let fs = failsafe_breaker();
    group.bench_function("failsafe", |b| {
        b.iter_custom(|iters| on_two_threads!(iters, |x| fs.call(|| bare(x))))
    });
    failsafe_assert_closed(&fs);

    let rc = recloser_breaker();
    group.bench_function("recloser", |b| {
        b.iter_custom(|iters| on_two_threads!(iters, |x| rc.call(|| bare(x))))
    });
    recloser_assert_closed(&rc);

    group.finish();
}

fn config() -> Criterion {
    // Set on the Criterion itself (not per group) so command-line flags still override them.
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = closed_success, open_rejection, two_threads
}
criterion_main!(benches);
