//! Outcome counters and sliding windows, striped per thread.
//!
//! Every call on the closed path records an outcome. If all threads wrote one shared counter,
//! two threads would fight over its cache line and each call would cost several times more.
//! So each thread writes its own stripe (a cache-line-aligned block), and the rare readers —
//! rule evaluation after a failure, snapshots — add the stripes up.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use super::config::SlidingWindow;

/// Totals and window counts read from all stripes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
    pub(crate) ignored: u64,
    pub(crate) rejected: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WindowCounts {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

#[derive(Debug)]
pub(crate) struct Stripes {
    stripes: Box<[Stripe]>,
    mask: usize,
    kind: WindowKind,
}

#[derive(Debug, Clone, Copy)]
enum WindowKind {
    Count {
        size: u64,
    },
    /// `slots` is `buckets` rounded up to a power of two, so a slice finds its slot with a
    /// mask; the window still covers the last `buckets` slices.
    Time {
        bucket_nanos: u64,
        buckets: u64,
        slots: u64,
    },
}

/// One thread's counters. Aligned to 256 bytes: with 128 the two-thread bench showed
/// neighbouring stripes still slowing each other (the prefetchers pull in adjacent lines).
#[derive(Debug)]
#[repr(align(256))]
struct Stripe {
    /// Non-ignored outcomes recorded here outside the count window. Outcomes that go into the
    /// count window are counted by `ring_position` alone, so the hot path increments one
    /// counter, not two.
    calls: AtomicU64,
    /// Count window: outcomes ever written into the ring.
    ring_position: AtomicU64,
    /// Count window: the slot the next outcome goes to, wrapping at `size` (kept apart from
    /// `ring_position` so the hot path needs no division).
    ring_cursor: AtomicU64,
    /// Time window: the time slice this stripe last wrote to, so the hot path only divides
    /// when a new slice begins.
    current_slice: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    ignored: AtomicU64,
    /// Refusals by the thread that owns this stripe (see [`thread_stripe`]): it alone writes
    /// here, so a load and a store count exactly, with no locked instruction.
    rejected_by_owner: AtomicU64,
    /// Refusals by the other threads dealt this stripe.
    rejected: AtomicU64,
    /// `ring_position` when the window was last cleared.
    window_base: AtomicU64,
    /// Count window: one failure bit and one slow bit per position, `size` positions.
    ring_failures: Box<[AtomicU64]>,
    ring_slow: Box<[AtomicU64]>,
    /// Time window: one bucket per slice.
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which slice of time (now / bucket length) the counts belong to; `u64::MAX` = none.
    slice: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
}

thread_local! {
    static STRIPE_INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

/// This thread's number, dealt in order on first use; its stripe in a breaker is the number
/// masked by the breaker's stripe count. A thread whose number is below that count is the
/// first dealt its stripe, and owns it (see `Stripe::rejected_by_owner`).
#[inline]
fn thread_stripe() -> usize {
    STRIPE_INDEX.with(|cell| {
        let index = cell.get();
        if index != usize::MAX {
            return index;
        }
        let index = NEXT_STRIPE.fetch_add(1, Relaxed);
        cell.set(index);
        index
    })
}

fn stripe_count() -> usize {
    let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
    (cpus * 4).next_power_of_two().clamp(4, 64)
}

impl Stripes {
    pub(crate) fn new(window: SlidingWindow) -> Self {
        let kind = match window {
            SlidingWindow::Count { size } => WindowKind::Count {
                size: u64::from(size.max(1)),
            },
            SlidingWindow::Time { duration, buckets } => {
                let buckets = u64::from(buckets.max(1));
                let nanos = super::clock::duration_nanos(duration);
                WindowKind::Time {
                    bucket_nanos: (nanos / buckets).max(1),
                    buckets,
                    slots: buckets.next_power_of_two(),
                }
            }
        };
        let (ring_words, bucket_count) = match kind {
            WindowKind::Count { size } => (size.div_ceil(64) as usize, 0),
            WindowKind::Time { slots, .. } => (0, slots as usize),
        };
        let count = stripe_count();
        let stripes = (0..count)
            .map(|_| Stripe {
                calls: AtomicU64::new(0),
                ring_position: AtomicU64::new(0),
                ring_cursor: AtomicU64::new(0),
                current_slice: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                slow: AtomicU64::new(0),
                ignored: AtomicU64::new(0),
                rejected_by_owner: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                window_base: AtomicU64::new(0),
                ring_failures: (0..ring_words).map(|_| AtomicU64::new(0)).collect(),
                ring_slow: (0..ring_words).map(|_| AtomicU64::new(0)).collect(),
                buckets: (0..bucket_count)
                    .map(|_| Bucket {
                        slice: AtomicU64::new(u64::MAX),
                        ..Bucket::default()
                    })
                    .collect(),
            })
            .collect();
        Self {
            stripes,
            mask: count - 1,
            kind,
        }
    }

    /// Whether recording needs the time (the time window does; the count window does not).
    #[inline]
    pub(crate) fn needs_time(&self) -> bool {
        matches!(self.kind, WindowKind::Time { .. })
    }

    #[inline]
    fn mine(&self) -> &Stripe {
        &self.stripes[thread_stripe() & self.mask]
    }

    /// Records a success or a failure; `now` is only read for the time window.
    #[inline(always)]
    pub(crate) fn record(&self, failed: bool, slow: bool, now: u64, in_window: bool) {
        let stripe = self.mine();
        if failed {
            stripe.failures.fetch_add(1, Relaxed);
        }
        if slow {
            stripe.slow.fetch_add(1, Relaxed);
        }
        if !in_window {
            stripe.calls.fetch_add(1, Relaxed);
            return;
        }
        match self.kind {
            WindowKind::Count { size } => {
                stripe.ring_position.fetch_add(1, Relaxed);
                // Written by this stripe's thread only (save a collision of threads on one
                // stripe, where a slot may be written twice): a plain load and store suffice.
                let slot = stripe.ring_cursor.load(Relaxed);
                let next = slot + 1;
                stripe
                    .ring_cursor
                    .store(if next >= size { 0 } else { next }, Relaxed);
                let word = (slot / 64) as usize;
                let bit = 1u64 << (slot % 64);
                set_bit(&stripe.ring_failures[word], bit, failed);
                set_bit(&stripe.ring_slow[word], bit, slow);
            }
            WindowKind::Time {
                bucket_nanos,
                slots,
                ..
            } => {
                stripe.calls.fetch_add(1, Relaxed);
                let mut slice = stripe.current_slice.load(Relaxed);
                let start = slice.wrapping_mul(bucket_nanos);
                if now.wrapping_sub(start) >= bucket_nanos {
                    slice = now / bucket_nanos;
                    stripe.current_slice.store(slice, Relaxed);
                }
                let bucket = &stripe.buckets[(slice & (slots - 1)) as usize];
                if bucket.slice.load(Relaxed) != slice {
                    // First call of a new slice here: the counts belong to a slice that has
                    // left the window. Whoever wins the swap clears them.
                    let old = bucket.slice.load(Relaxed);
                    if old != slice
                        && bucket
                            .slice
                            .compare_exchange(old, slice, Relaxed, Relaxed)
                            .is_ok()
                    {
                        bucket.calls.store(0, Relaxed);
                        bucket.failures.store(0, Relaxed);
                        bucket.slow.store(0, Relaxed);
                    }
                }
                bucket.calls.fetch_add(1, Relaxed);
                if failed {
                    bucket.failures.fetch_add(1, Relaxed);
                }
                if slow {
                    bucket.slow.fetch_add(1, Relaxed);
                }
            }
        }
    }

    #[inline]
    pub(crate) fn record_ignored(&self) {
        self.mine().ignored.fetch_add(1, Relaxed);
    }

    #[inline]
    pub(crate) fn record_rejected(&self) {
        self.record_rejected_by(thread_stripe());
    }

    #[inline(always)]
    fn record_rejected_by(&self, thread: usize) {
        let stripe = &self.stripes[thread & self.mask];
        // The first thread dealt each stripe owns it in every breaker: a refusal, which is
        // what an open breaker does all day, is then an ordinary increment.
        if thread <= self.mask {
            let rejected = stripe.rejected_by_owner.load(Relaxed);
            stripe.rejected_by_owner.store(rejected + 1, Relaxed);
        } else {
            stripe.rejected.fetch_add(1, Relaxed);
        }
    }

    /// Empties the window (totals are kept). Called when the breaker closes.
    pub(crate) fn clear_window(&self) {
        for stripe in self.stripes.iter() {
            stripe
                .window_base
                .store(stripe.ring_position.load(Relaxed), Relaxed);
            for word in stripe.ring_failures.iter().chain(stripe.ring_slow.iter()) {
                word.store(0, Relaxed);
            }
            for bucket in stripe.buckets.iter() {
                bucket.slice.store(u64::MAX, Relaxed);
            }
        }
    }

    /// Calls, failures and slow calls in the window as of `now`.
    pub(crate) fn window(&self, now: u64) -> WindowCounts {
        let mut counts = WindowCounts::default();
        for stripe in self.stripes.iter() {
            match self.kind {
                WindowKind::Count { size } => {
                    let recorded = stripe
                        .ring_position
                        .load(Relaxed)
                        .saturating_sub(stripe.window_base.load(Relaxed));
                    counts.calls += recorded.min(size);
                    counts.failures += popcount(&stripe.ring_failures);
                    counts.slow += popcount(&stripe.ring_slow);
                }
                WindowKind::Time {
                    bucket_nanos,
                    buckets,
                    ..
                } => {
                    let current = now / bucket_nanos;
                    for bucket in stripe.buckets.iter() {
                        let slice = bucket.slice.load(Relaxed);
                        if slice <= current && current - slice < buckets {
                            counts.calls += bucket.calls.load(Relaxed);
                            counts.failures += bucket.failures.load(Relaxed);
                            counts.slow += bucket.slow.load(Relaxed);
                        }
                    }
                }
            }
        }
        counts
    }

    pub(crate) fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for stripe in self.stripes.iter() {
            totals.calls += stripe.calls.load(Relaxed) + stripe.ring_position.load(Relaxed);
            totals.failures += stripe.failures.load(Relaxed);
            totals.slow += stripe.slow.load(Relaxed);
            totals.ignored += stripe.ignored.load(Relaxed);
            totals.rejected +=
                stripe.rejected_by_owner.load(Relaxed) + stripe.rejected.load(Relaxed);
        }
        totals
    }
}

/// Sets or clears `bit`, writing only when it changes: on a healthy path every bit is already
/// clear and the word is only read.
#[inline]
fn set_bit(word: &AtomicU64, bit: u64, value: bool) {
    let current = word.load(Relaxed);
    if (current & bit != 0) != value {
        if value {
            word.fetch_or(bit, Relaxed);
        } else {
            word.fetch_and(!bit, Relaxed);
        }
    }
}

fn popcount(words: &[AtomicU64]) -> u64 {
    words
        .iter()
        .map(|word| u64::from(word.load(Relaxed).count_ones()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stripe_s_first_thread_counts_apart_from_the_threads_that_share_it() {
        let stripes = Stripes::new(SlidingWindow::Count { size: 10 });
        let count = stripes.stripes.len();
        // Thread 1 owns stripe 1; thread `count + 1` is dealt it after, and shares it.
        stripes.record_rejected_by(1);
        stripes.record_rejected_by(1);
        stripes.record_rejected_by(count + 1);
        let stripe = &stripes.stripes[1];
        assert_eq!(stripe.rejected_by_owner.load(Relaxed), 2);
        assert_eq!(stripe.rejected.load(Relaxed), 1);
        assert_eq!(stripes.totals().rejected, 3);
    }
}
