//! A point-in-time view of one breaker, for health reports and dashboards.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::state::State;

/// What a breaker knows right now. Window figures cover the configured sliding window; totals
/// cover the breaker's whole life.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: Arc<str>,
    /// Current state. An open breaker whose open duration has passed still reads `Open` until
    /// the next call turns it half-open; `retry_after` is then zero.
    pub state: State,
    /// Calls in the window (successes and failures; ignored outcomes are not calls).
    pub window_calls: u64,
    /// Failures in the window.
    pub window_failures: u64,
    /// Slow calls in the window.
    pub window_slow_calls: u64,
    /// Failures / calls in the window, 0 when the window is empty.
    pub failure_rate: f64,
    /// Slow calls / calls in the window, 0 when the window is empty.
    pub slow_call_rate: f64,
    /// Failures in a row, as of the last recorded outcome.
    pub consecutive_failures: u32,
    /// When the last failure was recorded.
    #[serde(with = "humantime_serde")]
    pub last_failure_at: Option<SystemTime>,
    /// When the breaker last opened, while it is open, forced open or half-open.
    #[serde(with = "humantime_serde")]
    pub opened_at: Option<SystemTime>,
    /// How many times the breaker has opened (including forced opens).
    pub opens: u64,
    /// Time since the last transition (or since creation).
    #[serde(with = "humantime_serde")]
    pub time_in_state: Duration,
    /// While open: time until the next trial call is admitted.
    #[serde(with = "humantime_serde")]
    pub retry_after: Option<Duration>,
    /// Half-open trial calls in flight.
    pub half_open_trials: u32,
    /// Every recorded outcome, ignored ones included.
    pub total_calls: u64,
    /// Recorded successes.
    pub total_successes: u64,
    /// Recorded failures.
    pub total_failures: u64,
    /// Recorded slow calls (only measured while the slow-call rule is on).
    pub total_slow_calls: u64,
    /// Recorded ignored outcomes.
    pub total_ignored: u64,
    /// Calls refused.
    pub total_rejected: u64,
}
