//! What the memory cache stored lately, so that storing the same result again soon costs two
//! hashes and three loads instead of a lookup in the cache itself.
//!
//! A key hashes to a set of two slots; a slot holds the key's hash, a fingerprint of the key,
//! the TTL and the payload, and when they were stored. Lossy by design: a slot taken over by
//! another key only means that a result is stored again. Two stores of one key at once may
//! leave either's fingerprint with the other's time: both results were just stored, and the
//! cache holds one of them.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A fingerprint is never 0: 0 marks a slot being written.
const WRITING: u64 = 0;

/// Each key may sit in either slot of its set.
const WAYS: usize = 2;

#[derive(Debug)]
pub(super) struct Lately {
    slots: Box<[Slot]>,
    sets: usize,
}

#[derive(Debug, Default)]
struct Slot {
    /// The hash of the key this slot last held.
    key: AtomicU64,
    fingerprint: AtomicU64,
    stored_ms: AtomicU64,
}

/// A key's hash, and the fingerprint of one result stored under it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    key: u64,
    fingerprint: u64,
}

impl Stamp {
    pub(super) fn of(key: &str, ttl: Duration, payload: &[u8]) -> Self {
        // SipHash with fixed keys: well spread, and no state to keep.
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let key = hasher.finish();
        ttl.hash(&mut hasher);
        payload.hash(&mut hasher);
        let fingerprint = hasher.finish().max(1);
        Self { key, fingerprint }
    }
}

impl Lately {
    /// Room for about `entries` keys: a set of two slots per two keys (at least 256 sets, at
    /// most 8,192: 384 KiB).
    pub(super) fn new(entries: u64) -> Self {
        let sets = usize::try_from(entries / 2)
            .unwrap_or(usize::MAX)
            .clamp(256, 8192)
            .next_power_of_two();
        Self {
            slots: (0..sets * WAYS).map(|_| Slot::default()).collect(),
            sets,
        }
    }

    fn set(&self, stamp: Stamp) -> &[Slot] {
        let first = (stamp.key as usize & (self.sets - 1)) * WAYS;
        &self.slots[first..first + WAYS]
    }

    /// Whether the result `stamp` stands for was stored less than `within` before `now_ms`
    /// (milliseconds since the Unix epoch).
    pub(super) fn stored_within(&self, stamp: Stamp, now_ms: u64, within: Duration) -> bool {
        self.set(stamp).iter().any(|slot| {
            if slot.fingerprint.load(Ordering::Acquire) != stamp.fingerprint {
                return false;
            }
            let at = slot.stored_ms.load(Ordering::Acquire);
            slot.fingerprint.load(Ordering::Acquire) == stamp.fingerprint
                && now_ms
                    .checked_sub(at)
                    .is_some_and(|since| u128::from(since) < within.as_millis())
        })
    }

    /// Notes that the result `stamp` stands for was stored at `at_ms`: in the slot its key
    /// had, else in the one written longest ago.
    pub(super) fn note(&self, stamp: Stamp, at_ms: u64) {
        let set = self.set(stamp);
        let slot = set
            .iter()
            .find(|slot| slot.key.load(Ordering::Relaxed) == stamp.key)
            .or_else(|| {
                set.iter()
                    .min_by_key(|slot| slot.stored_ms.load(Ordering::Relaxed))
            })
            .unwrap_or(&set[0]);
        slot.fingerprint.store(WRITING, Ordering::Release);
        slot.key.store(stamp.key, Ordering::Release);
        slot.stored_ms.store(at_ms, Ordering::Release);
        slot.fingerprint.store(stamp.fingerprint, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_found_only_within_its_window() {
        let lately = Lately::new(1000);
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
        // A new result under the key takes its slot.
        lately.note(Stamp::of("k", second * 100, b"2"), 10_500);
        assert!(!lately.stored_within(stamp, 10_600, second));
        assert!(lately.stored_within(Stamp::of("k", second * 100, b"2"), 10_600, second));
    }

    #[test]
    fn two_keys_of_one_set_are_both_kept() {
        let lately = Lately::new(0);
        let ttl = Duration::from_secs(100);
        let window = Duration::from_secs(1);
        // Find two keys of one set.
        let first = Stamp::of("key-0", ttl, b"v");
        let same_set = |stamp: Stamp| stamp.key as usize & (lately.sets - 1);
        let second = (1..)
            .map(|n| Stamp::of(&format!("key-{n}"), ttl, b"v"))
            .find(|stamp| same_set(*stamp) == same_set(first))
            .expect("a key of the same set");
        lately.note(first, 1_000);
        lately.note(second, 1_001);
        assert!(lately.stored_within(first, 1_002, window));
        assert!(lately.stored_within(second, 1_002, window));
    }
}
