//! Permits: proof that a call may go through, and the place its outcome is recorded.

use std::fmt;
use std::time::Duration;

use super::clock::ClockSource;
use super::core::Inner;
use super::state::{Outcome, STATE_BITS, State, unpack_state};

/// Permission for one call. Record its outcome with [`Permit::record`]; dropping it unrecorded
/// (a cancelled call) records nothing and, for a half-open trial, frees the trial slot.
///
/// Borrowing the breaker keeps the closed path free of reference-count traffic.
#[must_use = "a permit records nothing unless `record` is called"]
pub struct Permit<'a> {
    inner: &'a Inner,
    /// The state word that issued the permit: its outcome only counts while the breaker is
    /// still in that state and generation.
    word: u64,
    /// Half-open trial ticket; 0 for a normal (closed or disabled) permit.
    ticket: u64,
}

impl<'a> Permit<'a> {
    #[inline]
    pub(crate) fn normal(inner: &'a Inner, word: u64) -> Self {
        Self {
            inner,
            word,
            ticket: 0,
        }
    }

    pub(crate) fn trial(inner: &'a Inner, word: u64, ticket: u64) -> Self {
        Self {
            inner,
            word,
            ticket,
        }
    }

    /// Whether this permit is one of the limited half-open trial calls.
    pub fn is_trial(&self) -> bool {
        self.ticket != 0
    }

    /// The breaker's transition count when it issued this permit (the `sequence` of the
    /// [`StateChange`](super::StateChange) that entered the state; 0 before any). The outcome
    /// only counts while the breaker is still in this epoch.
    pub fn epoch(&self) -> u64 {
        self.word >> STATE_BITS
    }

    /// The state the breaker was in when it issued this permit.
    pub fn state(&self) -> State {
        unpack_state(self.word)
    }

    /// Records how the call went and how long it took.
    #[inline(always)]
    pub fn record(self, outcome: Outcome, elapsed: Duration) {
        let this = std::mem::ManuallyDrop::new(self);
        if this.ticket == 0 {
            this.inner.record_normal(this.word, outcome, elapsed);
        } else {
            this.inner
                .record_trial(this.word, this.ticket, outcome, elapsed);
        }
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.ticket != 0 {
            self.inner.release_trial(self.word, self.ticket);
        }
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("state", &self.state())
            .field("trial", &self.is_trial())
            .finish()
    }
}

/// A call refused by the breaker.
///
/// It holds the moment a call may next be admitted, not the wait: refusing reads no clock,
/// and [`retry_after`](Self::retry_after) reads it only when asked.
#[derive(Clone, thiserror::Error)]
#[non_exhaustive]
pub struct Rejected {
    /// The breaker's state: open, forced open, or half-open with every trial slot taken.
    pub state: State,
    /// When a call may next be admitted, on the breaker's clock; `None` when the breaker was
    /// forced open by hand.
    retry_at: Option<u64>,
    clock: ClockSource,
}

impl Rejected {
    pub(crate) fn new(state: State, retry_at: Option<u64>, clock: &ClockSource) -> Self {
        Self {
            state,
            retry_at,
            clock: clock.clone(),
        }
    }

    /// How long until a call may next be admitted, as of now (zero once that moment has
    /// passed); `None` when the breaker was forced open by hand.
    pub fn retry_after(&self) -> Option<Duration> {
        let at = self.retry_at?;
        Some(Duration::from_nanos(
            at.saturating_sub(self.clock.now_nanos()),
        ))
    }
}

impl PartialEq for Rejected {
    /// The same state and the same moment to retry at.
    fn eq(&self, other: &Self) -> bool {
        self.state == other.state && self.retry_at == other.retry_at
    }
}

impl Eq for Rejected {}

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("state", &self.state)
            .field("retry_after", &self.retry_after())
            .finish()
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.state, self.retry_after()) {
            (State::HalfOpen, Some(after)) => write!(
                f,
                "circuit half-open with every trial slot taken; retry after {after:?}"
            ),
            (State::ForcedOpen, _) => f.write_str("circuit forced open; it stays open until reset"),
            (state, Some(after)) => write!(f, "circuit {state}; retry after {after:?}"),
            (state, None) => write!(f, "circuit {state}"),
        }
    }
}
