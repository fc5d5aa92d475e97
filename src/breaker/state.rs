//! Breaker states, outcomes, transition reasons and the packed state word.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls pass and outcomes are measured.
    Closed,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// A limited number of trial calls test whether the dependency has recovered.
    HalfOpen,
    /// Opened by hand: every call is rejected until the breaker is reset.
    ForcedOpen,
    /// Switched off by hand: every call passes, outcomes are measured, nothing trips.
    Disabled,
}

impl State {
    pub(crate) const fn code(self) -> u64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
            Self::ForcedOpen => 3,
            Self::Disabled => 4,
        }
    }

    pub(crate) const fn from_code(code: u64) -> Self {
        match code {
            0 => Self::Closed,
            1 => Self::Open,
            2 => Self::HalfOpen,
            3 => Self::ForcedOpen,
            _ => Self::Disabled,
        }
    }

    /// Lower-case name, as used in reports and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::Disabled => "disabled",
        }
    }

    /// Whether calls are currently refused (open or forced open).
    pub const fn is_open(self) -> bool {
        matches!(self, Self::Open | Self::ForcedOpen)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state and its generation packed in one word, so a permit can tell in one load whether
/// the breaker is still in the state that issued it.
pub(crate) const STATE_BITS: u32 = 3;
pub(crate) const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

pub(crate) const fn pack(state: State, generation: u64) -> u64 {
    (generation << STATE_BITS) | state.code()
}

pub(crate) const fn unpack_state(word: u64) -> State {
    State::from_code(word & STATE_MASK)
}

/// How the caller's classification judged a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The dependency did its job (a query error answered by a healthy server is a success).
    Success,
    /// An infrastructure failure that counts against the dependency.
    Failure,
    /// Neither: recorded in the totals, changes no rule and no trial.
    Ignored,
}

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransitionReason {
    /// `count` failures in a row reached the threshold.
    ConsecutiveFailures {
        /// Failures in a row.
        count: u32,
    },
    /// The failure rate over the window reached the threshold.
    FailureRate {
        /// Failure rate over the window, 0..=1.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// The slow-call rate over the window reached the threshold.
    SlowCallRate {
        /// Slow-call rate over the window, 0..=1.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// The open duration passed; trial calls may go through.
    OpenDurationElapsed {
        /// How long the breaker was open.
        #[serde(with = "humantime_serde")]
        open_for: Duration,
    },
    /// Enough trial calls succeeded.
    TrialsSucceeded {
        /// Successful trials.
        successes: u32,
    },
    /// A trial call failed.
    TrialFailed,
    /// A trial call took at least `slow_call_duration`.
    TrialTooSlow,
    /// [`reset`](crate::breaker::CircuitBreaker::reset) was called.
    ManualReset,
    /// [`force_open`](crate::breaker::CircuitBreaker::force_open) was called.
    ManualForceOpen,
    /// [`disable`](crate::breaker::CircuitBreaker::disable) was called.
    ManualDisable,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures { count } => write!(f, "{count} consecutive failures"),
            Self::FailureRate { rate, calls } => {
                write!(f, "failure rate {:.1}% over {calls} calls", rate * 100.0)
            }
            Self::SlowCallRate { rate, calls } => {
                write!(f, "slow-call rate {:.1}% over {calls} calls", rate * 100.0)
            }
            Self::OpenDurationElapsed { open_for } => write!(f, "open for {open_for:?}"),
            Self::TrialsSucceeded { successes } => write!(f, "{successes} trial calls succeeded"),
            Self::TrialFailed => f.write_str("a trial call failed"),
            Self::TrialTooSlow => f.write_str("a trial call was slow"),
            Self::ManualReset => f.write_str("reset by hand"),
            Self::ManualForceOpen => f.write_str("forced open by hand"),
            Self::ManualDisable => f.write_str("disabled by hand"),
        }
    }
}
