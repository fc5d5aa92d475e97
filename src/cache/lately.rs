//! What the pool stored in its cache lately, so that a cached read answered with the result it
//! stored a moment ago costs a hash and a few loads instead of serialising the result and
//! storing it again.
//!
//! A key hashes to a set of four slots, one cache line; a slot holds part of the key's hash, a
//! fingerprint of the key, the TTL and the result, and when they were stored. Lossy by design:
//! a slot taken over by another key only means that a result is stored again. Two stores of
//! one key at once may leave either's fingerprint with the other's time: both results were
//! just stored, and the cache holds one of them.

use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::breaker::{SystemClock, coarse_nanos};
use crate::route::Route;

/// A fingerprint is never 0: 0 marks a slot being written.
const WRITING: u64 = 0;

/// Each key may sit in any slot of its set.
const WAYS: usize = 4;

/// A result stored less than this part of its time to live before is not stored again.
const RESTORE_AFTER_TTL_PART: u32 = 100;

/// Sets when the cache's size is not known: 16,384 slots, 256 KiB.
const DEFAULT_SETS: u64 = 4096;

/// The pool's note of its recent stores, made on the first cached read: a pool that caches
/// nothing pays nothing for it.
#[derive(Debug)]
pub(crate) struct RecentStores {
    table: OnceLock<Lately>,
    /// About how many values the cache holds, if it says.
    entries: Option<u64>,
    /// The coarse clock's tick and the rounding to milliseconds, taken off every window so
    /// that a window is never exceeded.
    slack_ms: u64,
}

impl RecentStores {
    /// A note sized for a cache of about `entries` values (unknown: 16,384 slots).
    pub(crate) fn new(entries: Option<u64>) -> Self {
        Self {
            table: OnceLock::new(),
            entries,
            slack_ms: millis_up(SystemClock::resolution()) + 1,
        }
    }

    fn table(&self) -> &Lately {
        self.table
            .get_or_init(|| Lately::new(self.entries.map_or(DEFAULT_SETS, |entries| entries / 2)))
    }

    /// The coarse clock (a few nanoseconds a reading), in milliseconds.
    fn now_ms() -> u64 {
        coarse_nanos() / 1_000_000
    }

    /// Whether the result `stamp` stands for was stored less than a hundredth of `ttl` ago.
    /// Never for a TTL whose hundredth is not longer than the clock's tick and a millisecond.
    pub(crate) fn stored_lately(&self, stamp: Stamp, ttl: Duration) -> bool {
        let window = u64::try_from((ttl / RESTORE_AFTER_TTL_PART).as_millis()).unwrap_or(u64::MAX);
        let within = window.saturating_sub(self.slack_ms);
        within > 0 && self.table().stored_within(stamp, Self::now_ms(), within)
    }

    /// Notes that the result `stamp` stands for was stored now.
    pub(crate) fn note(&self, stamp: Stamp) {
        self.table().note(stamp, Self::now_ms());
    }
}

/// `duration` in whole milliseconds, rounded up.
fn millis_up(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct Lately {
    sets: Box<[Set]>,
}

/// One cache line: four slots.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Set([Slot; WAYS]);

#[derive(Debug, Default)]
struct Slot {
    fingerprint: AtomicU64,
    /// The top half of the key's hash, then when it was stored: the note's clock in
    /// milliseconds, wrapping after 49 days (a window is at most half that).
    tag: AtomicU64,
}

/// A key's hash, and the fingerprint of one result stored under it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    key: u64,
    fingerprint: u64,
}

/// Feeds what it is given to a hasher.
struct HashWriter<'h, H>(&'h mut H);

impl<H: Hasher> io::Write for HashWriter<'_, H> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.write(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stamp {
    /// The stamp of `value` cached under the caller's `key`, scoped by `route` and the
    /// result's `type_name` as the stored key is, for `ttl`. The fingerprint covers the value
    /// as JSON, the form it is stored in, fed to the hash as it is written (no buffer); `None`
    /// when the value does not serialize.
    pub(crate) fn of<T: Serialize>(
        route: Route,
        type_name: &str,
        key: &str,
        ttl: Duration,
        value: &T,
    ) -> Option<Self> {
        // foldhash with a fixed seed: well spread, fast on short input, no state to keep.
        let mut hasher = foldhash::quality::FixedState::default().build_hasher();
        route.hash(&mut hasher);
        type_name.hash(&mut hasher);
        key.hash(&mut hasher);
        let key = hasher.finish();
        ttl.hash(&mut hasher);
        serde_json::to_writer(HashWriter(&mut hasher), value).ok()?;
        let fingerprint = hasher.finish().max(1);
        Some(Self { key, fingerprint })
    }
}

impl Lately {
    /// About `sets` sets of four slots: a power of two, at least 64, at most 8,192 (512 KiB).
    fn new(sets: u64) -> Self {
        let sets = usize::try_from(sets)
            .unwrap_or(usize::MAX)
            .clamp(64, 8192)
            .next_power_of_two();
        Self {
            sets: (0..sets).map(|_| Set::default()).collect(),
        }
    }

    fn set(&self, stamp: Stamp) -> &[Slot; WAYS] {
        &self.sets[stamp.key as usize & (self.sets.len() - 1)].0
    }

    /// Whether the result `stamp` stands for was stored less than `within` before `now` (both
    /// in milliseconds).
    fn stored_within(&self, stamp: Stamp, now: u64, within: u64) -> bool {
        let within = within.min(u64::from(u32::MAX / 2));
        self.set(stamp).iter().any(|slot| {
            if slot.fingerprint.load(Ordering::Acquire) != stamp.fingerprint {
                return false;
            }
            let tag = slot.tag.load(Ordering::Acquire);
            let since = u64::from((now as u32).wrapping_sub(tag as u32));
            slot.fingerprint.load(Ordering::Acquire) == stamp.fingerprint
                && tag >> 32 == stamp.key >> 32
                && since < within
        })
    }

    /// Notes that the result `stamp` stands for was stored at `at` (milliseconds): in the slot
    /// its key had, else in the one written longest ago.
    fn note(&self, stamp: Stamp, at: u64) {
        let set = self.set(stamp);
        let key_of = |slot: &Slot| slot.tag.load(Ordering::Relaxed) >> 32;
        let age = |slot: &Slot| (at as u32).wrapping_sub(slot.tag.load(Ordering::Relaxed) as u32);
        let slot = set
            .iter()
            .find(|slot| key_of(slot) == stamp.key >> 32)
            .or_else(|| set.iter().max_by_key(|slot| age(slot)))
            .unwrap_or(&set[0]);
        slot.fingerprint.store(WRITING, Ordering::Release);
        slot.tag.store(
            (stamp.key >> 32 << 32) | (at & u64::from(u32::MAX)),
            Ordering::Release,
        );
        slot.fingerprint.store(stamp.fingerprint, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1000;

    fn stamp(key: &str, ttl: Duration, value: &str) -> Stamp {
        Stamp::of(Route::Read, "T", key, ttl, &value).unwrap()
    }

    #[test]
    fn a_stamp_is_found_only_within_its_window() {
        let lately = Lately::new(500);
        let ttl = Duration::from_secs(100);
        let first = stamp("k", ttl, "1");
        assert!(!lately.stored_within(first, 10 * SECOND, SECOND));
        lately.note(first, 10 * SECOND);
        assert!(lately.stored_within(first, 11 * SECOND - 1, SECOND));
        assert!(!lately.stored_within(first, 11 * SECOND, SECOND));
        // A clock that went back: not within.
        assert!(!lately.stored_within(first, 10 * SECOND - 1, SECOND));
        // Another result, another TTL, another key, route or type: not the same result.
        let at = 10 * SECOND + 1;
        assert!(!lately.stored_within(stamp("k", ttl, "2"), at, SECOND));
        assert!(!lately.stored_within(stamp("k", ttl * 2, "1"), at, SECOND));
        assert!(!lately.stored_within(stamp("j", ttl, "1"), at, SECOND));
        let auth = Stamp::of(Route::Auth, "T", "k", ttl, &"1").unwrap();
        assert!(!lately.stored_within(auth, at, SECOND));
        let other_type = Stamp::of(Route::Read, "U", "k", ttl, &"1").unwrap();
        assert!(!lately.stored_within(other_type, at, SECOND));
        // A new result under the key takes its slot.
        lately.note(stamp("k", ttl, "2"), 10 * SECOND + SECOND / 2);
        assert!(!lately.stored_within(first, 10 * SECOND + SECOND / 2, SECOND));
        assert!(lately.stored_within(stamp("k", ttl, "2"), 11 * SECOND, SECOND));
    }

    #[test]
    fn the_clock_may_wrap_its_32_bits() {
        let lately = Lately::new(64);
        let first = stamp("k", Duration::from_secs(100), "1");
        let at = u64::from(u32::MAX) - 10;
        lately.note(first, at);
        assert!(lately.stored_within(first, at + 20, SECOND));
        assert!(!lately.stored_within(first, at + SECOND, SECOND));
    }

    #[test]
    fn the_fingerprint_is_of_the_whole_value() {
        let ttl = Duration::from_secs(100);
        let of = |value: &(Vec<&str>, Option<i64>)| {
            Stamp::of(Route::Read, "T", "k", ttl, value)
                .unwrap()
                .fingerprint
        };
        let value = (vec!["ab", "c"], Some(1));
        assert_eq!(of(&value), of(&value.clone()));
        assert_ne!(of(&value), of(&(vec!["a", "bc"], Some(1))));
        assert_ne!(of(&value), of(&(vec!["ab", "c"], None)));
        assert_ne!(of(&value), of(&(vec!["ab", "c"], Some(2))));
    }

    #[test]
    fn a_value_that_does_not_serialize_has_no_stamp() {
        // JSON object keys must be strings.
        let map = std::collections::BTreeMap::from([((1, 2), "pair")]);
        assert!(Stamp::of(Route::Read, "T", "k", Duration::from_secs(1), &map).is_none());
    }

    #[test]
    fn four_keys_of_one_set_are_kept_and_a_fifth_replaces_the_oldest() {
        let lately = Lately::new(64);
        let ttl = Duration::from_secs(100);
        let set_of = |stamp: &Stamp| stamp.key as usize & (lately.sets.len() - 1);
        let first = stamp("key-0", ttl, "v");
        let same: Vec<Stamp> = (1..)
            .map(|n| stamp(&format!("key-{n}"), ttl, "v"))
            .filter(|stamp| set_of(stamp) == set_of(&first))
            .take(4)
            .collect();
        lately.note(first, 1_000);
        for (n, stamp) in same[..3].iter().enumerate() {
            lately.note(*stamp, 1_001 + n as u64);
        }
        for stamp in std::iter::once(&first).chain(&same[..3]) {
            assert!(lately.stored_within(*stamp, 1_010, SECOND));
        }
        lately.note(same[3], 1_010);
        assert!(
            !lately.stored_within(first, 1_011, SECOND),
            "the oldest made room"
        );
        for stamp in &same {
            assert!(lately.stored_within(*stamp, 1_011, SECOND));
        }
    }

    #[test]
    fn a_ttl_whose_hundredth_is_within_the_slack_is_always_stored() {
        let recent = RecentStores::new(Some(100));
        let ttl = Duration::from_millis(recent.slack_ms * u64::from(RESTORE_AFTER_TTL_PART));
        let stamp = stamp("k", ttl, "1");
        recent.note(stamp);
        assert!(!recent.stored_lately(stamp, ttl));
        // A long TTL: the store just noted counts.
        let long = Duration::from_secs(3600);
        let long_stamp = self::stamp("k", long, "1");
        recent.note(long_stamp);
        assert!(recent.stored_lately(long_stamp, long));
    }
}
