//! Configuration: presets, validation that lists every problem, serde round trips, snapshots.

mod support;

use std::time::Duration;

use protected_pool::breaker::{
    BreakerConfig, CircuitBreaker, OpenDuration, Outcome, SlidingWindow, State,
};
use support::{Rig, consecutive, ms, secs};

/// The longest duration a breaker accepts.
const YEAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);

fn problem_paths(config: &BreakerConfig) -> Vec<String> {
    match config.validate() {
        Ok(()) => Vec::new(),
        Err(error) => error.problems.into_iter().map(|p| p.path).collect(),
    }
}

#[test]
fn presets_match_the_design_and_validate() {
    let read = BreakerConfig::read();
    let write = BreakerConfig::write();
    let auth = BreakerConfig::auth();
    for (config, failures, base, max, successes, window) in [
        (&read, 3, 3, 15, 2, 30),
        (&write, 5, 10, 60, 3, 60),
        (&auth, 10, 5, 30, 2, 30),
    ] {
        config.validate().unwrap();
        assert_eq!(config.consecutive_failures, Some(failures));
        assert_eq!((config.open.base, config.open.max), (secs(base), secs(max)));
        assert_eq!(config.success_threshold, successes);
        assert_eq!(
            config.window,
            SlidingWindow::Time {
                duration: secs(window),
                buckets: 10
            }
        );
    }
    assert_eq!(BreakerConfig::default(), write);
}

#[test]
fn validation_lists_every_problem_with_its_path() {
    let config = BreakerConfig {
        consecutive_failures: Some(0),
        failure_rate: Some(1.5),
        slow_call_rate: Some(-0.1),
        minimum_calls: 0,
        window: SlidingWindow::Count { size: 0 },
        open: OpenDuration {
            base: secs(10),
            multiplier: 0.5,
            max: secs(5),
            jitter: 1.0,
        },
        half_open_max_calls: 0,
        success_threshold: 0,
        ..BreakerConfig::default()
    };
    let error = config.validate().unwrap_err();
    let paths: Vec<&str> = error.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "consecutive_failures",
            "failure_rate",
            "slow_call_rate",
            "window.size",
            "minimum_calls",
            "open.multiplier",
            "open.max",
            "open.jitter",
            "half_open_max_calls",
            "success_threshold",
        ]
    );
    let text = error.to_string();
    assert!(
        text.contains("failure_rate: 1.5 is outside 0..=1"),
        "{text}"
    );
    assert!(
        text.contains("open.max: 5s is below open.base 10s"),
        "{text}"
    );
    assert!(CircuitBreaker::new("bad", config).is_err());
}

#[test]
fn validation_prefixes_paths_for_nested_configs() {
    let config = BreakerConfig {
        failure_rate: Some(2.0),
        ..BreakerConfig::write()
    };
    let mut problems = Vec::new();
    config.validate_into("breakers.write", &mut problems);
    assert_eq!(
        problems[0].to_string(),
        "breakers.write.failure_rate: 2 is outside 0..=1 (and must be above 0)"
    );
}

#[test]
fn a_breaker_with_no_rule_is_rejected() {
    let config = BreakerConfig {
        consecutive_failures: None,
        failure_rate: None,
        slow_call_rate: None,
        ..BreakerConfig::default()
    };
    let error = config.validate().unwrap_err();
    assert!(error.to_string().contains("no trip rule is enabled"));
}

#[test]
fn config_reads_from_human_friendly_json_and_round_trips() {
    let json = r#"{
        "consecutive_failures": 4,
        "failure_rate": 0.3,
        "window": { "kind": "count", "size": 50 },
        "minimum_calls": 10,
        "open": { "base": "2s", "multiplier": 3.0, "max": "1m", "jitter": 0.2 },
        "max_wait_in_half_open": "500ms"
    }"#;
    let config: BreakerConfig = serde_json::from_str(json).unwrap();
    assert_eq!(config.consecutive_failures, Some(4));
    assert_eq!(config.open.max, secs(60));
    assert_eq!(config.max_wait_in_half_open, ms(500));
    assert_eq!(
        config.success_threshold,
        BreakerConfig::write().success_threshold
    );
    config.validate().unwrap();
    let again: BreakerConfig =
        serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(again, config);

    let typo = serde_json::from_str::<BreakerConfig>(r#"{ "failure_rat": 0.5 }"#).unwrap_err();
    assert!(typo.to_string().contains("failure_rat"), "{typo}");
}

#[test]
fn snapshot_reports_counts_rates_times_and_serializes() {
    let rig = Rig::new(BreakerConfig {
        failure_rate: Some(0.9),
        window: SlidingWindow::Count { size: 10 },
        minimum_calls: 10,
        ..consecutive(3)
    });
    rig.succeed(3);
    rig.advance(secs(2));
    rig.fail(1);
    rig.call(Outcome::Ignored);
    let snapshot = rig.breaker.snapshot();
    assert_eq!(snapshot.state, State::Closed);
    assert_eq!((snapshot.window_calls, snapshot.window_failures), (4, 1));
    assert!((snapshot.failure_rate - 0.25).abs() < 1e-9);
    assert_eq!(snapshot.consecutive_failures, 1);
    assert_eq!(snapshot.total_calls, 5);
    assert_eq!(snapshot.total_successes, 3);
    assert_eq!(snapshot.total_ignored, 1);
    assert!(snapshot.last_failure_at.is_some());
    assert_eq!(snapshot.opened_at, None);
    assert_eq!(snapshot.time_in_state, secs(2));

    rig.fail(2);
    rig.advance(ms(250));
    let open = rig.breaker.snapshot();
    assert_eq!(open.state, State::Open);
    assert_eq!(open.opens, 1);
    assert_eq!(open.time_in_state, ms(250));
    assert_eq!(open.retry_after, Some(ms(750)));
    assert_eq!(open.opened_at, open.last_failure_at);

    let json = serde_json::to_value(&open).unwrap();
    assert_eq!(json["state"], "open");
    assert_eq!(json["opens"], 1);
    assert_eq!(json["retry_after"], "750ms");
}

#[test]
fn thresholds_change_at_runtime_without_losing_state_or_counts() {
    let rig = Rig::new(consecutive(5));
    rig.fail(3);
    let before = rig.breaker.snapshot();
    assert_eq!(before.consecutive_failures, 3);

    // Tighter: the streak already counted toward the old rule counts toward the new one.
    rig.breaker
        .update_config(BreakerConfig {
            consecutive_failures: Some(4),
            ..rig.breaker.config()
        })
        .unwrap();
    let after = rig.breaker.snapshot();
    assert_eq!(after.state, State::Closed);
    assert_eq!(after.consecutive_failures, 3);
    assert_eq!(after.total_failures, before.total_failures);
    rig.fail(1);
    assert_eq!(rig.state(), State::Open);

    // Changing the open duration while open keeps it open and counts the new duration from
    // the next opening; the backoff it already earned is kept.
    let open_config = BreakerConfig {
        open: OpenDuration {
            base: secs(3),
            ..rig.breaker.config().open
        },
        ..rig.breaker.config()
    };
    rig.breaker.update_config(open_config).unwrap();
    assert_eq!(rig.state(), State::Open);
    assert_eq!(rig.breaker.snapshot().opens, 1);
}

#[test]
fn a_rate_rule_switched_on_at_runtime_trips_on_the_calls_that_follow() {
    let rig = Rig::new(consecutive(100));
    rig.breaker
        .update_config(BreakerConfig {
            failure_rate: Some(0.5),
            window: rig.breaker.config().window,
            minimum_calls: 4,
            ..rig.breaker.config()
        })
        .unwrap();
    rig.succeed(2);
    rig.fail(1);
    assert_eq!(rig.state(), State::Closed);
    rig.fail(1);
    assert_eq!(rig.state(), State::Open, "2 failures in 4 calls is 50%");
}

#[test]
fn a_runtime_update_is_validated_and_cannot_change_the_window() {
    let rig = Rig::new(consecutive(3));
    let error = rig
        .breaker
        .update_config(BreakerConfig {
            failure_rate: Some(1.5),
            window: SlidingWindow::Count { size: 20 },
            ..rig.breaker.config()
        })
        .unwrap_err();
    let paths: Vec<&str> = error.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["failure_rate", "window"], "{error}");
    assert_eq!(rig.breaker.config().failure_rate, None, "nothing changed");
    rig.fail(3);
    assert_eq!(rig.state(), State::Open, "the old rule still holds");
}

#[test]
fn minimum_calls_above_a_count_windows_size_is_rejected() {
    let rate_rule = |minimum_calls| BreakerConfig {
        consecutive_failures: None,
        failure_rate: Some(0.5),
        window: SlidingWindow::Count { size: 10 },
        minimum_calls,
        ..consecutive(1)
    };
    // The window never holds 11 of one thread's calls: the rule could never fire for it.
    let error = rate_rule(11).validate().unwrap_err();
    assert_eq!(problem_paths(&rate_rule(11)), ["minimum_calls"]);
    assert!(
        error.to_string().contains("above window.size 10"),
        "{error}"
    );
    assert!(CircuitBreaker::new("bad", rate_rule(11)).is_err());

    // Just inside: a full window is enough, and the rule fires on one thread.
    let rig = Rig::new(rate_rule(10));
    rig.succeed(5);
    rig.fail(4);
    assert_eq!(rig.state(), State::Closed, "9 calls are below the minimum");
    rig.fail(1);
    assert_eq!(rig.state(), State::Open, "5 failures in 10 calls is 50%");

    // No rate rule reads the window, so its size does not matter; nor for a time window.
    BreakerConfig {
        minimum_calls: 11,
        ..consecutive(1)
    }
    .validate()
    .unwrap();
    BreakerConfig {
        minimum_calls: 1_000_000,
        ..BreakerConfig::write()
    }
    .validate()
    .unwrap();
}

/// A config valid but for one duration set to `value`, and the paths it must be reported at.
fn with_duration(field: &str, value: Duration) -> (BreakerConfig, Vec<&'static str>) {
    let valid = BreakerConfig {
        slow_call_rate: Some(0.5),
        ..consecutive(1)
    };
    match field {
        "slow_call_duration" => (
            BreakerConfig {
                slow_call_duration: value,
                ..valid
            },
            vec!["slow_call_duration"],
        ),
        "window.duration" => (
            BreakerConfig {
                window: SlidingWindow::Time {
                    duration: value,
                    buckets: 10,
                },
                ..valid
            },
            vec!["window.duration"],
        ),
        // With max at the bound: a longer base is also above max.
        "open.base" => (
            BreakerConfig {
                open: OpenDuration {
                    base: value,
                    max: YEAR,
                    ..valid.open
                },
                ..valid
            },
            if value > YEAR {
                vec!["open.base", "open.max"]
            } else {
                vec![]
            },
        ),
        "open.max" => (
            BreakerConfig {
                open: OpenDuration {
                    max: value,
                    ..valid.open
                },
                ..valid
            },
            vec!["open.max"],
        ),
        "max_wait_in_half_open" => (
            BreakerConfig {
                max_wait_in_half_open: value,
                ..valid
            },
            vec!["max_wait_in_half_open"],
        ),
        _ => unreachable!("no duration field {field}"),
    }
}

const DURATION_FIELDS: [&str; 5] = [
    "slow_call_duration",
    "window.duration",
    "open.base",
    "open.max",
    "max_wait_in_half_open",
];

#[test]
fn durations_beyond_a_year_are_listed_problems_not_panics() {
    let too_long = [
        YEAR + Duration::from_nanos(1),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ];
    for field in DURATION_FIELDS {
        for value in too_long {
            let (config, expected) = with_duration(field, value);
            let error = config.validate().unwrap_err();
            let paths: Vec<&str> = error.problems.iter().map(|p| p.path.as_str()).collect();
            assert_eq!(paths, expected, "{field} = {value:?}");
            assert!(
                error.problems[0].message.contains("365 days"),
                "says the bound: {error}"
            );
            assert!(CircuitBreaker::new("bad", config).is_err());
        }
    }
}

#[test]
fn durations_of_a_year_are_accepted_and_run() {
    for field in DURATION_FIELDS {
        let (config, _) = with_duration(field, YEAR);
        assert_eq!(problem_paths(&config), Vec::<String>::new(), "{field}");
        // Through every state, with two trial calls competing for one slot.
        let rig = Rig::new(config);
        rig.fail(1);
        assert_eq!(rig.state(), State::Open, "{field}");
        rig.advance(YEAR);
        let trial = rig.breaker.try_acquire().expect("half-open");
        let busy = rig.breaker.try_acquire().unwrap_err();
        assert!(busy.retry_after().unwrap() <= YEAR, "{field}");
        trial.record(Outcome::Failure, YEAR);
        assert!(rig.breaker.time_until_trial().unwrap() <= YEAR, "{field}");
        rig.advance(YEAR);
        rig.call_taking(Outcome::Success, YEAR);
        let _ = rig.breaker.snapshot();
    }
}

#[test]
fn a_clock_at_the_end_of_its_range_does_not_overflow() {
    // A custom clock may count from any origin; sums of its readings and configured durations
    // saturate rather than panic.
    let rig = Rig::new(BreakerConfig {
        max_wait_in_half_open: YEAR,
        ..consecutive(1)
    });
    rig.advance(Duration::from_nanos(u64::MAX) - secs(60));
    rig.fail(1);
    rig.advance(secs(2));
    let trial = rig.breaker.try_acquire().expect("half-open");
    let busy = rig.breaker.try_acquire().unwrap_err();
    assert!(busy.retry_after().unwrap() <= secs(60));
    drop(trial);
    rig.advance(secs(58));
    rig.call(Outcome::Failure);
    assert_eq!(rig.state(), State::Open);
    assert!(rig.breaker.snapshot().last_failure_at.is_some());
}

#[test]
fn half_open_max_calls_is_bounded() {
    for too_many in [1_001, u32::MAX] {
        let config = BreakerConfig {
            half_open_max_calls: too_many,
            ..consecutive(1)
        };
        assert_eq!(
            problem_paths(&config),
            ["half_open_max_calls"],
            "{too_many}"
        );
        assert!(CircuitBreaker::new("bad", config).is_err());
    }
    // Just inside: a thousand trials at once.
    let rig = Rig::new(BreakerConfig {
        half_open_max_calls: 1_000,
        ..consecutive(1)
    });
    rig.fail(1);
    rig.advance(secs(1));
    let trials: Vec<_> = (0..1_000)
        .map(|_| rig.breaker.try_acquire().expect("a free trial slot"))
        .collect();
    assert!(trials.iter().all(|permit| permit.is_trial()));
    assert_eq!(
        rig.breaker.try_acquire().unwrap_err().state,
        State::HalfOpen
    );
}

#[test]
fn a_runtime_update_is_held_to_the_same_bounds() {
    let rig = Rig::new(consecutive(3));
    let current = rig.breaker.config();
    let updates = [
        (
            "minimum_calls",
            BreakerConfig {
                failure_rate: Some(0.5),
                minimum_calls: 11,
                ..current.clone()
            },
        ),
        (
            "half_open_max_calls",
            BreakerConfig {
                half_open_max_calls: u32::MAX,
                ..current.clone()
            },
        ),
        (
            "open.max",
            BreakerConfig {
                open: OpenDuration {
                    max: Duration::MAX,
                    ..current.open
                },
                ..current.clone()
            },
        ),
        (
            "max_wait_in_half_open",
            BreakerConfig {
                max_wait_in_half_open: Duration::MAX,
                ..current.clone()
            },
        ),
        (
            "slow_call_duration",
            BreakerConfig {
                slow_call_rate: Some(0.5),
                slow_call_duration: Duration::MAX,
                ..current.clone()
            },
        ),
    ];
    for (path, update) in updates {
        let error = rig.breaker.update_config(update).unwrap_err();
        let paths: Vec<&str> = error.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, [path], "{error}");
    }
    assert_eq!(rig.breaker.config(), current, "nothing changed");
    rig.fail(3);
    assert_eq!(rig.state(), State::Open, "the old rule still holds");
}

#[test]
fn window_sizes_are_bounded() {
    use protected_pool::breaker::SlidingWindow;
    for (window, path) in [
        (SlidingWindow::Count { size: 100_001 }, "window.size"),
        (SlidingWindow::Count { size: u32::MAX }, "window.size"),
        (
            SlidingWindow::Time {
                duration: secs(60),
                buckets: 1_001,
            },
            "window.buckets",
        ),
        (
            SlidingWindow::Time {
                duration: secs(60),
                buckets: u32::MAX,
            },
            "window.buckets",
        ),
    ] {
        let config = BreakerConfig {
            window,
            ..consecutive(1)
        };
        assert_eq!(problem_paths(&config), [path], "{window:?}");
        assert!(CircuitBreaker::new("bad", config).is_err());
    }
    // Just inside each bound: built, and it counts.
    for window in [
        SlidingWindow::Count { size: 100_000 },
        SlidingWindow::Time {
            duration: secs(60),
            buckets: 1_000,
        },
    ] {
        let rig = Rig::new(BreakerConfig {
            window,
            ..consecutive(3)
        });
        rig.fail(3);
        assert_eq!(rig.state(), State::Open, "{window:?}");
    }
}
