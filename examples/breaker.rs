//! The circuit breaker on its own, around a dependency that goes down and comes back.
//!
//! `cargo run --example breaker`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, CircuitBreaker, OpenDuration, Outcome};

/// A stand-in dependency whose health is switched by hand (the pool examples use a real
/// database).
struct Dependency {
    up: AtomicBool,
}

impl Dependency {
    fn call(&self) -> Result<&'static str, &'static str> {
        std::thread::sleep(Duration::from_millis(2));
        if self.up.load(Ordering::SeqCst) {
            Ok("row")
        } else {
            Err("connection refused")
        }
    }
}

fn main() {
    let config = BreakerConfig {
        open: OpenDuration {
            base: Duration::from_millis(200),
            max: Duration::from_secs(1),
            ..BreakerConfig::read().open
        },
        ..BreakerConfig::read()
    };
    let breaker = CircuitBreaker::new("inventory", config).expect("valid config");
    breaker.on_state_change(|change| println!("  [listener] {change}"));
    let dependency = Arc::new(Dependency {
        up: AtomicBool::new(true),
    });

    let run = |label: &str, calls: usize| {
        let (mut ok, mut failed, mut rejected) = (0, 0, 0);
        let started = Instant::now();
        for _ in 0..calls {
            match breaker.try_acquire() {
                Ok(permit) => {
                    let begun = Instant::now();
                    let result = dependency.call();
                    let outcome = if result.is_ok() {
                        Outcome::Success
                    } else {
                        Outcome::Failure
                    };
                    permit.record(outcome, begun.elapsed());
                    if result.is_ok() { ok += 1 } else { failed += 1 }
                }
                Err(_) => rejected += 1,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        println!(
            "{label}: {ok} ok, {failed} failed, {rejected} rejected fast in {:?} (state {})",
            started.elapsed(),
            breaker.state()
        );
    };

    run("healthy", 20);
    dependency.up.store(false, Ordering::SeqCst);
    run("outage", 40);
    dependency.up.store(true, Ordering::SeqCst);
    run("recovered", 40);
    let snapshot = breaker.snapshot();
    println!(
        "snapshot: {}",
        serde_json::to_string_pretty(&snapshot).expect("serializable")
    );
}
