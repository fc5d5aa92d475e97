//! Time as the breaker sees it: a monotonic reading since the clock's origin.
//!
//! The breaker never calls `Instant::now()` directly. Production code uses [`SystemClock`];
//! tests inject a [`ManualClock`] and move time by hand, so every duration rule is exact.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// A monotonic time source for breakers.
///
/// `now` returns the time elapsed since an origin fixed when the clock was created. It must
/// never go backwards.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Monotonic time since this clock's origin.
    fn now(&self) -> Duration;
}

/// The operating system's monotonic clock.
///
/// On Linux this reads `CLOCK_MONOTONIC_COARSE`, which costs a few nanoseconds instead of the
/// tens a precise reading costs on virtual machines, at a resolution of one scheduler tick
/// (1-4 ms). Breaker decisions (open durations, windows, slow-call thresholds) are on the scale
/// of milliseconds to minutes, so the coarse clock loses nothing that matters and keeps the
/// open-state rejection path cheap. Elsewhere it falls back to [`std::time::Instant`].
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: u64,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self { origin: os_nanos() }
    }

    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        os_nanos().saturating_sub(self.origin)
    }

    /// How far apart two readings that differ can be: the scheduler tick on Linux.
    pub(crate) fn resolution() -> Duration {
        os_resolution()
    }
}

/// The coarse clock with no origin of its own, in nanoseconds: readings compare across the
/// whole process. For bookkeeping on the scale of seconds (a connection's lifetime, its idle
/// time), where a precise reading would cost ten times as much for nothing.
#[inline]
pub(crate) fn coarse_nanos() -> u64 {
    os_nanos()
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }
}

#[cfg(target_os = "linux")]
#[inline]
fn os_nanos() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    // tv_sec is never negative for a monotonic clock.
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[cfg(target_os = "linux")]
fn os_resolution() -> Duration {
    let ts = rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(not(target_os = "linux"))]
fn os_resolution() -> Duration {
    // `Instant` reads to the nanosecond, near enough.
    Duration::from_nanos(1)
}

#[cfg(not(target_os = "linux"))]
#[inline]
fn os_nanos() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    origin.elapsed().as_nanos() as u64
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use protected_pool::breaker::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// clock.advance(Duration::from_secs(3));
/// assert_eq!(clock.now(), Duration::from_secs(3));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(duration_nanos(by), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// The clock a breaker holds: the system clock without dynamic dispatch, or any other.
#[derive(Debug, Clone)]
pub(crate) enum ClockSource {
    System(SystemClock),
    Custom(Arc<dyn Clock>),
}

impl ClockSource {
    #[inline]
    pub(crate) fn now_nanos(&self) -> u64 {
        match self {
            Self::System(clock) => clock.now_nanos(),
            Self::Custom(clock) => duration_nanos(clock.now()),
        }
    }
}

/// Wall-clock time of a monotonic reading, for reports and events.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallAnchor {
    wall_at_origin: SystemTime,
}

impl WallAnchor {
    pub(crate) fn new(clock: &ClockSource) -> Self {
        let since_origin = Duration::from_nanos(clock.now_nanos());
        let wall_at_origin = SystemTime::now()
            .checked_sub(since_origin)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Self { wall_at_origin }
    }

    pub(crate) fn wall(&self, nanos: u64) -> SystemTime {
        self.wall_at_origin + Duration::from_nanos(nanos)
    }
}

/// Nanoseconds in a duration, saturating at `u64::MAX` (about 584 years).
#[inline]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
