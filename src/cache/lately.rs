//! What the memory cache stored lately, so that storing the same result again soon costs two
//! hashes and three loads instead of a lookup in the cache itself.
//!
//! One slot per hash of the key holds a fingerprint of the key, the TTL and the payload, and
//! when they were stored. Lossy by design: a slot taken over by another key only means that
//! a result is stored again. Two stores of one key at once may leave either's fingerprint
//! with the other's time: both results were just stored, and the cache holds one of them.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Slots per cache: 64 KiB.
const SLOTS: usize = 4096;

/// A fingerprint is never 0: 0 marks a slot being written.
const WRITING: u64 = 0;

#[derive(Debug)]
pub(super) struct Lately {
    slots: Box<[Slot]>,
}

#[derive(Debug, Default)]
struct Slot {
    fingerprint: AtomicU64,
    stored_ms: AtomicU64,
}

/// Which slot a key has, and the fingerprint of one result stored under it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    slot: usize,
    fingerprint: u64,
}

impl Stamp {
    pub(super) fn of(key: &str, ttl: Duration, payload: &[u8]) -> Self {
        // SipHash with fixed keys: the same stamp in every process run, and well spread.
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let slot = hasher.finish() as usize % SLOTS;
        ttl.hash(&mut hasher);
        payload.hash(&mut hasher);
        let fingerprint = hasher.finish().max(1);
        Self { slot, fingerprint }
    }
}

impl Lately {
    pub(super) fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    /// Whether the result `stamp` stands for was stored less than `within` before `now_ms`
    /// (milliseconds since the Unix epoch).
    pub(super) fn stored_within(&self, stamp: Stamp, now_ms: u64, within: Duration) -> bool {
        let slot = &self.slots[stamp.slot];
        if slot.fingerprint.load(Ordering::Acquire) != stamp.fingerprint {
            return false;
        }
        let at = slot.stored_ms.load(Ordering::Acquire);
        if slot.fingerprint.load(Ordering::Acquire) != stamp.fingerprint {
            return false;
        }
        now_ms
            .checked_sub(at)
            .is_some_and(|since| u128::from(since) < within.as_millis())
    }

    /// Notes that the result `stamp` stands for was stored at `at_ms`.
    pub(super) fn note(&self, stamp: Stamp, at_ms: u64) {
        let slot = &self.slots[stamp.slot];
        slot.fingerprint.store(WRITING, Ordering::Release);
        slot.stored_ms.store(at_ms, Ordering::Release);
        slot.fingerprint.store(stamp.fingerprint, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_found_only_within_its_window() {
        let lately = Lately::new();
        let second = Duration::from_secs(1);
        let stamp = Stamp::of("k", second * 100, b"1");
        assert!(!lately.stored_within(stamp, 10_000, second));
        lately.note(stamp, 10_000);
        assert!(lately.stored_within(stamp, 10_999, second));
        assert!(!lately.stored_within(stamp, 11_000, second));
        // A clock that went back: not within.
        assert!(!lately.stored_within(stamp, 9_999, second));
        // Another payload, another TTL, another key: not the same result.
        assert!(!lately.stored_within(Stamp::of("k", second * 100, b"2"), 10_001, second));
        assert!(!lately.stored_within(Stamp::of("k", second * 99, b"1"), 10_001, second));
        assert!(!lately.stored_within(Stamp::of("j", second * 100, b"1"), 10_001, second));
        // A new result under the key takes the slot.
        lately.note(Stamp::of("k", second * 100, b"2"), 10_500);
        assert!(!lately.stored_within(stamp, 10_600, second));
    }
}
