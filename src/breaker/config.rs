//! Breaker configuration: trip rules, window, open-duration backoff, half-open limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::problem::{ConfigError, ConfigProblem};

/// The longest duration any field may hold: 365 days.
///
/// The breaker adds durations to clock readings kept as nanoseconds in a `u64`, which lasts
/// about 584 years: a year keeps every such sum far from overflowing at any uptime. Nothing a
/// breaker measures (a call, a window, an open spell) has a reason to be longer, so a value
/// above it is a unit mistake, such as milliseconds written as seconds, better refused.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The most trial calls a half-open breaker may admit at once.
///
/// Trial slots are allocated up front, one per call, and scanned under the breaker's lock at
/// every trial admission and outcome; 1,000 keeps that to 16 KiB and a scan of microseconds,
/// while `u32::MAX` would be a 64 GiB allocation. Half-open exists to let a few calls test a
/// recovering database, so even hundreds defeat its purpose.
const MAX_HALF_OPEN_CALLS: u32 = 1_000;

/// The most calls a count window may hold. Every stripe keeps two bits per position (failed,
/// slow), and there are up to 64 stripes: 100,000 positions cost 1.6 MB per breaker, while
/// `u32::MAX` would cost about 64 GiB. A rate over the last hundred thousand calls is already
/// steadier than any trip rule needs.
const MAX_WINDOW_SIZE: u32 = 100_000;

/// The most slices a time window may be kept in: each stripe holds a counter block per slice
/// (rounded up to a power of two), so `u32::MAX` slices would be a 128 GiB allocation; a
/// thousand slices already make the window slide in steps of 0.1 % of its length.
const MAX_WINDOW_BUCKETS: u32 = 1_000;

/// How a breaker decides to open, how long it stays open, and how it closes again.
///
/// Plain data with serde support. Start from a preset ([`BreakerConfig::read`],
/// [`BreakerConfig::write`], [`BreakerConfig::auth`]) and change fields; [`BreakerConfig::validate`]
/// lists every problem at once. `Default` is the write preset.
///
/// Every duration is at most 365 days, `half_open_max_calls` at most 1,000, and with a rate rule
/// on a count window `minimum_calls` at most the window's `size`; see the fields.
///
/// Trip rules are optional and combinable; the breaker opens when any enabled rule holds after
/// an outcome is recorded:
/// - `consecutive_failures`: that many failures in a row;
/// - `failure_rate`: failures / calls in the window, once the window holds `minimum_calls`;
/// - `slow_call_rate`: calls that took at least `slow_call_duration` / calls in the window.
///
/// ```
/// use protected_pool::breaker::{BreakerConfig, SlidingWindow};
/// use std::time::Duration;
///
/// let config = BreakerConfig {
///     failure_rate: Some(0.5),
///     window: SlidingWindow::Count { size: 100 },
///     minimum_calls: 20,
///     ..BreakerConfig::read()
/// };
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Open after this many failures in a row. `None` disables the rule.
    pub consecutive_failures: Option<u32>,
    /// Open when the failure rate over the window reaches this value (0 < r <= 1).
    pub failure_rate: Option<f64>,
    /// Open when the rate of slow calls over the window reaches this value (0 < r <= 1).
    pub slow_call_rate: Option<f64>,
    /// A call that takes at least this long is slow. Slow trial calls in half-open re-open the
    /// breaker when `slow_call_rate` is enabled.
    #[serde(with = "humantime_serde")]
    pub slow_call_duration: Duration,
    /// The window the rate rules look at.
    pub window: SlidingWindow,
    /// The rate rules wait until the window holds at least this many calls.
    ///
    /// At most a count window's `size` when a rate rule is on: the window holds only the last
    /// `size` calls of a thread, so a larger minimum could never be met by one thread's calls.
    pub minimum_calls: u32,
    /// How long the breaker stays open.
    pub open: OpenDuration,
    /// Trial calls admitted at once while half-open; at most 1,000.
    pub half_open_max_calls: u32,
    /// Successful trials needed to close from half-open.
    pub success_threshold: u32,
    /// A trial permit held longer than this is reclaimed, so a lost caller cannot wedge the
    /// breaker in half-open.
    #[serde(with = "humantime_serde")]
    pub max_wait_in_half_open: Duration,
}

/// The window of recent calls the rate rules are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SlidingWindow {
    /// The last `size` calls.
    ///
    /// Outcomes are kept per thread stripe so that threads never write the same cache line;
    /// with one thread this is exactly the last `size` calls, with several it is the last
    /// `size` calls of each stripe.
    Count {
        /// Calls kept.
        size: u32,
    },
    /// The calls of the last `duration`, kept in `buckets` slices of `duration / buckets`; a
    /// whole slice leaves the window at once.
    Time {
        /// Window length.
        #[serde(with = "humantime_serde")]
        duration: Duration,
        /// Slices the window is kept in.
        buckets: u32,
    },
}

/// Open-state duration: `base * multiplier^k`, capped at `max`, where `k` counts re-opens from
/// half-open since the breaker last closed; then shortened by a random fraction of up to
/// `jitter` so breakers that opened together do not probe together.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenDuration {
    /// Duration of the first open.
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    /// Growth factor per re-open (>= 1).
    pub multiplier: f64,
    /// Upper bound before jitter.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Largest fraction taken off at random (0 <= j < 1).
    pub jitter: f64,
}

impl Default for OpenDuration {
    /// The write preset's schedule: 10 s doubling to 60 s, 10 % jitter.
    fn default() -> Self {
        BreakerConfig::write().open
    }
}

impl OpenDuration {
    /// The duration before jitter for the `reopens`-th consecutive open (0 = first).
    pub fn nominal(&self, reopens: u32) -> Duration {
        let factor = self.multiplier.powi(reopens.min(i32::MAX as u32) as i32);
        let secs = self.base.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

impl BreakerConfig {
    fn preset(
        consecutive_failures: u32,
        open_base: Duration,
        open_max: Duration,
        success_threshold: u32,
        window: Duration,
    ) -> Self {
        Self {
            consecutive_failures: Some(consecutive_failures),
            failure_rate: Some(0.5),
            slow_call_rate: None,
            slow_call_duration: Duration::from_secs(5),
            window: SlidingWindow::Time {
                duration: window,
                buckets: 10,
            },
            minimum_calls: 20,
            open: OpenDuration {
                base: open_base,
                multiplier: 2.0,
                max: open_max,
                jitter: 0.1,
            },
            half_open_max_calls: success_threshold,
            success_threshold,
            max_wait_in_half_open: Duration::from_secs(30),
        }
    }

    /// Reads: open after 3 failures in a row (or half of at least 20 calls in 30 s), 3 s doubling
    /// to 15 s, 2 successes to close.
    pub fn read() -> Self {
        Self::preset(
            3,
            Duration::from_secs(3),
            Duration::from_secs(15),
            2,
            Duration::from_secs(30),
        )
    }

    /// Writes: open after 5 failures in a row (or half of at least 20 calls in 60 s), 10 s
    /// doubling to 60 s, 3 successes to close.
    pub fn write() -> Self {
        Self::preset(
            5,
            Duration::from_secs(10),
            Duration::from_secs(60),
            3,
            Duration::from_secs(60),
        )
    }

    /// Auth traffic (login and session checks): open after 10 failures in a row (or half of at
    /// least 20 calls in 30 s), 5 s doubling to 30 s, 2 successes to close.
    pub fn auth() -> Self {
        Self::preset(
            10,
            Duration::from_secs(5),
            Duration::from_secs(30),
            2,
            Duration::from_secs(30),
        )
    }

    /// Checks every field and returns all problems found, each with its field path.
    ///
    /// A config that passes cannot make the breaker panic or allocate without bound: durations
    /// are at most 365 days and `half_open_max_calls` at most 1,000.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.validate_into("", &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::new(problems))
        }
    }

    /// Appends this config's problems to `problems`, each path prefixed with `prefix`
    /// (e.g. `breakers.write`), for callers that validate a larger configuration.
    pub fn validate_into(&self, prefix: &str, problems: &mut Vec<ConfigProblem>) {
        let mut report = |field: &str, message: String| {
            let path = if prefix.is_empty() {
                field.to_owned()
            } else {
                format!("{prefix}.{field}")
            };
            problems.push(ConfigProblem::new(path, message));
        };
        if self.consecutive_failures == Some(0) {
            report("consecutive_failures", "0 must be at least 1".into());
        }
        for (field, rate) in [
            ("failure_rate", self.failure_rate),
            ("slow_call_rate", self.slow_call_rate),
        ] {
            if let Some(rate) = rate
                && !(rate > 0.0 && rate <= 1.0)
            {
                report(
                    field,
                    format!("{rate} is outside 0..=1 (and must be above 0)"),
                );
            }
        }
        if self.consecutive_failures.is_none()
            && self.failure_rate.is_none()
            && self.slow_call_rate.is_none()
        {
            report(
                "consecutive_failures",
                "no trip rule is enabled: set consecutive_failures, failure_rate or slow_call_rate"
                    .into(),
            );
        }
        if self.slow_call_rate.is_some() && self.slow_call_duration.is_zero() {
            report("slow_call_duration", "0s would make every call slow".into());
        } else if let Some(message) = too_long(self.slow_call_duration) {
            report("slow_call_duration", message);
        }
        match self.window {
            SlidingWindow::Count { size } => {
                if size == 0 {
                    report("window.size", "0 must be at least 1".into());
                } else if size > MAX_WINDOW_SIZE {
                    report(
                        "window.size",
                        format!("{size} is above {MAX_WINDOW_SIZE}, the most a window may hold"),
                    );
                }
            }
            SlidingWindow::Time { duration, buckets } => {
                if duration.is_zero() {
                    report("window.duration", "0s must be above zero".into());
                } else if let Some(message) = too_long(duration) {
                    report("window.duration", message);
                }
                if buckets == 0 {
                    report("window.buckets", "0 must be at least 1".into());
                } else if buckets > MAX_WINDOW_BUCKETS {
                    report(
                        "window.buckets",
                        format!(
                            "{buckets} is above {MAX_WINDOW_BUCKETS}, the most slices a window may have"
                        ),
                    );
                } else if duration.as_nanos() < u128::from(buckets) {
                    report(
                        "window.buckets",
                        format!("{buckets} buckets do not fit in {duration:?}"),
                    );
                }
            }
        }
        if self.minimum_calls == 0 {
            report("minimum_calls", "0 must be at least 1".into());
        }
        // Only the rate rules read the window; without them the minimum is never used.
        let rate_rules = self.failure_rate.is_some() || self.slow_call_rate.is_some();
        if let SlidingWindow::Count { size } = self.window
            && rate_rules
            && size > 0
            && self.minimum_calls > size
        {
            report(
                "minimum_calls",
                format!(
                    "{} is above window.size {size}: the window holds only the last {size} \
                     calls of a thread, so the rate rules could never trip on one thread's \
                     calls",
                    self.minimum_calls
                ),
            );
        }
        let open = &self.open;
        if open.base.is_zero() {
            report("open.base", "0s must be above zero".into());
        } else if let Some(message) = too_long(open.base) {
            report("open.base", message);
        }
        if !(open.multiplier >= 1.0 && open.multiplier.is_finite()) {
            report(
                "open.multiplier",
                format!("{} must be a finite number >= 1", open.multiplier),
            );
        }
        if open.max < open.base {
            report(
                "open.max",
                format!("{:?} is below open.base {:?}", open.max, open.base),
            );
        } else if let Some(message) = too_long(open.max) {
            report("open.max", message);
        }
        if !(open.jitter >= 0.0 && open.jitter < 1.0) {
            report("open.jitter", format!("{} is outside 0..1", open.jitter));
        }
        if self.half_open_max_calls == 0 {
            report("half_open_max_calls", "0 must be at least 1".into());
        } else if self.half_open_max_calls > MAX_HALF_OPEN_CALLS {
            report(
                "half_open_max_calls",
                format!(
                    "{} is above {MAX_HALF_OPEN_CALLS}: half-open lets a few trial calls test \
                     a recovering database, and each slot is held in memory",
                    self.half_open_max_calls
                ),
            );
        }
        if self.success_threshold == 0 {
            report("success_threshold", "0 must be at least 1".into());
        }
        if self.max_wait_in_half_open.is_zero() {
            report("max_wait_in_half_open", "0s must be above zero".into());
        } else if let Some(message) = too_long(self.max_wait_in_half_open) {
            report("max_wait_in_half_open", message);
        }
    }
}

/// The problem with a duration above [`MAX_DURATION`], if it is.
pub(crate) fn too_long(duration: Duration) -> Option<String> {
    (duration > MAX_DURATION).then(|| format!("{duration:?} is above the limit of 365 days"))
}

impl Default for BreakerConfig {
    /// The write preset.
    fn default() -> Self {
        Self::write()
    }
}
